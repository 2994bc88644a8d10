r"""The tuned CNN with data augmentation and dropout (the study's second experiment).

  python -m fer.main --config=configs/augment.py --workdir=runs/augment
  python -m fer.main --config=configs/augment.py:runlocal --workdir=/tmp/augment

Augmentation mirrors the original Keras ImageDataGenerator (flip, rotation, shift, zoom).
Measured with --config.train.num_epochs=30 (standard protocol, 2-core AMD EPYC, mostly shared
with other jobs): 58.3% val, 60.1% test (PrivateTest), val still rising at epoch 30, 54 min of
training (about 500 images/s on the quiet machine); see experiments/results/augment_standard/.
"""

from configs import cnn
from configs import common


def get_config(arg=None):
  c = cnn.get_config(arg)
  common.apply_study_augmentation(c)
  c.model.dropout = 0.4
  c.model.conv_dropout = 0.1
  if arg != "runlocal":
    c.train.num_epochs = 60
    c.train.early_stopping_epochs = 12
  return c
