"""fer.native: the C++ patch and resampling kernels equal the XLA versions, and a failed build
falls back with a warning instead of breaking anything."""

import os
import shutil
import stat

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from fer import augment
from fer import native
from fer.models import layers

HAVE_COMPILER = native.compiler() is not None


@pytest.fixture
def native_on():
  """The native kernels, which must build wherever there is a C++ compiler (CI has g++)."""
  if not HAVE_COMPILER:
    pytest.skip("no C++ compiler: fer.native falls back to XLA (tested below)")
  assert native.available(), "fer.native failed to build or load (see the warning)"


def _xla(fn, *args):
  with native.use(False):
    assert not native.available()
    return fn(*args)


def _spy(monkeypatch, name, record=lambda *args: 1):
  """Replaces native.<name> by a wrapper that appends record(*args) to the returned list."""
  calls, real = [], getattr(native, name)
  monkeypatch.setattr(native, name, lambda *a: calls.append(record(*a)) or real(*a))
  return calls


def _bf16(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.bfloat16)


SHAPES = [  # (x shape, kernel size)
    ((2, 5, 7, 3), (3, 3)),
    ((3, 6, 4, 2), (2, 2)),
    ((1, 9, 8, 4), (5, 3)),
    ((2, 4, 4, 1), (3, 3)),
    ((4, 24, 24, 32), (3, 3)),
    # The widths that have their own copy loop in patches_t (48, 24 above, 12, 6, 3).
    ((1, 48, 48, 1), (3, 3)),
    ((1, 12, 12, 2), (3, 3)),
    ((2, 6, 6, 4), (2, 2)),
    ((1, 3, 3, 2), (3, 3)),
]


@pytest.mark.parametrize("shape,ks", SHAPES)
def test_patches_equal_xla_bit_for_bit(native_on, shape, ks):
  x = _bf16(shape)
  flipped = [(hi, lo) for lo, hi in layers._same_padding(ks)]  # the input gradient's padding
  for padding in (None, flipped):
    got = jax.jit(lambda x: layers._bf16_patches(x, ks, padding))(x)
    want = _xla(lambda: jax.jit(lambda x: layers._bf16_patches(x, ks, padding))(x))
    assert got.shape == want.shape and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  got = jax.jit(lambda x: layers._bf16_patches_t(x, ks))(x)
  want = _xla(lambda: jax.jit(lambda x: layers._bf16_patches_t(x, ks))(x))
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_patches_under_vmap(native_on):
  # Searches vmap whole models: the leading vmap axis reaches the kernels as a batch dimension.
  xs = _bf16((3, 2, 6, 5, 4))
  for fn in (lambda x: layers._bf16_patches(x, (3, 3)),
             lambda x: layers._bf16_patches_t(x, (3, 3))):
    got = jax.jit(jax.vmap(fn))(xs)
    want = _xla(lambda: jnp.stack([jax.jit(fn)(x) for x in xs]))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_conv_gemm_bf16_uses_native_patches_and_matches_xla_patches(native_on, monkeypatch):
  calls = _spy(monkeypatch, "patches", lambda *a: "patches")
  calls_t = _spy(monkeypatch, "patches_t", lambda *a: "patches_t")
  x, kernel, g = (jax.random.normal(jax.random.key(i), s) for i, s in
                  enumerate([(2, 8, 8, 6), (3, 3, 6, 5), (2, 8, 8, 5)]))
  run = lambda: jax.jit(lambda x, k, g: jax.vjp(layers.conv_gemm_bf16, x, k)[1](g))(x, kernel, g)
  with native.use(True, direct_conv=False):  # 6 input channels keep the patches anyway
    got = run()
  assert calls and calls_t
  calls.clear()
  calls_t.clear()
  want = _xla(run)
  assert not calls and not calls_t
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def test_bilinear_equals_xla_resampling(native_on):
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 12, 10, 2)), jnp.float32)
  rng = np.random.default_rng(1)
  src_y = jnp.asarray(rng.uniform(-3, 15, (8, 12, 10)), jnp.float32)  # includes out-of-image
  src_x = jnp.asarray(rng.uniform(-3, 13, (8, 12, 10)), jnp.float32)
  got = jax.jit(augment._bilinear)(images, src_y, src_x)
  want = _xla(lambda: jax.jit(augment._bilinear)(images, src_y, src_x))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)  # float rounding on a 0..255 scale
  # On the pixel grid it is a pure copy (clamped at the edges): exact.
  yy, xx = jnp.meshgrid(jnp.arange(12.0) - 1, jnp.arange(10.0) + 1, indexing="ij")
  shifted = native.bilinear(images, jnp.broadcast_to(yy, src_y.shape),
                            jnp.broadcast_to(xx, src_x.shape))
  want = images[:, np.clip(np.arange(12) - 1, 0, 11)][:, :, np.clip(np.arange(10) + 1, 0, 9)]
  np.testing.assert_array_equal(shifted, want)


def test_augment_uses_native_resampling(native_on, monkeypatch):
  calls = _spy(monkeypatch, "bilinear")
  cfg = type("Cfg", (), dict(flip=False, rotate_degrees=10.0, shift_fraction=0.1,
                             zoom_fraction=0.1, crop_padding=0, erase_prob=0.0))()
  images = jnp.full((2, 8, 8, 1), 7.0)
  out = jax.jit(lambda k, x: augment.augment(k, x, cfg))(jax.random.key(0), images)
  assert calls and np.allclose(out, 7.0)  # a constant image stays constant


def test_kernel_rejects_a_wrong_output_size(native_on):
  x = _bf16((2, 4, 4, 2))
  call = jax.ffi.ffi_call("fer_patches", jax.ShapeDtypeStruct((5, 7), jnp.bfloat16))
  with pytest.raises(Exception, match="output size does not match"):
    jax.block_until_ready(call(x, kh=np.int64(3), kw=np.int64(3), pt=np.int64(1), pl=np.int64(1)))
  with pytest.raises(ValueError, match="doesn't keep the size"):
    native.patches(x, (3, 3), [(0, 0), (1, 1)])


def _conv_c1_reference(x, kernel, bias):
  return layers.conv_xla(x, kernel) + bias


@pytest.mark.parametrize("x_shape,kernel_shape", [
    ((4, 48, 48, 1), (3, 3, 1, 32)),  # the first layer of the study's CNNs
    ((2, 9, 7, 1), (3, 3, 1, 64)),    # the strong config's width, odd image sides
    ((2, 6, 5, 1), (5, 3, 1, 7)),     # generic channel count, non-square kernel
    ((3, 6, 6, 1), (2, 2, 1, 5)),     # even kernel: SAME's extra pixel goes after
])
def test_conv_c1_and_its_gradients_equal_xla(native_on, x_shape, kernel_shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0, 255, x_shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
  bias = jnp.asarray(rng.normal(size=kernel_shape[-1:]), jnp.float32)
  g = jnp.asarray(rng.normal(size=x_shape[:-1] + kernel_shape[-1:]), jnp.float32)
  got_y, got_vjp = jax.vjp(layers.conv_c1_native, x, kernel, bias)
  want_y, want_vjp = jax.vjp(_conv_c1_reference, x, kernel, bias)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5 * float(jnp.abs(want_y).max()))
  for got, want in zip(got_vjp(g), want_vjp(g)):  # dx (by XLA), dkernel, dbias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_conv_c1_under_vmap_uses_each_models_weights(native_on):
  # The search vmaps stacked models: each leading index has its own kernel and bias.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(0, 255, (3, 2, 8, 8, 1)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 1, 32)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(3, 32)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, 2, 8, 8, 32)), jnp.float32)
  run = lambda fn: jax.jit(jax.vmap(lambda x, k, b, g: (fn(x, k, b),
                                                        jax.vjp(fn, x, k, b)[1](g)[1:])))
  got, want = run(layers.conv_c1_native)(x, kernel, bias, g), run(_conv_c1_reference)(
      x, kernel, bias, g)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_first_conv_layer_uses_conv_c1_only_when_native(native_on, monkeypatch):
  calls = _spy(monkeypatch, "conv_c1")
  x = jnp.asarray(np.random.default_rng(2).uniform(0, 255, (2, 8, 8, 1)), jnp.float32)
  for use_bias in (True, False):
    layer = layers.Conv2D(16, impl="gemm_bf16", use_bias=use_bias,
                          bias_init=jax.nn.initializers.normal(1.0))
    variables = layer.init(jax.random.key(0), x)
    calls.clear()
    got = jax.jit(layer.apply)(variables, x)
    assert calls
    calls.clear()
    want = _xla(lambda: jax.jit(layer.apply)(variables, x))
    assert not calls
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  # bfloat16 compute keeps XLA's convolution
  layer = layers.Conv2D(16, impl="gemm_bf16", dtype=jnp.bfloat16)
  jax.jit(layer.apply)(layer.init(jax.random.key(0), x), x)
  assert not calls


def test_conv_c1_rejects_mismatched_shapes(native_on):
  x = jnp.zeros((2, 6, 6, 1))
  call = jax.ffi.ffi_call("fer_conv_c1", jax.ShapeDtypeStruct((2, 6, 6, 8), jnp.float32))
  with pytest.raises(Exception, match="bias or output size does not match"):
    jax.block_until_ready(call(x, jnp.zeros((3, 3, 1, 8)), jnp.zeros((5,)), pt=np.int64(1),
                               pl=np.int64(1)))
  with pytest.raises(Exception, match=r"expected x \[..., N, H, W, 1\]"):
    jax.block_until_ready(call(jnp.zeros((2, 6, 6, 2)), jnp.zeros((3, 3, 1, 8)),
                               jnp.zeros((8,)), pt=np.int64(1), pl=np.int64(1)))


def _conv_c1_then_pool(x, kernel, bias, relu):
  y = layers.max_pool_2x2(layers.conv_c1_native(x, kernel, bias))
  return jax.nn.relu(y) if relu else y


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("x_shape,kernel_shape", [
    ((4, 48, 48, 1), (3, 3, 1, 32)),  # the reference CNN's first block
    ((2, 9, 7, 1), (3, 3, 1, 64)),    # odd sides: the last row and column are dropped
    ((2, 6, 5, 1), (2, 3, 1, 7)),     # generic path, even kernel
])
def test_fused_first_block_equals_conv_then_pool_bit_for_bit(native_on, x_shape, kernel_shape,
                                                             relu):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.integers(0, 256, x_shape) / 255.0, jnp.float32)
  kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
  bias = jnp.asarray(rng.normal(size=kernel_shape[-1:]), jnp.float32)
  # Ties inside windows (a constant image corner: equal pixels there) and ReLU zeros both occur.
  x = x.at[:, :12, :12].set(0.5)
  got_y, got_vjp = jax.vjp(lambda k, b: layers.conv_c1_pool_native(x, k, b, relu), kernel, bias)
  want_y, want_vjp = jax.vjp(lambda k, b: _conv_c1_then_pool(x, k, b, relu), kernel, bias)
  g = jnp.asarray(rng.normal(size=want_y.shape), jnp.float32)
  np.testing.assert_array_equal(got_y, want_y)
  for got, want in zip(got_vjp(g), want_vjp(g)):  # dkernel, dbias
    np.testing.assert_array_equal(got, want)
  if relu:
    assert float((want_y == 0).mean()) > 0.1  # the ReLU's no-gradient case was exercised
  # and against XLA's convolution and nn.max_pool's tie rule, to float rounding
  ref = lambda x, k, b: layers.max_pool(layers.conv_xla(x, k) + b, "xla", relu)
  ref_y, ref_vjp = jax.vjp(ref, x, kernel, bias)
  np.testing.assert_allclose(got_y, ref_y, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref_y).max()))
  for got, want in zip(got_vjp(g), ref_vjp(g)[1:]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


def test_fused_first_block_input_gradient_and_vmap(native_on):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.uniform(0, 1, (3, 2, 8, 8, 1)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 1, 32)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(3, 32)), jnp.float32)
  loss = lambda fn: jax.jit(jax.vmap(jax.grad(lambda x, k, b: (fn(x, k, b) ** 2).sum(),
                                              argnums=(0, 1, 2))))
  got = loss(lambda x, k, b: layers.conv_c1_pool_native(x, k, b, True))(x, kernel, bias)
  want = loss(lambda x, k, b: _conv_c1_then_pool(x, k, b, True))(x, kernel, bias)
  for a, b in zip(got, want):  # dx (by XLA in both), dkernel, dbias per model
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_cnn_first_block_is_fused_only_without_batch_norm(native_on, monkeypatch):
  from fer.models import cnn  # pylint: disable=g-import-not-at-top
  calls = _spy(monkeypatch, "conv_c1_pool")
  x = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 48, 48, 1)), jnp.uint8)
  for batch_norm, fused in ((False, True), (True, False)):
    model = cnn.CNN(conv_features=(8, 16), dense_features=(16,), conv_impl="gemm_bf16",
                    batch_norm=batch_norm)
    variables = model.init(jax.random.key(0), x)
    calls.clear()
    got = jax.grad(lambda v: model.apply(v, x, mutable=["batch_stats"])[0].sum())(variables)
    assert bool(calls) == fused
    want = _xla(lambda: jax.grad(
        lambda v: model.apply(v, x, mutable=["batch_stats"])[0].sum())(variables))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3 * float(jnp.abs(b).max()))


def test_fused_first_block_rejects_mismatched_shapes(native_on):
  x = jnp.zeros((2, 6, 6, 1))
  out = (jax.ShapeDtypeStruct((2, 3, 3, 8), jnp.float32), jax.ShapeDtypeStruct((2, 3, 3, 8),
                                                                                jnp.int8))
  call = jax.ffi.ffi_call("fer_conv_c1_pool", out)
  with pytest.raises(Exception, match="bias or output size does not match"):
    jax.block_until_ready(call(x, jnp.zeros((3, 3, 1, 8)), jnp.zeros((5,)), pt=np.int64(1),
                               pl=np.int64(1), relu=True))
  grad = jax.ffi.ffi_call("fer_conv_c1_pool_wgrad", (jax.ShapeDtypeStruct((3, 3, 1, 8),
                                                                          jnp.float32),
                                                     jax.ShapeDtypeStruct((8,), jnp.float32)))
  with pytest.raises(Exception, match="g, pos or db's size does not match"):
    jax.block_until_ready(grad(x, jnp.zeros((2, 3, 3, 8), jnp.int8), jnp.zeros((2, 6, 6, 8)),
                               pt=np.int64(1), pl=np.int64(1)))


@pytest.fixture
def bf16_conv_on(native_on):
  if not native.bf16_conv_available():
    pytest.skip("this CPU has no AVX-512 BF16: conv_gemm_bf16 keeps the patch matmul")


@pytest.mark.parametrize("x_shape,kernel_shape", [
    ((4, 24, 24, 32), (3, 3, 32, 64)),   # the reference CNN's second layer: 4 x 6 blocks
    ((2, 7, 5, 64), (3, 3, 64, 32)),     # its input gradient's shape: 2 x 12, ragged blocks
    ((3, 6, 6, 18), (2, 2, 18, 48)),     # even kernel (SAME's extra pixel after), 1 x 24
    ((2, 9, 13, 16), (5, 3, 16, 80)),    # non-square kernel, 80 = 16 x 5 channels
])
def test_direct_bf16_conv_and_weight_gradient_equal_xla_on_the_same_bf16_inputs(
    bf16_conv_on, x_shape, kernel_shape):
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.bfloat16)
  padding = layers._same_padding(kernel_shape[:2])  # pylint: disable=protected-access
  got = native.conv_bf16(x, kernel, padding)
  want = layers.conv_xla(x.astype(jnp.float32), kernel.astype(jnp.float32))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  # the input gradient's padding: the other way round
  flipped = [(hi, lo) for lo, hi in padding]
  want = lax.conv_general_dilated(x.astype(jnp.float32), kernel.astype(jnp.float32), (1, 1),
                                  flipped, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(native.conv_bf16(x, kernel, flipped), want, rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(want).max()))
  if kernel_shape[2] % 16 == 0:  # the weight gradient (pixels in pairs; 7x5 images: one odd)
    g = jnp.asarray(rng.normal(size=x_shape[:-1] + kernel_shape[-1:]), jnp.bfloat16)
    got = native.conv_bf16_wgrad(x, g, kernel_shape, padding)
    want = jax.vjp(lambda k: layers.conv_xla(x.astype(jnp.float32), k),
                   kernel.astype(jnp.float32))[1](g.astype(jnp.float32))[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_direct_bf16_conv_and_weight_gradient_under_vmap_use_each_models_data(bf16_conv_on):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(3, 2, 6, 6, 16)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 16, 32)), jnp.bfloat16)
  pad = [(1, 1), (1, 1)]
  g = jnp.asarray(rng.normal(size=(3, 2, 6, 6, 32)), jnp.bfloat16)
  got = jax.jit(jax.vmap(lambda x, k, g: (native.conv_bf16(x, k, pad),
                                          native.conv_bf16_wgrad(x, g, k.shape, pad))))(
      x, kernel, g)
  f32 = lambda a: a.astype(jnp.float32)
  want = jax.vmap(lambda x, k, g: jax.vjp(lambda k: layers.conv_xla(f32(x), k), f32(k)))(
      x, kernel, g)
  want = (want[0], jax.vmap(lambda x, k, g: jax.vjp(lambda k: layers.conv_xla(f32(x), k),
                                                    f32(k))[1](f32(g))[0])(x, kernel, g))
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_gemm_bf16_layer_uses_the_direct_kernels_where_they_apply(bf16_conv_on, monkeypatch):
  calls = _spy(monkeypatch, "conv_bf16", lambda x, kernel, padding: kernel.shape)
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 16, 32)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 8, 8, 32)), jnp.float32)
  wgrads = _spy(monkeypatch, "conv_bf16_wgrad", lambda x, g, kernel_shape, padding: kernel_shape)
  got_y, got_vjp = jax.vjp(layers.conv_gemm_bf16, x, kernel)
  got = (got_y, *got_vjp(g))
  assert calls == [(3, 3, 16, 32), (3, 3, 32, 16)]  # forward, then the flipped kernel
  assert wgrads == [(3, 3, 16, 32)]
  calls.clear()
  with native.use(False):
    want_y, want_vjp = jax.vjp(layers.conv_gemm_bf16, x, kernel)
    want = (want_y, *want_vjp(g))
  with native.use(True, direct_conv=False):  # FER_NO_DIRECT_CONV=1: native patches + matmul
    assert native.available() and not native.bf16_conv_available()
    jax.vjp(layers.conv_gemm_bf16, x, kernel)[1](g)
  assert not calls and wgrads == [(3, 3, 16, 32)]
  for a, b in zip(got, want):  # same bf16 inputs, fp32 sums in another order
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
  # Narrow convolutions keep the patch matmul (fewer than 16 input channels, or outputs not a
  # multiple of 16): 8 -> 32 in both directions; 16 -> 24 forward, but its gradient 24 -> 16 not.
  for shape, direct in (((3, 3, 8, 32), []), ((3, 3, 16, 24), [(3, 3, 24, 16)])):
    calls.clear()
    wgrads.clear()
    jax.vjp(layers.conv_gemm_bf16, x[..., :shape[2]], jnp.zeros(shape))[1](
        jnp.zeros(x.shape[:-1] + shape[-1:]))
    assert calls == direct and not wgrads


def test_direct_bf16_conv_rejects_bad_shapes(bf16_conv_on):
  call = jax.ffi.ffi_call("fer_conv_bf16", jax.ShapeDtypeStruct((2, 6, 6, 24), jnp.float32))
  attrs = dict(pt=np.int64(1), pl=np.int64(1))
  with pytest.raises(Exception, match="O a multiple of 16"):
    jax.block_until_ready(call(jnp.zeros((2, 6, 6, 16), jnp.bfloat16),
                               jnp.zeros((3, 3, 16, 24), jnp.bfloat16), **attrs))
  with pytest.raises(Exception, match="expected bf16 x"):
    jax.block_until_ready(call(jnp.zeros((2, 6, 6, 16)), jnp.zeros((3, 3, 16, 24)), **attrs))
  wgrad = jax.ffi.ffi_call("fer_conv_bf16_wgrad", jax.ShapeDtypeStruct((3, 3, 16, 32),
                                                                       jnp.float32))
  with pytest.raises(Exception, match="need matching shapes"):
    jax.block_until_ready(wgrad(jnp.zeros((2, 6, 6, 16), jnp.bfloat16),
                                jnp.zeros((2, 6, 5, 32), jnp.bfloat16), **attrs))


def _winograd_reference(x, kernel, g):
  """F(2x2, 3x3) in jnp with V and U rounded to bf16 like fer.native's kernels (SAME, even H, W),
  and the weight gradient for the output gradient g as F(3x3, 2x2) (A g A^T rounded too)."""
  bt = jnp.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], jnp.float32)
  gm = jnp.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], jnp.float32)
  at = jnp.array([[1, 1, 1, 0], [0, 1, -1, -1]], jnp.float32)
  n, h, w, _ = x.shape
  xp = jnp.pad(x.astype(jnp.float32), [(0, 0), (1, 1), (1, 1), (0, 0)])
  tiles = jnp.stack([jnp.stack([xp[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4] for j in range(w // 2)], 1)
                     for i in range(h // 2)], 1)  # [n, h/2, w/2, 4, 4, C]
  rnd = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  v = rnd(jnp.einsum("ij,nabjkc,lk->nabilc", bt, tiles, bt))
  u = rnd(jnp.einsum("ij,jkco,lk->ilco", gm, kernel.astype(jnp.float32), gm))
  m = jnp.einsum("nabilc,ilco->nabilo", v, u, precision="highest")
  y = jnp.einsum("ij,nabjko,lk->nabilo", at, m, at, precision="highest")
  gt = g.astype(jnp.float32).reshape(n, h // 2, 2, w // 2, 2, -1).transpose(0, 1, 3, 2, 4, 5)
  e = rnd(jnp.einsum("ji,nabjko,kl->nabilo", at, gt, at))  # A e A^T, A = at^T
  mw = jnp.einsum("nabilc,nabilo->ilco", v, e, precision="highest")
  dw = jnp.einsum("ji,jkco,kl->ilco", gm, mw, gm, precision="highest")
  return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, -1), dw


@pytest.mark.parametrize("x_shape,kernel_shape", [
    ((2, 8, 8, 16), (3, 3, 16, 32)),      # 32 tiles: one partial block of 48
    ((3, 6, 10, 32), (3, 3, 32, 16)),     # non-square images, 1 x 24 register blocks
    ((1, 12, 12, 256), (3, 3, 256, 64)),  # 36 tiles in blocks of 24 (wide C), 4 x 6 blocks
])
def test_winograd_conv_and_weight_gradient_are_winograd_in_bf16_and_close_to_exact_fp32(
    bf16_conv_on, x_shape, kernel_shape):
  x = _bf16(x_shape, 9)
  kernel = (_bf16(kernel_shape, 10).astype(jnp.float32) / np.sqrt(9 * x_shape[-1])).astype(
      jnp.bfloat16)
  g = _bf16(x_shape[:-1] + kernel_shape[-1:], 11)
  got = native.conv_wino_bf16(x, kernel)
  got_dw = native.conv_wino_bf16_wgrad(x, g)
  assert got.dtype == got_dw.dtype == jnp.float32
  assert got.shape == g.shape and got_dw.shape == kernel_shape
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  want, want_dw = _winograd_reference(x, kernel, g)
  assert rel(got, want) < 1e-4 and rel(got_dw, want_dw) < 1e-4  # the same algorithm, roundings
  f32 = lambda a: a.astype(jnp.float32)
  exact, vjp = jax.vjp(lambda k: layers.conv_xla(f32(x), k), f32(kernel))
  # only the transforms round here (x, kernel and g are bf16): ~4e-3
  assert rel(got, exact) < 6e-3 and rel(got_dw, vjp(f32(g))[0]) < 6e-3
  # under vmap each model uses its own data
  xs, ks, gs = jnp.stack([x, x[::-1]]), jnp.stack([kernel, -kernel]), jnp.stack([g, -g])
  got = jax.jit(jax.vmap(lambda x, k, g: (native.conv_wino_bf16(x, k),
                                          native.conv_wino_bf16_wgrad(x, g))))(xs, ks, gs)
  np.testing.assert_allclose(got[0][1], native.conv_wino_bf16(x[::-1], -kernel), rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(got[1][1], native.conv_wino_bf16_wgrad(x[::-1], -g), rtol=1e-6,
                             atol=1e-6)


def test_winograd_bf16_layers_use_winograd_where_it_applies(bf16_conv_on, monkeypatch):
  calls = _spy(monkeypatch, "conv_wino_bf16", lambda x, kernel: kernel.shape)
  wgrads = _spy(monkeypatch, "conv_wino_bf16_wgrad", lambda x, g: (x.shape[-1], g.shape[-1]))
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 16, 32)), jnp.float32) / 12
  g = jnp.asarray(rng.normal(size=(2, 8, 8, 32)), jnp.float32)
  got_y, got_vjp = jax.vjp(lambda x, k: layers.conv_gemm_bf16(x, k, True), x, kernel)
  got = (got_y, *got_vjp(g))
  assert calls == [(3, 3, 16, 32), (3, 3, 32, 16)]  # forward, then the flipped kernel
  assert wgrads == [(16, 32)]
  want_y, want_vjp = jax.vjp(layers.conv_gemm_bf16, x, kernel)  # direct bf16
  for a, b in zip(got, (want_y, *want_vjp(g))):
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-2
  # Not for odd sizes, other kernels, or channel counts that aren't multiples of 16.
  for x_shape, k_shape in (((2, 7, 8, 16), (3, 3, 16, 32)), ((2, 8, 8, 16), (5, 5, 16, 32)),
                           ((2, 8, 8, 24), (3, 3, 24, 32))):
    calls.clear()
    wgrads.clear()
    jax.vjp(lambda x, k: layers.conv_gemm_bf16(x, k, True), jnp.ones(x_shape),
            jnp.ones(k_shape))[1](jnp.ones(x_shape[:-1] + k_shape[-1:]))
    assert not calls and not wgrads, (x_shape, k_shape)
  layer = layers.Conv2D(32, impl="winograd_bf16")
  params = layer.init(jax.random.key(0), x)
  calls.clear()
  layer.apply(params, x)
  assert calls == [(3, 3, 16, 32)]
  with pytest.raises(Exception, match="needs a 3x3 kernel, SAME padding and an even"):
    jax.block_until_ready(native.conv_wino_bf16(_bf16((1, 5, 6, 16)), _bf16((3, 3, 16, 16))))
  with pytest.raises(Exception, match="need matching shapes: g"):
    jax.block_until_ready(native.conv_wino_bf16_wgrad(_bf16((1, 6, 6, 16)), _bf16((1, 4, 6, 16))))


def test_build_writes_the_library_atomically(tmp_path):
  if not HAVE_COMPILER:
    pytest.skip("no C++ compiler")
  path = native.build(tmp_path / "sub" / "lib.so")
  assert path.exists() and [p.name for p in path.parent.iterdir()] == ["lib.so"]


def test_a_damaged_cached_library_is_rebuilt(tmp_path, monkeypatch):
  if not HAVE_COMPILER:
    pytest.skip("no C++ compiler")
  monkeypatch.setenv("FER_NATIVE_CACHE", str(tmp_path))
  native.library_path().write_bytes(b"not a shared library")
  native._load.cache_clear()
  try:
    assert native.available()
    assert native.library_path().read_bytes()[:4] == b"\x7fELF"
  finally:
    native._load.cache_clear()


def test_failed_build_warns_falls_back_and_leaves_nothing(tmp_path, monkeypatch):
  fake = tmp_path / "broken-c++"
  fake.write_text("#!/bin/sh\necho 'broken-c++: internal error' >&2\nexit 3\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("CXX", str(fake))
  monkeypatch.setenv("FER_NATIVE_CACHE", str(tmp_path / "cache"))
  native._load.cache_clear()
  try:
    with pytest.warns(UserWarning, match="broken-c\\+\\+: internal error"):
      assert not native.available()
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library left behind
    # The XLA versions take over: a convolution still runs and is correct.
    x, kernel = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 1))
    np.testing.assert_allclose(layers.conv_gemm_bf16(x, kernel)[0, 1, 1, 0], 18.0)
  finally:
    native._load.cache_clear()


def test_cache_falls_back_to_a_temp_dir_when_home_is_unwritable(tmp_path, monkeypatch):
  monkeypatch.delenv("FER_NATIVE_CACHE", raising=False)
  not_a_dir = tmp_path / "home"
  not_a_dir.write_text("a file where a home directory should be")
  monkeypatch.setattr(native.Path, "home", staticmethod(lambda: not_a_dir))
  assert native.cache_dir().parent == native.Path(native.tempfile.gettempdir())
  monkeypatch.setenv("FER_NATIVE_CACHE", str(tmp_path / "mine"))
  assert native.cache_dir() == tmp_path / "mine"


def test_missing_compiler_is_named(tmp_path, monkeypatch):
  monkeypatch.delenv("CXX", raising=False)
  monkeypatch.setattr(shutil, "which", lambda name: None)
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler.*g\\+\\+"):
    native.build(tmp_path / "lib.so")
  assert not os.path.exists(tmp_path / "lib.so")


def test_use_sets_and_restores_the_switch(monkeypatch):
  monkeypatch.delenv("FER_NO_NATIVE", raising=False)
  with native.use(False):
    assert os.environ["FER_NO_NATIVE"] == "1" and not native.available()
  assert "FER_NO_NATIVE" not in os.environ
  monkeypatch.setenv("FER_NO_NATIVE", "1")
  with native.use(True):
    assert os.environ["FER_NO_NATIVE"] == "0"
  assert os.environ["FER_NO_NATIVE"] == "1"
