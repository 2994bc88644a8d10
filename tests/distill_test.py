"""fer.distill: teacher targets from finished runs, and training on them."""

import json

import jax
import numpy as np
import pytest

from configs import cnn as cnn_config
from fer import distill
from fer import input_pipeline
from fer import runs
from fer import train

import trained_run
from train_test import checkpoint_state, tiny_config


def _teacher_file(path, config, probs_fn, teachers=("teacher",)):
  """A targets file for `config`'s train images with probabilities probs_fn(labels)."""
  data = input_pipeline.load_splits(config.input)
  images, labels = data["train"]["image"], data["train"]["label"]
  distill.write_targets(path, probs_fn(labels), images, {
      "teachers": [{"workdir": t} for t in teachers],
      "split_input": {k: config.input.get(k) for k in runs.SPLIT_KEYS}})
  return path


def test_soften_and_fingerprints():
  p = np.array([[0.6, 0.3, 0.1], [1.0, 0.0, 0.0]], np.float32)
  np.testing.assert_array_equal(distill.soften(p, 1.0), p)
  flat = distill.soften(p, 2.0)
  expected = np.sqrt(p[0]) / np.sqrt(p[0]).sum()
  np.testing.assert_allclose(flat[0], expected, rtol=1e-6)
  np.testing.assert_allclose(flat.sum(1), 1.0, rtol=1e-6)
  assert distill.soften(p, 0.5)[0, 0] > 0.6 > flat[0, 0]  # sharper / flatter, same order
  assert np.all(np.isfinite(distill.soften(p, 3.0)))  # zeros stay finite
  images = np.random.default_rng(0).integers(0, 256, (4, 6, 6, 1), np.uint8)
  prints = distill.fingerprints(images)
  assert prints.shape == (4, 16) and prints.dtype == np.uint8
  np.testing.assert_array_equal(distill.fingerprints(images[::-1]), prints[::-1])
  changed = images.copy()
  changed[2, 0, 0, 0] ^= 1
  assert (distill.fingerprints(changed) != prints).any(1).tolist() == [False, False, True, False]
  # The same bytes in another shape are another image.
  assert (distill.fingerprints(images.reshape(4, 36, 1, 1)) != prints).any(1).all()


def test_targets_are_the_teachers_mean_matched_by_content(run_dir, tmp_path, capsys):
  config = runs.load_config(run_dir)
  data = input_pipeline.load_splits(config.input)
  out = tmp_path / "t.npz"
  summary = distill.make_targets([run_dir], out, tta="flip", data=data)
  assert "train/accuracy" in capsys.readouterr().out
  run = runs.load(run_dir)
  expected = train.predict_probs(train.make_predict(run.model, "flip"), run.variables,
                                 data["train"]["image"], 32, train.make_mesh())
  assert summary["teachers"] == [{"workdir": str(run_dir), "tta": "flip", "train/accuracy":
                                  float((expected.argmax(1) == data["train"]["label"]).mean())}]
  assert summary["num_images"] == len(expected)
  # A run training on a shuffled subset of the images gets each image's own probabilities.
  order = np.random.default_rng(1).permutation(len(expected))[: len(expected) // 2]
  student = tiny_config(**{"distill.targets": str(out)})
  student.input = config.input
  got, got_summary = distill.load_targets(student, data["train"]["image"][order])
  np.testing.assert_allclose(got, expected[order], rtol=1e-5, atol=1e-6)
  assert got_summary["teachers"] == summary["teachers"]
  # Two teachers: the mean of the two.
  two = distill.make_targets([run_dir, run_dir], tmp_path / "t2.npz", tta="none", data=data)
  assert [t["tta"] for t in two["teachers"]] == ["none", "none"]
  student.distill.targets = str(tmp_path / "t2.npz")
  student.distill.temperature = 2.0
  none = train.predict_probs(train.make_predict(run.model, "none"), run.variables,
                             data["train"]["image"], 32, train.make_mesh())
  np.testing.assert_allclose(distill.load_targets(student, data["train"]["image"])[0],
                             distill.soften(none, 2.0), rtol=1e-4, atol=1e-6)


def test_unusable_targets_name_the_file_and_the_fix(tmp_path):
  config = tiny_config(**{"input.synthetic_train_size": 64})
  images = input_pipeline.load_splits(config.input)["train"]["image"]
  config.distill.targets = str(tmp_path / "missing.npz")
  with pytest.raises(distill.DistillError, match=r"missing.npz.*does not exist.*python -m "
                     r"fer.distill --teachers="):
    distill.load_targets(config, images)
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  config.distill.targets = str(tmp_path / "bad.npz")
  with pytest.raises(distill.DistillError, match="bad.npz is not a teacher-targets file"):
    distill.load_targets(config, images)
  one_hot = lambda labels: np.eye(7, dtype=np.float32)[labels]
  config.distill.targets = str(_teacher_file(tmp_path / "t.npz", config, one_hot))
  assert distill.load_targets(config, images)[0].shape == (len(images), 7)
  other = config.copy_and_resolve_references()
  other.input.split_seed = 1  # other val/test: the teachers may have trained on them
  with pytest.raises(distill.DistillError, match=r"other splits.*input.split_seed is 0 against 1"):
    distill.load_targets(other, images)
  changed = images.copy()
  changed[:3] = 255 - changed[:3]
  with pytest.raises(distill.DistillError, match=r"no teacher probabilities for 3 of this run's"):
    distill.load_targets(config, changed)


def test_make_targets_refuses_teachers_of_other_splits_and_bad_flags(run_dir, tmp_path):
  other = tmp_path / "other"
  other.mkdir()
  config = json.loads((run_dir / "config.json").read_text())
  config["input"]["protocol"] = "seed"
  (other / "config.json").write_text(json.dumps(config))
  with pytest.raises(distill.DistillError, match=r"other was trained on other splits.*"
                     r"protocol is .seed. against .standard."):
    distill.make_targets([run_dir, other], tmp_path / "t.npz")
  with pytest.raises(distill.DistillError, match="ending in .npz"):
    distill.make_targets([run_dir], tmp_path / "t.npy")
  with pytest.raises(distill.DistillError, match="--tta='ten'"):
    distill.make_targets([run_dir], tmp_path / "t.npz", tta="ten")
  assert not list(tmp_path.glob("t.*"))


def test_one_hot_teacher_trains_exactly_as_the_labels(tmp_path):
  """Teacher probabilities equal to the labels, at any weight, give the labels' training: the
  teacher rows follow the images through the shuffled batches."""
  plain = tiny_config(**{"input.synthetic_train_size": 192, "train.num_epochs": 1})
  train.train_and_evaluate(plain, str(tmp_path / "plain"))
  one_hot = lambda labels: np.eye(7, dtype=np.float32)[labels]
  distilled = tiny_config(**{"input.synthetic_train_size": 192, "train.num_epochs": 1,
                             "distill.weight": 0.7})
  distilled.distill.targets = str(_teacher_file(tmp_path / "t.npz", plain, one_hot))
  results = train.train_and_evaluate(distilled, str(tmp_path / "distilled"))
  assert results["distill_teachers"] == ["teacher"]
  for x, y in zip(jax.tree.leaves(checkpoint_state(tmp_path / "plain")["params"]),
                  jax.tree.leaves(checkpoint_state(tmp_path / "distilled")["params"])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_student_learns_what_the_teacher_says(tmp_path, capsys):
  """A teacher that calls every face the next class (label + 1) at weight 1: the student ends up
  predicting the next class on val, never seeing it in its labels."""
  c = cnn_config.get_config("runlocal")
  c.input.synthetic_train_size = 1050
  c.train.num_epochs = 3
  c.distill.weight = 1.0
  shifted = lambda labels: np.eye(7, dtype=np.float32)[(labels + 1) % 7]
  c.distill.targets = str(_teacher_file(tmp_path / "t.npz", c, shifted))
  train.train_and_evaluate(c, str(tmp_path / "run"))
  assert "agree with 0.0% of the train labels" in capsys.readouterr().out
  # The last epoch's network (val accuracy, against the true labels, picked an early one).
  last = runs.load(checkpoint=tmp_path / "run" / "checkpoints" / "last" / "3")
  val = input_pipeline.load_splits(c.input)["val"]
  probs = train.predict_probs(train.make_predict(last.model, "none"), last.variables,
                              val["image"], 128, train.make_mesh())
  agreement = (probs.argmax(1) == (val["label"] + 1) % 7).mean()
  assert agreement > 0.8, agreement


def test_bad_distill_values_fail_before_work(tmp_path):
  c = tiny_config(**{"distill.targets": str(tmp_path / "t.npz"), "distill.weight": 1.5,
                 "distill.temperature": 0.0})
  with pytest.raises(train.ConfigError, match=r"distill.weight=1.5.*\n.*distill.temperature=0.0"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_cli_writes_targets_and_a_run_trains_on_them(run_dir, tmp_path):
  out = tmp_path / "teachers.npz"
  done = trained_run.run_module("fer.distill", f"--teachers={run_dir}", f"--out={out}")
  assert done.returncode == 0, done.stderr
  assert f"--config.distill.targets={out}" in done.stdout
  with np.load(out) as f:
    summary = json.loads(str(f["summary"]))
  assert summary["teachers"][0]["workdir"] == str(run_dir)
  assert summary["split_input"]["source"] == "synthetic"
  bad = trained_run.run_module("fer.distill", f"--teachers={tmp_path / 'nothing'}",
                               f"--out={out}")
  assert bad.returncode != 0 and "fer.distill:" in bad.stderr and "Traceback" not in bad.stderr
