"""Convolution, pooling and batch-norm layers with CPU-friendly gradients (issue 9: CPU speed).

`Conv2D` is a drop-in for `nn.Conv` (stride 1, SAME padding): same parameter names and shapes
(`kernel` HWIO, `bias`), same initialisers, so checkpoints are interchangeable. Its `impl` picks
the lowering (configs say `auto`: `resolve_conv_impl` makes it winograd_bf16 on CPU, xla
elsewhere):
  xla     lax.conv_general_dilated, exactly what nn.Conv emits (XLA:CPU runs it through YNNPACK).
  im2col  patch extraction plus one matmul; gradients by autodiff (the weight gradient is then
          one patches^T @ grad matmul). On XLA:CPU 0.10 it loses: the patch concatenate costs
          more than the convolution (experiments/results/cpu_step_study.md). Kept for study and
          for backends where a matmul is much faster than a convolution.
  gemm_bf16  the fast CPU path: im2col in bfloat16 and one bf16 x bf16 -> fp32 matmul for the
          forward pass, the weight gradient (transposed patches @ grad) and the input gradient
          (patches of grad @ flipped kernel), under a `jax.custom_vjp`. Parameters, activations
          and gradients stay fp32; only the matmul inputs are rounded to bf16 (relative error
          ~3e-3 against fp32, like bf16 mixed precision). AVX-512 BF16 runs bf16 matmuls at 2x
          the fp32 rate, and YNNPACK runs these plain matmuls at ~2x the rate of its own
          small-channel convolutions: forward + both gradients of a layer are 1.2-2.3x faster on a
          2-core AVX-512 CPU, the whole training step 1.3x (experiments/benchmark_conv.py).
          Layers with an odd number of input channels keep `xla` (their patches can't use the
          32-bit copy below), except the 1-channel first layer in fp32 where fer.native builds:
          its forward pass and weight gradient are then C++ kernels (fp32, equal to XLA's to
          float rounding; the reference CNN's step 61 -> 56 ms, experiments/benchmark_conv.py),
          with the block's 2x2 max pool and ReLU fused in for Conv2D(pool_relu=True) (CNNs
          without batch norm: the full-size activation is never written; 58.6 -> 54.1 ms).
          Where fer.native builds and the CPU has AVX-512 BF16, the three passes of layers with
          16+ even input channels (and channel counts multiples of 16) are its direct bf16
          convolutions instead: no patches, the same bf16 inputs and fp32 sums in another
          order (~1e-6 relative); the reference CNN's step 57 -> 44 ms. Elsewhere the patches
          come from fer.native's C++ kernels where they build (one pass at memory speed, 3-4x
          faster than XLA's; the step ~1.3x), else from XLA, copied as 16/32-bit integers:
          XLA:CPU's concatenate of bfloat16 runs at ~0.7 GB/s, of the same bits as uint32 at
          ~10 GB/s. Both give the same bits.
  winograd_bf16  gemm_bf16, but the three passes of 3x3 layers (channel counts multiples of 16,
          even height and width) are fer.native's Winograd kernels (F(2x2, 3x3), and F(3x3,
          2x2) for the weight gradient) where the direct bf16 convolutions run: 0.45x the
          multiplications, 1.4-2.1x faster per pass, with ~1.8x the bf16 rounding error
          (relative 4e-3 instead of 2.4e-3 against exact fp32). Elsewhere exactly gemm_bf16.

`BatchNorm` is nn.BatchNorm (same variables and function) with a hand-written gradient that
XLA:CPU runs in fewer passes over the activations (`batch_norm_train`).

`max_pool_2x2` is 2x2/stride-2 VALID max pooling as a reshape and max, with a custom gradient:
the output gradient goes to the first maximum of each window in row-major order, which is the
tie rule of nn.max_pool's select-and-scatter, so gradients match nn.max_pool exactly. XLA:CPU
lowers select-and-scatter to iota, reduce-window and scatter; this version is a few fused
elementwise ops and is the largest single win of the study.

`DepthwiseConv` (nn.Conv with feature_group_count = channels: same `kernel` [kh, kw, 1, C] and
initialiser) and `max_pool_same` (nn.max_pool of any window and stride with SAME padding) are
the same functions as kh*kw shifted multiply-adds and a maximum of strided slices: on XLA:CPU
(jax 0.10) forward + gradient of the grouped convolution take 3-15x as long, and nn.max_pool's
(select-and-scatter) 4-5x from 16 channels up (0.8x at 8), batch 64 at mini-Xception's sizes
(3x3 depthwise at 44x44x16: 118 against 14 ms; experiments/results/benchmark_depthwise.md).
For separable-convolution networks such as configs/mini_xception.py.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fer import native

CONV_IMPLS = ("xla", "im2col", "gemm_bf16", "winograd_bf16")
BF16_IMPLS = ("gemm_bf16", "winograd_bf16")  # bf16 operands, fp32 sums
POOL_IMPLS = ("xla", "reshape")


def resolve_conv_impl(impl: str) -> str:
  """'auto' -> 'winograd_bf16' where JAX's default backend is the CPU, else 'xla' (cuDNN & co.
  win)."""
  if impl == "auto":
    return "winograd_bf16" if jax.default_backend() == "cpu" else "xla"
  if impl not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl={impl!r}: expected auto or one of {CONV_IMPLS}")
  return impl


def _same_padding(kernel_size: Sequence[int]):
  # Matches lax's SAME for stride 1: the extra pixel of an even kernel goes after.
  return [((k - 1) // 2, k // 2) for k in kernel_size]


def extract_patches(x: jax.Array, kernel_size: Sequence[int], padding=None) -> jax.Array:
  """[N, H, W, C] -> [N, H, W, kh * kw * C], stride 1, ordered (kh, kw, C) like HWIO.

  `padding`: [(top, bottom), (left, right)]; SAME (lax's, for stride 1) by default.
  """
  kh, kw = kernel_size
  _, h, w, _ = x.shape
  padding = _same_padding(kernel_size) if padding is None else padding
  xp = jnp.pad(x, [(0, 0), *padding, (0, 0)])
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


def _as_words(x: jax.Array) -> jax.Array:
  """bf16 [..., C] -> uint32 [..., C/2] (C even) or uint16 [..., C]: same bits, fast copies."""
  if x.shape[-1] % 2 == 0:
    return lax.bitcast_convert_type(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2), jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.uint16)


def _bf16_patches(x: jax.Array, kernel_size: Sequence[int], padding=None) -> jax.Array:
  """bf16 NHWC -> [N*H*W, kh*kw*C] patches: fer.native's, else extract_patches of 16/32-bit
  words."""
  kh, kw = kernel_size
  n, h, w, c = x.shape
  if native.available():
    return native.patches(x, kernel_size, padding or _same_padding(kernel_size))
  p = extract_patches(_as_words(x), kernel_size, padding)
  return lax.bitcast_convert_type(p, jnp.bfloat16).reshape(n * h * w, kh * kw * c)


def _bf16_patches_t(x: jax.Array, kernel_size: Sequence[int]) -> jax.Array:
  """bf16 NHWC -> the transposed patches [kh*kw*C, N*H*W] (a row-major matmul operand).

  fer.native's where available. Otherwise built from the channel-major [C, N, H, W] copy of x,
  so each shifted window is one large contiguous block; contracting the [N*H*W, ...] patches
  over their first axis instead runs at a third of the speed on XLA:CPU.
  """
  kh, kw = kernel_size
  n, h, w, c = x.shape
  if native.available():
    return native.patches_t(x, kernel_size, _same_padding(kernel_size))
  xt = lax.bitcast_convert_type(x, jnp.uint16).transpose(3, 0, 1, 2)
  xt = jnp.pad(xt, [(0, 0), (0, 0), *_same_padding(kernel_size)])
  p = jnp.stack([xt[:, :, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], axis=0)
  return lax.bitcast_convert_type(p, jnp.bfloat16).reshape(kh * kw * c, n * h * w)


def _mm_f32(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_gemm_bf16(x: jax.Array, kernel: jax.Array, winograd: bool = False) -> jax.Array:
  """SAME, stride-1 convolution with bf16 matmul inputs and fp32 accumulation (module doc);
  `winograd`: 3x3 layers as Winograd where `_winograd` allows (conv_impl winograd_bf16)."""
  return _conv_gemm_bf16_fwd(x, kernel, winograd)[0]


def _direct_bf16(cin: int, cout: int, weight_gradient: bool = False) -> bool:
  """Whether fer.native's direct bf16 convolution (or its weight gradient, which pairs input
  channels 16 at a time) takes cin -> cout channels here (from 16 input channels: below that the
  patch matmul is as fast)."""
  return (cin >= 16 and cin % (16 if weight_gradient else 2) == 0 and cout % 16 == 0
          and native.bf16_conv_available())


def _winograd(kernel_shape, h: int, w: int) -> bool:
  """Whether fer.native's Winograd F(2x2, 3x3) kernel takes this convolution: 3x3, even h and
  w, channel counts multiples of 16, and the direct bf16 convolutions available."""
  kh, kw, cin, cout = kernel_shape
  return (kh == kw == 3 and h % 2 == 0 and w % 2 == 0
          and _direct_bf16(cin, cout, weight_gradient=True))


def _conv_gemm_bf16_fwd(x, kernel, winograd):
  kh, kw, cin, cout = kernel.shape
  n, h, w, _ = x.shape
  xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  if winograd and _winograd(kb.shape, h, w):
    y = native.conv_wino_bf16(xb, kb)
  elif _direct_bf16(cin, cout):
    y = native.conv_bf16(xb, kb, _same_padding((kh, kw)))
  else:
    y = _mm_f32(_bf16_patches(xb, (kh, kw)), kb.reshape(kh * kw * cin, cout))
  # Zero-size arrays carry the input and kernel dtypes (residuals must be arrays).
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), kernel.dtype))
  return y.reshape(n, h, w, cout).astype(x.dtype), (xb, kb, dtypes)


def _conv_gemm_bf16_bwd(winograd, res, g):
  xb, kb, (x_dtype, k_dtype) = res
  kh, kw, cin, cout = kb.shape
  n, h, w, _ = g.shape
  gb = g.astype(jnp.bfloat16)
  if winograd and _winograd(kb.shape, h, w):
    dk = native.conv_wino_bf16_wgrad(xb, gb)
  elif _direct_bf16(cin, cout, weight_gradient=True):
    dk = native.conv_bf16_wgrad(xb, gb, kb.shape, _same_padding((kh, kw)))
  else:
    dk = _mm_f32(_bf16_patches_t(xb, (kh, kw)), gb.reshape(n * h * w, cout))
  # The input gradient is the convolution of g with the flipped, in/out-swapped kernel, padded
  # the other way round (the same as SAME for odd kernels).
  flipped = kb[::-1, ::-1].transpose(0, 1, 3, 2)  # [kh, kw, cout, cin]
  padding = [(hi, lo) for lo, hi in _same_padding((kh, kw))]
  if winograd and _winograd(flipped.shape, h, w):
    dx = native.conv_wino_bf16(gb, flipped)
  elif _direct_bf16(cout, cin):
    dx = native.conv_bf16(gb, flipped, padding)
  else:
    dx = _mm_f32(_bf16_patches(gb, (kh, kw), padding), flipped.reshape(kh * kw * cout, cin))
  return (dx.reshape(n, h, w, cin).astype(x_dtype.dtype),
          dk.reshape(kh, kw, cin, cout).astype(k_dtype.dtype))


conv_gemm_bf16.defvjp(_conv_gemm_bf16_fwd, _conv_gemm_bf16_bwd)


@jax.custom_vjp
def conv_c1_native(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """conv_xla(x, kernel) + bias for a 1-channel fp32 input: forward pass, weight and bias
  gradients by fer.native's C++ kernels (module doc); the input gradient, rarely needed (the
  input is data), by XLA."""
  return _conv_c1_native_fwd(x, kernel, bias)[0]


def _conv_c1_native_fwd(x, kernel, bias):
  return native.conv_c1(x, kernel, bias, _same_padding(kernel.shape[:2])), (x, kernel)


def _conv_c1_native_bwd(res, g):
  x, kernel = res
  dx = jax.vjp(lambda x: conv_xla(x, kernel), x)[1](g)[0]  # dead code when x is data
  dk, db = native.conv_c1_grads(x, g, kernel.shape, _same_padding(kernel.shape[:2]))
  return dx, dk, db


conv_c1_native.defvjp(_conv_c1_native_fwd, _conv_c1_native_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv_c1_pool_native(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                        relu: bool = True) -> jax.Array:
  """max_pool(conv_c1_native(x, kernel, bias), relu=relu) in one pass of fer.native's kernels
  (the first block of a CNN without batch norm): the same bits, forward and gradients, without
  the full-size activation or its gradient; the input gradient, rarely needed, by XLA."""
  return _conv_c1_pool_native_fwd(x, kernel, bias, relu)[0]


def _conv_c1_pool_native_fwd(x, kernel, bias, relu):
  y, pos = native.conv_c1_pool(x, kernel, bias, _same_padding(kernel.shape[:2]), relu)
  return y, (x, kernel, bias, pos)


def _conv_c1_pool_native_bwd(relu, res, g):
  x, kernel, bias, pos = res
  reference = lambda x: max_pool(conv_xla(x, kernel) + bias, "reshape", relu)
  dx = jax.vjp(reference, x)[1](g)[0]  # dead code when x is data
  dk, db = native.conv_c1_pool_grads(x, pos, g, kernel.shape, _same_padding(kernel.shape[:2]))
  return dx, dk, db


conv_c1_pool_native.defvjp(_conv_c1_pool_native_fwd, _conv_c1_pool_native_bwd)


class Conv2D(nn.Module):
  """nn.Conv(features, kernel_size, padding='SAME') with a selectable lowering (see module doc).

  pool_relu: return max_pool(conv, relu=True) (2x2, stride 2, then ReLU) instead, in one fused
  native kernel where the conv_c1 path applies; the same values and gradients either way.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  use_bias: bool = True
  impl: str = "xla"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  pool_relu: bool = False

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
    if self.impl == "im2col":
      y = conv_im2col(x, kernel)
    elif self.impl in BF16_IMPLS and x.shape[-1] % 2 == 0:
      y = conv_gemm_bf16(x, kernel, self.impl == "winograd_bf16")
    elif (self.impl in BF16_IMPLS and x.shape[-1] == 1 and x.dtype == jnp.float32
          and native.available()):
      bias = jnp.zeros((self.features,), jnp.float32) if bias is None else bias
      if self.pool_relu:
        return conv_c1_pool_native(x, kernel, bias, True)
      return conv_c1_native(x, kernel, bias)
    else:
      y = conv_xla(x, kernel)
    if bias is not None:
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return max_pool(y, "reshape", relu=True) if self.pool_relu else y


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


def max_pool_same(x: jax.Array, window: Sequence[int] = (3, 3),
                  strides: Sequence[int] = (2, 2)) -> jax.Array:
  """nn.max_pool(x, window, strides, padding="SAME") for NHWC x, as the maximum of the
  window's strided slices of the -inf-padded input (gradients: elementwise selects; a tie
  shares the gradient where select-and-scatter gives it to the first maximum)."""
  (h, w), (sh, sw) = x.shape[1:3], strides
  pads = lax.padtype_to_pads((h, w), tuple(window), tuple(strides), "SAME")
  x = jnp.pad(x, [(0, 0), *pads, (0, 0)], constant_values=-jnp.inf)
  oh, ow = -(-h // sh), -(-w // sw)
  out = None
  for i in range(window[0]):
    for j in range(window[1]):
      tap = lax.slice(x, (0, i, j, 0), (x.shape[0], i + sh * (oh - 1) + 1,
                                        j + sw * (ow - 1) + 1, x.shape[3]), (1, sh, sw, 1))
      out = tap if out is None else jnp.maximum(out, tap)
  return out


class DepthwiseConv(nn.Module):
  """nn.Conv(C, kernel_size, padding="SAME", feature_group_count=C, use_bias=False) on C input
  channels (the same `kernel` parameter), as kh*kw shifted multiply-adds."""
  kernel_size: Sequence[int] = (3, 3)
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, x.shape[-1]), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    h, w = x.shape[1:3]
    x = jnp.pad(x, [(0, 0), *_same_padding(self.kernel_size), (0, 0)])
    return sum(x[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
               for i in range(kh) for j in range(kw))


def max_pool(x: jax.Array, impl: str = "reshape", relu: bool = False) -> jax.Array:
  """2x2/stride-2 max pooling, then nn.relu where relu: impl 'xla' is nn.max_pool, 'reshape' is
  max_pool_2x2."""
  if impl == "xla":
    y = nn.max_pool(x, (2, 2), strides=(2, 2))
  elif impl == "reshape":
    y = max_pool_2x2(x)
  else:
    raise ValueError(f"max_pool impl={impl!r}: expected one of {POOL_IMPLS}")
  return nn.relu(y) if relu else y


def _bn_stats(x):
  """Per-channel mean and variance of x [..., C] in fp32, as E[x^2] - E[x]^2 in one pass (flax's
  `use_fast_variance`), clipped at 0."""
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axes)
  return mean, jnp.maximum(0.0, jnp.mean(jnp.square(xf), axes) - jnp.square(mean))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch norm of x [..., C] over all axes but the last, with a hand-written gradient.

  Returns (y, mean, var): y = (x - mean) / sqrt(var + epsilon) * scale + bias in `dtype`, and
  the batch statistics (fp32) for the running averages. The same function as flax's
  nn.BatchNorm in training mode (to float rounding). Autodiff of flax's version leaves XLA:CPU
  several separate passes over each activation (in a profile of configs/strong.py's step it was
  ~22% of the thread time, once the convolutions were fast); this backward pass reads each
  activation twice (the sums of g and g * x in one reduction, then dx = a * g + k * x + c per
  channel), and the forward pass writes y as one per-channel affine map that fuses into the
  following ReLU.
  """
  return _batch_norm_train_fwd(x, scale, bias, epsilon, dtype)[0]


def _bn_apply(x, scale, bias, mean, r, dtype):
  """(x - mean) * r * scale + bias as one per-channel affine map, computed in fp32."""
  a = scale * r
  return (x.astype(jnp.float32) * a + (bias - mean * a)).astype(dtype)


def _batch_norm_train_fwd(x, scale, bias, epsilon, dtype):
  mean, var = _bn_stats(x)
  r = lax.rsqrt(var + epsilon)
  return (_bn_apply(x, scale, bias, mean, r, dtype), mean, var), (x, scale, mean, r)


def _batch_norm_train_bwd(epsilon, dtype, res, cts):
  del epsilon, dtype
  x, scale, mean, r = res
  g, g_mean, g_var = cts  # g_mean, g_var: cotangents of the returned statistics (usually 0)
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
  sum_g = jnp.sum(gf, axes)
  sum_g_xhat = r * (jnp.sum(gf * xf, axes) - mean * sum_g)  # sum(g * (x - mean) * r)
  a = scale * r
  # dx = a * (g - mean(g) - xhat * mean(g * xhat)) + g_mean / n + g_var * 2 (x - mean) / n
  k = (2.0 * g_var - a * r * sum_g_xhat) / n
  c = (g_mean - a * sum_g) / n - k * mean
  dx = (gf * a + xf * k + c).astype(x.dtype)
  return dx, sum_g_xhat.astype(scale.dtype), sum_g.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nn.Module):
  """A drop-in for nn.BatchNorm over the last axis (scale and bias on, fast variance): the same
  variables (`params` scale/bias, `batch_stats` mean/var), initialisers and running-average
  update, so checkpoints are interchangeable; training mode runs `batch_norm_train`.

  Measured on the 2-core AMD EPYC, against nn.BatchNorm, alternated: `python
  experiments/benchmark_train.py --config=configs/strong.py --max_images=3840 --epochs=2`
  185 / 195 / 191 images/s against 169 / 184 / 177, peak memory 3.1 GB against 4.9;
  `--config=configs/augment.py` 1,394 / 1,409 against 1,269 / 1,261, 1.3 GB against 1.7.
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    dtype = jnp.dtype(self.dtype or x.dtype)
    if self.use_running_average:
      return _bn_apply(x, scale, bias, ra_mean.value, lax.rsqrt(ra_var.value + self.epsilon),
                       dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, dtype)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y
