"""fer.metrics' calibration: ECE, reliability bins, temperature scaling."""

import shutil

import numpy as np
import pytest

from experiments import calibration
from fer import input_pipeline
from fer import metrics
from fer import plots

import trained_run


def _sampled(n, temperature_of_truth, seed=0, classes=7):
  """Probabilities softmax(z) and labels drawn from softmax(z / t): t = 1 calibrated, t > 1 the
  probabilities are overconfident by exactly temperature t."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, classes)) * 2.5
  truth = np.exp(logits / temperature_of_truth)
  truth /= truth.sum(1, keepdims=True)
  labels = (truth.cumsum(1) < rng.random((n, 1))).sum(1)
  probs = np.exp(logits)
  return probs / probs.sum(1, keepdims=True), labels


def test_ece_by_hand():
  # Confidences 0.9, 0.9 (one right), 0.5 (right), 0.35 (wrong); 15 bins: 0.9 -> bin 13,
  # 0.5 -> bin 7, 0.35 -> bin 5.
  probs = np.array([[0.9, 0.1, 0], [0.9, 0, 0.1], [0.5, 0.3, 0.2], [0.35, 0.33, 0.32]])
  labels = np.array([0, 1, 0, 1])
  conf, acc, count = metrics.reliability_bins(probs, labels)
  assert count.sum() == 4 and count[13] == 2 and count[7] == 1 and count[5] == 1
  assert acc[13] == 0.5 and acc[7] == 1.0 and acc[5] == 0.0
  assert np.isnan(acc[0]) and np.isnan(conf[14])
  expected = (2 * abs(0.5 - 0.9) + 1 * abs(1 - 0.5) + 1 * abs(0 - 0.35)) / 4
  assert metrics.expected_calibration_error(probs, labels) == pytest.approx(expected)
  assert metrics.classification_metrics(probs, labels, "test")["test/ece"] == pytest.approx(
      expected)


def test_bins_are_closed_on_the_right():
  probs = np.array([[1.0, 0.0], [1 / 15 * 7, 1 - 1 / 15 * 7]])  # 1.0 and 8/15
  conf, _, count = metrics.reliability_bins(probs, np.array([0, 1]))
  assert count[14] == 1 and count[7] == 1  # 8/15 is the top of bin 7: (7/15, 8/15]
  assert conf[14] == 1.0


def test_nan_probabilities_give_a_nan_ece_quietly():
  # A diverged search trial's val probabilities: its ECE is NaN, not a number from garbage bins.
  probs = np.array([[np.nan, np.nan], [0.9, 0.1]])
  with np.errstate(all="raise"):
    conf, _, count = metrics.reliability_bins(probs, np.array([0, 0]))
  assert count.sum() == 2 and count[0] == 1 and np.isnan(conf[0])
  assert np.isnan(metrics.expected_calibration_error(probs, np.array([0, 0])))


def test_calibrated_probabilities_have_small_ece_and_overconfident_large():
  probs, labels = _sampled(40_000, 1.0)
  assert metrics.expected_calibration_error(probs, labels) < 0.01
  probs, labels = _sampled(40_000, 3.0)
  assert metrics.expected_calibration_error(probs, labels) > 0.15


@pytest.mark.parametrize("truth", [0.5, 1.0, 3.0])
def test_fit_temperature_recovers_the_temperature(truth):
  probs, labels = _sampled(40_000, truth, seed=1)
  assert metrics.fit_temperature(probs, labels) == pytest.approx(truth, rel=0.05)


def test_temperature_keeps_predictions_and_fixes_calibration_on_new_data():
  val_probs, val_labels = _sampled(20_000, 3.0, seed=2)
  test_probs, test_labels = _sampled(20_000, 3.0, seed=3)
  out = metrics.calibration(val_probs, val_labels, test_probs, test_labels)
  before = metrics.classification_metrics(test_probs, test_labels, "test")
  assert out["temperature"] == pytest.approx(3.0, rel=0.05)
  assert out["test/ece_calibrated"] < 0.02 < before["test/ece"]
  assert out["test/loss_calibrated"] < before["test/loss"]
  scaled = metrics.apply_temperature(test_probs, out["temperature"])
  np.testing.assert_array_equal(scaled.argmax(1), test_probs.argmax(1))
  np.testing.assert_allclose(scaled.sum(1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(metrics.apply_temperature(test_probs, 1.0), test_probs, atol=1e-12)


def test_fit_temperature_needs_images():
  with pytest.raises(ValueError, match="no images"):
    metrics.fit_temperature(np.zeros((0, 7)), np.zeros(0, int))


def test_copy_metrics_split_the_accuracy_by_train_copy():
  probs = np.eye(7)[[0, 1, 2, 3, 4, 5]]
  labels = np.array([0, 1, 0, 3, 0, 0])  # right, right, wrong, right, wrong, wrong
  copy = np.array([True, True, True, False, False, False])
  assert metrics.copy_metrics(probs, labels, copy) == {
      "test/train_copies": 3, "test/accuracy_train_copy": pytest.approx(2 / 3),
      "test/accuracy_no_train_copy": pytest.approx(1 / 3)}
  assert metrics.copy_metrics(probs, labels, np.ones(6, bool), "val") == {
      "val/train_copies": 6, "val/accuracy_train_copy": 0.5, "val/accuracy_no_train_copy": None}


def test_reliability_diagram(tmp_path):
  probs, labels = _sampled(2_000, 2.0)
  curves = metrics.reliability_curves(probs, labels, 2.0)
  assert len(curves) == 2 and all(k.startswith(("as trained", "T=2.00")) for k in curves)
  path = plots.reliability_diagram({"a": curves, "b": curves}, tmp_path / "r.png")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_script_reads_collected_runs(tmp_path_factory, tmp_path):
  run = trained_run.tiny_run(tmp_path_factory)
  shutil.copytree(run, tmp_path / "tiny", ignore=shutil.ignore_patterns("checkpoints", "tb"))
  calibration.main(["--results", str(tmp_path)])
  labels = input_pipeline.load_splits(trained_run.tiny_config().input)
  val, test = (np.load(run / f"{s}_probs.npy") for s in ("val", "test"))
  temperature = metrics.fit_temperature(val, labels["val"]["label"])
  ece = metrics.expected_calibration_error(test, labels["test"]["label"])
  row = next(l for l in (tmp_path / "calibration.md").read_text().splitlines()
             if l.startswith("| tiny |"))
  assert f"| {ece:.3f} | {temperature:.2f} |" in row
  # A run whose probabilities are not its recorded accuracy's is named, not tabulated.
  np.save(tmp_path / "tiny" / "test_probs.npy", np.roll(test, 1, axis=1))
  with pytest.raises(SystemExit, match="tiny/test_probs.npy gives test accuracy"):
    calibration.main(["--results", str(tmp_path)])
