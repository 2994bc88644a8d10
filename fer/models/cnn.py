"""The searchable CNN: conv blocks (filters, kernel, pooling, batch norm, dropout) and a dense stack.

Used as a pure function: `model.apply(variables, images, train=False)`. Input is uint8 or float
images [N, 48, 48, 1] in 0..255; they are scaled to [0, 1] inside the model. Output: logits [N, 7].

`conv_impl` and `pool_impl` pick the lowering of the convolutions and 2x2 max pools (see
fer/models/layers.py); they change speed, not the parameter tree or, beyond float rounding, the
results. With pool_impl="reshape" a max pool is applied before the ReLU of its block (the same
function, since ReLU is monotone, with the same gradients) so the ReLU runs on a quarter of the
pixels.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fer.datasets.fer2013 import NUM_CLASSES
from fer.models import layers


class CNN(nn.Module):
  conv_features: Sequence[int] = (32, 64, 128, 256)
  convs_per_block: int = 1
  kernel_size: int = 3
  pool: str = "max"
  batch_norm: bool = False
  conv_dropout: float = 0.0
  dense_features: Sequence[int] = (512, 256, 128)
  dropout: float = 0.0
  num_classes: int = NUM_CLASSES
  dtype: jnp.dtype = jnp.float32
  conv_impl: str = "xla"  # layers.CONV_IMPLS
  pool_impl: str = "reshape"  # xla (nn.max_pool) | reshape (layers.max_pool_2x2, cheap gradient)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype) / 255.0
    fused_pool = self.pool == "max" and self.pool_impl == "reshape"
    for i, features in enumerate(self.conv_features):
      for j in range(self.convs_per_block):
        name = f"conv{i + 1}" if self.convs_per_block == 1 else f"conv{i + 1}_{j + 1}"
        last = j == self.convs_per_block - 1
        # Without batch norm the block's conv, pool and ReLU are one op (fused where it pays).
        pool_in_conv = fused_pool and last and not self.batch_norm
        x = layers.Conv2D(features, (self.kernel_size,) * 2, use_bias=not self.batch_norm,
                          impl=self.conv_impl, dtype=self.dtype, pool_relu=pool_in_conv,
                          name=name)(x)
        if self.batch_norm:
          x = layers.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                               name=f"{name}_bn")(x)
        if not (fused_pool and last):
          x = nn.relu(x)
      if self.pool == "max":
        if not pool_in_conv:
          x = layers.max_pool(x, self.pool_impl, relu=fused_pool)
      elif self.pool == "avg":
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      elif self.pool != "none":
        raise ValueError(f"model.pool={self.pool!r}: expected max, avg or none")
      if self.conv_dropout:
        x = nn.Dropout(self.conv_dropout, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    for i, features in enumerate(self.dense_features):
      x = nn.Dense(features, dtype=self.dtype, name=f"dense{i + 1}")(x)
      x = nn.relu(x)
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)
