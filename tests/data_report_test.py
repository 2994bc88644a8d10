"""The data report, end to end on synthetic faces and on a tiny archive with planted duplicates
(how duplicates are found: duplicates_test.py)."""

import json

import pytest

import fer2013_fakes as fakes
from configs import data_report as data_report_config
from fer import data_report
from fer.datasets import fer2013

FIGURES = ("class_distribution.png", "class_distribution_train.png",
           "class_distribution_val.png", "class_distribution_test.png", "near_duplicates.png")


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch):
  monkeypatch.delenv(fer2013.ARCHIVE_ENV, raising=False)
  monkeypatch.delenv("FER_DATA_DIR", raising=False)


def test_config():
  c = data_report_config.get_config()
  assert c.job == "data_report" and c.input.source == "fer2013"
  assert data_report_config.get_config("runlocal").input.source == "synthetic"


def test_runlocal_report(tmp_path):
  config = data_report_config.get_config("runlocal")
  # A third of runlocal's faces: the cartoon faces are near copies of seven templates, whose
  # thousands of candidate pairs would take the near-duplicate search seconds.
  config.input.synthetic_train_size = 240
  data_report.run(config, tmp_path)
  for name in FIGURES + ("data_report.md", "duplicates.json", "near_duplicates.json"):
    assert (tmp_path / name).stat().st_size > 0, name
  assert (tmp_path / "class_distribution.png").read_bytes()[:4] == b"\x89PNG"
  report = json.loads((tmp_path / "data_report.json").read_text())
  n = config.input.synthetic_train_size
  assert report["totals"] == {"train": n, "val": n // 4, "test": n // 4}
  for split in ("train", "val", "test"):
    assert list(report["counts"][split]) == list(fer2013.CLASSES)
    assert sum(report["counts"][split].values()) == report["totals"][split]


def test_report_on_an_archive_with_planted_duplicates(tmp_path):
  members = fakes.kaggle_members(per_cell=2)
  copy = fakes.jpeg_bytes(fakes.face(9000))
  members["train/happy/Training_9001.jpg"] = copy
  members["train/happy/Training_9002.jpg"] = copy  # within train, same label
  members["test/sad/PrivateTest_9003.jpg"] = copy  # across train-test, another label
  path = fakes.write_zip(tmp_path / "archive.zip", members)
  config = data_report_config.get_config()
  config.input.archive = str(path)
  config.input.data_dir = str(tmp_path / "data")
  report = data_report.run(config, tmp_path / "report")
  saved = json.loads((tmp_path / "report" / "data_report.json").read_text())
  assert saved == json.loads(json.dumps(report))
  assert saved["source"] == str(path)
  assert saved["counts"]["train"]["happy"] == 4 and saved["counts"]["test"]["sad"] == 3
  assert saved["totals"] == {"train": 16, "val": 14, "test": 15}
  d = saved["duplicates"]
  assert d["summary"]["duplicate_groups"] == 1
  assert d["summary"]["images_in_duplicate_groups"] == 3
  assert d["summary"]["label_conflict_groups"] == 1
  assert d["within"]["train"] == {"groups": 1, "extra_copies": 1, "label_conflicts": 0}
  assert d["across"]["train-test"] == {"shared_images": 1, "images_in_test": 1,
                                       "label_conflicts": 1}
  assert d["across"]["train-val"]["shared_images"] == 0
  groups = json.loads((tmp_path / "report" / "duplicates.json").read_text())
  assert sorted(m["file"] for m in groups[0]["members"]) == [
      "test/sad/PrivateTest_9003.jpg", "train/happy/Training_9001.jpg",
      "train/happy/Training_9002.jpg"]
  md = (tmp_path / "report" / "data_report.md").read_text()
  assert "| happy | 4 (25.0%)" in md and "`test/sad/PrivateTest_9003.jpg` (test: sad)" in md
  # Near duplicates hold the exact ones (the three copies: three pairs) and nothing else: the
  # other faces are independent noise.
  near = saved["near_duplicates"]
  assert near["summary"]["pairs"] == near["summary"]["identical_pairs"] == 3
  assert near["within"]["train"]["pairs"] == 1
  assert near["across"]["train-test"] == {"pairs": 2, "images_in_train": 2, "images_in_test": 1,
                                          "label_conflict_pairs": 2}
  listed = json.loads((tmp_path / "report" / "near_duplicates.json").read_text())
  assert [p["similarity"] for p in listed["pairs"]] == [1.0] * 3
  assert "## Near duplicates" in md and "| train-test | 2 | 2 (12.5%) | 1 (6.7%) | 2 |" in md
  assert (tmp_path / "report" / "near_duplicates.png").read_bytes()[:4] == b"\x89PNG"
