"""The searchable CNN: conv blocks (filters, kernel, pooling, batch norm, dropout) and a dense stack.

Used as a pure function: `model.apply(variables, images, train=False)`. Input is uint8 or float
images [N, 48, 48, 1] in 0..255; they are scaled to [0, 1] inside the model. Output: logits [N, 7].
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fer.datasets.fer2013 import NUM_CLASSES


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

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype) / 255.0
    for i, features in enumerate(self.conv_features):
      for j in range(self.convs_per_block):
        name = f"conv{i + 1}" if self.convs_per_block == 1 else f"conv{i + 1}_{j + 1}"
        x = nn.Conv(features, (self.kernel_size,) * 2, use_bias=not self.batch_norm,
                    dtype=self.dtype, name=name)(x)
        if self.batch_norm:
          x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                           name=f"{name}_bn")(x)
        x = nn.relu(x)
      if self.pool == "max":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
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
