"""Tiny FER2013 look-alikes for tests: Kaggle-layout zips and folders, and fer2013.csv files.

Nothing here is FER2013 data: the faces are random 48x48 grey noise with a class-dependent
mean, written as real JPEGs (Kaggle layout) or as pixel strings (CSV).
"""

import io
import pathlib
import zipfile

import numpy as np
from PIL import Image

from fer.datasets import fer2013

PREFIXES = ("Training", "PublicTest", "PrivateTest")
TOP = {"Training": "train", "PublicTest": "test", "PrivateTest": "test"}
TFDS_SPLIT = {"Training": "train", "PublicTest": "validation", "PrivateTest": "test"}


def face(seed: int, size=(48, 48), mode="L") -> Image.Image:
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
  image = Image.fromarray(pixels, "L")
  return image if mode == "L" else image.convert(mode)


def jpeg_bytes(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def kaggle_members(per_cell: int = 2) -> dict[str, bytes]:
  """{member path: JPEG bytes}: every class folder x every prefix x `per_cell` images."""
  members = {}
  seed = 0
  for folder in sorted(fer2013.KAGGLE_FOLDER_LABELS):
    for prefix in PREFIXES:
      for _ in range(per_cell):
        seed += 1
        members[f"{TOP[prefix]}/{folder}/{prefix}_{1000 + seed}.jpg"] = jpeg_bytes(face(seed))
  return members


def expected_examples(members: dict[str, bytes], root: str = "") -> dict[str, set]:
  """TFDS split -> {(label, file name)} that a correct build of `members` holds."""
  out = {s: set() for s in fer2013.SPLITS}
  for name in members:
    top, folder, fname = name[len(root):].split("/")
    out[TFDS_SPLIT[fname.split("_")[0]]].add(
        (fer2013.KAGGLE_FOLDER_LABELS[folder], f"{top}/{folder}/{fname}"))
  return out


def write_zip(path, members: dict[str, bytes] | list[tuple[str, bytes]]) -> pathlib.Path:
  path = pathlib.Path(path)
  items = members.items() if isinstance(members, dict) else members
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in items:
      zf.writestr(name, data)
  return path


def write_tree(root, members: dict[str, bytes]) -> pathlib.Path:
  root = pathlib.Path(root)
  for name, data in members.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  root.mkdir(parents=True, exist_ok=True)
  return root


def csv_rows(per_cell: int = 2) -> list[tuple[int, np.ndarray, str]]:
  """(label, uint8 [48, 48] pixels, Usage) for every class x every Usage x `per_cell`."""
  rows = []
  rng = np.random.default_rng(0)
  for label in range(fer2013.NUM_CLASSES):
    for usage in PREFIXES:
      for _ in range(per_cell):
        rows.append((label, rng.integers(0, 256, (48, 48), dtype=np.uint8), usage))
  return rows


def csv_text(rows, header: str = "emotion,pixels,Usage") -> str:
  lines = [header]
  for label, pixels, usage in rows:
    lines.append(f"{label},{' '.join(str(int(v)) for v in np.ravel(pixels))},{usage}")
  return "\n".join(lines) + "\n"


def write_csv(path, rows=None, header: str = "emotion,pixels,Usage") -> pathlib.Path:
  path = pathlib.Path(path)
  path.write_text(csv_text(csv_rows() if rows is None else rows, header))
  return path


def snapshot(root) -> set[str]:
  """Every path under `root` (to check that nothing was written where it should not be)."""
  return {str(p) for p in pathlib.Path(root).rglob("*")}
