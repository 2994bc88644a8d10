"""fer.ensemble: averaging saved or recomputed probabilities of finished runs."""

import json
import shutil

import numpy as np
import pytest

from fer import ensemble
from fer import metrics

import trained_run


def _member(run_dir, tmp_path, name, shift=0.0):
  """A copy of the tiny run whose saved probabilities are moved towards class `shift`."""
  member = tmp_path / name
  shutil.copytree(run_dir, member)
  for split in ("val", "test"):
    probs = np.load(member / f"{split}_probs.npy")
    if shift:
      probs = (1 - shift) * probs + shift * np.eye(probs.shape[1], dtype=np.float32)[3]
      np.save(member / f"{split}_probs.npy", probs)
  return member


def test_ensemble_averages_the_members_probabilities(run_dir, data, tmp_path):
  a, b = _member(run_dir, tmp_path, "a"), _member(run_dir, tmp_path, "b", shift=0.9)
  results = ensemble.ensemble([a, b], tmp_path / "ens", data=data)
  for split in ("val", "test"):
    expected = (np.load(a / f"{split}_probs.npy") + np.load(b / f"{split}_probs.npy")) / 2
    got = np.load(tmp_path / "ens" / f"{split}_probs.npy")
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    accuracy = float((expected.argmax(1) == data[split]["label"]).mean())
    assert results[f"{split}/accuracy"] == pytest.approx(accuracy)
  # b votes for class 3 ("happy") almost everywhere: its own accuracy is the share of class 3.
  assert results["members"][1]["test/accuracy"] == pytest.approx(
      float((data["test"]["label"] == 3).mean()))
  # ... so the two agree where a predicts class 3 too; a third copy of a agrees with a fully.
  agree = float((np.load(a / "val_probs.npy").argmax(1) == 3).mean())
  assert results["val/member_agreement"] == pytest.approx(agree)
  three = ensemble.ensemble([a, b, _member(run_dir, tmp_path, "c")], tmp_path / "ens3", data=data)
  assert three["val/member_agreement"] == pytest.approx((agree + agree + 1) / 3)
  # Per pair, members in order: a and c are copies; b agrees with each where they say class 3.
  np.testing.assert_allclose(three["val/pairwise_agreement"],
                             [[1, agree, 1], [agree, 1, agree], [1, agree, 1]], atol=1e-6)
  assert (tmp_path / "ens3" / "agreement.png").stat().st_size > 0
  on_disk = json.loads((tmp_path / "ens" / "results.json").read_text())
  assert on_disk["ensemble_size"] == 2 and on_disk["test/accuracy"] == results["test/accuracy"]
  assert "test/train_copies" not in on_disk  # synthetic faces: no near copies reported
  # FER2013's test carries which faces have a near copy in train: accuracy with and without.
  copy = np.arange(len(data["test"]["label"])) % 2 == 0
  marked = {**data, "test": {**data["test"], "train_copy": copy}}
  split = ensemble.ensemble([a, b], tmp_path / "ens_copy", data=marked)
  mean = (np.load(a / "test_probs.npy") + np.load(b / "test_probs.npy")) / 2
  assert split == results | metrics.copy_metrics(mean, data["test"]["label"], copy) | {
      "git_commit": split["git_commit"]}
  assert (tmp_path / "ens" / "confusion_matrix.png").stat().st_size > 0
  assert (tmp_path / "ens" / "reliability.png").stat().st_size > 0
  val_mean = (np.load(a / "val_probs.npy") + np.load(b / "val_probs.npy")) / 2
  assert on_disk["temperature"] == pytest.approx(
      metrics.fit_temperature(val_mean, data["val"]["label"]), rel=1e-5)
  config = json.loads((tmp_path / "ens" / "config.json").read_text())
  assert config["ensemble_members"] == [str(a), str(b)]
  assert on_disk["device_kind"] == "cpu"


def test_greedy_selection_adds_what_helps_val_most():
  """Three val images of class 0, two classes: A and B are right on two images each, their
  average on all three; C is wrong everywhere. A wins round 1 on NLL (tie on accuracy)."""
  labels = np.zeros(3, np.int64)
  p0 = np.array([[0.9, 0.9, 0.4], [0.4, 0.7, 0.9], [0.45, 0.45, 0.45]])
  probs = np.stack([p0, 1 - p0], axis=-1)  # [members, images, classes]
  assert ensemble.greedy_selection(probs, labels, rounds=1).tolist() == [1, 0, 0]
  assert ensemble.greedy_selection(probs, labels, rounds=2).tolist() == [1, 1, 0]
  # Round 3 adds A again (all right, lower NLL than A+B): more rounds keep it; C never helps.
  assert ensemble.greedy_selection(probs, labels, rounds=3).tolist() == [2, 1, 0]
  many = ensemble.greedy_selection(probs, labels, rounds=20)
  assert many[2] == 0 and many[0] > 0 and many[1] > 0


def test_select_greedy_weights_the_runs_it_picks_on_val_only(run_dir, data, tmp_path):
  """A run sure of a wrong class on every image is never picked; the test split plays no part
  (other test probabilities, the same weights); the ensemble is the weighted average."""
  a, b = _member(run_dir, tmp_path, "a"), _member(run_dir, tmp_path, "b", shift=0.5)
  wrong = _member(run_dir, tmp_path, "wrong")
  for split in ("val", "test"):
    np.save(wrong / f"{split}_probs.npy",
            np.eye(7, dtype=np.float32)[(data[split]["label"] + 1) % 7])
  results = ensemble.ensemble([a, wrong, b], tmp_path / "ens", data=data, select="greedy",
                              rounds=6)
  weights = [m["weight"] for m in results["members"]]
  assert weights[1] == 0 and sum(weights) <= 6 and results["ensemble_size"] == 3 - weights.count(0)
  expected = sum(w * np.load(m / "val_probs.npy") for w, m in zip(weights, (a, wrong, b)))
  np.testing.assert_allclose(np.load(tmp_path / "ens" / "val_probs.npy"),
                             expected / sum(weights), rtol=1e-5)
  config = json.loads((tmp_path / "ens" / "config.json").read_text())
  assert config["ensemble_candidates"] == [str(a), str(wrong), str(b)]
  assert wrong not in config["ensemble_members"] and config["ensemble_rounds"] == 6
  for member in (a, b):
    np.save(member / "test_probs.npy", np.random.default_rng(0).dirichlet(
        np.ones(7), len(data["test"]["label"])).astype(np.float32))
  again = ensemble.ensemble([a, wrong, b], tmp_path / "ens2", data=data, select="greedy",
                            rounds=6)
  assert [m["weight"] for m in again["members"]] == weights
  assert again["val/accuracy"] == results["val/accuracy"]
  with pytest.raises(ensemble.EnsembleError, match="--select='best'"):
    ensemble.ensemble([a, b], tmp_path / "ens3", data=data, select="best")


def test_members_from_several_machines_name_each_kind(run_dir, data, tmp_path):
  a, b = _member(run_dir, tmp_path, "a"), _member(run_dir, tmp_path, "b")
  results = json.loads((b / "results.json").read_text())
  results.update(device_kind="NVIDIA H100 80GB HBM3", device_count=2, platform="gpu")
  (b / "results.json").write_text(json.dumps(results))
  out = ensemble.ensemble([a, b], tmp_path / "ens", data=data)
  assert out["device_kind"] == "NVIDIA H100 80GB HBM3 / cpu"
  assert out["platform"] == "cpu / gpu" and out["device_count"] == 2


def test_recomputed_probabilities_match_the_saved_ones(run_dir, data, tmp_path):
  """--tta restores each best checkpoint and predicts: the run's own TTA was none, so the
  result must equal the probabilities the run saved at its end."""
  a, b = _member(run_dir, tmp_path, "a"), _member(run_dir, tmp_path, "b")
  ensemble.ensemble([a, b], tmp_path / "ens", tta="none", data=data)
  np.testing.assert_allclose(np.load(tmp_path / "ens" / "test_probs.npy"),
                             np.load(run_dir / "test_probs.npy"), atol=1e-5)
  # One run with --tta: its best checkpoint re-evaluated alone.
  one = ensemble.ensemble([a], tmp_path / "one", tta="flip", data=data)
  assert one["tta"] == "flip" and "val/member_agreement" not in one
  assert "val/pairwise_agreement" not in one and not (tmp_path / "one" / "agreement.png").exists()
  flipped = np.load(tmp_path / "one" / "test_probs.npy")
  assert one["test/accuracy"] == pytest.approx(
      float((flipped.argmax(1) == data["test"]["label"]).mean()))
  assert not np.allclose(flipped, np.load(run_dir / "test_probs.npy"), atol=1e-5)
  # One mode per run: a's saved probabilities beside b's best checkpoint with flip.
  mixed = ensemble.ensemble([a, b], tmp_path / "mixed", tta=",flip", data=data)
  assert [m["tta"] for m in mixed["members"]] == ["none", "flip"] and mixed["tta"] == "flip/none"
  np.testing.assert_allclose(np.load(tmp_path / "mixed" / "test_probs.npy"),
                             (np.load(run_dir / "test_probs.npy") + flipped) / 2, atol=1e-6)


@pytest.mark.parametrize("tta, match", [
    ("flip,none,", "gives 3 modes for 2 runs"),
    (",tencrops", "'tencrops' is not none, flip or tencrop"),
    ("10crop", "'10crop' is not none, flip or tencrop"),
])
def test_a_bad_tta_list_is_refused_before_any_work(run_dir, tmp_path, tta, match):
  with pytest.raises(ensemble.EnsembleError, match=match):
    ensemble.ensemble([run_dir, run_dir.parent / "other"], tmp_path / "ens", tta=tta)
  assert not (tmp_path / "ens").exists()


def test_members_on_other_splits_are_refused(run_dir, data, tmp_path):
  a, b = _member(run_dir, tmp_path, "a"), _member(run_dir, tmp_path, "b")
  config = json.loads((b / "config.json").read_text())
  config["input"]["protocol"] = "seed"
  (b / "config.json").write_text(json.dumps(config))
  with pytest.raises(ensemble.EnsembleError, match=r"b was trained on other splits.*input.protocol"):
    ensemble.ensemble([a, b], tmp_path / "ens", data=data)
  assert not (tmp_path / "ens").exists()


def test_out_must_not_be_a_member_and_members_not_repeat(run_dir, tmp_path):
  a, b = _member(run_dir, tmp_path, "a"), _member(run_dir, tmp_path, "b")
  before = (a / "results.json").read_bytes()
  for out in (a, a / "ensemble"):
    with pytest.raises(ensemble.EnsembleError, match="a run's workdir"):
      ensemble.ensemble([a, b], out)
  assert (a / "results.json").read_bytes() == before and not (a / "ensemble").exists()
  with pytest.raises(ensemble.EnsembleError, match="given more than once"):
    ensemble.ensemble([a, tmp_path / "." / "a"], tmp_path / "ens")


def test_one_member_is_not_an_ensemble(run_dir, tmp_path):
  with pytest.raises(ensemble.EnsembleError, match="at least two runs"):
    ensemble.ensemble([run_dir], tmp_path / "ens")


def test_cli_names_an_unfinished_run(run_dir, tmp_path):
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  shutil.copy(run_dir / "config.json", unfinished / "config.json")
  proc = trained_run.run_module("fer.ensemble", f"--workdirs={run_dir},{unfinished}",
                                f"--out={tmp_path}/ens")
  assert proc.returncode == 1
  assert f"{unfinished}/results.json: cannot read it" in proc.stderr
  assert "Traceback" not in proc.stderr
