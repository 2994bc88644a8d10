"""fer.models.layers: the im2col and bf16-matmul convolutions and the reshape max pool match nn.Conv / nn.max_pool."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer.models import cnn
from fer.models import layers

CONV_SHAPES = [  # (batch, height, width, in channels, out channels, kernel)
    (2, 9, 9, 1, 4, 3),
    (3, 7, 11, 32, 8, 3),
    (2, 8, 8, 32, 16, 5),
    (1, 5, 6, 3, 2, 5),
    (2, 6, 7, 4, 6, 2),
    (2, 6, 5, 6, 4, 4),
]


def _round_bf16(x):
  return x.astype(jnp.bfloat16).astype(jnp.float32)


def _rand(key, shape):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32)


@pytest.mark.parametrize("impl", layers.CONV_IMPLS)
@pytest.mark.parametrize("n,h,w,cin,cout,k", CONV_SHAPES)
def test_conv2d_matches_nn_conv(impl, n, h, w, cin, cout, k):
  x = _rand(0, (n, h, w, cin))
  ref = nn.Conv(cout, (k, k), padding="SAME")
  params = ref.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * _rand(2, p.shape), params)  # non-zero bias
  ours = layers.Conv2D(cout, (k, k), impl=impl)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
      jnp.shape, params)
  g = _rand(3, (n, h, w, cout))

  @jax.jit
  def outputs_and_grads(p, x):
    def loss(module, p, x):
      y = module.apply(p, x)
      return jnp.vdot(y, g), y
    return [jax.grad(loss, argnums=(1, 2), has_aux=True)(m, p, x) for m in (ours, ref)]

  ((dp, dx), y), ((dp_ref, dx_ref), y_ref) = outputs_and_grads(params, x)
  if impl in layers.BF16_IMPLS:  # bf16 matmul inputs: close to fp32, not equal (next test)
    scale = lambda a: float(jnp.abs(a).max())
    np.testing.assert_allclose(y, y_ref, atol=1e-2 * scale(y_ref))
    np.testing.assert_allclose(dx, dx_ref, atol=1e-2 * scale(dx_ref))
    for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(dp_ref)):
      np.testing.assert_allclose(a, b, atol=1e-2 * scale(b))
    return
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(dp_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,h,w,cin,cout,k", CONV_SHAPES)
def test_conv_gemm_bf16_is_fp32_conv_of_bf16_rounded_operands(n, h, w, cin, cout, k):
  # Output and both gradients equal fp32 convolution maths on bf16-rounded inputs (x, kernel and
  # the incoming gradient): the only approximation is that rounding, accumulation stays fp32.
  x, kernel, g = _rand(0, (n, h, w, cin)), _rand(1, (k, k, cin, cout)), _rand(2, (n, h, w, cout))
  y, vjp = jax.vjp(layers.conv_gemm_bf16, x, kernel)
  dx, dk = vjp(g)
  y_ref, vjp_ref = jax.vjp(layers.conv_xla, _round_bf16(x), _round_bf16(kernel))
  dx_ref, dk_ref = vjp_ref(_round_bf16(g))
  for a, b in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
    assert a.dtype == jnp.float32 and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_conv_gemm_bf16_keeps_dtypes():
  x, kernel = _rand(0, (2, 5, 5, 4)).astype(jnp.bfloat16), _rand(1, (3, 3, 4, 6))
  y, vjp = jax.vjp(layers.conv_gemm_bf16, x, kernel)
  dx, dk = vjp(jnp.ones_like(y))
  assert (y.dtype, dx.dtype, dk.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)


def test_conv2d_same_init_as_nn_conv():
  x = jnp.zeros((1, 6, 6, 3))
  a = layers.Conv2D(5, (3, 3)).init(jax.random.key(7), x)
  b = nn.Conv(5, (3, 3)).init(jax.random.key(7), x)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _nn_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2))


@jax.jit
def _pool_grads(x, g):
  return [jax.vjp(f, x)[1](g)[0] for f in (layers.max_pool_2x2, _nn_pool)]


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 9, 5), (1, 48, 48, 32)])
def test_max_pool_and_gradient_match_nn_max_pool(shape):
  x = _rand(0, shape)
  g = _rand(1, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
  np.testing.assert_array_equal(layers.max_pool_2x2(x), _nn_pool(x))
  dx, dx_ref = _pool_grads(x, g)
  np.testing.assert_array_equal(dx, dx_ref)


def test_max_pool_ties_go_to_first_maximum_in_row_major_order():
  """Tie rule: the whole gradient goes to the first maximum of the window (as nn.max_pool)."""
  # Random floats rounded to a coarse grid so that ties are common, plus ReLU-like zeros.
  x = jnp.round(_rand(0, (4, 10, 12, 6)) * 2) / 2
  x = jnp.maximum(x, 0.0)
  g = _rand(1, (4, 5, 6, 6))
  dx, dx_ref = _pool_grads(x, g)
  np.testing.assert_array_equal(dx, dx_ref)
  window = np.array([[2.0, 3.0], [3.0, 3.0]]).reshape(1, 2, 2, 1)
  dx = jax.grad(lambda x: layers.max_pool_2x2(x).sum())(jnp.asarray(window))
  np.testing.assert_array_equal(dx.reshape(2, 2), [[0.0, 1.0], [0.0, 0.0]])
  assert int((np.asarray(dx) != 0).sum()) == 1


def test_max_pool_impl_switch():
  x = _rand(0, (2, 6, 6, 2))
  np.testing.assert_array_equal(layers.max_pool(x, "xla"), layers.max_pool(x, "reshape"))
  with pytest.raises(ValueError):
    layers.max_pool(x, "nope")


def test_cnn_impls_share_params_and_match():
  images = jax.random.randint(jax.random.key(0), (2, 48, 48, 1), 0, 256).astype(jnp.uint8)
  labels = jnp.arange(2) % 7
  ref = cnn.CNN(conv_impl="xla", pool_impl="xla")
  params = ref.init(jax.random.key(1), images)
  assert sum(p.size for p in jax.tree.leaves(params)) == 1_733_127
  treedef = jax.tree.structure(params)

  def logits_and_grads(model, p):
    def loss(p):
      logits = model.apply(p, images)
      return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean(), logits
    grads, logits = jax.grad(loss, has_aux=True)(p)
    return logits, grads

  models = [ref] + [cnn.CNN(conv_impl=c, pool_impl="reshape") for c in layers.CONV_IMPLS]
  for model in models[1:]:
    assert jax.tree.structure(jax.eval_shape(model.init, jax.random.key(1), images)) == treedef
  outs = jax.jit(lambda p: [logits_and_grads(m, p) for m in models])(params)
  ref_logits, ref_grads = outs[0]
  for model, (logits, grads) in zip(models[1:], outs[1:]):
    bf16 = model.conv_impl in layers.BF16_IMPLS
    np.testing.assert_allclose(logits, ref_logits, rtol=2e-2 if bf16 else 1e-4,
                               atol=1e-2 if bf16 else 1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      if bf16:
        # At initialisation the hidden gradients are sums of nearly cancelling terms, so bf16
        # rounding moves them by 10-30% (a model run wholly in bfloat16 moves them as much);
        # the direction must still agree. Exactness is tested per layer above.
        cosine = jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
        assert cosine > 0.9
      else:
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_resolve_conv_impl():
  assert layers.resolve_conv_impl("auto") == (
      "winograd_bf16" if jax.default_backend() == "cpu" else "xla")
  assert layers.resolve_conv_impl("im2col") == "im2col"
  with pytest.raises(ValueError, match="conv_impl='fast'"):
    layers.resolve_conv_impl("fast")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_matches_nn_batch_norm(dtype):
  """Same variables, outputs, running statistics and gradients (also through the statistics)."""
  x = (_rand(0, (6, 5, 4, 8)) * 3 + 1).astype(dtype)
  ref = nn.BatchNorm(use_running_average=False, momentum=0.9, dtype=dtype)
  new = layers.BatchNorm(use_running_average=False, momentum=0.9, dtype=dtype)
  init, ref_init = new.init(jax.random.key(1), x), ref.init(jax.random.key(1), x)
  assert jax.tree.structure(init) == jax.tree.structure(ref_init)
  jax.tree.map(np.testing.assert_array_equal, init, ref_init)
  variables = {"params": {"scale": jnp.linspace(0.5, 2, 8), "bias": jnp.linspace(-1, 1, 8)},
               "batch_stats": {"mean": jnp.linspace(0, 1, 8), "var": jnp.linspace(1, 2, 8)}}
  w = _rand(2, x.shape)

  def loss(model, variables, x):
    y, updates = model.apply(variables, x, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    # The statistics feed the loss too, so their cotangents are tested.
    value = jnp.sum(jnp.tanh(y.astype(jnp.float32)) * w)
    value += jnp.sum(jnp.square(stats["mean"])) + jnp.sum(jnp.sin(3 * stats["var"]))
    return value, (y, stats)

  grad = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)
  ref_grads, (ref_y, ref_stats) = grad(ref, variables, x)
  grads, (y, stats) = grad(new, variables, x)
  assert y.dtype == ref_y.dtype == dtype
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(y.astype(jnp.float32), ref_y.astype(jnp.float32), **tol)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), rtol=1e-4,
                               atol=1e-4 if dtype == jnp.float32 else 2e-2)
  # Evaluation uses the running averages.
  ref_eval = nn.BatchNorm(use_running_average=True, dtype=dtype).apply(variables, x)
  new_eval = layers.BatchNorm(use_running_average=True, dtype=dtype).apply(variables, x)
  np.testing.assert_allclose(new_eval.astype(jnp.float32), ref_eval.astype(jnp.float32), **tol)


def test_batch_norm_gradient_is_the_autodiff_gradient_of_its_formula():
  """Against jax.grad of the two-pass textbook formula (not flax's)."""
  x = _rand(3, (64, 3)) * 2.0 + 1.0
  scale, bias = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.0, 1.0, -1.0])
  w = _rand(4, x.shape)

  def textbook(x, scale, bias):
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    return ((x - mean) / jnp.sqrt(var + 1e-5) * scale + bias) * w

  def ours(x, scale, bias):
    return layers.batch_norm_train(x, scale, bias, 1e-5, jnp.dtype(jnp.float32))[0] * w

  ref = jax.grad(lambda *a: jnp.sum(jnp.sin(textbook(*a))), argnums=(0, 1, 2))(x, scale, bias)
  got = jax.grad(lambda *a: jnp.sum(jnp.sin(ours(*a))), argnums=(0, 1, 2))(x, scale, bias)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape, window, strides", [
    ((2, 44, 44, 3), (3, 3), (2, 2)), ((2, 11, 11, 4), (3, 3), (2, 2)),
    ((1, 7, 10, 2), (3, 2), (1, 3)), ((2, 6, 6, 5), (2, 2), (2, 2))])
def test_max_pool_same_and_its_gradient_match_nn_max_pool(shape, window, strides):
  x = _rand(0, shape)  # random floats: no ties (there the gradient is shared, not the first's)
  ref = lambda x: nn.max_pool(x, window, strides, padding="SAME")  # pylint: disable=unnecessary-lambda-assignment
  mine = lambda x: layers.max_pool_same(x, window, strides)  # pylint: disable=unnecessary-lambda-assignment
  np.testing.assert_array_equal(mine(x), ref(x))
  g = _rand(1, ref(x).shape)
  np.testing.assert_array_equal(jax.vjp(mine, x)[1](g)[0], jax.vjp(ref, x)[1](g)[0])


@pytest.mark.parametrize("shape, kernel_size", [((2, 9, 9, 8), (3, 3)), ((1, 6, 7, 3), (2, 4))])
def test_depthwise_conv_matches_grouped_nn_conv(shape, kernel_size):
  x = _rand(0, shape)
  mine = layers.DepthwiseConv(kernel_size)
  ref = nn.Conv(shape[-1], kernel_size, padding="SAME", feature_group_count=shape[-1],
                use_bias=False)
  params = mine.init(jax.random.key(2), x)
  ref_params = ref.init(jax.random.key(2), x)  # the same initialiser and layout
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  np.testing.assert_allclose(mine.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda p, x, m=m: (m.apply(p, x) ** 2).sum(), argnums=(0, 1))(params, x)
           for m in (mine, ref)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), *grads)
