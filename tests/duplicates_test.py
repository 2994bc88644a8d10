"""Exact and near duplicates: planted re-encoded, brighter, shifted and zoomed copies of synthetic
photographs are found and different photographs are not; the train images that copy val or test
images are dropped, and that answer is cached per content."""

import io

import numpy as np
from PIL import Image
import pytest

import fer2013_fakes as fakes
from configs import data_report as data_report_config
from fer import data_report
from fer import duplicates
from fer import input_pipeline
from fer.datasets import fer2013


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch):
  monkeypatch.delenv(fer2013.ARCHIVE_ENV, raising=False)
  monkeypatch.delenv(input_pipeline.DATA_DIR_ENV, raising=False)


def test_find_duplicates_counts_constant_images_and_within_split_conflicts():
  img = np.zeros((5, 48, 48, 1), np.uint8)
  img[0, 0, 0] = 1  # unique; the other four are constant (all zero) duplicates
  splits = {"train": {"image": img[:3], "label": np.array([0, 1, 2], np.int32)},
            "val": {"image": img[3:], "label": np.array([2, 2], np.int32)}}
  d = duplicates.find_duplicates(splits)
  assert d["summary"]["constant_images"] == 4
  assert d["summary"]["duplicate_groups"] == 1 and d["summary"]["extra_copies"] == 3
  assert d["within"]["train"] == {"groups": 1, "extra_copies": 1, "label_conflicts": 1}
  assert d["within"]["val"] == {"groups": 1, "extra_copies": 1, "label_conflicts": 0}
  assert d["across"]["train-val"] == {"shared_images": 1, "images_in_val": 2,
                                      "label_conflicts": 1}
  assert d["groups"][0]["members"][0]["file"] == "train[1]"


def _photos(n: int, seed: int) -> np.ndarray:
  """n distinct smooth random 'photographs', uint8 [n, 48, 48, 1]: Gaussian noise drawn at 6, 12
  and 24 px and upsampled (shading, features, texture), so that shifts and JPEG act on them as
  on faces; FER-like random noise images would be no test of alignment."""
  rng = np.random.default_rng(seed)
  out = np.full((n, 48, 48), 128, np.float32)
  for size, amplitude in ((6, 40), (12, 25), (24, 12)):
    for k, noise in enumerate(rng.normal(0, amplitude, (n, size, size)).astype(np.float32)):
      out[k] += np.asarray(Image.fromarray(noise, "F").resize((48, 48), Image.BICUBIC))
  return np.clip(out, 0, 255).astype(np.uint8)[..., None]


def _jpeg(image: np.ndarray, quality: int = 50) -> np.ndarray:
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0]).save(buffer, format="JPEG", quality=quality)
  return np.asarray(Image.open(buffer))[..., None]


def _brighter(image: np.ndarray, by: int = 30) -> np.ndarray:
  return np.clip(image.astype(int) + by, 0, 255).astype(np.uint8)


def _shifted(image: np.ndarray, dx: int = 1) -> np.ndarray:
  return np.pad(image, ((0, 0), (dx, 0), (0, 0)), mode="edge")[:, :48]


def _zoomed(image: np.ndarray, factor: float = 1.05) -> np.ndarray:
  size = round(48 * factor)
  big = np.asarray(Image.fromarray(image[..., 0]).resize((size, size), Image.BILINEAR))
  o = (size - 48) // 2
  return big[o:o + 48, o:o + 48, None]


def _splits(**images) -> dict:
  return {s: {"image": x, "label": np.zeros(len(x), np.int32)} for s, x in images.items()}


def _found(near: dict) -> set:
  return {(p["a"]["split"], p["a"]["index"], p["b"]["split"], p["b"]["index"])
          for p in near["pairs"]}


def test_aligned_similarity_of_copies_and_of_different_images():
  photos = _photos(12, seed=0)
  copies = {"jpeg": _jpeg(photos[0]), "brighter": _brighter(photos[1], 30),
            "darker": _brighter(photos[2], -30), "shift 1": _shifted(photos[3], 1),
            "shift 3": _shifted(photos[4], 3), "zoom 5%": _zoomed(photos[5], 1.05),
            "jpeg + shift": _jpeg(_shifted(photos[6], 2)), "zoom 10%": _zoomed(photos[7], 1.1)}
  images = np.concatenate([photos, np.stack(list(copies.values()))])
  pairs = np.array([(k, 12 + k) for k in range(len(copies))] + [(k, k + 1) for k in range(11)])
  sim = duplicates.aligned_similarity(images, pairs)
  for name, s in zip(copies, sim):  # 0.995-1 and 0.93 here; without the zoom search 0.96 and
    assert s >= (0.9 if name == "zoom 10%" else 0.98), (name, s)  # 0.81, without shifts 0.5
  assert np.abs(sim[len(copies):]).max() < 0.5, sim[len(copies):]  # different photographs
  # Different photographs under the same strong lighting (2x2 noise upsampled): their pixels
  # correlate at 0.8-0.95, their band-passed pixels (edges, texture) under 0.5.
  light = np.stack([np.asarray(Image.fromarray(z, "F").resize((48, 48), Image.BICUBIC))
                    for z in np.random.default_rng(9).normal(0, 60, (8, 2, 2)).astype(np.float32)])
  lit = lambda x: np.clip((x - 128.0) * 0.5 + light[..., None] + 128, 0, 255).astype(np.uint8)
  same_light = np.concatenate([lit(_photos(8, seed=10)), lit(_photos(8, seed=11))])
  sim = duplicates.aligned_similarity(same_light, np.array([(k, 8 + k) for k in range(8)]))
  assert sim.max() < 0.5, sim
  assert duplicates.aligned_similarity(images, np.array([(0, 0)]))[0] == pytest.approx(1, abs=1e-5)


def test_near_duplicates_across_splits_are_found_and_distinct_images_are_not():
  train, val, test = _photos(40, seed=1), _photos(12, seed=2), _photos(12, seed=3)
  test[0] = _jpeg(train[0])  # re-encoded
  val[0] = _brighter(train[1], 30)
  test[1] = _shifted(val[1], 1)
  test[2] = train[2]  # identical: a near pair of similarity 1 too
  near = duplicates.find_near_duplicates(_splits(train=train, val=val, test=test))
  assert _found(near) == {("train", 0, "test", 0), ("train", 1, "val", 0), ("val", 1, "test", 1),
                          ("train", 2, "test", 2)}
  by_pair = {(p["a"]["index"], p["b"]["split"], p["b"]["index"]): p for p in near["pairs"]}
  assert by_pair[2, "test", 2]["similarity"] == 1.0 and by_pair[2, "test", 2]["exact"]
  assert not by_pair[0, "test", 0]["exact"]
  assert min(p["similarity"] for p in near["pairs"]) >= duplicates.NEAR_THRESHOLD
  assert near["across"]["train-test"] == {"pairs": 2, "images_in_train": 2, "images_in_test": 2,
                                          "label_conflict_pairs": 0}
  assert near["across"]["train-val"]["pairs"] == near["across"]["val-test"]["pairs"] == 1
  assert all(w["pairs"] == w["images"] == 0 for w in near["within"].values())
  assert near["summary"]["identical_pairs"] == 1 and near["summary"]["groups"] == 4
  assert near["pairs"][0]["a"]["split"] == "train" and near["pairs"][0]["b"]["split"] == "val"


def test_near_duplicate_label_conflicts_and_groups():
  train, test = _photos(30, seed=4), _photos(10, seed=5)
  train[5] = _jpeg(train[0])
  test[0] = _shifted(train[0], 1)  # a group of three: train 0, train 5, test 0
  test[1] = _brighter(train[3], -25)
  splits = _splits(train=train, test=test)
  splits["train"]["label"][5] = 3  # train 0 is 0: a conflict within train...
  splits["test"]["label"][1] = 4  # ...and one across, train 3 (0) against test 1 (4)
  near = duplicates.find_near_duplicates(splits)
  assert near["within"]["train"] == {"pairs": 1, "images": 2, "label_conflict_pairs": 1}
  assert near["across"]["train-test"]["pairs"] == 3
  assert near["across"]["train-test"]["label_conflict_pairs"] == 2  # test 0 (0) vs train 5 (3)
  assert near["summary"]["label_conflict_groups"] == 2 and near["summary"]["groups"] == 2
  assert [g["images"] for g in near["groups"]] == [3, 2]
  md = data_report._markdown({
      "source": "synthetic", "protocol": "standard", "split_seed": 0,
      "counts": {s: data_report.class_counts(splits[s]["label"]) for s in ("train", "test")}
      | {"val": data_report.class_counts(np.zeros(0, np.int32))},
      "totals": {"train": 30, "val": 0, "test": 10},
      "duplicates": duplicates.find_duplicates(splits), "near_duplicates": near})
  assert "`train[3]` (train: angry), `test[1]` (test: sad)" in md


def test_near_duplicates_of_constant_images():
  photo = _photos(1, seed=6)
  blank = lambda level, n=1: np.full((n, 48, 48, 1), level, np.uint8)
  splits = _splits(train=np.concatenate([blank(0, 2), blank(255), photo]),
                   val=blank(0), test=blank(7, 2))
  near = duplicates.find_near_duplicates(splits)
  assert near["summary"]["flat_images"] == 6 and near["summary"]["candidate_pairs"] == 0
  assert _found(near) == {("train", 0, "train", 1), ("train", 0, "val", 0),
                          ("train", 1, "val", 0), ("test", 0, "test", 1)}
  assert all(p["exact"] and p["similarity"] == 1.0 for p in near["pairs"])
  assert duplicates.find_near_duplicates(_splits(train=blank(0, 3), test=blank(9)))[
      "summary"]["pairs"] == 3


def _train_copies(*args, **kwargs) -> np.ndarray:
  """Indices of the train images with a near copy in val or test (cross_split_copies' mask)."""
  return np.flatnonzero(duplicates.cross_split_copies(*args, **kwargs)["train"])


def _planted(seed: int = 5) -> tuple[dict, list[int]]:
  """train/val/test photographs where train 3 copies val 0 and train 7 test 1 (and train 11
  copies train 12, which is no reason to drop either)."""
  photos = _photos(30, seed=seed)
  train, val, test = photos[:20].copy(), photos[20:25], photos[25:30]
  train[3], train[7], train[11] = _jpeg(val[0]), _shifted(test[1], 1), train[12]
  return _splits(train=train, val=val, test=test), [3, 7]


def test_drop_train_copies_keeps_only_train_images_without_a_copy_in_val_or_test(capsys):
  splits, expected = _planted()
  for s in splits.values():
    s["label"] = np.arange(len(s["label"]), dtype=np.int32) % 7
  train = splits["train"]
  out = input_pipeline.drop_train_copies(splits)
  np.testing.assert_array_equal(out["train"]["image"], np.delete(train["image"], expected, axis=0))
  np.testing.assert_array_equal(out["train"]["label"], np.delete(np.arange(20) % 7, expected))
  assert out["val"] is splits["val"] and out["test"] is splits["test"]
  assert "2 of 20 train images have a near copy in val or test" in capsys.readouterr().out


def test_drop_train_copies_keeps_synthetic_faces_and_refuses_to_leave_nothing(capsys):
  config = data_report_config.get_config("runlocal").input
  config.synthetic_train_size = 240
  plain = input_pipeline.load_splits(config)
  config.drop_train_copies = True
  kept = input_pipeline.load_splits(config)
  # The synthetic faces are drawn from a few templates: every train face has a copy in val, so
  # the flag keeps them (runlocal smoke tests of the nocopies runs), and says so.
  assert "all kept" in capsys.readouterr().out
  np.testing.assert_array_equal(kept["train"]["image"], plain["train"]["image"])
  with pytest.raises(ValueError, match=r"every one of the 240 train images has a near copy.*"
                     r"drop_train_copies=False"):
    input_pipeline.drop_train_copies(plain)


def test_train_copies_are_cached_per_content(tmp_path, monkeypatch, capsys):
  splits, expected = _planted()
  cache = tmp_path / "cache"
  np.testing.assert_array_equal(_train_copies(splits, cache), expected)
  [saved] = cache.glob("copies_*.npz")
  assert np.flatnonzero(np.load(saved)["train"]).tolist() == expected

  def no_search(*args, **kwargs):
    raise AssertionError("searched although the answer is cached")
  with monkeypatch.context() as m:
    m.setattr(duplicates, "find_near_duplicates", no_search)
    np.testing.assert_array_equal(_train_copies(splits, cache), expected)
  # Other images (one pixel of val) or another threshold: another key, a new search.
  other = {**splits, "val": {**splits["val"], "image": splits["val"]["image"].copy()}}
  other["val"]["image"][4, 0, 0] ^= 1
  np.testing.assert_array_equal(_train_copies(other, cache), expected)
  assert _train_copies(splits, cache, threshold=1.01).tolist() == []
  assert len(list(cache.glob("copies_*.npz"))) == 3
  # A damaged cache file costs a search, with a note, and is replaced.
  good = saved.read_bytes()
  for damaged in (b"not numpy", good[:len(good) // 2]):  # a ValueError; a zipfile.BadZipFile
    saved.write_bytes(damaged)
    np.testing.assert_array_equal(_train_copies(splits, cache), expected)
    assert f"{saved}: unreadable" in capsys.readouterr().out
  masks = dict(np.load(saved))
  assert np.flatnonzero(masks["train"]).tolist() == expected
  assert np.flatnonzero(masks["val"]).tolist() == [0] and np.flatnonzero(masks["test"]).tolist() == [1]
  with open(saved, "wb") as f:  # masks of other images (one image less in test)
    np.savez(f, **{**masks, "test": masks["test"][1:]})
  np.testing.assert_array_equal(_train_copies(splits, cache), expected)
  assert "not a mask per split of these images" in capsys.readouterr().out


def test_train_copies_when_the_cache_cannot_be_written(tmp_path, monkeypatch, capsys):
  splits, expected = _planted()
  blocked = tmp_path / "file"
  blocked.write_text("a file where the cache folder would go")
  np.testing.assert_array_equal(_train_copies(splits, blocked / "cache"), expected)
  assert "could not cache the near copies" in capsys.readouterr().out
  # A read-only data dir: the next folder of the list keeps the answer, and gives it back.
  fallback = tmp_path / "user_cache"
  np.testing.assert_array_equal(
      _train_copies(splits, [blocked / "cache", fallback]), expected)
  assert "could not cache" not in capsys.readouterr().out
  assert len(list(fallback.glob("copies_*.npz"))) == 1
  monkeypatch.setattr(duplicates, "find_near_duplicates", None)  # a search would fail
  np.testing.assert_array_equal(
      _train_copies(splits, [blocked / "cache", fallback]), expected)
  # load_splits' list: the data dir, then the user's cache.
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert input_pipeline.near_duplicates_cache(str(tmp_path / "data")) == (
      tmp_path / "data" / "fer2013_near_duplicates", tmp_path / "xdg" / "fer" /
      "fer2013_near_duplicates")


def test_load_splits_caches_fer2013_train_copies_in_the_data_dir(tmp_path, monkeypatch, capsys):
  members = fakes.kaggle_members(per_cell=1)
  members["train/happy/Training_9001.jpg"] = members["test/sad/PrivateTest_0.jpg"] = (
      fakes.jpeg_bytes(fakes.face(9000)))
  config = data_report_config.get_config().input
  config.archive = str(fakes.write_zip(tmp_path / "archive.zip", members))
  config.data_dir = str(tmp_path / "data")
  config.drop_train_copies = True
  first = input_pipeline.load_splits(config)
  [cached] = (tmp_path / "data" / input_pipeline.NEAR_DUPLICATES_CACHE).glob("*.npz")
  assert np.load(cached)["train"].sum() == np.load(cached)["test"].sum() == 1
  assert "1 of 8 train images have a near copy in val or test" in capsys.readouterr().out
  assert first["test"]["train_copy"].sum() == 1  # PrivateTest_0, a copy of Training_9001
  monkeypatch.setattr(duplicates, "find_near_duplicates", None)  # a search would fail
  again = input_pipeline.load_splits(config)
  np.testing.assert_array_equal(again["train"]["image"], first["train"]["image"])
