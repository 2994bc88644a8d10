"""Keys shared by the three VGG16 transfer-learning configs (vgg16_cached, vgg16_frozen,
vgg16_finetune): the VGG16 model keys, the pretrained weights and a smaller `runlocal`.

The weights (`pretrained.weights`, default keras) are described in fer/pretrained.py; with
`--config.pretrained.weights=none` every config trains from a seeded random initialisation.
"""

from configs import common


def base(arg=None):
  c = common.base()
  c.model.name = "vgg16"
  c.model.head_features = (256,)  # dense layers of the head, then the 7 logits
  c.model.head_dropout = 0.5
  c.model.head_pool = "flatten"  # flatten | avg | max over the block5 features
  c.model.input_size = 48  # images are resized to this before the base (>= 32)
  c.model.preprocess = "keras"  # keras | torch: must match pretrained.weights
  c.pretrained.weights = "keras"
  if arg == "runlocal":
    apply_runlocal(c)
  return c


def apply_runlocal(c):
  """common.apply_runlocal, smaller (the base costs ~0.3 GFLOP per 48x48 image), and without
  pretrained weights: a smoke test on synthetic faces needs no weights file
  (`--config.pretrained.weights=keras` puts them back)."""
  common.apply_runlocal(c)
  c.pretrained.weights = "none"
  c.input.synthetic_train_size = 224  # val and test get 56 each
  c.input.eval_batch_size = 64
  c.train.num_epochs = 1
  c.train.steps_per_dispatch = 1  # one VGG16 step to compile, not several unrolled
  c.train.log_every_steps = 2
  return c
