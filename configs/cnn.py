r"""The original study's tuned CNN: 4 conv layers, 3 dense layers, softmax output, no augmentation.

  python -m fer.main --config=configs/cnn.py --workdir=runs/cnn
  python -m fer.main --config=configs/cnn.py:runlocal --workdir=/tmp/cnn   # seconds, synthetic

Measured (standard protocol, 2-core AMD EPYC shared with other jobs): 57.1% val, 56.8% test
(PrivateTest), early-stopped after 15 epochs (best epoch 7), 32 min of training; see
experiments/results/cnn_standard/. The architecture search (experiments/results/search/) found
that model.batch_norm=True beats this on val at a 3-epoch budget (0.561 vs 0.503).
"""

from configs import common


def get_config(arg=None):
  c = common.base()
  c.train.num_epochs = 30
  c.train.early_stopping_epochs = 8
  if arg == "runlocal":
    common.apply_runlocal(c)
  return c
