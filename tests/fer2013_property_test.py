"""Property tests of the zip, folder and CSV readers and of the build, on random and mutated input.

Every input either gives a correct dataset or fails with DataError naming the file; nothing is
written outside the data dir. Example counts are small: the whole file runs in ~5 s on 2 cores;
ten times as many examples found nothing more.
"""

import io
import pathlib
import tempfile
import warnings
import zipfile

from hypothesis import HealthCheck, given, settings, strategies as st
import numpy as np
from PIL import Image

import fer2013_fakes as fakes
from fer import input_pipeline
from fer.datasets import fer2013
from fer.datasets.fer2013 import DataError

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
FOLDERS = sorted(fer2013.KAGGLE_FOLDER_LABELS)

GOOD = [fakes.jpeg_bytes(fakes.face(s)) for s in range(4)]
RGB = fakes.jpeg_bytes(fakes.face(10, mode="RGB"))
BIG = fakes.jpeg_bytes(fakes.face(11, size=(64, 48)))
BAD_CONTENT = [b"", b"\xff\xd8\xff garbage", GOOD[0][:300], BIG, b"GIF89a" + bytes(40)]
BAD_NAMES = ["train/contempt/Training_1.jpg", "train/happy/Validation_1.jpg",
             "test/happy/Training_1.jpg", "train/happy/PublicTest_1.jpg",
             "train/happy/extra/Training_1.jpg", "train/Training_1.jpg",
             "elsewhere/happy/Training_1.jpg", "train/happy/training_1.jpg"]
UNSAFE_NAMES = ["../Training_1.jpg", "/tmp/x/train/happy/Training_1.jpg",
                "train/../../Training_1.jpg", "..\\evil.jpg"]
IGNORED = [("README.txt", b"hello"), (".DS_Store", b"\x00\x01"),
           ("train/happy/.hidden.jpg", b"junk"), ("__MACOSX/train/._x.jpg", b"junk"),
           ("train/happy/Thumbs.db", b"junk")]


def decode(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


@st.composite
def archives(draw, allow_unsafe: bool):
  """(members as a list of (name, bytes), the names that must be reported, expected or None).

  Three valid images (one per split) are always there; extra members are valid, converted
  (RGB), ignored, or bad (name, content, unsafe path, duplicate member).
  """
  members, expected, bad = [], {}, []
  counter = iter(range(100, 10_000))

  def valid(prefix, data):
    folder = draw(st.sampled_from(FOLDERS))
    name = f"{fakes.TOP[prefix]}/{folder}/{prefix}_{next(counter)}.jpg"
    members.append((name, data))
    expected[name] = (fakes.TFDS_SPLIT[prefix], fer2013.KAGGLE_FOLDER_LABELS[folder])
    return name

  for prefix in fakes.PREFIXES:
    valid(prefix, GOOD[0])
  kinds = ["valid", "rgb", "ignored", "bad_name", "bad_content"]
  kinds += ["unsafe", "duplicate"] if allow_unsafe else []
  for kind in draw(st.lists(st.sampled_from(kinds), max_size=6)):
    if kind == "valid":
      valid(draw(st.sampled_from(fakes.PREFIXES)), draw(st.sampled_from(GOOD)))
    elif kind == "rgb":
      valid(draw(st.sampled_from(fakes.PREFIXES)), RGB)
    elif kind == "ignored":
      name, data = draw(st.sampled_from(IGNORED))
      if name not in dict(members):
        members.append((name, data))
    elif kind == "bad_name":
      name = draw(st.sampled_from(BAD_NAMES)).replace("_1.", f"_{next(counter)}.")
      members.append((name, GOOD[1]))
      bad.append(name)
    elif kind == "bad_content":
      name = valid(draw(st.sampled_from(fakes.PREFIXES)), draw(st.sampled_from(BAD_CONTENT)))
      bad.append(name)
    elif kind == "unsafe":
      name = draw(st.sampled_from(UNSAFE_NAMES))
      members.append((name, GOOD[2]))
      bad.append(name)
    elif kind == "duplicate":
      name, data = members[draw(st.integers(0, len(members) - 1))]
      members.append((name, data))
      bad.append(name)
  members = draw(st.permutations(members))
  return list(members), bad, (None if bad else expected)


def check(examples, members, expected):
  contents = dict(members)
  got = {}
  for ex in examples:
    assert ex.image.dtype == np.uint8 and ex.image.shape == (48, 48, 1)
    np.testing.assert_array_equal(ex.image[..., 0], decode(contents[ex.file_name]))
    assert ex.converted == (contents[ex.file_name] == RGB)
    got[ex.file_name] = (ex.split, ex.label)
  assert got == expected


def names_one_of(error: DataError, names) -> bool:
  return any(n in str(error) or repr(n) in str(error) for n in names)


def check_outcome(path, read, members, bad, expected):
  try:
    examples = list(read(path))
  except DataError as e:
    assert str(path) in str(e)
    assert bad, f"a valid archive was rejected: {e}"
    assert names_one_of(e, bad), (str(e), bad)
    return
  assert not bad, f"accepted {bad}"
  check(examples, members, expected)


@settings(max_examples=60, **SETTINGS)
@given(archives(allow_unsafe=True))
def test_zip_reader(archive):
  members, bad, expected = archive
  with tempfile.TemporaryDirectory() as tmp:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # zipfile warns about the duplicate member names
      path = fakes.write_zip(pathlib.Path(tmp) / "archive.zip", members)
    before = fakes.snapshot(tmp)
    check_outcome(path, fer2013.read_archive, members, bad, expected)
    assert fakes.snapshot(tmp) == before


@settings(max_examples=30, **SETTINGS)
@given(archives(allow_unsafe=False), st.booleans())
def test_folder_reader(archive, nested):
  members, bad, expected = archive
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp) / "src"
    fakes.write_tree(root / "inner" if nested else root, dict(members))
    before = fakes.snapshot(tmp)
    try:
      examples = list(fer2013.read_archive(root))
    except DataError as e:
      assert str(root) in str(e) and bad and names_one_of(e, bad), (str(e), bad)
    else:
      assert not bad, f"accepted {bad}"
      check(examples, members, expected)
    assert fakes.snapshot(tmp) == before


@st.composite
def mutations(draw, size: int):
  """A list of (offset, replacement bytes) or a truncation, applied to a file of `size` bytes."""
  kind = draw(st.sampled_from(["truncate", "overwrite", "insert"]))
  at = draw(st.integers(0, size - 1))
  data = draw(st.binary(min_size=1, max_size=16))
  return kind, at, data


def mutate(blob: bytes, mutation) -> bytes:
  kind, at, data = mutation
  if kind == "truncate":
    return blob[:at]
  if kind == "overwrite":
    return blob[:at] + data + blob[at + len(data):]
  return blob[:at] + data + blob[at:]


_ZIP_MEMBERS = fakes.kaggle_members(per_cell=1)
_ZIP = io.BytesIO()
with zipfile.ZipFile(_ZIP, "w", compression=zipfile.ZIP_DEFLATED) as _zf:
  for _name, _data in _ZIP_MEMBERS.items():
    _zf.writestr(_name, _data)
_ZIP = _ZIP.getvalue()


@settings(max_examples=100, **SETTINGS)
@given(st.lists(mutations(len(_ZIP)), min_size=1, max_size=3))
def test_mutated_zip_bytes(muts):
  blob = _ZIP
  for m in muts:
    blob = mutate(blob, m) if blob else blob
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "archive.zip"
    path.write_bytes(blob)
    before = fakes.snapshot(tmp)
    try:
      examples = list(fer2013.read_archive(path))
    except DataError as e:
      assert str(path) in str(e)
    else:  # the mutation hit bytes that do not matter (or left a consistent archive)
      for ex in examples:
        assert ex.image.shape == (48, 48, 1) and ex.image.dtype == np.uint8
        assert 0 <= ex.label < fer2013.NUM_CLASSES and ex.split in fer2013.SPLITS
        if ex.file_name in _ZIP_MEMBERS:
          np.testing.assert_array_equal(ex.image[..., 0], decode(_ZIP_MEMBERS[ex.file_name]))
    assert fakes.snapshot(tmp) == before


_ROWS = fakes.csv_rows(per_cell=1)
_PIXELS = " ".join(["9"] * 2304)
BAD_ROWS = {  # a bad data row and what the error says about it
    "pixel count": ("3," + " ".join(["9"] * 2000) + ",Training", "pixel values"),
    "non-numeric": ("3," + _PIXELS[:-1] + "z,Training", "pixel 'z'"),
    "pixel range": ("3,300" + _PIXELS[1:] + ",Training", "pixel '300'"),
    "label range": ("8," + _PIXELS + ",Training", "emotion '8'"),
    "label text": ("happy," + _PIXELS + ",Training", "emotion 'happy'"),
    "usage": ("3," + _PIXELS + ",Test", "Usage 'Test'"),
    "fields": ("3," + _PIXELS + ",Training,extra", "4 fields"),
}


@settings(max_examples=40, **SETTINGS)
@given(st.sets(st.integers(0, len(_ROWS) - 1), min_size=3),
       st.one_of(st.none(), st.sampled_from(sorted(BAD_ROWS))),
       st.integers(0, 100), st.lists(st.integers(0, 100), max_size=3))
def test_csv_reader(keep, bad_kind, bad_at, blank_at):
  rows = [_ROWS[i] for i in sorted(keep)]
  for usage in fakes.PREFIXES:  # every split keeps at least one row
    if not any(r[2] == usage for r in rows):
      rows.append(next(r for r in _ROWS if r[2] == usage))
  lines = fakes.csv_text(rows).splitlines()  # lines[0] is the header
  data_lines = [(line, None) for line in lines[1:]]
  if bad_kind:
    data_lines.insert(bad_at % (len(data_lines) + 1), (BAD_ROWS[bad_kind][0], bad_kind))
  for b in blank_at:
    data_lines.insert(b % (len(data_lines) + 1), ("", None))
  text_lines = [lines[0]] + [line for line, _ in data_lines]
  bad_line = next((i + 2 for i, (_, k) in enumerate(data_lines) if k), None)
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "fer2013.csv"
    path.write_text("\n".join(text_lines) + "\n")
    try:
      examples = list(fer2013.read_archive(path))
    except DataError as e:
      assert bad_kind, str(e)
      assert f"{path}, line {bad_line}: " in str(e) and BAD_ROWS[bad_kind][1] in str(e), str(e)
      return
  assert not bad_kind
  assert len(examples) == len(rows)
  for ex, (label, pixels, usage) in zip(examples, rows):
    assert ex.label == label and ex.split == fakes.TFDS_SPLIT[usage]
    np.testing.assert_array_equal(ex.image[..., 0], pixels)
  line_of = {f"fer2013.csv:{i + 1}" for i, t in enumerate(text_lines) if t and i}
  assert {ex.file_name for ex in examples} == line_of


_CSV = fakes.csv_text(fakes.csv_rows(per_cell=1)).encode()


@settings(max_examples=40, **SETTINGS)
@given(st.lists(st.tuples(st.sampled_from(["truncate", "overwrite", "insert"]),
                          st.integers(0, len(_CSV) - 1),
                          st.lists(st.sampled_from(list(b',"\n\r x-09.\x00\xff\xfe')),
                                   min_size=1, max_size=4).map(bytes)),
                min_size=1, max_size=3))
def test_mutated_csv_bytes(muts):
  blob = _CSV
  for m in muts:
    blob = mutate(blob, m) if blob else blob
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "fer2013.csv"
    path.write_bytes(blob)
    try:
      examples = list(fer2013.read_archive(path))
    except DataError as e:
      assert str(path) in str(e)
    else:
      for ex in examples:
        assert ex.image.shape == (48, 48, 1) and 0 <= ex.label < fer2013.NUM_CLASSES


@settings(max_examples=8, **SETTINGS)
@given(archives(allow_unsafe=True))
def test_build_writes_a_correct_dataset_or_nothing_and_only_into_the_data_dir(archive):
  members, bad, expected = archive
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # zipfile warns about the duplicate member names
      path = fakes.write_zip(tmp / "archive.zip", members)
    data_dir = tmp / "data"
    before = fakes.snapshot(tmp)
    try:
      data = input_pipeline.load_fer2013(str(path), str(data_dir), with_names=True,
                                         verbose=False)
    except DataError as e:
      assert bad and str(path) in str(e)
      assert not (data_dir / "fer2013" / "1.0.0").exists()
      assert not list((data_dir / "fer2013").glob("incomplete*"))
    else:
      assert not bad
      got = {n: (s, int(l)) for s in fer2013.SPLITS
             for n, l in zip(data[s]["file_name"], data[s]["label"])}
      assert got == expected
    new = fakes.snapshot(tmp) - before
    assert all(p.startswith(str(data_dir)) for p in new), new
