"""A ResNet for 48x48 faces: another architecture beside the VGG-style CNN, for ensembles.

Used as a pure function: `model.apply(variables, images, train=False)`. Input is uint8 or float
images [N, H, W, 1] in 0..255, scaled to [0, 1] inside; output: logits [N, 7].

A 3x3 stem convolution, then one stage per entry of `stage_features`, each of `blocks_per_stage`
basic residual blocks (two 3x3 conv + batch norm layers; a 1x1 conv + batch norm projects the
shortcut where the width changes). Stages after the first start with a 2x2 max pool instead of a
strided convolution, so that every convolution is the stride-1 `layers.Conv2D` with its fast CPU
lowerings (`conv_impl`). Global average pooling, dropout and optional dense layers lead to the
head, so any input size works (ten-crop views included).

The default widths (64, 128, 256, 512) with two blocks per stage are the ResNet-18 layout; with
the four pools of the VGG-style network replaced by three it runs at 48, 24, 12 and 6 pixels.
Architecture diversity is what the published FER2013 ensembles past 75% relied on (VGG,
ResNet and Inception members, Pramerdorfer and Kampel 2016).
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fer.datasets.fer2013 import NUM_CLASSES
from fer.models import layers


class ResidualBlock(nn.Module):
  """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), widths `features`."""
  features: int
  dtype: jnp.dtype = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = lambda f, k, name: layers.Conv2D(  # pylint: disable=unnecessary-lambda-assignment
        f, (k, k), use_bias=False, impl=self.conv_impl, dtype=self.dtype, name=name)
    bn = lambda name: layers.BatchNorm(  # pylint: disable=unnecessary-lambda-assignment
        use_running_average=not train, momentum=0.9, dtype=self.dtype, name=name)
    y = nn.relu(bn("bn1")(conv(self.features, 3, "conv1")(x)))
    y = bn("bn2")(conv(self.features, 3, "conv2")(y))
    if x.shape[-1] != self.features:
      x = bn("proj_bn")(conv(self.features, 1, "proj")(x))
    return nn.relu(y + x)


class ResNet(nn.Module):
  stage_features: Sequence[int] = (64, 128, 256, 512)
  blocks_per_stage: int = 2
  dense_features: Sequence[int] = ()
  dropout: float = 0.0
  num_classes: int = NUM_CLASSES
  dtype: jnp.dtype = jnp.float32
  conv_impl: str = "xla"  # layers.CONV_IMPLS
  pool_impl: str = "reshape"  # xla (nn.max_pool) | reshape (layers.max_pool_2x2)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype) / 255.0
    x = layers.Conv2D(self.stage_features[0], (3, 3), use_bias=False, impl=self.conv_impl,
                      dtype=self.dtype, name="stem")(x)
    x = nn.relu(layers.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                                 name="stem_bn")(x))
    for i, features in enumerate(self.stage_features):
      if i:
        x = layers.max_pool(x, self.pool_impl)
      for b in range(self.blocks_per_stage):
        x = ResidualBlock(features, self.dtype, self.conv_impl,
                          name=f"stage{i + 1}_block{b + 1}")(x, train)
    x = x.mean(axis=(1, 2))
    for i, features in enumerate(self.dense_features):
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = nn.relu(nn.Dense(features, dtype=self.dtype, name=f"dense{i + 1}")(x))
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)
