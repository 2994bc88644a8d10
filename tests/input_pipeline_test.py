"""Split protocols, the stratified split and load_splits (synthetic and tiny FER2013 archives)."""

import numpy as np
import pytest

import fer2013_fakes as fakes
from configs import common
from fer import input_pipeline
from fer.datasets import fer2013


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch):
  monkeypatch.delenv(fer2013.ARCHIVE_ENV, raising=False)
  monkeypatch.delenv(input_pipeline.DATA_DIR_ENV, raising=False)


def fake_tfds_splits(n_train=700, n_val=70, n_test=80, seed=0):
  """TFDS-named splits with unequal, known class sizes and images that identify each row."""
  rng = np.random.default_rng(seed)
  out = {}
  for offset, (split, n) in enumerate((("train", n_train), ("validation", n_val),
                                       ("test", n_test))):
    labels = rng.choice(7, n, p=[.14, .02, .14, .25, .17, .11, .17]).astype(np.int32)
    ids = offset * 100_000 + np.arange(n)
    images = np.zeros((n, 48, 48, 1), np.uint8)
    images[:, 0, :4, 0] = ids.view(np.uint8).reshape(n, 8)[:, :4]  # row id in the pixels
    out[split] = {"image": images, "label": labels}
  return out


def row_ids(split):
  return split["image"][:, 0, :4, 0].copy().view(np.uint32)[:, 0]


def test_stratified_split_is_deterministic_disjoint_complete_and_stratified():
  labels = fake_tfds_splits()["train"]["label"]
  kept, off = input_pipeline.stratified_split(labels, 0.3, seed=1)
  kept2, off2 = input_pipeline.stratified_split(labels, 0.3, seed=1)
  np.testing.assert_array_equal(kept, kept2)
  np.testing.assert_array_equal(off, off2)
  assert not set(kept) & set(off)
  np.testing.assert_array_equal(np.sort(np.concatenate([kept, off])), np.arange(len(labels)))
  for c in range(7):
    n = (labels == c).sum()
    assert (labels[off] == c).sum() == round(0.3 * n)
  other, _ = input_pipeline.stratified_split(labels, 0.3, seed=2)
  assert not np.array_equal(kept, other)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_stratified_split_rejects_bad_fractions(fraction):
  with pytest.raises(ValueError, match="fraction"):
    input_pipeline.stratified_split(np.zeros(10), fraction, 0)


def test_standard_protocol():
  data = fake_tfds_splits()
  out = input_pipeline.apply_protocol(data, "standard")
  assert out["train"] is data["train"]
  assert out["val"] is data["validation"]
  assert out["test"] is data["test"]


def test_seed_protocol_halves_training_and_tests_on_both_test_sets():
  data = fake_tfds_splits()
  out = input_pipeline.apply_protocol(data, "seed", val_fraction=0.9, seed=3)  # 0.9 ignored
  train, val = row_ids(out["train"]), row_ids(out["val"])
  assert abs(len(train) - len(val)) <= 7 and len(train) + len(val) == 700
  assert not set(train) & set(val) and set(train) | set(val) == set(row_ids(data["train"]))
  assert len(out["test"]["label"]) == 70 + 80
  assert set(row_ids(out["test"])) == set(row_ids(data["validation"])) | set(
      row_ids(data["test"]))
  for c in range(7):
    n_train, n_val = (out["train"]["label"] == c).sum(), (out["val"]["label"] == c).sum()
    assert abs(n_train - n_val) <= 1
  again = input_pipeline.apply_protocol(data, "seed", seed=3)
  np.testing.assert_array_equal(row_ids(again["val"]), val)


def test_val_fraction_protocol():
  data = fake_tfds_splits()
  out = input_pipeline.apply_protocol(data, "val_fraction", val_fraction=0.2, seed=0)
  assert out["test"] is data["test"]
  labels = data["train"]["label"]
  assert len(out["val"]["label"]) == sum(round(0.2 * (labels == c).sum()) for c in range(7))
  assert not set(row_ids(out["train"])) & set(row_ids(out["val"]))
  # Each row keeps its own label.
  for split in ("train", "val"):
    ids = row_ids(out[split])
    np.testing.assert_array_equal(out[split]["label"], labels[ids])


def test_unknown_protocol():
  with pytest.raises(ValueError, match="protocol='kfold'"):
    input_pipeline.apply_protocol(fake_tfds_splits(), "kfold")


def test_load_splits_synthetic():
  cfg = common.base().input
  cfg.source = "synthetic"
  cfg.synthetic_train_size = 140
  out = input_pipeline.load_splits(cfg)
  assert {k: len(v["label"]) for k, v in out.items()} == {"train": 140, "val": 35, "test": 35}
  for split in out.values():
    assert set(split) == {"image", "label"}
    assert split["image"].dtype == np.uint8 and split["image"].shape[1:] == (48, 48, 1)
    assert split["label"].dtype == np.int32
  assert not np.array_equal(out["val"]["image"], out["test"]["image"])
  again = input_pipeline.load_splits(cfg)
  np.testing.assert_array_equal(again["train"]["image"], out["train"]["image"])


@pytest.mark.parametrize("protocol, sizes", [
    ("standard", {"train": 28, "val": 28, "test": 28}),
    ("seed", {"train": 14, "val": 14, "test": 56}),
    ("val_fraction", {"train": 21, "val": 7, "test": 28}),
])
def test_load_splits_fer2013(tmp_path, protocol, sizes):
  path = fakes.write_zip(tmp_path / "archive.zip", fakes.kaggle_members(per_cell=4))
  cfg = common.base().input
  cfg.archive = str(path)
  cfg.data_dir = str(tmp_path / "data")
  cfg.protocol = protocol
  cfg.val_fraction = 0.25
  out = input_pipeline.load_splits(cfg)
  assert {k: len(v["label"]) for k, v in out.items()} == sizes
  for name, split in out.items():
    assert set(split) == {"image", "label"} | ({"train_copy"} if name == "test" else set())
    assert split["image"].dtype == np.uint8 and split["label"].dtype == np.int32
  assert out["test"]["train_copy"].dtype == bool and not out["test"]["train_copy"].any()
  if protocol != "standard":  # stratified: every class in both halves
    assert set(out["train"]["label"]) == set(out["val"]["label"]) == set(range(7))
  named = input_pipeline.load_splits(cfg, with_names=True)
  assert not set(named["train"]["file_name"]) & set(named["val"]["file_name"])
  val_top = "test/" if protocol == "standard" else "train/"  # PublicTest, or from Training
  assert all(n.startswith(val_top) for n in named["val"]["file_name"])


def test_data_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(input_pipeline.DATA_DIR_ENV, str(tmp_path / "env"))
  assert input_pipeline.resolve_data_dir("") == tmp_path / "env"
  assert input_pipeline.resolve_data_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
  monkeypatch.delenv(input_pipeline.DATA_DIR_ENV)
  assert str(input_pipeline.resolve_data_dir("")).endswith("tensorflow_datasets")


def test_archive_from_environment(tmp_path, monkeypatch, fer2013_zip):
  monkeypatch.setenv(fer2013.ARCHIVE_ENV, str(fer2013_zip))
  cfg = common.base().input
  cfg.data_dir = str(tmp_path / "data")
  out = input_pipeline.load_splits(cfg)
  assert len(out["train"]["label"]) == 14
