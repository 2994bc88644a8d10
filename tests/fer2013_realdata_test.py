"""The real FER2013 counts. Opt-in: runs only when FER2013_ARCHIVE points at the data.

  FER2013_ARCHIVE=/path/to/archive.zip python3 -m pytest -q -m realdata

Builds into $FER_DATA_DIR if set (reused when already prepared), else into a temp dir
(~15 s on a 2-core CPU).
"""

import os

import numpy as np
import pytest

from configs import common
from fer import input_pipeline
from fer.datasets import fer2013

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not os.environ.get(fer2013.ARCHIVE_ENV),
                       reason=f"set {fer2013.ARCHIVE_ENV} to the FER2013 archive.zip"),
]

# Per class in CLASSES order (angry, disgust, fear, happy, sad, surprise, neutral).
TRAINING = [3995, 436, 4097, 7215, 4830, 3171, 4965]  # 28,709
PUBLIC_TEST = [467, 56, 496, 895, 653, 415, 607]  # 3,589
PRIVATE_TEST = [491, 55, 528, 879, 594, 416, 626]  # 3,589


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return os.environ.get(input_pipeline.DATA_DIR_ENV) or str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tfds_splits(data_dir):
  return input_pipeline.load_fer2013("", data_dir, with_names=True)


def test_real_counts(tfds_splits):
  counts = {s: np.bincount(d["label"], minlength=7).tolist() for s, d in tfds_splits.items()}
  assert counts == {"train": TRAINING, "validation": PUBLIC_TEST, "test": PRIVATE_TEST}
  assert [len(d["label"]) for d in tfds_splits.values()] == [28709, 3589, 3589]
  for split, prefix in (("train", "train/"), ("validation", "test/"), ("test", "test/")):
    names = tfds_splits[split]["file_name"]
    assert all(n.startswith(prefix) for n in names)
  # Two Kaggle file names occur in two class folders; both copies are kept.
  names = [n.rsplit("/", 1)[1] for n in tfds_splits["train"]["file_name"]]
  assert len(names) - len(set(names)) == 2


def test_real_images(tfds_splits):
  for d in tfds_splits.values():
    assert d["image"].dtype == np.uint8 and d["image"].shape[1:] == (48, 48, 1)
    assert 100 < d["image"].mean() < 160  # README: mean about 130


@pytest.mark.parametrize("protocol, sizes", [
    ("standard", (28709, 3589, 3589)),
    ("seed", (14354, 14355, 7178)),
    ("val_fraction", (22968, 5741, 3589)),  # round(0.2 n) per class
])
def test_real_protocols(data_dir, tfds_splits, protocol, sizes):
  cfg = common.base().input
  cfg.data_dir = data_dir
  cfg.protocol = protocol
  cfg.val_fraction = 0.2
  out = input_pipeline.load_splits(cfg)
  assert tuple(len(out[s]["label"]) for s in ("train", "val", "test")) == sizes
