r"""VGG16 transfer learning, way 2: frozen base plus head, trained end-to-end on augmented images.

  python -m fer.main --config=configs/vgg16_frozen.py --workdir=runs/vgg16_frozen
  python -m fer.main --config=configs/vgg16_frozen.py --workdir=runs/vgg16_frozen_random \
      --config.pretrained.weights=none      # no weights file: seeded random base
  # Smoke test (synthetic faces, no weights file):
  python -m fer.main --config=configs/vgg16_frozen.py:runlocal --workdir=/tmp/vgg16_frozen

Every image goes through the base in every step, so the augmentation of configs/augment.py
(flip, rotation, shift, zoom) can be used. The base is frozen by `optim.freeze='^block'`: its
parameters get no update and no optimizer state (tests/vgg16_experiments_test.py checks that
they stay bit-identical). The original Keras study reached 39.3% test accuracy end-to-end.
Expected accuracy and time: the README's VGG16 table, filled from real runs. This run's
workdir is the starting point of configs/vgg16_finetune.py.
"""

from configs import common
from configs import vgg16_common


def get_config(arg=None):
  common.check_arg(arg, "configs/vgg16_frozen.py")
  c = vgg16_common.base(arg)
  c.optim.freeze = "^block"  # the whole conv base
  common.apply_study_augmentation(c)
  if arg != "runlocal":
    c.train.num_epochs = 30
    c.train.early_stopping_epochs = 8
  return c
