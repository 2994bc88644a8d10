r"""VGG16 transfer learning, way 3: fine-tune block5 (and the head) of a vgg16_frozen run.

  python -m fer.main --config=configs/vgg16_frozen.py --workdir=runs/vgg16_frozen   # first
  python -m fer.main --config=configs/vgg16_finetune.py --workdir=runs/vgg16_finetune \
      --config.init_from=runs/vgg16_frozen
  # Smoke test (synthetic faces, no weights file): the frozen run, then fine-tuning
  python -m fer.main --config=configs/vgg16_frozen.py:runlocal --workdir=/tmp/vgg16_frozen
  python -m fer.main --config=configs/vgg16_finetune.py:runlocal --workdir=/tmp/vgg16_finetune

`config.init_from` (default runs/vgg16_frozen, /tmp/vgg16_frozen with runlocal) is the frozen
run's workdir: its best checkpoint gives the base and the trained head. `optim.freeze` keeps
blocks 1-4 frozen (unfreeze more with e.g. --config.optim.freeze='^block[1-3]_'); every
unfrozen base layer trains at optim.learning_rate times the `^block` factor of optim.lr_scales
(0.1), the head at optim.learning_rate. Augmentation as configs/vgg16_frozen.py. Expected
accuracy and time: the README's VGG16 table, filled from real runs.
"""

from configs import common
from configs import vgg16_frozen


def get_config(arg=None):
  common.check_arg(arg, "configs/vgg16_finetune.py")
  c = vgg16_frozen.get_config(arg)
  c.init_from = "/tmp/vgg16_frozen" if arg == "runlocal" else "runs/vgg16_frozen"
  c.optim.freeze = "^block[1-4]_"
  c.optim.lr_scales = (("^block", 0.1),)  # the unfrozen base layers; frozen ones stay frozen
  c.optim.learning_rate = 1e-4
  if arg != "runlocal":
    c.train.num_epochs = 20
    c.train.early_stopping_epochs = 6
  return c
