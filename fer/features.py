"""Run the frozen VGG16 base once per split and cache its features on disk (configs/vgg16_cached.py).

`load_or_compute(config, workdir)` returns the splits as fer.train.load_data does, with the
block5 features in place of the images:

  {'train', 'val', 'test'} -> {'image': float16 [N, h, w, 512] (memory-mapped), 'label': int32 [N]}

The features live in `workdir/features/<key>/{train,val,test}.npy` with a `manifest.json`. They
are written batch by batch into float16 .npy files opened with np.lib.format.open_memmap inside a
temporary directory that is renamed into place when complete, so host memory and disk stay
bounded (at 224 pixels FER2013's 35,887 images give 7x7x512 features, 1.8 GB in float16) and a
killed run leaves no half-written cache. A later run with the same key reuses them.

The key is the first 16 hex digits of the sha256 of the JSON of:

  weights        'keras' / 'torchvision' or 'random-init-seed-N' (pretrained.weights=none)
  weights_sha256 sha256 of the base's parameter values, when loaded from a weights file; for a
                 random init the jax version and PRNG implementation that drew it instead
  base_tree      sha256 of the base's parameter paths, shapes and dtypes
  preprocess, input_size, dtype   model.preprocess, model.input_size, model.dtype
  data           sha256 of every split's images and labels (a changed protocol, split seed or
                 data set gives new features)
  format         the cache layout version

With pretrained.weights=none the base is the seeded initialisation that a `vgg16` run of the
same config.seed starts from (fer.train.create_train_state's key), so the head trained on these
features and the end-to-end model see the same random base.
"""

import functools
import hashlib
import json
import os
import pathlib
import shutil
import time
import uuid

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np

from fer import fileio
from fer import train
from fer.models import vgg16

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class FeaturesError(RuntimeError):
  """Cached features are incomplete, or the features do not fit float16."""


def base_model(model_cfg) -> vgg16.VGG16:
  """The VGG16 whose `features` are cached: the model keys of config.model, any model.name."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_cfg.dtype]
  return vgg16.VGG16(head_features=tuple(model_cfg.head_features),
                     head_dropout=model_cfg.head_dropout, head_pool=model_cfg.head_pool,
                     input_size=model_cfg.input_size, preprocess=model_cfg.preprocess,
                     dtype=dtype)


@functools.lru_cache(maxsize=2)
def _seeded_base(seed: int, sample_shape: tuple[int, ...]) -> dict:
  # Parameter values do not depend on input_size, preprocess, dtype or the head: a flax
  # parameter's key comes from its path. Memoised: a 15M-parameter init takes seconds on a CPU.
  model = vgg16.VGG16()
  k_init, _ = jax.random.split(jax.random.PRNGKey(seed))  # as fer.train.create_train_state
  init = jax.jit(lambda k: model.init({"params": k, "dropout": k},
                                      jnp.zeros((1,) + sample_shape, jnp.uint8),
                                      method=vgg16.VGG16.features)["params"],
                 compiler_options=train.init_compiler_options())
  params = jax.tree.map(np.array, init(k_init))
  for leaf in jax.tree.leaves(params):
    leaf.flags.writeable = False  # shared by every caller
  return params


def base_params(config, sample_shape=(48, 48, 1)) -> dict:
  """{block*_conv*: {kernel, bias}} as numpy: the pretrained weights of config.pretrained, or
  with weights=none the seeded init that a `vgg16` run with config.seed starts from."""
  if config.pretrained.weights == "none":
    return _seeded_base(int(config.seed), tuple(sample_shape))
  from fer import pretrained  # pylint: disable=import-outside-toplevel
  expects = pretrained.FILES.get(config.pretrained.weights)
  if expects and expects.preprocess != config.model.preprocess:
    logging.warning("pretrained.weights=%s expects model.preprocess=%r, not %r.",
                    config.pretrained.weights, expects.preprocess, config.model.preprocess)
  return pretrained.load_pretrained(config.pretrained)


def _sha256_arrays(arrays) -> str:
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
  return h.hexdigest()


def _tree_digest(params) -> str:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  desc = [(jax.tree_util.keystr(path), tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in flat]
  return hashlib.sha256(json.dumps(desc).encode()).hexdigest()


def data_digest(splits) -> str:
  """sha256 of each split's name, images and labels."""
  h = hashlib.sha256()
  for name in SPLITS:
    h.update(name.encode())
    h.update(_sha256_arrays([splits[name]["image"], splits[name]["label"]]).encode())
  return h.hexdigest()


def cache_key(config, splits, params=None) -> tuple[str, dict]:
  """(key, the fields it hashes); `params` (the loaded base) is needed unless weights=none."""
  sample_shape = tuple(splits["train"]["image"].shape[1:])
  model = base_model(config.model)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + sample_shape, jnp.uint8),
                         method=vgg16.VGG16.features)["params"])
  if config.pretrained.weights == "none":
    weights = f"random-init-seed-{int(config.seed)}"
    weights_sha256 = f"jax {jax.__version__}, prng {jax.config.jax_default_prng_impl}"
  else:
    if params is None:
      raise ValueError("cache_key needs the loaded base params for pretrained weights")
    weights = config.pretrained.weights
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    weights_sha256 = _sha256_arrays(leaf for _, leaf in sorted(
        flat, key=lambda kv: jax.tree_util.keystr(kv[0])))
  fields = {"format": FORMAT_VERSION, "weights": weights, "weights_sha256": weights_sha256,
            "base_tree": _tree_digest(shapes), "preprocess": config.model.preprocess,
            "input_size": int(config.model.input_size), "dtype": config.model.dtype,
            "data": data_digest(splits)}
  key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
  return key, fields


def compute_split(features_fn, params, images, out, batch_size: int, sharding, name: str):
  """Writes features_fn(params, batch) for every batch of `images` into `out` ([N, ...]).

  Fixed-size batches (the last one zero-padded) sharded over the mesh's `data` axis, one batch
  in flight while the previous one is copied out. Raises FeaturesError on values that overflow
  float16. Returns the largest absolute feature value.
  """
  n = len(images)
  t0 = last_print = time.perf_counter()
  max_abs = 0.0
  pending = None

  def drain(item):
    nonlocal max_abs, last_print
    start, count, result = item
    feats = np.asarray(result)[:count]
    if not np.isfinite(feats).all():
      raise FeaturesError(f"{name} features {start}..{start + count} overflow float16 "
                          f"(max {_FLOAT16_MAX:g}); check model.preprocess and the weights")
    max_abs = max(max_abs, float(np.abs(feats).max(initial=0.0)))
    out[start:start + count] = feats
    done = start + count
    now = time.perf_counter()
    if now - last_print >= 10 or done == n:
      rate = done / max(now - t0, 1e-9)
      print(f"  features {name}: {done}/{n} images | {rate:,.0f} img/s | ETA "
            f"{train.format_duration((n - done) / rate)}", flush=True)
      last_print = now

  for start in range(0, n, batch_size):
    batch = np.asarray(images[start:start + batch_size])
    count = len(batch)
    if count < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - count,) + batch.shape[1:],
                                              batch.dtype)])
    result = features_fn(params, jax.device_put(batch, sharding))
    if pending is not None:
      drain(pending)
    pending = (start, count, result)
  if pending is not None:
    drain(pending)
  return max_abs


def _open_features(directory: pathlib.Path, splits) -> dict:
  out = {}
  for name in SPLITS:
    path = directory / f"{name}.npy"
    if not path.is_file():
      raise FeaturesError(f"{path} is missing: the feature cache {directory} is incomplete; "
                          "delete it to compute the features again")
    feats = np.load(path, mmap_mode="r")
    if len(feats) != len(splits[name]["label"]):
      raise FeaturesError(f"{path} does not hold {len(splits[name]['label'])} feature rows; "
                          f"delete {directory} to compute the features again")
    # The split's other fields (test's train_copy for FER2013) stay as they were.
    out[name] = {**splits[name], "image": feats,
                 "label": np.asarray(splits[name]["label"], np.int32)}
  return out


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_stale_tmp(root: pathlib.Path):
  """Deletes temporary feature dirs left by killed processes (`.<key>.tmp-<pid>-<id>`)."""
  for tmp in root.glob(".*.tmp-*"):
    try:
      pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
    except ValueError:
      continue
    if not _pid_alive(pid):
      shutil.rmtree(tmp, ignore_errors=True)


def load_or_compute(config, workdir) -> dict:
  """The splits of config.input with their cached VGG16 features as 'image' (see module doc)."""
  from fer import input_pipeline  # pylint: disable=import-outside-toplevel
  from fer import train  # pylint: disable=import-outside-toplevel
  splits = input_pipeline.load_splits(config.input)
  sample_shape = tuple(splits["train"]["image"].shape[1:])
  params = None if config.pretrained.weights == "none" else base_params(config, sample_shape)
  key, fields = cache_key(config, splits, params)
  root = pathlib.Path(workdir) / "features"
  directory = root / key
  if directory.is_dir():
    print(f"features: reusing {directory} ({fields['weights']}, preprocess "
          f"{fields['preprocess']}, input_size {fields['input_size']})", flush=True)
    return _open_features(directory, splits)

  if params is None:
    params = base_params(config, sample_shape)
  root.mkdir(parents=True, exist_ok=True)
  _remove_stale_tmp(root)
  tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    t0 = time.perf_counter()
    mesh = train.make_mesh()
    ndev = mesh.devices.size
    largest = max(len(splits[name]["image"]) for name in SPLITS)
    batch_size = min(config.input.eval_batch_size, max(largest, 1))
    batch_size = int(np.ceil(batch_size / ndev) * ndev)
    model = base_model(config.model)
    features_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=vgg16.VGG16.features)
                          .astype(jnp.float16))
    device_params = jax.device_put(params, NamedSharding(mesh, P()))
    out_shape = jax.eval_shape(features_fn, device_params,
                               jax.ShapeDtypeStruct((1,) + sample_shape, jnp.uint8)).shape[1:]
    print(f"features: computing {directory} ({fields['weights']}, preprocess "
          f"{fields['preprocess']}, input_size {fields['input_size']}): {out_shape} float16 per "
          f"image, batch {batch_size}", flush=True)
    manifest = {"key": key, "fields": fields, "shapes": {}, "max_abs": {}}
    for name in SPLITS:
      images = splits[name]["image"]
      shape = (len(images),) + tuple(out_shape)
      out = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.float16,
                                      shape=shape)
      manifest["max_abs"][name] = compute_split(
          features_fn, device_params, images, out, batch_size,
          NamedSharding(mesh, P("data")), name)
      out.flush()
      del out
      manifest["shapes"][name] = list(shape)
    manifest["seconds"] = time.perf_counter() - t0
    fileio.write_json_atomic(tmp / "manifest.json", manifest)
    try:
      os.rename(tmp, directory)
    except OSError:
      if not directory.is_dir():
        raise
      print(f"features: another process wrote {directory} first; using it", flush=True)
    print(f"features: {directory} written in {manifest['seconds']:.1f}s", flush=True)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return _open_features(directory, splits)
