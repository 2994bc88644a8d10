"""Convolution and pooling layers with CPU-friendly gradients (issue 9: CPU training speed).

`Conv2D` is a drop-in for `nn.Conv` (stride 1, SAME padding): same parameter names and shapes
(`kernel` HWIO, `bias`), same initialisers, so checkpoints are interchangeable. Its `impl` picks
the lowering:
  xla     lax.conv_general_dilated, exactly what nn.Conv emits (XLA:CPU runs it through YNNPACK).
  im2col  patch extraction plus one matmul; gradients by autodiff (the weight gradient is then
          one patches^T @ grad matmul). On XLA:CPU 0.10 it loses: the patch concatenate costs
          more than the convolution (experiments/results/cpu_step_study.md). Kept for study and
          for backends where a matmul is much faster than a convolution.

`max_pool_2x2` is 2x2/stride-2 VALID max pooling as a reshape and max, with a custom gradient:
the output gradient goes to the first maximum of each window in row-major order, which is the
tie rule of nn.max_pool's select-and-scatter, so gradients match nn.max_pool exactly. XLA:CPU
lowers select-and-scatter to iota, reduce-window and scatter; this version is a few fused
elementwise ops and is the largest single win of the study.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("xla", "im2col")
POOL_IMPLS = ("xla", "reshape")


def _same_padding(kernel_size: Sequence[int]):
  # Matches lax's SAME for stride 1: the extra pixel of an even kernel goes after.
  return [((k - 1) // 2, k // 2) for k in kernel_size]


def extract_patches(x: jax.Array, kernel_size: Sequence[int]) -> jax.Array:
  """[N, H, W, C] -> [N, H, W, kh * kw * C], stride 1, SAME, ordered (kh, kw, C) like HWIO."""
  kh, kw = kernel_size
  _, h, w, _ = x.shape
  xp = jnp.pad(x, [(0, 0), *_same_padding(kernel_size), (0, 0)])
  return jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)],
                         axis=-1)


def conv_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """SAME, stride-1 convolution of NHWC `x` with an HWIO `kernel` as patches @ kernel."""
  kh, kw, cin, cout = kernel.shape
  n, h, w, _ = x.shape
  patches = extract_patches(x, (kh, kw)).reshape(n * h * w, kh * kw * cin)
  y = jnp.dot(patches, kernel.reshape(kh * kw * cin, cout), preferred_element_type=x.dtype)
  return y.reshape(n, h, w, cout)


def conv_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The convolution nn.Conv emits for stride 1 and SAME padding."""
  return lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding="SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv2D(nn.Module):
  """nn.Conv(features, kernel_size, padding='SAME') with a selectable lowering (see module doc)."""
  features: int
  kernel_size: Sequence[int] = (3, 3)
  use_bias: bool = True
  impl: str = "xla"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    if self.impl not in CONV_IMPLS:
      raise ValueError(f"Conv2D impl={self.impl!r}: expected one of {CONV_IMPLS}")
    kernel_size = tuple(self.kernel_size)
    kernel = self.param("kernel", self.kernel_init, (*kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv_xla(x, kernel) if self.impl == "xla" else conv_im2col(x, kernel)
    if bias is not None:
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y


def _windows(x):
  """[N, H, W, C] -> the four 2x2-window corners [N, H/2, W/2, C] (odd edges dropped, VALID)."""
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2, :].reshape(n, h // 2, 2, w // 2, 2, c)
  return x


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """nn.max_pool(x, (2, 2), strides=(2, 2)) for NHWC x, as a reshape and max."""
  return _windows(x).max(axis=(2, 4))


def _max_pool_fwd(x):
  return max_pool_2x2(x), x


def _max_pool_bwd(x, g):
  n, h, w, c = x.shape
  xw = _windows(x)
  y = xw.max(axis=(2, 4), keepdims=True)
  # Row-major position of each element inside its window, 0..3; the first maximum wins.
  pos = (2 * lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1, 2, 1), 2)
         + lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1, 2, 1), 4)).astype(jnp.int8)
  first = jnp.where(xw == y, pos, jnp.int8(4)).min(axis=(2, 4), keepdims=True)
  dx = jnp.where(pos == first, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  dx = dx.reshape(n, h - h % 2, w - w % 2, c)
  if h % 2 or w % 2:
    dx = jnp.pad(dx, [(0, 0), (0, h % 2), (0, w % 2), (0, 0)])
  return (dx,)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, impl: str = "reshape") -> jax.Array:
  """2x2/stride-2 max pooling: impl 'xla' is nn.max_pool, 'reshape' is max_pool_2x2."""
  if impl == "xla":
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  if impl == "reshape":
    return max_pool_2x2(x)
  raise ValueError(f"max_pool impl={impl!r}: expected one of {POOL_IMPLS}")
