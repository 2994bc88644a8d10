"""experiments/run_study.py: the whole study in one command, skipping complete runs."""

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import run_study  # pylint: disable=wrong-import-position


def test_the_study_lists_every_experiment_in_a_runnable_order(tmp_path):
  names = [e.name for e in run_study.experiments(tmp_path, seeds=2)]
  assert names == ["data_report", "search", "cnn_standard_s0", "augment_standard_s0",
                   "cnn_standard_s1", "augment_standard_s1",
                   "cnn_seed_s0", "augment_seed_s0", "cnn_seed_s1", "augment_seed_s1",
                   "vgg16_cached", "vgg16_frozen", "vgg16_finetune",
                   "strong_s0", "strong_s1", "strong_ensemble",
                   "strong_seed_s0", "strong_seed_s1", "strong_seed_ensemble"]
  strong_seed = {e.name: e for e in run_study.experiments(tmp_path, seeds=2)}["strong_seed_s1"]
  assert run_study.command(strong_seed) == (
      f"python -m fer.main --config=configs/strong.py --workdir={tmp_path / 'strong_seed_s1'} "
      "--config.input.protocol=seed --config.seed=1")
  by_name = {e.name: e for e in run_study.experiments(tmp_path, seeds=2, vgg16_weights="none")
             if e.name.startswith("vgg16")}
  assert f"--config.init_from={tmp_path / 'vgg16_frozen_scratch'}" in by_name[
      "vgg16_finetune_scratch"].argv
  assert "--config.pretrained.weights=none" in by_name["vgg16_cached_scratch"].argv


def test_runs_collects_and_then_skips_a_complete_run(tmp_path, capsys):
  root, results = tmp_path / "study", tmp_path / "results"
  args = ["--root", str(root), "--only=cnn_standard_s0", "--runlocal",
          "--results", str(results)]
  assert run_study.main(args) == 0
  finished = root / "cnn_standard_s0" / "results.json"
  stamp = finished.stat().st_mtime_ns
  info = json.loads((results / "cnn_standard_s0" / "run.json").read_text())
  assert info["command"].startswith("python -m fer.main --config=configs/cnn.py:runlocal")
  assert (results / "cnn_standard_s0" / "results.json").read_bytes() == finished.read_bytes()
  capsys.readouterr()
  assert run_study.main(args) == 0
  assert "cnn_standard_s0: complete" in capsys.readouterr().out
  assert finished.stat().st_mtime_ns == stamp


def test_an_unknown_selection_is_an_error(tmp_path, capsys):
  assert run_study.main(["--root", str(tmp_path), "--only=nothing"]) == 2
  assert "matches no experiment" in capsys.readouterr().err
