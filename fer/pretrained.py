r"""Pretrained VGG16 conv-base weights: the files table, the download cache, conversion, merging.

Weights are data. They are read here, outside the model, converted to the parameter layout of
fer.models.vgg16 (`block1_conv1/kernel` HWIO, `.../bias`) and merged into an initialised
parameter tree by `merge_params`, which logs every missing, extra or mis-shaped parameter and
leaves the head freshly initialised. No weights file is ever executed or unpickled.

The training code calls `load_pretrained(config.pretrained)` (keys in configs/common.py):

  weights    none | keras | torchvision
  path       a local weights file; when empty the file is looked up in, or downloaded into,
             cache_dir
  cache_dir  where downloads are kept; empty: $FER_WEIGHTS_DIR, else ~/.cache/fer/weights
  sha256     optional: the sha256 the file must have, instead of the table's checksum

Sources:

  keras        The official Keras Applications file
               vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 (read with h5py). Kernels are
               already HWIO. The network expects BGR images minus the ImageNet mean on the 0..255
               scale: model.preprocess = "keras".
               Downloaded once into the cache dir and verified.

  torchvision  torchvision's VGG16 (IMAGENET1K_V1) state dict, vgg16-397923af.pth. A .pth file is
               a pickle, which this project never loads, so export it once to safetensors on a
               machine with torch (TORCH_EXPORT_COMMAND; torch.hub checks that the .pth's sha256
               starts with the 397923af of its name):

    python -c "import torch, safetensors.torch as st; sd = torch.hub.load_state_dict_from_url('https://download.pytorch.org/models/vgg16-397923af.pth', map_location='cpu', check_hash=True, weights_only=True); st.save_file({k: v.contiguous() for k, v in sd.items()}, 'vgg16-397923af.safetensors')"

               or to npz: `numpy.savez('vgg16-397923af.npz', **{k: v.numpy() for k, v in
               sd.items()})`. Then set config.pretrained.path to the export, or put it in the
               cache dir under that name; `sha256sum` it and set config.pretrained.sha256 to pin
               it. Conv kernels are OIHW (`features.{0,2,5,...,28}.weight`) and are transposed to
               HWIO. The network expects RGB in [0, 1] normalised by the ImageNet mean and std:
               model.preprocess = "torch".
"""

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import urllib.request

from absl import logging
import flax.core
from flax import traverse_util
import h5py
import numpy as np
import safetensors.numpy

from fer.models import vgg16


class WeightsError(RuntimeError):
  """A weights file is missing, cannot be downloaded, fails its checksum or has the wrong layout."""


@dataclasses.dataclass(frozen=True)
class WeightsFile:
  url: str  # where the file (or, for download=False, the file it is made from) comes from
  filename: str  # its name in the cache dir
  sha256: str = ""  # expected digest; sha256 is preferred, md5 only where that is all published
  md5: str = ""
  download: bool = True  # False: the user makes the file (see the module docstring)
  preprocess: str = ""  # the model.preprocess these weights expect


FILES = {
    "keras": WeightsFile(
        url=("https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
             "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        filename="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        # Keras publishes only an md5 for this file (keras.applications.vgg16:
        # get_file(..., file_hash=...)); no published sha256 was found, so md5 is verified.
        md5="6d6bbae143d832006294945121d1f1fc",
        preprocess="keras"),
    "torchvision": WeightsFile(
        # The .pth's sha256 starts with 397923af (torchvision names its files that way); the
        # safetensors export is the user's own file: pin it with config.pretrained.sha256.
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        filename="vgg16-397923af.safetensors",
        download=False,
        preprocess="torch"),
}

TORCH_EXPORT_COMMAND = (
    "python -c \"import torch, safetensors.torch as st; sd = torch.hub.load_state_dict_from_url("
    "'https://download.pytorch.org/models/vgg16-397923af.pth', map_location='cpu', "
    "check_hash=True, weights_only=True); st.save_file({k: v.contiguous() for k, v in "
    "sd.items()}, 'vgg16-397923af.safetensors')\"")

# torchvision's `features` Sequential: conv, ReLU per layer and a max-pool after each block.
TORCH_CONV_INDICES = tuple(
    i for i, kind in enumerate(
        k for block in vgg16.BLOCKS for k in ("conv", "relu") * len(block) + ("pool",))
    if kind == "conv")

_READ_CHUNK = 1 << 20


def default_cache_dir() -> str:
  return os.environ.get("FER_WEIGHTS_DIR") or os.path.expanduser("~/.cache/fer/weights")


def file_digests(path: str, algorithms=("sha256",)) -> dict[str, str]:
  hashes = {a: hashlib.new(a) for a in algorithms}
  with open(path, "rb") as f:
    while chunk := f.read(_READ_CHUNK):
      for h in hashes.values():
        h.update(chunk)
  return {a: h.hexdigest() for a, h in hashes.items()}


def _expected(sha256: str = "", md5: str = "") -> dict[str, str]:
  """The one checksum to verify: sha256 when known, else md5; {} when none is known."""
  if sha256:
    return {"sha256": sha256.lower()}
  return {"md5": md5.lower()} if md5 else {}


def _describe(expected: dict[str, str]) -> str:
  return " ".join(f"{a} {d}" for a, d in expected.items()) or "no published checksum"


def _how_to_fix(entry: WeightsFile, cache_dir: str, expected: dict[str, str]) -> str:
  if entry.download:
    get = f"Download {entry.url} (expected {_describe(expected)})"
  else:
    get = (f"Export {entry.url} to safetensors with `{TORCH_EXPORT_COMMAND}` (expected "
           f"{_describe(expected)})")
  return (f"{get} and set config.pretrained.path to the local file, or put it into "
          f"config.pretrained.cache_dir ({cache_dir}) as {entry.filename}. A different trusted "
          f"copy can be pinned with config.pretrained.sha256. Without weights, "
          f"--config.pretrained.weights=none trains from a seeded random initialisation.")


def verify_file(path: str, *, sha256: str = "", md5: str = "", hint: str = "") -> None:
  """Raises WeightsError when the file's digest differs; logs the sha256 when none is expected."""
  expected = _expected(sha256, md5)
  got = file_digests(path, tuple(expected) or ("sha256",))
  if not expected:
    logging.warning("No checksum to verify %s against; its sha256 is %s (set "
                    "config.pretrained.sha256 to pin it).", path, got["sha256"])
    return
  (algorithm, want), = expected.items()
  if got[algorithm] != want:
    raise WeightsError(f"Checksum mismatch for {path}: {algorithm} is {got[algorithm]}, expected "
                       f"{want}. {hint}".rstrip())
  logging.info("Verified %s (%s %s).", path, algorithm, want)


def fetch(entry: WeightsFile, cache_dir: str, *, sha256: str = "",
          urlopen=urllib.request.urlopen) -> str:
  """Returns the verified file in cache_dir, downloading it first if it is not there yet.

  The download goes to a `.part` file next to the destination, is verified, then renamed into
  place atomically; on any failure the part file is deleted. `urlopen` is injectable for tests
  (a file:// URL also works with the default). `sha256` overrides the entry's checksum.
  """
  expected = _expected(sha256 or entry.sha256, "" if sha256 else entry.md5)
  hint = _how_to_fix(entry, cache_dir, expected)
  dest = os.path.join(cache_dir, entry.filename)
  if os.path.exists(dest):
    verify_file(dest, **expected, hint=f"The cached file is not the expected one. {hint}")
    return dest
  if not entry.download:
    raise WeightsError(f"{dest} does not exist and is not downloaded automatically. {hint}")
  os.makedirs(cache_dir, exist_ok=True)
  fd, part = tempfile.mkstemp(prefix=entry.filename + ".", suffix=".part", dir=cache_dir)
  logging.info("Downloading %s to %s", entry.url, dest)
  try:
    with os.fdopen(fd, "wb") as f, urlopen(entry.url, timeout=60) as response:
      shutil.copyfileobj(response, f, _READ_CHUNK)
    verify_file(part, **expected, hint=f"The download was deleted. {hint}")
    os.replace(part, dest)
  except OSError as e:  # urllib.error.URLError, timeouts and disk errors are OSErrors.
    raise WeightsError(f"Could not download {entry.url} ({e}); offline? {hint}") from e
  finally:
    if os.path.exists(part):
      os.remove(part)
  return dest


def _names_attr(group: h5py.Group, name: str) -> list[str]:
  """A list-of-names attribute, possibly split into name0, name1, ... (Keras's hdf5 format)."""
  if name in group.attrs:
    values = list(group.attrs[name])
  else:
    values, chunk = [], 0
    while f"{name}{chunk}" in group.attrs:
      values.extend(group.attrs[f"{name}{chunk}"])
      chunk += 1
  return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def read_keras_h5(path: str) -> dict[str, dict[str, np.ndarray]]:
  """{layer: {"kernel", "bias"}} for every layer with weights in a Keras (tf.keras 1/2) h5 file.

  Follows keras's legacy hdf5 loader: the root (or the `model_weights` group of a saved model)
  lists its layers in the attribute `layer_names`, each layer group its arrays in `weight_names`,
  e.g. `block1_conv1_W_1:0`, `block1_conv1_b_1:0` in the Keras Applications file or
  `block1_conv1/kernel:0` in newer ones. Without those attributes all datasets are read.
  """
  params = {}
  with h5py.File(path, "r") as f:
    root = f["model_weights"] if "model_weights" in f and "layer_names" not in f.attrs else f
    backend = root.attrs.get("backend", f.attrs.get("backend", b""))
    backend = backend.decode("utf8") if isinstance(backend, bytes) else str(backend)
    if backend == "theano":
      raise WeightsError(f"{path} holds Theano-ordered kernels; use the *_tf_kernels file.")
    for layer in _names_attr(root, "layer_names") or list(root):
      if layer not in root or not isinstance(root[layer], h5py.Group):
        continue
      group = root[layer]
      weight_names = _names_attr(group, "weight_names")
      if not weight_names:
        group.visititems(
            lambda n, obj: weight_names.append(n) if isinstance(obj, h5py.Dataset) else None)
      arrays = [np.asarray(group[n], np.float32) for n in weight_names]
      if not arrays:
        continue  # input and pooling layers
      kernels = [a for a in arrays if a.ndim > 1]
      biases = [a for a in arrays if a.ndim == 1]
      if len(arrays) != 2 or len(kernels) != 1 or len(biases) != 1:
        raise WeightsError(f"{path}: layer {layer} has weights {weight_names} with shapes "
                           f"{[a.shape for a in arrays]}; expected one kernel and one bias.")
      params[layer] = {"kernel": kernels[0], "bias": biases[0]}
  return params


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch state dict exported to safetensors or npz (never a pickled .pth)."""
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    raise WeightsError(f"{path} is a pickle, which fer never loads. Export it to safetensors "
                       f"with `{TORCH_EXPORT_COMMAND}` and set config.pretrained.path to the "
                       f"export.")
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # safetensors raises its own error types for foreign files.
    raise WeightsError(f"{path} is not a safetensors file ({e}); expected a safetensors or "
                       f".npz export of the torchvision state dict.") from e


def convert_torchvision(state_dict: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """torchvision `features.{i}.weight` OIHW / `.bias` -> {block*_conv*: {kernel HWIO, bias}}."""
  params = {}
  for index, name in zip(TORCH_CONV_INDICES, vgg16.CONV_NAMES):
    w, b = state_dict.get(f"features.{index}.weight"), state_dict.get(f"features.{index}.bias")
    if w is None or b is None or np.ndim(w) != 4:
      continue  # reported as missing by check_conv_base
    params[name] = {"kernel": np.asarray(w, np.float32).transpose(2, 3, 1, 0),
                    "bias": np.asarray(b, np.float32)}
  used = {f"features.{i}.{p}" for i in TORCH_CONV_INDICES for p in ("weight", "bias")}
  for key in sorted(set(state_dict) - used):
    logging.info("Ignoring %s %s of the torchvision state dict.", key, np.shape(state_dict[key]))
  return params


def check_conv_base(params: dict, origin: str) -> dict[str, dict[str, np.ndarray]]:
  """Keeps the 13 conv layers; raises naming every missing or mis-shaped one, logs extra ones."""
  expected = vgg16.conv_shapes()
  problems = []
  for name, (kernel_shape, bias_shape) in expected.items():
    layer = params.get(name)
    if layer is None:
      problems.append(f"{name} is missing")
      continue
    for key, shape in (("kernel", kernel_shape), ("bias", bias_shape)):
      got = np.shape(layer.get(key))
      if got != shape:
        problems.append(f"{name}/{key} has shape {got}, expected {shape}")
  if problems:
    raise WeightsError(f"{origin} is not a VGG16 conv base: " + "; ".join(problems))
  for name in sorted(set(params) - set(expected)):
    logging.info("Ignoring layer %s of %s (not in the conv base).", name, origin)
  return {name: params[name] for name in expected}


def load_file(path: str, weights: str) -> dict[str, dict[str, np.ndarray]]:
  """Reads and converts a weights file of the given source; no checksum verification."""
  if weights == "keras":
    params = read_keras_h5(path)
  elif weights == "torchvision":
    params = convert_torchvision(read_state_dict(path))
  else:
    raise ValueError(f"config.pretrained.weights={weights!r}: expected one of {sorted(FILES)}")
  return check_conv_base(params, f"{weights} weights file {path}")


def load_pretrained(config, *, files=FILES, urlopen=urllib.request.urlopen):
  """The VGG16 conv base of `config.pretrained` as numpy params {block*_conv*: {kernel, bias}}.

  None when config.weights is "none". Merge the result into initialised params with
  `merge_params(params, loaded)`. Raises WeightsError with the URL, the expected checksum and
  the config keys to set when the file is missing, cannot be downloaded or fails its checksum.
  """
  weights = config.get("weights") or "none"
  if weights == "none":
    return None
  if weights not in files:
    raise ValueError(f"config.pretrained.weights={weights!r}: expected none or one of "
                     f"{sorted(files)}")
  entry = files[weights]
  cache_dir = os.path.expanduser(config.get("cache_dir") or default_cache_dir())
  sha256 = config.get("sha256") or ""
  expected = _expected(sha256 or entry.sha256, "" if sha256 else entry.md5)
  path = os.path.expanduser(config.get("path") or "")
  if path:
    if not os.path.isfile(path):
      raise WeightsError(f"config.pretrained.path={path!r} does not exist. "
                         f"{_how_to_fix(entry, cache_dir, expected)}")
    verify_file(path, **expected, hint=_how_to_fix(entry, cache_dir, expected))
  else:
    if not entry.download:  # also accept an npz export in the cache dir
      npz = os.path.join(cache_dir, os.path.splitext(entry.filename)[0] + ".npz")
      if os.path.exists(npz) and not os.path.exists(os.path.join(cache_dir, entry.filename)):
        entry = dataclasses.replace(entry, filename=os.path.basename(npz))
    path = fetch(entry, cache_dir, sha256=sha256, urlopen=urlopen)
  params = load_file(path, weights)
  logging.info("Loaded the %s VGG16 conv base from %s (model.preprocess must be %r).",
               weights, path, entry.preprocess)
  return params


def merge_params(init_params, loaded, *, reset_regex: str = "^head"):
  """Returns init_params with every parameter taken from `loaded` where path and shape match.

  Paths are "/"-joined ("block1_conv1/kernel"). Parameters matching `reset_regex` keep their
  initial values (the fresh head). Every missing, mis-shaped or extra parameter is logged; those
  keep their initial values (or are dropped). Loaded values are numpy, cast to the init dtype.
  """
  init_flat = traverse_util.flatten_dict(flax.core.unfreeze(init_params), sep="/")
  loaded_flat = traverse_util.flatten_dict(flax.core.unfreeze(loaded or {}), sep="/")
  reset = re.compile(reset_regex) if reset_regex else None
  merged, counts = {}, dict(loaded=0, reset=0, missing=0, mismatched=0, extra=0)
  for path, init in init_flat.items():
    merged[path] = init
    if reset and reset.search(path):
      counts["reset"] += 1
      logging.info("merge_params: %s %s initialised fresh (reset_regex %r).", path,
                   tuple(init.shape), reset_regex)
    elif path not in loaded_flat:
      counts["missing"] += 1
      logging.warning("merge_params: %s %s missing from the loaded weights; initialised fresh.",
                      path, tuple(init.shape))
    elif np.shape(loaded_flat[path]) != tuple(init.shape):
      counts["mismatched"] += 1
      logging.warning("merge_params: %s has shape %s in the loaded weights, %s in the model; "
                      "initialised fresh.", path, np.shape(loaded_flat[path]), tuple(init.shape))
    else:
      counts["loaded"] += 1
      merged[path] = np.asarray(loaded_flat[path], dtype=init.dtype)
  for path in sorted(loaded_flat.keys() - init_flat.keys()):
    if reset and reset.search(path):
      logging.info("merge_params: %s of the loaded weights dropped (reset_regex %r).", path,
                   reset_regex)
    else:
      counts["extra"] += 1
      logging.warning("merge_params: %s %s of the loaded weights is not in the model; ignored.",
                      path, np.shape(loaded_flat[path]))
  logging.info("merge_params: %s.", ", ".join(f"{v} {k}" for k, v in counts.items()))
  return traverse_util.unflatten_dict(merged, sep="/")
