"""Exact and near duplicates among the splits, and the train images that copy a val or test image.

Exact duplicates: identical 48x48 pixels, counted within each split, across each pair of splits
(leakage between train and the evaluation splits), and where the copies' labels disagree.

Near duplicates (find_near_duplicates) are the copies that exact matching misses: re-encoded
(the Kaggle archive's JPEGs differ in a few grey levels), brighter or of other contrast, shifted
by a few pixels, zoomed by a few percent, watermarked. Two stages, numpy and one jitted JAX
function, about 45 s for FER2013's 35,887 images on 2 CPU cores shared with a training run:
  1. Candidates: a 12x12 blurred, mean-free, unit-norm descriptor per image; each image is
     paired with its NEIGHBOURS nearest by cosine (chunked matrix products) and with any of its
     MAX_NEIGHBOURS nearest at cosine >= COARSE_THRESHOLD (62,791 pairs on FER2013).
  2. Verification: both images band-passed (Gaussian 0.7 px minus 4 px: edges and texture, not
     lighting); the normalised correlation of one image's central 36x36 with the other,
     maximised over shifts of up to SHIFT pixels and zooms SCALES, both ways (FFT). A pair is a
     near duplicate when this aligned similarity is >= NEAR_THRESHOLD; identical images are
     near duplicates of similarity 1 whatever they hold (blank frames too).
How NEAR_THRESHOLD = 0.82 was chosen: on FER2013 the candidates' similarities have a mode at
0.40 (different faces, about 2,800 pairs per 0.02) and one at 0.98-1 (copies, 4,200 per 0.02)
with a valley of 55-77 pairs per 0.01 from 0.80 to 0.85. Random pairs per band, looked at in
image strips: 0.75-0.80, 9 copies of 28 (the rest different people in the same pose); 0.80-0.81,
11 of 14; train-test pairs at 0.80-0.82, 10 of 16; 0.81-0.83, 12 of 14; 0.83-0.89, 42 of 42;
train-test pairs at 0.82-0.85, 16 of 16. So pairs from 0.82 up are copies; a few more copies sit
below. Planted into FER2013, copies of 200 real faces score (verification): JPEG quality 50,
+-30 grey levels, contrast x0.7, shifts of 1-4 px and a 5% zoom >= 0.97; a 10% zoom 0.83-0.99;
two different faces 0.07-0.5 (median 0.25). The candidate stage bounds recall: it pairs the
copy with its original for all of these but 2-px shifts (96%), 10% zooms (94%) and 4-px shifts
(48%); on a sample, 5 nearest instead of 2 found 2% more test images with a copy in train.

`cross_split_copies(splits, cache_dir)` marks the images with a near copy in another split (test
faces with one in train: the copy-free test accuracy of every run; train images with one in val
or test: what input.drop_train_copies drops), cached per split contents and method in cache_dir:
the search runs once per set of splits, not at every start of a run.
"""

import hashlib
import itertools
import os
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from fer import fileio
from fer.datasets.fer2013 import CLASSES
from fer.datasets.fer2013 import IMAGE_SIZE


def _flatten(splits: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """The splits as one table: image (uint8 [N, 48*48]), label, split (position in `splits`),
  index (within its split) and file (its file name, else 'split[index]')."""
  names = list(splits)
  return {
      "image": np.concatenate([splits[s]["image"].reshape(len(splits[s]["image"]), -1)
                               for s in names]),
      "label": np.concatenate([splits[s]["label"] for s in names]),
      "split": np.concatenate([np.full(len(splits[s]["label"]), i) for i, s in enumerate(names)]),
      "index": np.concatenate([np.arange(len(splits[s]["label"])) for s in names]),
      "file": np.concatenate([
          splits[s]["file_name"] if "file_name" in splits[s]
          else np.array([f"{s}[{i}]" for i in range(len(splits[s]["label"]))]) for s in names]),
  }


def _member(table: dict, names: list[str], row: int) -> dict:
  return {"split": names[table["split"][row]], "index": int(table["index"][row]),
          "file": str(table["file"][row]), "label": CLASSES[table["label"][row]]}


def _identical_rows(images: np.ndarray) -> tuple[list[np.ndarray], int]:
  """(rows of each pixel content that occurs more than once, number of distinct contents)."""
  rows = np.ascontiguousarray(images).view(np.dtype((np.void, images.shape[1])))[:, 0]
  _, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
  order = np.argsort(inverse, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)])
  return [order[starts[g]:starts[g + 1]] for g in np.flatnonzero(counts > 1)], len(counts)


def find_duplicates(splits: dict[str, dict[str, np.ndarray]]) -> dict:
  """Exact-duplicate figures over splits {'train', 'val', 'test'}: {'image', 'label'[, 'file_name']}.

  Returns {'summary': ..., 'within': {split: ...}, 'across': {'a-b': ...}, 'groups': [...]},
  where each group is a list of {'split', 'index', 'file', 'label'} with identical pixels.
  """
  names = list(splits)
  table = _flatten(splits)
  images, labels, split_of = table["image"], table["label"], table["split"]
  members, distinct = _identical_rows(images)

  groups, conflicting = [], []
  within = {s: {"groups": 0, "extra_copies": 0, "label_conflicts": 0} for s in names}
  across = {f"{a}-{b}": {"shared_images": 0, "images_in_" + b: 0, "label_conflicts": 0}
            for a, b in itertools.combinations(names, 2)}
  for rows_g in members:
    group = [_member(table, names, r) for r in rows_g]
    conflict = len(set(labels[rows_g].tolist())) > 1
    groups.append({"copies": len(rows_g), "label_conflict": conflict, "members": group})
    if conflict:
      conflicting.append(groups[-1])
    for i, s in enumerate(names):
      in_s = rows_g[split_of[rows_g] == i]
      if len(in_s) > 1:
        within[s]["groups"] += 1
        within[s]["extra_copies"] += len(in_s) - 1
        within[s]["label_conflicts"] += len(set(labels[in_s].tolist())) > 1
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
      in_a, in_b = rows_g[split_of[rows_g] == i], rows_g[split_of[rows_g] == j]
      if len(in_a) and len(in_b):
        pair = across[f"{a}-{b}"]
        pair["shared_images"] += 1
        pair["images_in_" + b] += len(in_b)
        pair["label_conflicts"] += len(set(labels[np.concatenate([in_a, in_b])].tolist())) > 1

  sizes = np.array([len(m) for m in members], int)
  constant = images.min(axis=1) == images.max(axis=1)
  summary = {
      "images": int(len(labels)),
      "distinct_images": int(distinct),
      "duplicate_groups": int(len(members)),
      "images_in_duplicate_groups": int(sizes.sum()),
      "extra_copies": int((sizes - 1).sum()),
      "label_conflict_groups": len(conflicting),
      "constant_images": int(constant.sum()),
  }
  groups.sort(key=lambda g: (not g["label_conflict"], -g["copies"], g["members"][0]["file"]))
  return {"summary": summary, "within": within, "across": across, "groups": groups}


# Near duplicates. How each constant was chosen on the real data: module docstring.
NEAR_THRESHOLD = 0.82  # aligned band-pass correlation from which two images count as copies
NEIGHBOURS = 2  # candidates: each image with its NEIGHBOURS nearest by the coarse descriptor,
MAX_NEIGHBOURS = 16  # and with any of its MAX_NEIGHBOURS nearest that are as close as
COARSE_THRESHOLD = 0.95  # this cosine (clusters of many copies; larger ones join transitively)
FLAT_STD = 4.0  # grey levels: images whose coarse descriptor varies less are matched exactly only
SHIFT = 4  # pixels: alignment searched over |dy|, |dx| <= SHIFT,
SCALES = (0.95, 1.0, 1.05)  # these zooms about the centre,
CROP = 36  # of one image's central CROP x CROP on the other image, both ways
METHOD_VERSION = 1  # part of cross_split_copies' cache key: bump it when a change finds other copies


def _gaussian(sigma: float, n: int = IMAGE_SIZE) -> np.ndarray:
  """[n, n] matrix that blurs a column with a Gaussian, edges clamped."""
  r = int(np.ceil(3 * sigma))
  taps = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma * sigma))
  out = np.zeros((n, n))
  for i in range(n):
    np.add.at(out[i], np.clip(i + np.arange(-r, r + 1), 0, n - 1), taps / taps.sum())
  return out.astype(np.float32)


def _zoom(scale: float, n: int = IMAGE_SIZE) -> np.ndarray:
  """[n, n] bilinear resampling matrix: output pixel i reads input (i - c) * scale + c."""
  c = (n - 1) / 2
  u = np.clip((np.arange(n) - c) * scale + c, 0, n - 1)
  lo = np.minimum(np.floor(u).astype(int), n - 2)
  out = np.zeros((n, n), np.float32)
  out[np.arange(n), lo] = 1 - (u - lo)
  out[np.arange(n), lo + 1] += u - lo
  return out


def coarse_descriptors(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(unit descriptors float32 [N, 144], flat bool [N]) of uint8 images [N, 48, 48(, 1)].

  The image blurred (sigma 2 px) and averaged over 4x4 blocks to 12x12, minus its mean, over its
  norm: the cosine of two descriptors ignores brightness and contrast and moves little under
  re-encoding or a shift of a pixel or two. `flat`: the 12x12 varies by less than FLAT_STD grey
  levels (blank frames), where the cosine is noise.
  """
  x = images.reshape(len(images), IMAGE_SIZE, IMAGE_SIZE).astype(np.float32)
  op = np.kron(np.eye(IMAGE_SIZE // 4, dtype=np.float32),
               np.full((1, 4), 0.25, np.float32)) @ _gaussian(2.0)  # [12, 48]
  d = (x.reshape(-1, IMAGE_SIZE) @ op.T).reshape(len(x), IMAGE_SIZE, -1)  # x @ op.T
  d = (op @ d).reshape(len(x), -1)  # op @ x @ op.T
  d -= d.mean(axis=1, keepdims=True)
  norm = np.linalg.norm(d, axis=1)
  flat = norm / np.sqrt(d.shape[1]) < FLAT_STD
  return d / np.maximum(norm, 1e-6)[:, None], flat


def candidate_pairs(desc: np.ndarray, flat: np.ndarray, chunk: int = 1024,
                    block: int = 64) -> np.ndarray:
  """Unique pairs int [P, 2] (i < j) of non-flat images: each image with its NEIGHBOURS nearest
  by the cosine of the coarse descriptors, and with those of its MAX_NEIGHBOURS nearest whose
  cosine is >= COARSE_THRESHOLD. The nearest are found among the `block`-column blocks with the
  largest maxima, which hold them (exact, and much cheaper than sorting whole rows)."""
  keep = np.flatnonzero(~flat)
  k = min(MAX_NEIGHBOURS, len(keep) - 1)
  if k < 1:
    return np.zeros((0, 2), int)
  blocks = -(-len(keep) // block)
  d = np.zeros((blocks * block, desc.shape[1]), np.float32)
  d[:len(keep)] = desc[keep]
  found = [np.zeros((0, 2), int)]
  for start in range(0, len(keep), chunk):
    sim = d[start:min(start + chunk, len(keep))] @ d.T
    rows = np.arange(len(sim))
    sim[rows, start + rows] = -np.inf
    sim[:, len(keep):] = -np.inf
    top_blocks = np.argpartition(sim.reshape(len(sim), blocks, block).max(axis=2),
                                 -min(k, blocks), axis=1)[:, -min(k, blocks):]
    cols = (top_blocks[:, :, None] * block + np.arange(block)).reshape(len(sim), -1)
    values = np.take_along_axis(sim, cols, axis=1)
    order = np.argsort(-values, axis=1)[:, :k]  # nearest first
    cols, values = np.take_along_axis(cols, order, 1), np.take_along_axis(values, order, 1)
    take = (np.arange(k) < NEIGHBOURS) | (values >= COARSE_THRESHOLD)
    found.append(np.stack([start + np.nonzero(take)[0], cols[take]], axis=1))
  pairs = np.sort(keep[np.concatenate(found)], axis=1)
  return np.unique(pairs, axis=0).reshape(-1, 2)


def _both_sides(op, x):
  """op @ x[k] @ op.T for every image x[k] of [P, n, n]."""
  return jnp.einsum("ij,pjk,lk->pil", op, x, op)


def _band_pass(images):
  """float32 [P, 48, 48] of uint8 [P, 48, 48]: blurred by 0.7 px minus blurred by 4 px, the edges
  and textures that tell one photograph from another (lighting, skin tone, JPEG noise gone)."""
  x = images.astype(jnp.float32)
  return _both_sides(_gaussian(0.7), x) - _both_sides(_gaussian(4.0), x)


def _aligned_one_way(a, b):
  """Max over SCALES and shifts of the correlation of a's central CROP^2 with the window of b
  (zoomed, shifted) under it; a, b: band-passed [P, 48, 48]. The circular correlation by FFT is
  exact: the crop's margin, (48 - CROP) / 2, is at least SHIFT."""
  o = (IMAGE_SIZE - CROP) // 2
  crop = a[:, o:o + CROP, o:o + CROP]
  crop = crop - crop.mean(axis=(1, 2), keepdims=True)
  crop /= jnp.maximum(jnp.sqrt((crop ** 2).sum(axis=(1, 2), keepdims=True)), 1e-6)
  spectrum = jnp.conj(jnp.fft.rfft2(jnp.zeros_like(a).at[:, o:o + CROP, o:o + CROP].set(crop)))
  shifts = np.arange(-SHIFT, SHIFT + 1) % IMAGE_SIZE
  box = np.zeros((2 * SHIFT + 1, IMAGE_SIZE), np.float32)  # row k sums the window at k - SHIFT
  for k in range(2 * SHIFT + 1):
    box[k, o - SHIFT + k:o - SHIFT + k + CROP] = 1
  best = jnp.full(len(a), -1.0)
  for scale in SCALES:
    bz = b if scale == 1.0 else _both_sides(_zoom(scale), b)
    dot = jnp.fft.irfft2(spectrum * jnp.fft.rfft2(bz), s=(IMAGE_SIZE, IMAGE_SIZE))
    dot = dot[:, shifts][:, :, shifts]
    total, squares = _both_sides(box, bz), _both_sides(box, bz * bz)
    var = jnp.maximum(squares - total ** 2 / CROP ** 2, 1e-6)
    best = jnp.maximum(best, (dot / jnp.sqrt(var)).reshape(len(a), -1).max(axis=1))
  return jnp.minimum(best, 1.0)


@jax.jit
def _aligned_chunk(a, b):
  a, b = _band_pass(a), _band_pass(b)
  return jnp.maximum(_aligned_one_way(a, b), _aligned_one_way(b, a))


def aligned_similarity(images: np.ndarray, pairs: np.ndarray, chunk: int = 2048) -> np.ndarray:
  """float32 [P]: per pair (i, j) of uint8 `images` [N, 48, 48(, 1)], the best correlation of
  their band-passed pixels over the alignments `_aligned_one_way` searches, i's centre on j and
  j's centre on i. 1 for identical or brightness/contrast-changed copies, 0.9-1 for re-encoded,
  shifted or slightly zoomed ones, 0.1-0.5 for two random faces, up to about 0.8 for different
  faces of the same pose and lighting (module docstring)."""
  images = images.reshape(len(images), IMAGE_SIZE, IMAGE_SIZE)
  chunk = min(chunk, max(256, 1 << max(len(pairs) - 1, 1).bit_length()))  # few jit shapes
  out = np.empty(len(pairs), np.float32)
  for k in range(0, len(pairs), chunk):
    part = pairs[k:k + chunk]
    part = np.concatenate([part, np.zeros((chunk - len(part), 2), part.dtype)])
    out[k:k + chunk] = np.asarray(_aligned_chunk(images[part[:, 0]], images[part[:, 1]]))[
        :len(pairs) - k]
  return out


def _components(n: int, pairs) -> np.ndarray:
  """Connected-component label [n] (its smallest member) of the graph with edges `pairs`."""
  parent = list(range(n))
  def root(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i
  for i, j in pairs:
    ri, rj = root(i), root(j)
    if ri != rj:
      parent[max(ri, rj)] = min(ri, rj)
  return np.array([root(i) for i in range(n)])


def find_near_duplicates(splits: dict[str, dict[str, np.ndarray]],
                         threshold: float = NEAR_THRESHOLD) -> dict:
  """Near-duplicate figures over splits {'train', 'val', 'test'}: {'image', 'label'[, 'file_name']}.

  A superset of find_duplicates: every two identical images are a near pair of similarity 1
  (blank frames included), and so is every candidate pair whose aligned similarity is >=
  `threshold`. Groups join pairs transitively (copies of copies). Returns {'summary',
  'within': {split: ...}, 'across': {'a-b': ...}, 'pairs': [...], 'groups': [...]}. Pairs and
  label conflicts are direct pairs; `images` counts an image once whatever its number of copies.
  """
  names = list(splits)
  table = _flatten(splits)
  images, labels, split_of = table["image"], table["label"], table["split"]
  desc, flat = coarse_descriptors(images)
  candidates = candidate_pairs(desc, flat)
  similarity = aligned_similarity(images, candidates)
  score = {(int(i), int(j)): float(s) for (i, j), s in zip(candidates, similarity)
           if s >= threshold}
  exact = set()
  for rows_g in _identical_rows(images)[0]:
    exact.update(itertools.combinations(sorted(rows_g.tolist()), 2))
  score.update(dict.fromkeys(exact, 1.0))
  edges = sorted(score)
  component = _components(len(labels), edges)

  pairs, groups = [], {}
  within = {s: {"pairs": 0, "images": set(), "label_conflict_pairs": 0} for s in names}
  across = {(a, b): {"pairs": 0, "images_in_" + a: set(), "images_in_" + b: set(),
                     "label_conflict_pairs": 0} for a, b in itertools.combinations(names, 2)}
  for i, j in edges:
    a, b = names[split_of[i]], names[split_of[j]]
    conflict = bool(labels[i] != labels[j])
    pairs.append({"similarity": round(score[i, j], 4), "exact": (i, j) in exact,
                  "label_conflict": conflict, "a": _member(table, names, i),
                  "b": _member(table, names, j)})
    cell = within[a] if a == b else across[tuple(sorted((a, b), key=names.index))]
    cell["pairs"] += 1
    cell["label_conflict_pairs"] += conflict
    groups.setdefault(component[i], set()).update((i, j))
  for rows_g in groups.values():
    in_split = {s: [r for r in rows_g if names[split_of[r]] == s] for s in names}
    for s in names:
      if len(in_split[s]) > 1:
        within[s]["images"].update(in_split[s])
    for a, b in across:
      if in_split[a] and in_split[b]:
        across[a, b]["images_in_" + a].update(in_split[a])
        across[a, b]["images_in_" + b].update(in_split[b])
  count = lambda cell: {k: len(v) if isinstance(v, set) else v for k, v in cell.items()}

  group_list = []
  for rows_g in groups.values():
    rows_g = sorted(rows_g)
    group_list.append({
        "images": len(rows_g),
        "splits": sorted({names[split_of[r]] for r in rows_g}, key=names.index),
        "label_conflict": len(set(labels[rows_g].tolist())) > 1,
        "members": [_member(table, names, r) for r in rows_g]})
  group_list.sort(key=lambda g: (len(g["splits"]) == 1, not g["label_conflict"], -g["images"],
                                 g["members"][0]["file"]))
  split_pair = lambda p: (p["a"]["split"] == p["b"]["split"], names.index(p["a"]["split"]),
                          names.index(p["b"]["split"]))
  pairs.sort(key=lambda p: (*split_pair(p), -p["similarity"], p["a"]["file"], p["b"]["file"]))
  summary = {
      "threshold": threshold,
      "candidate_pairs": int(len(candidates)),
      "pairs": len(pairs),
      "identical_pairs": len(exact),
      "groups": len(group_list),
      "images_in_groups": sum(g["images"] for g in group_list),
      "label_conflict_pairs": sum(p["label_conflict"] for p in pairs),
      "label_conflict_groups": sum(g["label_conflict"] for g in group_list),
      "flat_images": int(flat.sum()),
  }
  return {"summary": summary, "within": {s: count(c) for s, c in within.items()},
          "across": {f"{a}-{b}": count(c) for (a, b), c in across.items()},
          "pairs": pairs, "groups": group_list}


def _cache_key(splits: dict[str, dict[str, np.ndarray]], threshold: float) -> str:
  """sha256 of the splits' images (names, shapes, pixels) and of every setting of the method."""
  h = hashlib.sha256(repr((METHOD_VERSION, threshold, NEIGHBOURS, MAX_NEIGHBOURS,
                           COARSE_THRESHOLD, FLAT_STD, SHIFT, SCALES, CROP)).encode())
  for name, split in splits.items():
    images = np.ascontiguousarray(split["image"])
    h.update(f"{name} {images.shape} {images.dtype}".encode())
    h.update(images.data)
  return h.hexdigest()


def _read_masks(path: pathlib.Path, splits) -> dict[str, np.ndarray] | None:
  """The cached masks at `path` when they fit `splits`, else None (with a note if damaged)."""
  try:
    with np.load(path, allow_pickle=False) as saved:
      found = {s: saved[s] for s in splits}
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
    print(f"{path}: unreadable ({type(e).__name__}: {e}); searching again", flush=True)
    return None
  if all(found[s].dtype == bool and found[s].shape == (len(splits[s]["image"]),) for s in splits):
    return found
  print(f"{path}: not a mask per split of these images; searching again", flush=True)
  return None


def cross_split_copies(splits: dict[str, dict[str, np.ndarray]], cache_dir=None,
                       threshold: float = NEAR_THRESHOLD) -> dict[str, np.ndarray]:
  """Which images have a near copy in another split: {'train': bool [N_train] (its near-duplicate
  group holds a val or test image: the train faces that are also evaluated on), 'val' and 'test':
  bool [N] (the group holds a train image)}. `splits`: {'train', 'val', 'test'}: {'image', ...}.

  The search takes 15-40 s on FER2013 on a 2-core CPU. With `cache_dir` (a folder, or a list of
  folders: the first that holds the answer is read, the first that can be written keeps it), the
  answer is kept as copies_<key>.npz, where the key hashes the images and the method's settings;
  a later call with the same images reads it back. A cache file that cannot be read or written
  only costs the search again (with a note).
  """
  names = ("train", "val", "test")
  splits = {s: splits[s] for s in names}
  if cache_dir is None:
    dirs = []
  elif isinstance(cache_dir, (str, os.PathLike)):
    dirs = [pathlib.Path(cache_dir)]
  else:
    dirs = [pathlib.Path(d) for d in cache_dir]
  name = f"copies_{_cache_key(splits, threshold)[:32]}.npz" if dirs else ""
  for d in dirs:
    if (d / name).exists() and (found := _read_masks(d / name, splits)) is not None:
      return found
  near = find_near_duplicates(splits, threshold)
  found = {s: np.zeros(len(splits[s]["image"]), bool) for s in names}
  for g in near["groups"]:
    in_group = set(g["splits"])
    for m in g["members"]:  # train: a val or test image in the group; val, test: a train one
      other = in_group - {"train"} if m["split"] == "train" else in_group & {"train"}
      found[m["split"]][m["index"]] = bool(other)
  failures = []
  for d in dirs:
    try:
      fileio.save_npz_atomic(d / name, **found)
      break
    except OSError as e:
      failures.append(f"{d}: {e}")
  else:
    if failures:
      print(f"could not cache the near copies ({'; '.join(failures)}); the next run searches "
            "again", flush=True)
  return found
