"""The data as in-memory uint8 arrays: FER2013 (built once with TFDS) or synthetic faces.

`load_splits(config.input)` returns {'train', 'val', 'test'}, each {'image': uint8 [N, 48, 48, 1],
'label': int32 [N]}, after the split protocol (config.input.protocol):
  standard      train = Training, val = PublicTest, test = PrivateTest (the published protocol)
  seed          the original Keras study: Training halved (stratified, seeded) into train and
                val; test = PublicTest + PrivateTest (7,178 images)
  val_fraction  train/val = a stratified split of Training (val gets config.input.val_fraction);
                test = PrivateTest
Splits are deterministic for a split_seed, stratified per class and disjoint. FER2013's test
split also carries 'train_copy' (bool [N]: the face has a near copy in train; load_splits).
"""

import os
import pathlib
import time

import numpy as np
import tensorflow_datasets as tfds

from fer import duplicates
from fer.datasets import fer2013
from fer.datasets import synthetic

DATA_DIR_ENV = "FER_DATA_DIR"
PROTOCOLS = ("standard", "seed", "val_fraction")
NEAR_DUPLICATES_CACHE = "fer2013_near_duplicates"  # in the data dir: copies across splits


def resolve_data_dir(data_dir: str = "") -> pathlib.Path:
  """The TFDS data dir: `data_dir` (the config), else $FER_DATA_DIR, else ~/tensorflow_datasets."""
  value = data_dir or os.environ.get(DATA_DIR_ENV) or "~/tensorflow_datasets"
  return pathlib.Path(value).expanduser()


def near_duplicates_cache(data_dir: str = "") -> tuple[pathlib.Path, pathlib.Path]:
  """Where the near-copy search's answers are kept: the data dir, and where it cannot be written
  (a shared, read-only data set) the user's cache ($XDG_CACHE_HOME or ~/.cache, fer/)."""
  user = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fer"
  return (resolve_data_dir(data_dir) / NEAR_DUPLICATES_CACHE, user / NEAR_DUPLICATES_CACHE)


def prepare(archive: str = "", data_dir: str = "", verbose: bool = True) -> fer2013.Fer2013:
  """The FER2013 builder, prepared into the data dir on first use and reused afterwards.

  The archive (config, then $FER2013_ARCHIVE, then <data_dir>/downloads/manual) is only
  looked for when the data dir holds no prepared dataset.
  """
  data_dir = resolve_data_dir(data_dir)
  builder = fer2013.Fer2013(data_dir=data_dir, archive=archive or None, verbose=verbose)
  if builder.data_path.exists():
    if not builder.is_prepared():
      raise fer2013.DataError(f"{builder.data_path} exists but holds no complete dataset "
                              f"(no dataset_info.json); delete it to rebuild")
    source = builder.info.metadata.get("source", "?")
    if verbose:
      print(f"fer2013: using {builder.data_path} (built from {source})", flush=True)
    if archive and os.path.abspath(os.path.expanduser(archive)) != os.path.abspath(source):
      print(f"fer2013: note: the prepared data was built from {source}, not from {archive}; "
            f"delete {builder.data_path} (or use another data_dir) to rebuild", flush=True)
    return builder
  if verbose:
    print(f"fer2013: preparing {builder.data_dir} (once; later runs reuse it)", flush=True)
  start = time.perf_counter()
  tfds.display_progress_bar(False)  # the progress printed here and by the builder is enough
  try:
    builder.download_and_prepare()
  except OSError:
    # Another process (a parallel sweep) finished first and the rename onto its complete
    # dataset failed: use that one.
    other = fer2013.Fer2013(data_dir=data_dir, verbose=verbose)
    if not other.is_prepared():
      raise
    if verbose:
      print(f"fer2013: another process prepared {other.data_path} first; using it", flush=True)
    return other
  if verbose:
    print(f"fer2013: prepared in {time.perf_counter() - start:.1f}s", flush=True)
  return builder


def load_fer2013(archive: str = "", data_dir: str = "", with_names: bool = False,
                 verbose: bool = True) -> dict[str, dict[str, np.ndarray]]:
  """The TFDS splits (train, validation, test) as arrays; builds the dataset if needed.

  Each split: {'image': uint8 [N, 48, 48, 1], 'label': int32 [N]} and, with `with_names`,
  'file_name': str [N] (the source file of each image, for tracing).
  """
  builder = prepare(archive, data_dir, verbose=verbose)
  out = {}
  for split in fer2013.SPLITS:
    source = builder.as_data_source(split)
    records = source.__getitems__(range(len(source)))
    images = np.empty((len(records),) + fer2013.IMAGE_SHAPE, np.uint8)
    for i, r in enumerate(records):
      images[i] = r["image"]
    out[split] = {"image": images,
                  "label": np.fromiter((r["label"] for r in records), np.int32, len(records))}
    if with_names:
      out[split]["file_name"] = np.array([_text(r["file_name"]) for r in records])
  return out


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def stratified_split(labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept, split_off) sorted index arrays: `fraction` of each class split off, at random.

  Deterministic for a seed, disjoint, and together they cover every index once. Each class
  contributes round(fraction * its count) to the split-off part.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction={fraction}: expected 0 < fraction < 1")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  kept, split_off = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_off = int(round(fraction * len(idx)))
    split_off.append(idx[:n_off])
    kept.append(idx[n_off:])
  empty = np.zeros(0, np.int64)
  return (np.sort(np.concatenate(kept + [empty])), np.sort(np.concatenate(split_off + [empty])))


def _take(split: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
  return {k: v[idx] for k, v in split.items()}


def _concat(*splits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([s[k] for s in splits]) for k in splits[0]}


def apply_protocol(data: dict[str, dict[str, np.ndarray]], protocol: str,
                   val_fraction: float = 0.5, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """TFDS splits (train, validation, test) -> the protocol's {'train', 'val', 'test'}."""
  if protocol == "standard":
    return {"train": data["train"], "val": data["validation"], "test": data["test"]}
  if protocol == "seed":
    fraction, test = 0.5, _concat(data["validation"], data["test"])
  elif protocol == "val_fraction":
    fraction, test = val_fraction, data["test"]
  else:
    raise ValueError(f"config.input.protocol={protocol!r}: expected one of {PROTOCOLS}")
  train_idx, val_idx = stratified_split(data["train"]["label"], fraction, seed)
  return {"train": _take(data["train"], train_idx), "val": _take(data["train"], val_idx),
          "test": test}


def load_splits(input_cfg, with_names: bool = False) -> dict[str, dict[str, np.ndarray]]:
  """{'train', 'val', 'test'}: {'image': uint8 [N, 48, 48, 1], 'label': int32 [N]} per config.input.

  `with_names` adds 'file_name' (str [N]) for FER2013; synthetic images have no files. FER2013's
  test also gets 'train_copy' (bool [N]): the face has a near copy in train (fer.duplicates; the
  search runs once per data dir, 15-40 s on a 2-core CPU, and is cached there), for the test
  accuracy on the faces without one. With input.drop_train_copies, train loses its near copies
  of val and test images (FER2013 only: synthetic faces are all copies of a few templates).
  """
  if input_cfg.source == "synthetic":
    n, seed = input_cfg.synthetic_train_size, 1000 * input_cfg.split_seed
    out = {}
    for split, size, offset in (("train", n, 0), ("val", n // 4, 1), ("test", n // 4, 2)):
      images, labels = synthetic.make_faces(size, seed + offset)
      out[split] = {"image": images, "label": labels}
  elif input_cfg.source == "fer2013":
    data = load_fer2013(input_cfg.archive, input_cfg.data_dir, with_names=with_names)
    out = apply_protocol(data, input_cfg.protocol, input_cfg.val_fraction, input_cfg.split_seed)
  else:
    raise ValueError(f"config.input.source={input_cfg.source!r}: expected fer2013 or synthetic")
  drop = input_cfg.get("drop_train_copies", False)
  if input_cfg.source == "fer2013":
    copies = duplicates.cross_split_copies(out, near_duplicates_cache(input_cfg.data_dir))
    out["test"] = {**out["test"], "train_copy": copies["test"]}
    if drop:
      out = drop_train_copies(out, copies["train"])
  elif drop:  # synthetic faces: copies of a few templates, nothing to report or keep
    print("input.drop_train_copies: every synthetic face is a noisy copy of a few templates, so "
          "all have a copy in val and test; they are all kept (a smoke test of the flag).",
          flush=True)
  return out


def drop_train_copies(splits: dict[str, dict[str, np.ndarray]],
                      train_copy: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
  """The splits with train reduced to the images whose near-duplicate group (identical,
  re-encoded, re-lit, slightly shifted or zoomed copies: fer.duplicates) holds no val or test
  image, so that no evaluation face is also trained on. `train_copy`: those images (bool
  [N_train], fer.duplicates.cross_split_copies' 'train'), searched here (15-40 s on FER2013 on
  a 2-core CPU, uncached) when not given. Prints how many train images it dropped."""
  if train_copy is None:
    train_copy = duplicates.cross_split_copies(splits)["train"]
  n = len(splits["train"]["label"])
  keep = np.flatnonzero(~train_copy)
  if not len(keep):
    raise ValueError(f"input.drop_train_copies: every one of the {n:,} train images has a near "
                     "copy in val or test, so nothing is left to train on; set "
                     "--config.input.drop_train_copies=False for these data")
  print(f"input.drop_train_copies: {n - len(keep):,} of {n:,} train images have a near copy in "
        f"val or test; training on the other {len(keep):,}.", flush=True)
  return {**splits, "train": _take(splits["train"], keep)}
