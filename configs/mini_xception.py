r"""mini-Xception (Arriaga, Valdenegro-Toro and Ploeger 2017, "Real-time Convolutional Neural
Networks for Emotion and Gender Classification": 66% on FER2013 with about 60,000 parameters),
and the example of a model of your own: the flax module below is not part of fer; this config
names it, `model.name = "configs.mini_xception:MiniXception"`, and fer.models.build_model
imports it and builds it with `model.kwargs` (fer.models.plugin_model says what the module must
take and return). Copy this file, change the module, and train it like any built-in model:

  python -m fer.main --config=configs/mini_xception.py --workdir=runs/mini_xception
  python -m fer.main --config=configs/mini_xception.py:runlocal --workdir=/tmp/mx   # seconds
  python -m fer.main --config=configs/mini_xception.py --config.model.kwargs.widths='(32,64,128,256)' ...

Everything else works on it as on the built-in models (checkpoints, TTA, fer.ensemble,
fer.distill, fer.predict, fer.explain, fer.export), wherever `configs.mini_xception` is
importable: run from the repository's root (or put that folder on PYTHONPATH).

The network as in the authors' Keras code (oarriaga/face_classification, `mini_XCEPTION`): two
3x3 convolutions of 8 filters without padding, then four modules of 16, 32, 64 and 128 filters,
each two 3x3 depthwise-separable convolutions with batch norm and a 3x3 stride-2 max pool, added
to a strided 1x1 convolution of the module's input; a 3x3 convolution to the 7 classes and global
average pooling. They trained on 64x64 inputs with an L2 penalty of 0.01 on the kernels, Adam and
early stopping; here the inputs are FER2013's 48x48 faces and the training is configs/augment.py's
(the same augmentation as theirs, AdamW with a cosine schedule, the best epoch by val).

Measured (row mini_xception_s0 of the README's results table): on the 2-core AMD EPYC, alone,
about 470 images/s, 56 minutes for the 50 epochs; 63.4% on PrivateTest (val 61.9%), its best
epoch the last; its checkpoint with ten-crop TTA 64.9% (val 63.3%;
experiments/results/tta_mini_xception/). With --config.train.num_epochs=100 (row
mini_xception_e100_s0; 120 minutes alone there): 65.3% (val 64.3%, best epoch 89), with ten-crop
TTA 68.1% (val 65.9%). 56,951 parameters (+ 1,472 batch-norm statistics: the paper's 58,423).
Seed 1 of 100 epochs (row mini_xception_e100_s1, 132 minutes): 63.8% (val 63.8%), with ten-crop
TTA 66.8%; the two seeds 64.5% ± 1.1%, their ensemble 66.6%. The study
(experiments/run_study.py) and the README's summary table train it 100 epochs: runs
mini_xception_e100_s<k>.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from configs import augment
from configs import common
from fer.models import layers  # fast CPU versions of flax layers; any flax code works here


class SeparableConv(nn.Module):
  """A depthwise 3x3 convolution, then a pointwise 1x1 one (Keras SeparableConv2D), no bias.
  layers.DepthwiseConv is nn.Conv(..., feature_group_count=channels), 3-15x faster on a CPU."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.DepthwiseConv((3, 3), dtype=self.dtype, name="depthwise")(x)
    return nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name="pointwise")(x)


class MiniXception(nn.Module):
  """uint8 faces [N, H, W, 1] -> logits [N, num_classes]."""
  widths: Sequence[int] = (16, 32, 64, 128)
  base_width: int = 8
  num_classes: int = 7
  bn_momentum: float = 0.99  # Keras' default, the authors'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda: layers.BatchNorm(  # pylint: disable=unnecessary-lambda-assignment
        use_running_average=not train, momentum=self.bn_momentum, dtype=self.dtype)
    x = x.astype(self.dtype) / 127.5 - 1.0
    for _ in range(2):
      x = nn.relu(bn()(nn.Conv(self.base_width, (3, 3), padding="VALID", use_bias=False,
                               dtype=self.dtype)(x)))
    for width in self.widths:
      residual = bn()(nn.Conv(width, (1, 1), strides=(2, 2), use_bias=False,
                              dtype=self.dtype)(x))
      x = nn.relu(bn()(SeparableConv(width, self.dtype)(x)))
      x = bn()(SeparableConv(width, self.dtype)(x))
      x = layers.max_pool_same(x, (3, 3), (2, 2)) + residual  # = nn.max_pool(..., "SAME")
    x = nn.Conv(self.num_classes, (3, 3), padding="SAME", dtype=self.dtype)(x)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


def get_config(arg=None):
  common.check_arg(arg, "configs/mini_xception.py")
  c = augment.get_config(arg)
  c.model.name = "configs.mini_xception:MiniXception"
  c.model.kwargs.widths = (16, 32, 64, 128)
  c.model.kwargs.base_width = 8
  c.model.dropout = 0.0  # none in mini-Xception (the built-in models' keys are unused here)
  if arg == "runlocal":
    c.model.kwargs.widths = (8, 16)
    c.model.kwargs.base_width = 4
    c.model.kwargs.bn_momentum = 0.9  # running statistics that settle in a few dozen steps
  return c
