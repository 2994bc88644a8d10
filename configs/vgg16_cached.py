r"""VGG16 transfer learning, way 1: the frozen base runs once, a dense head trains on its features.

  python -m fer.main --config=configs/vgg16_cached.py --workdir=runs/vgg16_cached
  python -m fer.main --config=configs/vgg16_cached.py --workdir=runs/vgg16_cached_random \
      --config.pretrained.weights=none      # no weights file: seeded random base
  # Smoke test (synthetic faces, no weights file):
  python -m fer.main --config=configs/vgg16_cached.py:runlocal --workdir=/tmp/vgg16_cached

fer/features.py runs the block5 base over train/val/test once and keeps the float16 features in
`<workdir>/features/<key>/` (the key hashes the weights, model.preprocess, model.input_size,
model.dtype and the data; a rerun reuses them, a change computes new ones). The head
(model.head_*) then trains on them in seconds per epoch; no augmentation (the features are fixed).
The original Keras study reached 43.9% test accuracy this way. Expected accuracy and time: the
README's VGG16 table, filled from real runs.
"""

from configs import common
from configs import vgg16_common


def get_config(arg=None):
  common.check_arg(arg, "configs/vgg16_cached.py")
  c = vgg16_common.base(arg)
  c.model.name = "vgg16_head"  # the head alone, on fer.features.load_or_compute's features
  if arg == "runlocal":  # the head is cheap once the features exist: small batches, more epochs
    c.input.batch_size = 8
    c.model.head_dropout = 0.0
    c.train.num_epochs = 12
    c.train.steps_per_dispatch = 7
  else:
    c.train.num_epochs = 50
    c.train.early_stopping_epochs = 10
  return c
