r"""The fixed reference network of the CPU speed comparisons (issue: CPU training speed).

3x3 convs with 32, 64, 128, 256 filters, each followed by 2x2 max-pooling; dense 512, 256, 128;
7-way softmax; 48x48x1 input: 1.73 M parameters, about 68 MFLOP per image forward.

  python experiments/benchmark_train.py --config=configs/reference_net.py
"""

from configs import common


def get_config(arg=None):
  common.check_arg(arg, "configs/reference_net.py")
  c = common.base()
  c.model.conv_features = (32, 64, 128, 256)
  c.model.dense_features = (512, 256, 128)
  c.model.batch_norm = False
  c.model.dropout = 0.0
  c.train.num_epochs = 1
  if arg == "runlocal":
    common.apply_runlocal(c)
  return c
