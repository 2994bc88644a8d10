"""FER2013 as a TFDS builder, prepared once from a manually downloaded file.

Sources (any of them, found by `find_archive`):
  (a) the Kaggle "msambare/fer2013" `archive.zip`: `train/<class>/Training_<id>.jpg`,
      `test/<class>/PublicTest_<id>.jpg` and `test/<class>/PrivateTest_<id>.jpg`;
  (b) the same tree extracted into a folder (also when nested one folder down);
  (c) the original `fer2013.csv` with columns `emotion,pixels,Usage`.

Each example holds the image (uint8 48x48x1, decoded once at build time, stored raw), the label
(a ClassLabel in the original FER2013 order, CLASSES) and the source file name for tracing
(`train/happy/Training_123.jpg`, or `fer2013.csv:<line>`). Keys are `<class>/<file name>`: two
Kaggle file names occur in two class folders. The splits follow the published protocol:
`train` = Training (28,709), `validation` = PublicTest (3,589), `test` = PrivateTest (3,589),
told apart by the file-name prefix (or the CSV's Usage column).

Bad input fails with `DataError`, naming the source and the member or line. Nothing is ever
extracted: zip members are read into memory, so no member path can write outside the data dir
(unsafe member paths are rejected all the same). Images that are 48x48 but not 8-bit grey
(RGB, palette, ...) are converted to grey (PIL's "L", ITU-R 601 luma) and counted: the build
prints their names and stores them in the dataset's metadata.json. Images of any other size
are rejected: resizing would silently change the benchmark (an upsampled 224x224 copy of
FER2013 circulates), so the file is named and the build stops. The whole source is read and
checked before anything is written; TFDS writes into an `incomplete.*` folder that is renamed
only on success, so a failed build never looks complete.
"""

import csv
import io
import os
import pathlib
import re
import time
import zipfile
from typing import Callable, Iterator, NamedTuple

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# The original FER2013 label order: the ids of fer2013.csv and of the papers.
CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(CLASSES)

# The Kaggle class folders sort differently (neutral, sad, surprise): mapped explicitly.
KAGGLE_FOLDER_LABELS = {
    "angry": 0,
    "disgust": 1,
    "fear": 2,
    "happy": 3,
    "sad": 4,
    "surprise": 5,
    "neutral": 6,
}

# File-name prefix (Kaggle) or Usage value (CSV) -> (TFDS split, Kaggle top folder).
USAGE_SPLITS = {
    "Training": ("train", "train"),
    "PublicTest": ("validation", "test"),
    "PrivateTest": ("test", "test"),
}
SPLITS = ("train", "validation", "test")

IMAGE_SIZE = 48
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
CSV_COLUMNS = ("emotion", "pixels", "Usage")
ARCHIVE_ENV = "FER2013_ARCHIVE"
KAGGLE_URL = "https://www.kaggle.com/datasets/msambare/fer2013"
KAGGLE_CSV_URL = ("https://www.kaggle.com/c/challenges-in-representation-learning-facial-"
                  "expression-recognition-challenge/data")

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_IMAGE_FORMATS = ("JPEG", "PNG")  # never let PIL pick other plugins (EPS runs ghostscript)
_MAX_MEMBER_BYTES = 4 << 20  # a 48x48 face is ~2 KB; anything this large is not one
# 8-bit modes that convert to grey without a choice of scale; I;16, I and F are rejected.
_CONVERTIBLE_MODES = ("1", "P", "LA", "La", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK",
                      "YCbCr", "LAB", "HSV")

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
FER2013 needs a Kaggle login, so it is downloaded by hand. Get either
  archive.zip   from {KAGGLE_URL}
  fer2013.csv   from {KAGGLE_CSV_URL}
and point at the zip, its extracted folder or the csv in one of three ways:
  1. the config: --config.input.archive=/path/to/archive.zip
  2. the environment: export {ARCHIVE_ENV}=/path/to/archive.zip
  3. the TFDS manual dir: put the file (or the extracted folder's content) into
     <data_dir>/downloads/manual/
"""


class DataError(ValueError):
  """The FER2013 source is missing, malformed or inconsistent. The message names the file."""


class Example(NamedTuple):
  split: str  # train | validation | test
  label: int  # index into CLASSES
  file_name: str  # for tracing: path inside the archive/folder, or "fer2013.csv:<line>"
  image: np.ndarray  # uint8 [48, 48, 1]
  converted: bool  # True when the source image was not 8-bit grey and was converted

  @property
  def key(self) -> str:
    return f"{CLASSES[self.label]}/{self.file_name.rsplit('/', 1)[-1]}"


# ----------------------------------------------------------------------------- finding it


def find_archive(archive: str | os.PathLike | None = None,
                 manual_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The FER2013 source: `archive` (the config), else $FER2013_ARCHIVE, else the manual dir."""
  for value, origin in ((archive, "config.input.archive"),
                        (os.environ.get(ARCHIVE_ENV), f"${ARCHIVE_ENV}")):
    if value:
      path = pathlib.Path(value).expanduser()
      if not path.exists():
        raise DataError(f"{path} ({origin}) does not exist.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
      return path
  if manual_dir:
    found = _find_in_manual_dir(pathlib.Path(manual_dir))
    if found:
      return found
  where = f" (looked in the manual dir {manual_dir})" if manual_dir else ""
  raise DataError(f"FER2013 not found{where}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")


def _find_in_manual_dir(manual_dir: pathlib.Path) -> pathlib.Path | None:
  if not manual_dir.is_dir():
    return None
  entries = sorted(p for p in manual_dir.iterdir() if not p.name.startswith("."))
  names = {p.name for p in entries}
  if names & {"train", "test"} or any((p / "train").is_dir() or (p / "test").is_dir()
                                      for p in entries if p.is_dir()):
    return manual_dir
  for pattern in ("archive.zip", "fer2013.csv", "*.zip", "*.csv"):
    matches = sorted(manual_dir.glob(pattern))
    if matches:
      return matches[0]
  return None


# ----------------------------------------------------------------------------- readers


def read_archive(path: str | os.PathLike) -> Iterator[Example]:
  """All examples of a zip, an extracted folder or a fer2013.csv, checked and decoded."""
  path = pathlib.Path(path)
  if path.is_dir():
    return read_folder(path)
  if not path.is_file():
    raise DataError(f"{path}: not a file or folder")
  if path.suffix.lower() == ".csv":
    return read_csv(path)
  if zipfile.is_zipfile(path):
    return read_zip(path)
  if path.suffix.lower() == ".zip":
    raise DataError(f"{path}: not a valid zip archive (truncated or corrupt?)")
  raise DataError(f"{path}: neither a zip archive, a folder nor a .csv file. "
                  f"Expected the Kaggle archive.zip (or its extracted folder) or fer2013.csv.")


def read_zip(path: str | os.PathLike) -> Iterator[Example]:
  """Examples of the Kaggle archive.zip. Members are read in memory, never extracted."""
  path = pathlib.Path(path)
  try:
    zf = zipfile.ZipFile(path)
    infos = zf.infolist()
  except Exception as e:  # BadZipFile, OSError, EOFError, ... on a damaged file
    raise DataError(f"{path}: not a readable zip archive ({type(e).__name__}: {e})") from e
  with zf:
    seen = set()
    entries = []
    for info in infos:
      name = info.filename
      _check_member_path(path, name)
      if name in seen:
        raise DataError(f"{path}: member {name!r} occurs twice")
      seen.add(name)
      if info.is_dir():
        continue
      entries.append((name, info.file_size, lambda info=info: zf.read(info)))
    yield from _read_tree(path, entries)


def read_folder(path: str | os.PathLike) -> Iterator[Example]:
  """Examples of the extracted Kaggle tree (the folder holds train/ and test/, or one folder does)."""
  path = pathlib.Path(path)
  entries = []
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames.sort()
    rel_dir = pathlib.Path(dirpath).relative_to(path).as_posix()
    for fname in sorted(filenames):
      file_path = os.path.join(dirpath, fname)
      rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
      try:
        size = os.path.getsize(file_path)
      except OSError as e:  # a broken link, no permission
        if _ignored(rel):
          continue
        raise DataError(f"{path}: cannot read {rel!r} ({e})") from e
      entries.append((rel, size, lambda p=file_path: pathlib.Path(p).read_bytes()))
  if not entries:
    raise DataError(f"{path}: the folder is empty; expected the extracted Kaggle archive "
                    f"(train/<class>/*.jpg and test/<class>/*.jpg)")
  yield from _read_tree(path, entries)


def _check_member_path(source: pathlib.Path, name: str):
  parts = re.split(r"[/\\]", name)
  if (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts
      or "\x00" in name):
    raise DataError(f"{source}: member {name!r} has an unsafe path (absolute or with '..'); "
                    f"refusing the archive")


def _ignored(rel: str) -> bool:
  parts = rel.split("/")
  return (any(p.startswith(".") or p == "__MACOSX" for p in parts)
          or not parts[-1].lower().endswith(_IMAGE_SUFFIXES))


def _read_tree(source: pathlib.Path,
               entries: list[tuple[str, int, Callable[[], bytes]]]) -> Iterator[Example]:
  """Checks the Kaggle layout of (relative path, size, reader) entries, then decodes them."""
  images = [e for e in entries if not _ignored(e[0])]
  if not images:
    raise DataError(f"{source}: no images (.jpg, .png) found; expected the Kaggle layout "
                    f"train/<class>/*.jpg and test/<class>/*.jpg")
  root = _find_root(source, [name for name, _, _ in images])
  checked = []
  split_counts = dict.fromkeys(SPLITS, 0)
  for name, size, read in images:
    rel = name[len(root):]
    parts = rel.split("/")
    if not name.startswith(root) or parts[0] not in ("train", "test") or len(parts) != 3:
      raise DataError(f"{source}: image {name!r} is outside the layout "
                      f"{root}train|test/<class>/<file>")
    top, folder, fname = parts
    if folder not in KAGGLE_FOLDER_LABELS:
      raise DataError(f"{source}: {name!r}: unknown class folder {folder!r}; "
                      f"expected one of {', '.join(sorted(KAGGLE_FOLDER_LABELS))}")
    usage = fname.split("_", 1)[0]
    if usage not in USAGE_SPLITS or "_" not in fname:
      raise DataError(f"{source}: {name!r}: the file name must start with Training_, "
                      f"PublicTest_ or PrivateTest_ (it tells the split)")
    split, expected_top = USAGE_SPLITS[usage]
    if top != expected_top:
      raise DataError(f"{source}: {name!r}: a {usage}_ image belongs in {expected_top}/")
    if size > _MAX_MEMBER_BYTES:
      raise DataError(f"{source}: {name!r} is {size} bytes, too large for a 48x48 face")
    split_counts[split] += 1
    checked.append((rel, split, KAGGLE_FOLDER_LABELS[folder], read))
  _check_all_splits(source, split_counts)
  for rel, split, label, read in checked:
    try:
      data = read()
    except Exception as e:  # BadZipFile (CRC), zlib.error, OSError, ... on damaged members
      raise DataError(f"{source}: cannot read {root}{rel!r} "
                      f"({type(e).__name__}: {e})") from e
    image, converted = decode_image(data, f"{source}: {root}{rel}")
    yield Example(split, label, rel, image, converted)


def _find_root(source: pathlib.Path, names: list[str]) -> str:
  tops = sorted({n.split("/")[0] for n in names})
  if set(tops) & {"train", "test"}:
    return ""
  roots = sorted({n.split("/")[0] for n in names
                  if n.count("/") >= 1 and n.split("/")[1] in ("train", "test")})
  if len(roots) == 1:
    return roots[0] + "/"
  if roots:
    raise DataError(f"{source}: several folders hold train/ or test/: {roots}; "
                    f"point at one of them")
  raise DataError(f"{source}: no train/ or test/ folder at the top or one folder down "
                  f"(found {tops[:10]}); expected the Kaggle layout train/<class>/*.jpg")


def _check_all_splits(source: pathlib.Path, split_counts: dict[str, int]):
  missing = [s for s in SPLITS if not split_counts[s]]
  if missing:
    names = {v[0]: k for k, v in USAGE_SPLITS.items()}
    raise DataError(f"{source}: no images for the split(s) "
                    f"{', '.join(f'{s} ({names[s]})' for s in missing)}; found {split_counts}")


def decode_image(data: bytes, name: str) -> tuple[np.ndarray, bool]:
  """JPEG/PNG bytes -> (uint8 [48, 48, 1], converted). 48x48 only; 8-bit colour -> grey."""
  try:
    with Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS) as im:
      if im.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{name}: image is {im.size[0]}x{im.size[1]}, expected 48x48 "
                        f"(other sizes are rejected, not resized)")
      mode = im.mode
      if mode == "L":
        array = np.asarray(im)
      elif mode in _CONVERTIBLE_MODES:
        array = np.asarray(im.convert("L"))
      else:
        raise DataError(f"{name}: image mode {mode!r} is not 8-bit; expected grey (L)")
  except DataError:
    raise
  except Exception as e:  # UnidentifiedImageError, truncated files, decoder errors
    raise DataError(f"{name}: not a readable JPEG/PNG image ({type(e).__name__}: {e})") from e
  if array.shape != (IMAGE_SIZE, IMAGE_SIZE) or array.dtype != np.uint8:
    raise DataError(f"{name}: decoded to {array.dtype} {array.shape}, expected uint8 48x48")
  return array.reshape(IMAGE_SHAPE), mode != "L"


def read_csv(path: str | os.PathLike) -> Iterator[Example]:
  """Examples of the original fer2013.csv (`emotion,pixels,Usage`; any column order)."""
  path = pathlib.Path(path)
  try:
    f = open(path, newline="", encoding="utf-8-sig", errors="replace")
  except OSError as e:
    raise DataError(f"{path}: cannot open ({e})") from e
  with f:
    reader = csv.reader(f)
    header = _next_row(path, reader)
    if header is None:
      raise DataError(f"{path}, line 1: the file is empty; expected the header "
                      f"{','.join(CSV_COLUMNS)}")
    columns = [h.strip() for h in header]
    if sorted(columns) != sorted(CSV_COLUMNS):
      raise DataError(f"{path}, line 1: header {','.join(header)!r}; "
                      f"expected {','.join(CSV_COLUMNS)}")
    i_label, i_pixels, i_usage = (columns.index(c) for c in CSV_COLUMNS)
    split_counts = dict.fromkeys(SPLITS, 0)
    examples = []
    while True:
      line = reader.line_num + 1
      row = _next_row(path, reader)
      if row is None:
        break
      if not any(cell.strip() for cell in row):
        continue  # blank line
      where = f"{path}, line {line}"
      if reader.line_num != line:  # a quoted field ran over several lines
        where = f"{path}, lines {line}-{reader.line_num}"
      if len(row) != len(CSV_COLUMNS):
        raise DataError(f"{where}: {len(row)} fields, expected {len(CSV_COLUMNS)} "
                        f"({','.join(CSV_COLUMNS)})")
      label_text = row[i_label].strip()
      if not (label_text.isascii() and label_text.isdigit()) or int(label_text) >= NUM_CLASSES:
        raise DataError(f"{where}: emotion {label_text!r} is not a label 0..{NUM_CLASSES - 1}")
      usage = row[i_usage].strip()
      if usage not in USAGE_SPLITS:
        raise DataError(f"{where}: Usage {usage!r} is not one of {', '.join(USAGE_SPLITS)}")
      split = USAGE_SPLITS[usage][0]
      split_counts[split] += 1
      examples.append(Example(split, int(label_text), f"{path.name}:{line}",
                              _parse_pixels(where, row[i_pixels]), False))
  _check_all_splits(path, split_counts)
  yield from examples


def _next_row(path: pathlib.Path, reader) -> list[str] | None:
  try:
    return next(reader)
  except StopIteration:
    return None
  except csv.Error as e:  # NUL bytes, oversized fields, bad quoting
    raise DataError(f"{path}, line {reader.line_num + 1}: {e}") from e


def _parse_pixels(where: str, text: str) -> np.ndarray:
  tokens = text.split()
  if len(tokens) != IMAGE_SIZE * IMAGE_SIZE:
    raise DataError(f"{where}: {len(tokens)} pixel values, expected "
                    f"{IMAGE_SIZE * IMAGE_SIZE} (48x48)")
  digits = "".join(tokens)
  if not (digits.isascii() and digits.isdigit()):
    bad = next(t for t in tokens if not (t.isascii() and t.isdigit()))
    raise DataError(f"{where}: pixel {bad!r} is not an integer 0..255")
  try:
    values = np.array(tokens, dtype=np.int64)
  except OverflowError:
    values = np.array([256 if len(t.lstrip("0")) > 3 else int(t) for t in tokens])
  if values.max() > 255:
    raise DataError(f"{where}: pixel {tokens[int(values.argmax())]!r} is outside 0..255")
  return values.astype(np.uint8).reshape(IMAGE_SHAPE)


# ----------------------------------------------------------------------------- the builder


class Fer2013(tfds.core.GeneratorBasedBuilder):
  """FER2013 (Goodfellow et al. 2013), manual download, raw uint8 images in array_record."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Kaggle zip, extracted folder or fer2013.csv; raw uint8 images."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  # TFDS looks for checksums beside the builder's code. For a builder inside a package its
  # lookup needs the `importlib_resources` backport (not installed on Python >= 3.9), so the
  # path is given here; no checksums file exists: the download is manual.
  code_path = epath.Path(__file__)

  def __init__(self, *, archive: str | os.PathLike | None = None, verbose: bool = False,
               **kwargs):
    """`archive`: the zip, folder or csv; else $FER2013_ARCHIVE, else the manual dir."""
    kwargs.setdefault("file_format", "array_record")
    self._archive = archive
    self._verbose = verbose
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="FER2013: 48x48 grey faces in 7 expression classes (ICML 2013 challenge).",
        features=tfds.features.FeaturesDict({
            # Raw bytes: 2,304 per image (the default stores uint8 as int64 varints).
            "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.ClassLabel(names=CLASSES),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage=KAGGLE_URL,
        metadata=tfds.core.MetadataDict(),
        citation="""@inproceedings{goodfellow2013challenges,
  title={Challenges in representation learning: A report on three machine learning contests},
  author={Goodfellow, Ian J and Erhan, Dumitru and Carrier, Pierre Luc and others},
  booktitle={ICONIP}, year={2013}}""",
    )

  def _split_generators(self, dl_manager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError:  # the manual dir is missing or empty
      manual_dir = None
    source = find_archive(self._archive, manual_dir)
    start = time.perf_counter()
    self._log(f"fer2013: reading {source}")
    by_split = {s: [] for s in SPLITS}
    converted = []
    for ex in read_archive(source):
      by_split[ex.split].append(ex)
      if ex.converted:
        converted.append(ex.file_name)
    counts = {s: len(v) for s, v in by_split.items()}
    self._log(f"fer2013: decoded {sum(counts.values())} images {counts} "
              f"in {time.perf_counter() - start:.1f}s; writing {self.data_dir}")
    if converted:
      print(f"fer2013: converted {len(converted)} non-grey 48x48 images to grey, e.g. "
            f"{', '.join(converted[:5])} (all listed in metadata.json)")
    self.info.metadata.update(source=str(source), converted_to_grey=converted)
    return {split: self._generate_examples(examples) for split, examples in by_split.items()}

  def _generate_examples(self, examples):
    for ex in examples:
      yield ex.key, {"image": ex.image, "label": ex.label, "file_name": ex.file_name}

  def _log(self, message: str):
    if self._verbose:
      print(message, flush=True)
