r"""The original study's tuned CNN: 4 conv layers, 3 dense layers, softmax output, no augmentation.

  python -m fer.main --config=configs/cnn.py --workdir=runs/cnn
  python -m fer.main --config=configs/cnn.py:runlocal --workdir=/tmp/cnn   # seconds, synthetic

Expected accuracy and time: see the README's results table (filled from real runs).
"""

from configs import common


def get_config(arg=None):
  c = common.base()
  c.train.num_epochs = 30
  c.train.early_stopping_epochs = 8
  if arg == "runlocal":
    common.apply_runlocal(c)
  return c
