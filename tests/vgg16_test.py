"""VGG16: parameter tree and count, shapes, input preprocessing, the head on cached features.

Parameters are drawn with numpy from the shapes of `jax.eval_shape(model.init)`: a real init of
14.7M parameters costs seconds of random-number generation on a small CPU.
"""

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer.models import vgg16
from fer.models.vgg16 import VGG16


def _param_shapes(model, image_size=48):
  images = jax.ShapeDtypeStruct((2, image_size, image_size, 1), jnp.uint8)
  return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def _random_params(model, seed=0):
  """He-scaled normal kernels and small biases, as numpy, with the model's tree."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == "bias":
      return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
    fan_in = np.prod(leaf.shape[:-1])
    return (rng.standard_normal(leaf.shape, np.float32) * np.sqrt(2 / fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, _param_shapes(model))


def test_parameter_tree_and_count():
  params = _param_shapes(VGG16(head_features=(256,)))
  names = list(params)
  assert names[:13] == list(vgg16.CONV_NAMES)
  assert names[13:] == ["head"]
  assert vgg16.CONV_NAMES[0] == "block1_conv1" and vgg16.CONV_NAMES[-1] == "block5_conv3"
  for name, (kernel_shape, bias_shape) in vgg16.conv_shapes().items():
    assert params[name]["kernel"].shape == kernel_shape  # HWIO, as in the Keras file
    assert params[name]["bias"].shape == bias_shape
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  base = {k: v for k, v in params.items() if k.startswith("block")}
  # Golden number: Keras VGG16(include_top=False).count_params(). Change it only when the conv
  # base itself is meant to change (it must keep matching the pretrained files).
  assert count(base) == vgg16.NUM_BASE_PARAMS == 14_714_688
  # Head at 48 pixels: flatten 1x1x512 -> 256 -> 7.
  assert count(params["head"]) == 512 * 256 + 256 + 256 * 7 + 7
  assert set(params["head"]) == {"dense1", "logits"}


@pytest.mark.parametrize("input_size,pool,features_shape,head_in", [
    (48, "flatten", (1, 1, 512), 512),
    (96, "flatten", (3, 3, 512), 4608),
    (96, "avg", (3, 3, 512), 512),
    (64, "max", (2, 2, 512), 512),
])
def test_shapes(input_size, pool, features_shape, head_in):
  model = VGG16(input_size=input_size, head_pool=pool, head_features=(128, 64))
  params = _param_shapes(model)
  assert params["head"]["dense1"]["kernel"].shape == (head_in, 128)
  images = jax.ShapeDtypeStruct((3, 48, 48, 1), jnp.uint8)
  logits = jax.eval_shape(model.apply, {"params": params}, images)
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  feats = jax.eval_shape(lambda v, x: model.apply(v, x, method=VGG16.features),
                         {"params": params}, images)
  assert feats.shape == (3, *features_shape)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = VGG16(dtype=jnp.bfloat16)
  params = _param_shapes(model)
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  images = jax.ShapeDtypeStruct((2, 48, 48, 1), jnp.uint8)
  assert jax.eval_shape(model.apply, {"params": params}, images).dtype == jnp.float32


def test_preprocess_keras_is_bgr_minus_mean():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
  got = np.asarray(vgg16.preprocess(jnp.asarray(rgb), "keras", 48))
  want = rgb[..., ::-1].astype(np.float32) - np.array([103.939, 116.779, 123.68], np.float32)
  np.testing.assert_allclose(got, want, atol=1e-4)
  grey = rgb[..., :1]
  got = np.asarray(vgg16.preprocess(jnp.asarray(grey), "keras", 48))
  np.testing.assert_allclose(got, np.repeat(grey, 3, -1) - np.array([103.939, 116.779, 123.68]),
                             atol=1e-4)


def test_preprocess_torch_is_rgb_mean_std():
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
  got = np.asarray(vgg16.preprocess(jnp.asarray(rgb), "torch", 48))
  want = (rgb / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_preprocess_resizes():
  flat = np.full((1, 48, 48, 1), 200, np.uint8)
  out = np.asarray(vgg16.preprocess(jnp.asarray(flat), "torch", 96))
  assert out.shape == (1, 96, 96, 3)
  want = (200 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), atol=1e-5)
  ramp = np.tile(np.arange(48, dtype=np.uint8)[None, :, None], (48, 1, 1))[None] * 5
  out = np.asarray(vgg16.preprocess(jnp.asarray(ramp), "keras", 96))
  assert np.all(np.diff(out[0, 10, :, 0]) >= 0)  # still a left-to-right ramp


def test_preprocess_rejects_bad_settings():
  with pytest.raises(ValueError, match="model.preprocess"):
    vgg16.preprocess(jnp.zeros((1, 48, 48, 1)), "caffe", 48)
  with pytest.raises(ValueError, match="input_size"):
    vgg16.preprocess(jnp.zeros((1, 48, 48, 1)), "keras", 24)
  with pytest.raises(ValueError, match="images"):
    vgg16.preprocess(jnp.zeros((1, 48, 48, 2)), "keras", 48)


def test_forward_head_on_cached_features_and_dropout():
  model = VGG16(head_features=(64,), head_dropout=0.5)
  variables = {"params": _random_params(model)}
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 48, 48, 1), dtype=np.uint8)
  logits = model.apply(variables, images)
  assert logits.shape == (4, 7) and np.all(np.isfinite(logits))
  # Grey input is the same as the grey image repeated to RGB.
  np.testing.assert_allclose(model.apply(variables, np.repeat(images, 3, -1)), logits, atol=1e-5)
  # The base once, then the standalone head on the cached features: the same logits.
  feats = model.apply(variables, images, method=VGG16.features)
  head = vgg16.head_of(model)
  np.testing.assert_allclose(head.apply({"params": variables["params"]["head"]}, feats), logits,
                             rtol=1e-5, atol=1e-5)
  # Dropout only in training, driven by the "dropout" rng.
  train = lambda seed: head.apply({"params": variables["params"]["head"]}, feats, train=True,
                                  rngs={"dropout": jax.random.key(seed)})
  assert not np.allclose(train(0), logits)
  np.testing.assert_array_equal(train(1), train(1))


def test_freezing_regex_selects_exactly_the_base():
  params = _param_shapes(VGG16())
  paths = traverse_util.flatten_dict(params, sep="/")
  base = [p for p in paths if p.startswith("block")]
  assert len(base) == 26 and all(not p.startswith("head") for p in base)
  assert len(paths) - len(base) == len([p for p in paths if p.startswith("head")])
