"""The FER2013 builder and its readers on tiny archives, folders and CSVs (no real data)."""

import io
import pathlib
import sys

import numpy as np
from PIL import Image
import pytest

import fer2013_fakes as fakes
from fer import input_pipeline
from fer.datasets import fer2013
from fer.datasets.fer2013 import DataError


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch):
  monkeypatch.delenv(fer2013.ARCHIVE_ENV, raising=False)
  monkeypatch.delenv(input_pipeline.DATA_DIR_ENV, raising=False)


def load(tmp_path, archive, data_dir=None):
  data_dir = data_dir or tmp_path / "data"
  return input_pipeline.load_fer2013(str(archive), str(data_dir), with_names=True,
                                     verbose=False)


def check_dataset(data, members, root=""):
  """`data` (load_fer2013 output) holds exactly `members`, with the right labels and pixels."""
  expected = fakes.expected_examples(members, root)
  for split in fer2013.SPLITS:
    d = data[split]
    assert d["image"].dtype == np.uint8 and d["image"].shape[1:] == (48, 48, 1)
    assert d["label"].dtype == np.int32
    assert set(zip(d["label"].tolist(), d["file_name"].tolist())) == expected[split]
    for image, name in zip(d["image"], d["file_name"]):
      want = np.asarray(Image.open(io.BytesIO(members[root + name])))
      np.testing.assert_array_equal(image[..., 0], want)


def test_kaggle_folders_map_to_the_original_label_order():
  assert fer2013.CLASSES == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
  assert set(fer2013.KAGGLE_FOLDER_LABELS) == set(fer2013.CLASSES)
  for folder, label in fer2013.KAGGLE_FOLDER_LABELS.items():
    assert fer2013.CLASSES[label] == folder
  # The Kaggle folders sort as angry, disgust, fear, happy, neutral, sad, surprise: the sorted
  # position is not the label.
  assert [fer2013.KAGGLE_FOLDER_LABELS[f] for f in sorted(fer2013.KAGGLE_FOLDER_LABELS)] == [
      0, 1, 2, 3, 6, 4, 5]


def test_builds_from_zip_and_second_run_reuses_it(tmp_path, fer2013_zip, monkeypatch):
  members = fakes.kaggle_members()
  data = load(tmp_path, fer2013_zip)
  check_dataset(data, members)
  assert {s: len(d["label"]) for s, d in data.items()} == {
      "train": 14, "validation": 14, "test": 14}
  builder = fer2013.Fer2013(data_dir=tmp_path / "data")
  assert builder.info.metadata["source"] == str(fer2013_zip)
  assert builder.info.features["label"].names == list(fer2013.CLASSES)

  # A second run neither reads the archive nor rewrites anything.
  files = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*") if p.is_file()}
  monkeypatch.setattr(fer2013, "read_archive", lambda *a: pytest.fail("rebuilt"))
  fer2013_zip.unlink()
  again = load(tmp_path, "")
  assert files == {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*")
                   if p.is_file()}
  for split in fer2013.SPLITS:
    np.testing.assert_array_equal(again[split]["image"], data[split]["image"])


def test_reusing_data_built_from_another_archive_says_so(tmp_path, fer2013_zip, capsys):
  load(tmp_path, fer2013_zip)
  other = fakes.write_zip(tmp_path / "other.zip", fakes.kaggle_members(per_cell=1))
  input_pipeline.prepare(str(other), str(tmp_path / "data"))
  assert f"built from {fer2013_zip}, not from {other}" in capsys.readouterr().out


@pytest.mark.parametrize("nested", [False, True])
def test_builds_from_folder(tmp_path, nested):
  members = fakes.kaggle_members()
  root = tmp_path / "src"
  fakes.write_tree(root / "fer2013" if nested else root, members)
  (root / "README.txt").write_text("not an image")  # ignored
  check_dataset(load(tmp_path, root), members)


def test_builds_from_zip_nested_one_folder_down(tmp_path):
  members = {f"archive/{k}": v for k, v in fakes.kaggle_members().items()}
  members["__MACOSX/archive/train/._x.jpg"] = b"resource fork"  # ignored
  members["archive/train/happy/.DS_Store"] = b"junk"  # ignored
  path = fakes.write_zip(tmp_path / "a.zip", members)
  data = load(tmp_path, path)
  real = {k: v for k, v in members.items() if k.endswith(".jpg") and "MACOSX" not in k}
  check_dataset(data, real, root="archive/")


def test_builds_from_csv(tmp_path):
  rows = fakes.csv_rows()
  path = fakes.write_csv(tmp_path / "fer2013.csv", rows)
  data = load(tmp_path, path)
  for split, usage in (("train", "Training"), ("validation", "PublicTest"),
                       ("test", "PrivateTest")):
    want = {f"fer2013.csv:{i + 2}": (label, pixels)
            for i, (label, pixels, u) in enumerate(rows) if u == usage}
    d = data[split]
    assert sorted(d["file_name"]) == sorted(want)
    for image, label, name in zip(d["image"], d["label"], d["file_name"]):
      assert label == want[name][0]
      np.testing.assert_array_equal(image[..., 0], want[name][1])


def test_csv_columns_in_another_order_and_quoted(tmp_path):
  rows = fakes.csv_rows(per_cell=1)
  lines = ["Usage,emotion,pixels"] + [
      f'{u},{label},"{" ".join(map(str, p.ravel()))}"' for label, p, u in rows]
  path = tmp_path / "icml.csv"
  path.write_text("\n".join(lines) + "\n\n")
  examples = list(fer2013.read_archive(path))
  assert [e.label for e in examples] == [r[0] for r in rows]
  np.testing.assert_array_equal(examples[3].image[..., 0], rows[3][1])


def test_duplicate_file_names_in_two_class_folders_get_distinct_keys(tmp_path):
  # As in the real archive: Training_52789098.jpg is in neutral/ and in surprise/.
  members = fakes.kaggle_members(per_cell=1)
  members["train/neutral/Training_7.jpg"] = fakes.jpeg_bytes(fakes.face(7))
  members["train/surprise/Training_7.jpg"] = fakes.jpeg_bytes(fakes.face(8))
  data = load(tmp_path, fakes.write_zip(tmp_path / "a.zip", members))
  check_dataset(data, members)
  keys = {e.key for e in fer2013.read_archive(tmp_path / "a.zip")}
  assert {"neutral/Training_7.jpg", "surprise/Training_7.jpg"} <= keys


# ----------------------------------------------------------------------------- finding it


def test_find_archive_order(tmp_path, monkeypatch):
  a, b = tmp_path / "a.zip", tmp_path / "b.zip"
  a.touch(), b.touch()
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "fer2013.csv").touch()
  monkeypatch.setenv(fer2013.ARCHIVE_ENV, str(b))
  assert fer2013.find_archive(str(a), manual) == a
  assert fer2013.find_archive("", manual) == b
  monkeypatch.delenv(fer2013.ARCHIVE_ENV)
  assert fer2013.find_archive("", manual) == manual / "fer2013.csv"
  (manual / "archive.zip").touch()
  assert fer2013.find_archive(None, manual) == manual / "archive.zip"
  (manual / "train").mkdir()
  assert fer2013.find_archive(None, manual) == manual


def test_manual_dir_of_the_data_dir_is_used(tmp_path):
  members = fakes.kaggle_members(per_cell=1)
  manual = tmp_path / "data" / "downloads" / "manual"
  manual.mkdir(parents=True)
  fakes.write_zip(manual / "archive.zip", members)
  check_dataset(load(tmp_path, ""), members)


def test_no_archive_anywhere_says_where_to_get_and_put_it(tmp_path):
  with pytest.raises(DataError) as e:
    load(tmp_path, "")
  message = str(e.value)
  for needle in (fer2013.KAGGLE_URL, "config.input.archive", "FER2013_ARCHIVE",
                 "downloads/manual"):
    assert needle in message
  assert not (tmp_path / "data" / "fer2013" / "1.0.0").exists()


def test_missing_configured_archive(tmp_path, monkeypatch):
  with pytest.raises(DataError, match="nope.zip.*config.input.archive"):
    fer2013.find_archive(tmp_path / "nope.zip")
  monkeypatch.setenv(fer2013.ARCHIVE_ENV, str(tmp_path / "gone.zip"))
  with pytest.raises(DataError, match=r"gone.zip.*\$FER2013_ARCHIVE"):
    fer2013.find_archive("")


# ----------------------------------------------------------------------------- bad input


def read_all(path):
  return list(fer2013.read_archive(path))


def test_not_a_zip(tmp_path):
  for name in ("archive.zip", "archive.bin"):
    path = tmp_path / name
    path.write_bytes(b"this is not a zip file at all")
    with pytest.raises(DataError, match=name):
      read_all(path)


def test_truncated_zip(tmp_path, fer2013_zip):
  data = fer2013_zip.read_bytes()
  for cut in (len(data) // 2, len(data) - 30):
    path = tmp_path / f"cut{cut}.zip"
    path.write_bytes(data[:cut])
    with pytest.raises(DataError, match=f"cut{cut}.zip"):
      read_all(path)


def test_empty_folder_and_folder_without_layout(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="empty.*folder is empty"):
    read_all(tmp_path / "empty")
  fakes.write_tree(tmp_path / "flat", {"happy/Training_1.jpg": fakes.jpeg_bytes(fakes.face(1))})
  with pytest.raises(DataError, match="flat.*no train/ or test/"):
    read_all(tmp_path / "flat")


def test_broken_link_in_folder_names_the_file(tmp_path):
  root = fakes.write_tree(tmp_path / "tree", fakes.kaggle_members(per_cell=1))
  (root / "train" / "happy" / "Training_77.jpg").symlink_to(tmp_path / "missing.jpg")
  with pytest.raises(DataError, match="tree: cannot read 'train/happy/Training_77.jpg'"):
    read_all(root)


def test_empty_zip(tmp_path):
  path = fakes.write_zip(tmp_path / "empty.zip", {})
  with pytest.raises(DataError, match="empty.zip: no images"):
    read_all(path)


@pytest.mark.parametrize("bad", ["../x.jpg", "/abs/train/happy/Training_1.jpg",
                                 "train/../../escape.jpg", "..\\..\\win.jpg", "C:/x.jpg"])
def test_unsafe_member_paths_are_rejected_and_nothing_is_written(tmp_path, bad):
  work = tmp_path / "work"
  work.mkdir()
  members = list(fakes.kaggle_members(per_cell=1).items()) + [(bad, b"payload")]
  path = fakes.write_zip(work / "archive.zip", members)
  before = fakes.snapshot(tmp_path)
  with pytest.raises(DataError, match="unsafe path") as e:
    load(work, path, data_dir=work / "data")
  assert str(path) in str(e.value) and repr(bad) in str(e.value)
  after = fakes.snapshot(tmp_path)
  assert not {p for p in after - before if not p.startswith(str(work / "data"))}
  assert not (work / "data" / "fer2013" / "1.0.0").exists()


def test_unknown_class_folder_lists_the_expected_names(tmp_path):
  members = fakes.kaggle_members(per_cell=1)
  members["train/contempt/Training_1.jpg"] = fakes.jpeg_bytes(fakes.face(1))
  with pytest.raises(DataError) as e:
    read_all(fakes.write_zip(tmp_path / "a.zip", members))
  assert "'contempt'" in str(e.value)
  assert "angry, disgust, fear, happy, neutral, sad, surprise" in str(e.value)


@pytest.mark.parametrize("name, match", [
    ("train/happy/Foo_1.jpg", "must start with Training_"),
    ("test/happy/Training_99.jpg", "belongs in train/"),
    ("train/happy/PrivateTest_99.jpg", "belongs in test/"),
    ("train/Training_99.jpg", "outside the layout"),
    ("other/happy/Training_99.jpg", "outside the layout"),
])
def test_bad_layout_names_the_member(tmp_path, name, match):
  members = fakes.kaggle_members(per_cell=1)
  members[name] = fakes.jpeg_bytes(fakes.face(1))
  with pytest.raises(DataError, match=match) as e:
    read_all(fakes.write_tree(tmp_path / "tree", members))
  assert name in str(e.value)


def test_missing_split_is_an_error(tmp_path):
  members = {k: v for k, v in fakes.kaggle_members().items() if "PublicTest" not in k}
  with pytest.raises(DataError, match=r"validation \(PublicTest\)"):
    read_all(fakes.write_zip(tmp_path / "a.zip", members))


def test_corrupt_jpeg_names_the_member(tmp_path):
  members = fakes.kaggle_members(per_cell=1)
  name = next(k for k in members if k.startswith("train/sad/"))
  good = members[name]
  for i, bad in enumerate([b"\xff\xd8 not really a jpeg", good[: len(good) // 2], b""]):
    members[name] = bad
    with pytest.raises(DataError, match=f"{name}: not a readable"):
      read_all(fakes.write_zip(tmp_path / f"a{i}.zip", members))


def test_corrupt_zip_member_names_the_member(tmp_path, fer2013_zip):
  data = bytearray(fer2013_zip.read_bytes())
  name = b"train/angry/Training_1001.jpg"
  start = data.index(name) + len(name) + 100  # inside the first member's stored bytes
  data[start:start + 8] = b"\x00" * 8
  path = tmp_path / "crc.zip"
  path.write_bytes(bytes(data))
  with pytest.raises(DataError, match="crc.zip.*train/angry/Training_1001.jpg"):
    read_all(path)


def test_other_sizes_are_rejected_naming_the_file(tmp_path):
  members = fakes.kaggle_members(per_cell=1)
  members["train/happy/Training_5.jpg"] = fakes.jpeg_bytes(fakes.face(5, size=(224, 224)))
  with pytest.raises(DataError, match="Training_5.jpg: image is 224x224, expected 48x48"):
    read_all(fakes.write_zip(tmp_path / "a.zip", members))


def test_colour_48x48_images_are_converted_and_counted(tmp_path, capsys):
  members = fakes.kaggle_members(per_cell=1)
  rgb = fakes.face(5, mode="RGB")
  members["train/happy/Training_5.jpg"] = fakes.jpeg_bytes(rgb)
  buf = io.BytesIO()
  fakes.face(6, mode="P").save(buf, format="PNG")
  members["test/fear/PublicTest_6.png"] = buf.getvalue()
  path = fakes.write_zip(tmp_path / "a.zip", members)
  builder = input_pipeline.prepare(str(path), str(tmp_path / "data"), verbose=False)
  converted = ["train/happy/Training_5.jpg", "test/fear/PublicTest_6.png"]
  assert sorted(builder.info.metadata["converted_to_grey"]) == sorted(converted)
  assert "converted 2 non-grey 48x48 images" in capsys.readouterr().out
  data = input_pipeline.load_fer2013("", str(tmp_path / "data"), with_names=True,
                                     verbose=False)
  i = list(data["train"]["file_name"]).index("train/happy/Training_5.jpg")
  want = Image.open(io.BytesIO(members["train/happy/Training_5.jpg"])).convert("L")
  np.testing.assert_array_equal(data["train"]["image"][i, ..., 0], np.asarray(want))


def test_16_bit_images_are_rejected(tmp_path):
  members = fakes.kaggle_members(per_cell=1)
  buf = io.BytesIO()
  Image.fromarray(np.full((48, 48), 4000, np.uint16)).save(buf, format="PNG")
  members["train/happy/Training_5.png"] = buf.getvalue()
  with pytest.raises(DataError, match="Training_5.png: image mode .* not 8-bit"):
    read_all(fakes.write_zip(tmp_path / "a.zip", members))


def _csv_with(tmp_path, line: str, at: int = 3) -> pathlib.Path:
  lines = fakes.csv_text(fakes.csv_rows(per_cell=1)).splitlines()
  lines.insert(at - 1, line)
  path = tmp_path / "fer2013.csv"
  path.write_text("\n".join(lines) + "\n")
  return path


PIXELS = " ".join(["7"] * 2304)


@pytest.mark.parametrize("line, at, match", ids=lambda v: str(v)[:20], argvalues=[
    ("emotion,pixel,Usage", 1, "line 1: header"),
    ("3," + " ".join(["7"] * 2303) + ",Training", 3, "line 3: 2303 pixel values"),
    ("3," + PIXELS[:-1] + "x,Training", 4, "line 4: pixel 'x' is not an integer"),
    ("3," + PIXELS[:-1] + "256,Training", 5, "line 5: pixel '256' is outside 0..255"),
    ("7," + PIXELS + ",Training", 6, "line 6: emotion '7' is not a label 0..6"),
    ("-1," + PIXELS + ",Training", 6, "line 6: emotion '-1'"),
    ("x," + PIXELS + ",Training", 2, "line 2: emotion 'x'"),
    ("3," + PIXELS + ",Validation", 7, "line 7: Usage 'Validation' is not one of"),
    ("3," + PIXELS, 8, "line 8: 2 fields, expected 3"),
    ("3,\"" + PIXELS + ",Training", 9, "lines 9-23: 2 fields"),  # an unclosed quote runs on
    ("3," + PIXELS + "\x00,Training", 10, "line 10: pixel '7.x00' is not an integer"),
])
def test_csv_errors_name_the_line(tmp_path, line, at, match):
  path = _csv_with(tmp_path, line, at)
  with pytest.raises(DataError, match=match) as e:
    read_all(path)
  assert str(path) in str(e.value)


def test_empty_csv(tmp_path):
  (tmp_path / "fer2013.csv").write_text("")
  with pytest.raises(DataError, match="line 1: the file is empty"):
    read_all(tmp_path / "fer2013.csv")
  (tmp_path / "fer2013.csv").write_text("emotion,pixels,Usage\n")
  with pytest.raises(DataError, match="no images for the split"):
    read_all(tmp_path / "fer2013.csv")


# ----------------------------------------------------------------------------- failed builds


def test_a_build_that_fails_halfway_leaves_no_dataset(tmp_path, fer2013_zip, monkeypatch):
  original = fer2013.Fer2013._generate_examples

  def failing(self, examples):
    for i, item in enumerate(original(self, examples)):
      if i == 5 and examples[0].split == "validation":
        raise RuntimeError("disk full")
      yield item

  monkeypatch.setattr(fer2013.Fer2013, "_generate_examples", failing)
  with pytest.raises(RuntimeError, match="disk full"):
    load(tmp_path, fer2013_zip)
  dataset_dir = tmp_path / "data" / "fer2013"
  assert not (dataset_dir / "1.0.0").exists()
  assert not any(dataset_dir.glob("incomplete*"))
  assert not fer2013.Fer2013(data_dir=tmp_path / "data").is_prepared()

  monkeypatch.setattr(fer2013.Fer2013, "_generate_examples", original)
  check_dataset(load(tmp_path, fer2013_zip), fakes.kaggle_members())


def test_a_killed_build_is_not_taken_for_complete(tmp_path, fer2013_zip):
  # What a killed process leaves: a half-written incomplete.* folder beside the version.
  leftover = tmp_path / "data" / "fer2013" / "incomplete.ABCDEF_1.0.0"
  leftover.mkdir(parents=True)
  (leftover / "fer2013-train.array_record-00000-of-00001").write_bytes(b"half")
  check_dataset(load(tmp_path, fer2013_zip), fakes.kaggle_members())


def test_two_processes_building_at_once_both_get_the_dataset(tmp_path, fer2013_zip,
                                                              monkeypatch):
  original = fer2013.Fer2013._split_generators
  raced = []

  def racing(self, dl_manager):
    if not raced:  # another process starts later and finishes first
      raced.append(True)
      input_pipeline.prepare(str(fer2013_zip), str(tmp_path / "data"), verbose=False)
    return original(self, dl_manager)

  monkeypatch.setattr(fer2013.Fer2013, "_split_generators", racing)
  check_dataset(load(tmp_path, fer2013_zip), fakes.kaggle_members())
  assert raced
  assert not list((tmp_path / "data" / "fer2013").glob("incomplete*"))


def test_a_version_folder_without_dataset_info_is_an_error(tmp_path, fer2013_zip):
  (tmp_path / "data" / "fer2013" / "1.0.0").mkdir(parents=True)
  with pytest.raises(DataError, match="no complete dataset"):
    load(tmp_path, fer2013_zip)


def test_builds_and_loads_without_tensorflow(tmp_path, fer2013_zip):
  load(tmp_path, fer2013_zip)
  assert "tensorflow" not in sys.modules
