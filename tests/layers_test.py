"""fer.models.layers: the im2col convolution and the reshape max pool match nn.Conv / nn.max_pool."""

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
]


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
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(dp_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


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
  for logits, grads in outs[1:]:
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
