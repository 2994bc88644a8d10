"""Pretrained weights: file layouts, conversion checked against numpy, merging, download cache.

The weight files are synthetic: random values with the real names, shapes and layout of the
Keras notop h5 file and of a torchvision VGG16 state dict exported to safetensors, written to a
temp dir. The network never runs against the internet: downloads use file:// URLs or a fake
urlopen.
"""

import hashlib
import logging
import os
import urllib.error

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from fer import pretrained
from fer.models import vgg16
from fer.models.vgg16 import VGG16

KERAS_BGR_MEAN = np.array([103.939, 116.779, 123.68])
TORCH_MEAN, TORCH_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
# torchvision features.{i}: VGG16 config [64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M].
TORCH_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256),
               (12, 256, 256), (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512),
               (24, 512, 512), (26, 512, 512), (28, 512, 512))


def _he(rng, shape, fan_in):
  return (rng.standard_normal(shape, np.float32) * np.sqrt(2 / fan_in)).astype(np.float32)


def write_keras_notop_h5(path, seed=0, skip=(), reshape=None):
  """The layout of vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 (Keras 2, TF backend)."""
  rng = np.random.default_rng(seed)
  names = ["input_1"]
  for b, block in enumerate(vgg16.BLOCKS):
    names += [f"block{b + 1}_conv{i + 1}" for i in range(len(block))] + [f"block{b + 1}_pool"]
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([n.encode() for n in names if n not in skip])
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.0.8"
    cin = 3
    for name in names:
      if name in skip:
        continue
      g = f.create_group(name)
      if "conv" not in name:
        g.attrs["weight_names"] = np.array([])  # Keras writes an empty list for these
        continue
      cout = dict(zip(vgg16.CONV_NAMES, [c for block in vgg16.BLOCKS for c in block]))[name]
      kernel_shape = (reshape or {}).get(name, (3, 3, cin, cout))
      weight_names = [f"{name}_W_1:0", f"{name}_b_1:0"]
      g.attrs["weight_names"] = np.array([n.encode() for n in weight_names])
      g.create_dataset(weight_names[0], data=_he(rng, kernel_shape, 9 * cin))
      g.create_dataset(weight_names[1], data=rng.normal(0, 0.1, cout).astype(np.float32))
      cin = cout


def write_torchvision_safetensors(path, seed=1):
  """torchvision vgg16().state_dict() names and OIHW shapes (the big classifier left out)."""
  rng = np.random.default_rng(seed)
  state = {}
  for index, cin, cout in TORCH_CONVS:
    state[f"features.{index}.weight"] = _he(rng, (cout, cin, 3, 3), 9 * cin)
    state[f"features.{index}.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
  state["classifier.6.bias"] = np.zeros(1000, np.float32)
  safetensors.numpy.save_file(state, path)


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("keras") / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
  write_keras_notop_h5(path)
  return path


@pytest.fixture(scope="module")
def torch_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("torch") / "vgg16-397923af.safetensors")
  write_torchvision_safetensors(path)
  return path


def _sha256(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _md5(path):
  return hashlib.md5(open(path, "rb").read()).hexdigest()


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(weights="none", path="", cache_dir="", sha256=""))
  c.update(kw)
  return c


# Direct numpy convolutions, written in each source's own layout (no transposes of the kernels).
def conv_nhwc_hwio(x, w, b):
  n, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, h, wd, w.shape[3]))
  for dy in range(3):
    for dx in range(3):
      out += xp[:, dy:dy + h, dx:dx + wd, :] @ w[dy, dx].astype(np.float64)
  return out + b


def conv_nchw_oihw(x, w, b):
  n, _, h, wd = x.shape
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  out = np.zeros((n, w.shape[0], h, wd))
  for dy in range(3):
    for dx in range(3):
      out += np.einsum("oi,nihw->nohw", w[:, :, dy, dx].astype(np.float64),
                       xp[:, :, dy:dy + h, dx:dx + wd], optimize=True)
  return out + b[None, :, None, None]


def keras_reference(rgb, h5_path):
  """Keras VGG16 notop in numpy: BGR minus the mean, convs + ReLU, 2x2 max-pools (NHWC)."""
  x = rgb[..., ::-1].astype(np.float64) - KERAS_BGR_MEAN
  with h5py.File(h5_path, "r") as f:
    for b, block in enumerate(vgg16.BLOCKS):
      for i in range(len(block)):
        g = f[f"block{b + 1}_conv{i + 1}"]
        x = np.maximum(conv_nhwc_hwio(x, g[f"block{b + 1}_conv{i + 1}_W_1:0"][...],
                                      g[f"block{b + 1}_conv{i + 1}_b_1:0"][...]), 0)
      n, h, w, c = x.shape  # 2x2 max-pool, stride 2, odd edges dropped (VALID)
      x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
  return x


def torch_reference(rgb, st_path):
  """torchvision vgg16().features in numpy: RGB/255 mean/std normalised, NCHW, OIHW kernels."""
  sd = safetensors.numpy.load_file(st_path)
  x = ((rgb / 255.0 - TORCH_MEAN) / TORCH_STD).transpose(0, 3, 1, 2)
  for index, _, _ in TORCH_CONVS:
    x = np.maximum(conv_nchw_oihw(x, sd[f"features.{index}.weight"],
                                  sd[f"features.{index}.bias"]), 0)
    if index in (2, 7, 14, 21, 28):  # the last conv of each block
      n, c, h, w = x.shape  # MaxPool2d(2, 2): odd edges dropped
      x = x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
  return x.transpose(0, 2, 3, 1)  # NHWC for the comparison


def _assert_close(got, want, rtol=2e-4):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  assert np.abs(want).max() > 0
  np.testing.assert_allclose(got, want, atol=rtol * np.abs(want).max())


def _model_params(model, loaded):
  """Init params for merging: the base from shapes (zeros), a freshly initialised head."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 48, 48, 1), jnp.uint8))["params"]
  init = {k: jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), v)
          for k, v in shapes.items() if k != "head"}
  feats = jnp.zeros((1, 1, 1, 512))
  init["head"] = vgg16.head_of(model).init(jax.random.key(0), feats)["params"]
  return pretrained.merge_params(init, loaded), init


@pytest.mark.parametrize("source", ["keras", "torchvision"])
def test_converted_conv_layers_match_numpy(source, keras_file, torch_file):
  rng = np.random.default_rng(0)
  if source == "keras":
    loaded = pretrained.load_file(keras_file, "keras")
    with h5py.File(keras_file, "r") as f:
      raw = {n: (f[n][f"{n}_W_1:0"][...], f[n][f"{n}_b_1:0"][...]) for n in vgg16.CONV_NAMES}
  else:
    loaded = pretrained.load_file(torch_file, "torchvision")
    sd = safetensors.numpy.load_file(torch_file)
    raw = {n: (sd[f"features.{i}.weight"], sd[f"features.{i}.bias"])
           for n, (i, _, _) in zip(vgg16.CONV_NAMES, TORCH_CONVS)}
  for name in ("block1_conv1", "block3_conv1"):  # 3 -> 64 and 128 -> 256 channels
    kernel_shape, _ = vgg16.conv_shapes()[name]
    x = rng.normal(size=(2, 12, 12, kernel_shape[2])).astype(np.float32)
    got = nn.Conv(kernel_shape[3], (3, 3), padding="SAME").apply({"params": loaded[name]}, x)
    if source == "keras":
      want = conv_nhwc_hwio(x, *raw[name])
    else:
      want = conv_nchw_oihw(x.transpose(0, 3, 1, 2), *raw[name]).transpose(0, 2, 3, 1)
    _assert_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("source", ["keras", "torchvision"])
def test_pretrained_network_matches_numpy_reference(source, keras_file, torch_file):
  """The whole conv base with the source's preprocessing, on colour images (channel order)."""
  path = keras_file if source == "keras" else torch_file
  loaded = pretrained.load_pretrained(_cfg(weights=source, path=path, sha256=_sha256(path)))
  assert sum(x.size for x in jax.tree_util.tree_leaves(loaded)) == vgg16.NUM_BASE_PARAMS
  model = VGG16(preprocess=pretrained.FILES[source].preprocess)
  params, _ = _model_params(model, loaded)
  rgb = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
  got = model.apply({"params": params}, rgb, method=VGG16.features)
  want = (keras_reference if source == "keras" else torch_reference)(rgb, path)
  _assert_close(got, want)


def test_keras_reader_follows_weight_names(tmp_path):
  """Newer Keras files: `model_weights` root, nested `layer/kernel:0`, chunked name attributes."""
  path = str(tmp_path / "model.h5")
  with h5py.File(path, "w") as f:
    root = f.create_group("model_weights")
    root.attrs["layer_names0"] = np.array([b"block1_conv1"])
    root.attrs["layer_names1"] = np.array([b"flatten", b"fc1"])
    for name, shape in (("block1_conv1", (3, 3, 3, 4)), ("flatten", None), ("fc1", (8, 2))):
      g = root.create_group(name)
      if shape is None:
        g.attrs["weight_names"] = np.array([])
        continue
      g.attrs["weight_names"] = np.array([f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()])
      g.create_dataset(f"{name}/kernel:0", data=np.ones(shape, np.float32))
      g.create_dataset(f"{name}/bias:0", data=np.zeros(shape[-1], np.float32))
  params = pretrained.read_keras_h5(path)
  assert set(params) == {"block1_conv1", "fc1"}
  assert params["block1_conv1"]["kernel"].shape == (3, 3, 3, 4)
  assert params["fc1"]["bias"].shape == (2,)


def test_wrong_layouts_name_every_problem(tmp_path):
  path = str(tmp_path / "bad.h5")
  write_keras_notop_h5(path, skip=("block2_conv2",),
                       reshape={"block4_conv1": (3, 3, 256, 256), "block1_conv1": (3, 3, 1, 64)})
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.load_file(path, "keras")
  message = str(e.value)
  assert "block2_conv2 is missing" in message
  assert "block1_conv1/kernel has shape (3, 3, 1, 64), expected (3, 3, 3, 64)" in message
  assert "block4_conv1/kernel has shape (3, 3, 256, 256), expected (3, 3, 256, 512)" in message
  st = str(tmp_path / "partial.safetensors")
  safetensors.numpy.save_file({"features.0.weight": np.zeros((64, 3, 3, 3), np.float32)}, st)
  with pytest.raises(pretrained.WeightsError, match="block1_conv1 is missing"):
    pretrained.load_file(st, "torchvision")


def test_pickles_are_refused(tmp_path):
  path = tmp_path / "vgg16-397923af.pth"
  path.write_bytes(b"\x80\x02not really a pickle")
  with pytest.raises(pretrained.WeightsError, match="pickle.*safetensors"):
    pretrained.load_file(str(path), "torchvision")


def test_npz_export_is_read(tmp_path, torch_file):
  sd = safetensors.numpy.load_file(torch_file)
  npz = str(tmp_path / "vgg16-397923af.npz")
  np.savez(npz, **sd)
  a, b = pretrained.load_file(npz, "torchvision"), pretrained.load_file(torch_file, "torchvision")
  np.testing.assert_array_equal(a["block5_conv3"]["kernel"], b["block5_conv3"]["kernel"])


def test_merge_params_logs_every_mismatch(caplog):
  init = {"block1_conv1": {"kernel": np.zeros((3, 3, 3, 4)), "bias": np.zeros(4)},
          "block1_conv2": {"kernel": np.zeros((3, 3, 4, 4)), "bias": np.zeros(4)},
          "head": {"logits": {"kernel": np.zeros((4, 7)), "bias": np.zeros(7)}}}
  loaded = {"block1_conv1": {"kernel": np.ones((3, 3, 3, 4), np.float32), "bias": np.ones(4)},
            "block1_conv2": {"kernel": np.ones((3, 3, 4, 8)), "bias": np.ones(4)},
            "fc1": {"kernel": np.ones((2, 2))},
            "head": {"logits": {"kernel": np.ones((4, 1000))}}}
  del loaded["block1_conv1"]["bias"]
  with caplog.at_level(logging.INFO):
    merged = pretrained.merge_params(init, loaded)
  np.testing.assert_array_equal(merged["block1_conv1"]["kernel"], 1)  # loaded
  assert merged["block1_conv1"]["kernel"].dtype == np.float64  # cast to the init dtype
  np.testing.assert_array_equal(merged["block1_conv1"]["bias"], 0)  # missing
  np.testing.assert_array_equal(merged["block1_conv2"]["kernel"], 0)  # mis-shaped
  np.testing.assert_array_equal(merged["block1_conv2"]["bias"], 1)
  np.testing.assert_array_equal(merged["head"]["logits"]["kernel"], 0)  # reset
  assert "fc1" not in merged
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 3
  assert any("block1_conv1/bias" in m and "missing" in m for m in warnings)
  assert any("block1_conv2/kernel" in m and "(3, 3, 4, 8)" in m for m in warnings)
  assert any("fc1/kernel" in m and "not in the model" in m for m in warnings)
  infos = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
  assert "head/logits/kernel" in infos and "2 loaded" in infos


def test_merge_into_the_model_keeps_a_fresh_head(keras_file, caplog):
  loaded = pretrained.load_file(keras_file, "keras")
  model = VGG16(head_features=(32,))
  with caplog.at_level(logging.WARNING):
    params, init = _model_params(model, loaded)
  assert not caplog.records  # a complete conv base: nothing missing, extra or mis-shaped
  np.testing.assert_array_equal(params["block5_conv3"]["kernel"], loaded["block5_conv3"]["kernel"])
  np.testing.assert_array_equal(params["head"]["dense1"]["kernel"],
                                init["head"]["dense1"]["kernel"])


def test_download_verifies_and_caches(tmp_path, keras_file):
  entry = pretrained.WeightsFile(url="file://" + keras_file, filename="w.h5", md5=_md5(keras_file))
  cache = tmp_path / "cache"
  path = pretrained.fetch(entry, str(cache))
  assert path == str(cache / "w.h5") and _md5(path) == entry.md5
  assert os.listdir(cache) == ["w.h5"]

  def offline(*args, **kwargs):
    raise AssertionError("a cached file must not be downloaded again")

  assert pretrained.fetch(entry, str(cache), urlopen=offline) == path
  # load_pretrained with an injected table downloads, verifies and converts the same way.
  files = {"keras": entry}
  cfg = _cfg(weights="keras", cache_dir=str(tmp_path / "cache2"))
  loaded = pretrained.load_pretrained(cfg, files=files)
  assert set(loaded) == set(vgg16.CONV_NAMES)


def test_bad_checksum_leaves_nothing_behind(tmp_path, keras_file):
  wrong = "0" * 32
  entry = pretrained.WeightsFile(url="file://" + keras_file, filename="w.h5", md5=wrong)
  cache = tmp_path / "cache"
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.load_pretrained(_cfg(weights="keras", cache_dir=str(cache)), files={"keras": entry})
  message = str(e.value)
  assert f"expected {wrong}" in message and _md5(keras_file) in message
  assert entry.url in message
  assert "config.pretrained.path" in message and "config.pretrained.cache_dir" in message
  assert os.listdir(cache) == []
  # A local copy with the wrong checksum is refused the same way.
  with pytest.raises(pretrained.WeightsError, match="Checksum mismatch"):
    pretrained.load_pretrained(_cfg(weights="keras", path=keras_file), files={"keras": entry})


def test_offline_error_gives_url_checksum_and_config_keys(tmp_path):
  def urlopen(url, timeout=None):
    raise urllib.error.URLError("no network")

  cache = tmp_path / "cache"
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.load_pretrained(_cfg(weights="keras", cache_dir=str(cache)), urlopen=urlopen)
  message = str(e.value)
  keras = pretrained.FILES["keras"]
  assert keras.url in message and "md5 6d6bbae143d832006294945121d1f1fc" in message
  assert "config.pretrained.path" in message and keras.filename in message
  assert os.listdir(cache) == []  # no half-downloaded file


class _FailingResponse:
  """A download that breaks after the first bytes."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def read(self, n=-1):
    raise ConnectionResetError("connection reset")


def test_interrupted_download_leaves_nothing_behind(tmp_path):
  cache = tmp_path / "cache"
  with pytest.raises(pretrained.WeightsError, match="connection reset"):
    pretrained.fetch(pretrained.FILES["keras"], str(cache),
                     urlopen=lambda url, timeout=None: _FailingResponse())
  assert os.listdir(cache) == []


def test_missing_files_explain_what_to_set(tmp_path):
  missing = str(tmp_path / "nope.h5")
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.load_pretrained(_cfg(weights="keras", path=missing))
  assert "config.pretrained.path" in str(e.value) and pretrained.FILES["keras"].url in str(e.value)
  # torchvision weights are never downloaded (a .pth is a pickle): the error gives the export.
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.load_pretrained(_cfg(weights="torchvision", cache_dir=str(tmp_path)))
  message = str(e.value)
  assert "vgg16-397923af.pth" in message and "safetensors" in message
  assert "config.pretrained.sha256" in message


def test_torchvision_export_in_the_cache_dir(tmp_path, torch_file):
  os.symlink(torch_file, tmp_path / "vgg16-397923af.safetensors")
  loaded = pretrained.load_pretrained(_cfg(weights="torchvision", cache_dir=str(tmp_path)))
  assert set(loaded) == set(vgg16.CONV_NAMES)
  with pytest.raises(pretrained.WeightsError, match="Checksum mismatch"):
    pretrained.load_pretrained(_cfg(weights="torchvision", cache_dir=str(tmp_path),
                                    sha256="1" * 64))


def test_none_and_unknown_sources(monkeypatch, tmp_path):
  assert pretrained.load_pretrained(_cfg(weights="none")) is None
  with pytest.raises(ValueError, match="config.pretrained.weights"):
    pretrained.load_pretrained(_cfg(weights="caffe"))
  monkeypatch.setenv("FER_WEIGHTS_DIR", str(tmp_path))
  assert pretrained.default_cache_dir() == str(tmp_path)
