r"""The tuned CNN with data augmentation and dropout (the study's second experiment).

  python -m fer.main --config=configs/augment.py --workdir=runs/augment
  python -m fer.main --config=configs/augment.py:runlocal --workdir=/tmp/augment

Augmentation mirrors the original Keras ImageDataGenerator (flip, rotation, shift, zoom); the
network and optimiser are configs/cnn.py's (batch norm, AdamW, cosine schedule). Dropout 0.2
on the dense layers: with batch norm, the earlier 0.4 dense + 0.1 conv dropout underfit (train
accuracy 57% after 45 epochs). Measured runs (commands and machines): the README's results
table and experiments/results/augment_*/.
"""

from configs import cnn
from configs import common


def get_config(arg=None):
  common.check_arg(arg, "configs/augment.py")
  c = cnn.get_config(arg)
  common.apply_study_augmentation(c)
  c.model.dropout = 0.2
  c.model.conv_dropout = 0.0
  if arg != "runlocal":
    c.train.num_epochs = 50  # 51 min on the 2-core CPU (experiments/results/augment_standard_s0)
    c.train.early_stopping_epochs = 0  # the cosine schedule decides the end; best by val
  return c
