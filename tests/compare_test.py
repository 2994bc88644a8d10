"""fer.compare: McNemar's exact test, the paired bootstrap interval, and two runs compared on
their saved probabilities."""

import json
import math
import shutil

import numpy as np
import pytest

from fer import compare
from fer.datasets.fer2013 import CLASSES
import trained_run


def test_mcnemar_exact_p_values():
  a = np.array([True] * 10 + [False] * 5)
  b = np.array([False] * 10 + [False] * 5)  # A alone right on 10 faces, B alone on none
  assert compare.mcnemar_p(a, b) == pytest.approx(2 / 2 ** 10)
  assert compare.mcnemar_p(b, a) == compare.mcnemar_p(a, b)  # two-sided
  assert compare.mcnemar_p(a, a) == 1.0  # no disagreement
  # 7 against 3: 2 * P(X <= 3), X ~ Binomial(10, 1/2) = 2 * 176 / 1024.
  a = np.array([True] * 7 + [False] * 3 + [True] * 20)
  b = np.array([False] * 7 + [True] * 3 + [True] * 20)
  assert compare.mcnemar_p(a, b) == pytest.approx(2 * sum(math.comb(10, i) for i in range(4))
                                                  / 1024)
  # An even split, and large counts (big integers, no overflow).
  many = np.array([True, False] * 2000)
  assert compare.mcnemar_p(many, ~many) == 1.0
  assert compare.mcnemar_p(np.ones(3000, bool), np.r_[np.zeros(1600, bool),
                                                      np.ones(1400, bool)]) < 1e-100


def test_bootstrap_interval_is_paired_and_covers_the_difference():
  rng = np.random.default_rng(1)
  a = rng.random(4000) < 0.7
  b = a.copy()
  flip = rng.choice(4000, 120, replace=False)  # B differs from A on 120 faces only
  b[flip] = ~b[flip]
  low, high = compare.bootstrap_interval(a, b, resamples=2000, seed=0)
  diff = b.mean() - a.mean()
  assert low < diff < high
  # Paired: the interval reflects the 120 disagreements, not two independent 0.75-point errors.
  assert high - low < 0.015
  unpaired = 2 * 1.96 * math.sqrt(2 * 0.7 * 0.3 / 4000)
  assert high - low < unpaired / 2
  assert compare.bootstrap_interval(a, b, resamples=2000, seed=0) == (low, high)  # seeded
  assert compare.bootstrap_interval(a, a, resamples=500) == (0.0, 0.0)


def test_bootstrap_of_several_runs_a_side_holds_their_spread():
  rng = np.random.default_rng(2)
  b = rng.random(3000) < 0.7
  same = np.stack([b, b])  # two runs that agree face for face: no seed spread
  spread = np.stack([rng.random(3000) < 0.62, rng.random(3000) < 0.78])  # 16 points apart
  width = lambda a: np.subtract(*compare.bootstrap_interval(a, b, resamples=2000)[::-1])
  assert compare.bootstrap_interval(same, b, resamples=2000) == (0.0, 0.0)
  low, high = compare.bootstrap_interval(spread, b, resamples=2000)
  assert low < b.mean() - spread.mean() < high
  assert width(spread) > 3 * width(spread[:1])  # the runs' draw adds their spread
  one = compare.paired(spread[:1], b, resamples=500)
  two = compare.paired(spread, b, resamples=500)
  assert one["mcnemar_p"] is not None and two["mcnemar_p"] is None  # McNemar: one run a side
  assert two["a/run_accuracies"] == pytest.approx(spread.mean(axis=1))
  assert two["difference"] == pytest.approx(b.mean() - spread.mean())


def _variant(run_dir, data, tmp_path, name, wrong=()):
  """A copy of the tiny run whose saved probabilities are right on every face (one-hot of the
  label) but the faces `wrong` (indices, the same in val and test: the next class)."""
  member = tmp_path / name
  shutil.copytree(run_dir, member)
  for split in ("val", "test"):
    labels = np.array(data[split]["label"])  # a copy: the fixture's stay as they are
    labels[list(wrong)] = (labels[list(wrong)] + 1) % 7
    np.save(member / f"{split}_probs.npy", np.eye(7, dtype=np.float32)[labels])
  return member


def test_two_runs_are_compared_face_by_face(run_dir, data, tmp_path):
  a = _variant(run_dir, data, tmp_path, "a", wrong=[0])
  b = _variant(run_dir, data, tmp_path, "b", wrong=[1, 2, 3, 4, 5, 6])  # 5 fewer right
  result = compare.compare(a, b, data=data, resamples=1000)
  for split in ("val", "test"):
    r, n = result[split], len(data[split]["label"])
    assert r["faces"] == n and r["a/accuracy"] == pytest.approx(1 - 1 / n)
    assert r["only_a_right"] == 6 and r["only_b_right"] == 1
    assert r["difference"] == pytest.approx(-5 / n)
    assert r["mcnemar_p"] == pytest.approx(2 * 8 / 2 ** 7)
    assert r["interval_95"][0] < r["difference"] < r["interval_95"][1] <= 1 / n
  assert "test_no_train_copy" not in result  # synthetic faces: no near copies marked
  n = len(data["test"]["label"])
  marked = {**data, "test": {**data["test"], "train_copy": np.arange(n) % 2 == 0}}
  with_copies = compare.compare(a, b, data=marked, resamples=1000)
  clean = with_copies["test_no_train_copy"]  # the odd faces: b alone wrong on 1, 3 and 5
  assert clean["faces"] == n // 2 and (clean["only_a_right"], clean["only_b_right"]) == (3, 0)
  table = compare.to_table(with_copies)
  assert "test_no_train_copy" in table and "McNemar p" in table and "test, by class:" in table
  by_class = result["test_per_class"]  # a and b wrong on faces 0 and 1-6: per class, the same
  labels = data["test"]["label"]
  assert sum(r["faces"] for r in by_class.values()) == n
  for c, name in enumerate(CLASSES):
    if name in by_class:
      assert by_class[name]["only_a_right"] == np.sum(labels[1:7] == c)
      assert by_class[name]["only_b_right"] == int(labels[0] == c)
      assert f"\n  {name} " in table


def test_sides_of_several_runs_are_compared_by_their_mean(run_dir, data, tmp_path):
  a = [_variant(run_dir, data, tmp_path, "a1", wrong=[0]),
       _variant(run_dir, data, tmp_path, "a2", wrong=[1, 2])]
  b = [_variant(run_dir, data, tmp_path, "b1"), _variant(run_dir, data, tmp_path, "b2", [3])]
  result = compare.compare(a, b, data=data, resamples=1000)
  r, n = result["test"], len(data["test"]["label"])
  assert r["a/run_accuracies"] == pytest.approx([1 - 1 / n, 1 - 2 / n])
  assert r["difference"] == pytest.approx(1 / n) and r["mcnemar_p"] is None
  assert r["interval_95"][0] <= r["difference"] <= r["interval_95"][1]
  table = compare.to_table(result)
  assert f"A: the mean of 2 runs: {a[0]}, {a[1]}" in table and "and of the runs" in table
  assert table.splitlines()[3].split()[-3:] == ["-", "-", "-"]  # no McNemar for groups


def test_runs_on_other_splits_or_data_are_refused(run_dir, data, tmp_path):
  a = _variant(run_dir, data, tmp_path, "a")
  other = _variant(run_dir, data, tmp_path, "other")
  config = json.loads((other / "config.json").read_text())
  config["input"]["protocol"] = "seed"
  (other / "config.json").write_text(json.dumps(config))
  with pytest.raises(compare.CompareError, match="other splits than"):
    compare.compare(a, other, data=data)
  short = _variant(run_dir, data, tmp_path, "short")
  np.save(short / "test_probs.npy", np.load(short / "test_probs.npy")[:-1])
  with pytest.raises(compare.CompareError, match="test_probs.npy: probabilities of shape"):
    compare.compare(a, short, data=data)
  (short / "val_probs.npy").unlink()
  with pytest.raises(compare.CompareError, match="val_probs.npy: cannot read it"):
    compare.compare(a, short, data=data)


def test_cli(run_dir, data, tmp_path):
  a = _variant(run_dir, data, tmp_path, "a")
  b = _variant(run_dir, data, tmp_path, "b", wrong=[0, 1])
  proc = trained_run.run_module("fer.compare", f"--a={a}", f"--b={b}", "--resamples=200",
                                f"--out={tmp_path / 'cmp.json'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"A: {a}" in proc.stdout
  test_line = next(l for l in proc.stdout.splitlines() if l.startswith("test "))
  assert test_line.split()[:5] == ["test", "16", "100.00%", "87.50%", "-12.50"], proc.stdout
  assert test_line.split()[-3:] == ["2", "0", "0.5"], proc.stdout
  saved = json.loads((tmp_path / "cmp.json").read_text())
  assert saved["resamples"] == 200 and set(saved) >= {"val", "test"}
  bad = trained_run.run_module("fer.compare", f"--a={a}", f"--b={tmp_path / 'missing'}")
  assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_importing_it_defines_no_flags():
  """Tests import fer.compare beside fer.ensemble (which has module flags): define_flags() runs
  only when it is the command."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from fer import ensemble  # pylint: disable=import-outside-toplevel,unused-import
  assert "resamples" not in flags.FLAGS and "out" in flags.FLAGS
