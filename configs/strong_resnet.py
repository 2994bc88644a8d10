r"""A ResNet beside configs/strong.py's VGG-style network: the same data, augmentation, optimiser
and ten-crop test averaging, another architecture, so that ensembles of both kinds can be
tried (the published FER2013 ensembles past 75% mixed VGG, ResNet and Inception networks).
Trained on FER2013's Training split only; val picks the best epoch; test is read once.

  python -m fer.main --config=configs/strong_resnet.py --config.seed=0 --workdir=runs/strong_resnet_s0
  python -m fer.main --config=configs/strong_resnet.py:runlocal --workdir=/tmp/resnet   # seconds
  python -m fer.ensemble --workdirs=runs/strong_s0,runs/strong_resnet_s0 --out=runs/mixed_ensemble

The model (fer/models/resnet.py): a 3x3 stem, four stages of two basic residual blocks with
64-128-256-512 filters (the ResNet-18 layout) at 48, 24, 12 and 6 pixels (max pooling between
stages), global average pooling, dropout and the 7-way head: 11.2 M parameters.
At half width (`--config.model.conv_features="(32,64,128,256)"`, 2.8 M parameters) and 50
epochs (`--config.train.num_epochs=50`) it trained on the 2-core CPU in 112 minutes (222-233
images/s): val 69.0%, test 70.9% ten-crop (results row strong_resnet_half_e50_s0; seed 1: val 69.0%,
test 71.0%), level with configs/strong_half.py's 100 epochs in about the same time. At half width
and the default 100 epochs (about 4 hours here, resumed across two sessions) it reached val
71.0%, test 72.9% (row strong_resnet_half_s0), the best single network on this CPU so far;
seed 1 val 70.8%, test 72.5% (row strong_resnet_half_s1): 72.7% +- 0.3% over two seeds.
Not yet trained to the end at full width: its first 5 epochs on the CPU reached val 56.9%
(experiments/results/probes/README.md) and its first 74 on a shared H100 val 69.2% without TTA,
ahead of configs/strong.py's seeds at that epoch (experiments/results/selection_gpu/README.md); its
optimiser and schedule are configs/strong.py's and its dropout (0.3, before the head) a guess,
none of them tuned; the README's results table gets its rows when it is run.
Expected time for the default 100 epochs: on the 2-core CPU it trains at 0.42x the speed of
configs/strong.py (65 against 154 images/s, one after the other beside a training run at nice
19: `python experiments/benchmark_train.py --config=configs/strong_resnet.py --max_images=1920
--epochs=2`, then the same with configs/strong.py; peak memory 4.3 against 3.1 GB), so about 6
minutes per epoch and 10 hours for 100 epochs on a quiet CPU: a GPU config. On one H100 (jax
0.11.2) it took 80 s for its first epoch (compiling) and then 3.5 s per epoch (8,200 images/s)
while the GPU ran one other training run beside it, 5.5 s while it ran three (session 12's
strong_resnet_s0 log): about 6-7 minutes for 100 epochs sharing the GPU that way, against 1.6 s
per epoch for the VGG-style network beside it.
"""

from configs import common
from configs import strong


def get_config(arg=None):
  common.check_arg(arg, "configs/strong_resnet.py")
  c = strong.get_config()
  c.model.name = "resnet"
  c.model.conv_features = (64, 128, 256, 512)
  c.model.blocks_per_stage = 2
  c.model.dense_features = ()
  c.model.dropout = 0.3
  if arg == "runlocal":
    common.apply_runlocal(c)
    c.model.conv_features = (8, 16, 16, 32)
    c.model.blocks_per_stage = 1
  return c
