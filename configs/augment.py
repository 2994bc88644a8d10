r"""The tuned CNN with data augmentation and dropout (the study's second experiment).

  python -m fer.main --config=configs/augment.py --workdir=runs/augment
  python -m fer.main --config=configs/augment.py:runlocal --workdir=/tmp/augment

Augmentation mirrors the original Keras ImageDataGenerator (flip, rotation, shift, zoom).
"""

from configs import cnn


def get_config(arg=None):
  c = cnn.get_config(arg)
  c.augment.flip = True
  c.augment.rotate_degrees = 10.0
  c.augment.shift_fraction = 0.1
  c.augment.zoom_fraction = 0.1
  c.model.dropout = 0.4
  c.model.conv_dropout = 0.1
  if arg != "runlocal":
    c.train.num_epochs = 60
    c.train.early_stopping_epochs = 12
  return c
