"""experiments/study.py: collecting runs and rebuilding the results table from their files."""

import json
import pathlib
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import study  # pylint: disable=wrong-import-position


def _fake_run(path, test_accuracy, protocol="seed"):
  path.mkdir(parents=True)
  per_class = [test_accuracy] * 7
  (path / "results.json").write_text(json.dumps({
      "val/accuracy": test_accuracy - 0.01, "test/accuracy": test_accuracy,
      "test/macro_f1": 0.5, "num_params": 1234, "epochs_trained": 3, "best_epoch": 2,
      "train_seconds": 120.0, "device_count": 1, "device_kind": "cpu",
      "test/per_class_accuracy": per_class, "classes": list("abcdefg")}))
  (path / "config.json").write_text(json.dumps({"input": {"protocol": protocol},
                                                "model": {"name": "cnn"}}))
  (path / "metrics.jsonl").write_text("".join(
      json.dumps({"epoch": e + 1, "val/accuracy": test_accuracy * (e + 1) / 3}) + "\n"
      for e in range(3)))
  return path


def test_table_has_a_row_per_run_and_a_mean_row_per_seed_group(tmp_path):
  runs = tmp_path / "runs"
  results = tmp_path / "results"
  for seed, acc in enumerate((0.50, 0.54)):
    study.collect(_fake_run(runs / f"cnn_seed_s{seed}", acc), f"cnn_seed_s{seed}",
                  f"python -m fer.main --config.seed={seed}", "test machine", results)
  strong = _fake_run(runs / "strong", 0.7, "standard")
  (strong / "agreement.png").write_bytes(b"an ensemble's figure")
  (strong / "checkpoints" / "1").mkdir(parents=True)
  study.collect(strong, "strong", "cmd", "m", results)
  # strong builds model 'cnn' too, but the original study has no strong: no 52.7% beside it.
  study.collect(_fake_run(runs / "strong_seed_s0", 0.65), "strong_seed_s0", "cmd", "m", results)
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{study.START}\nold table\n{study.END}\nafter\n")
  study.table(results, readme)
  text = (results / "results_table.md").read_text()
  rows = [l for l in text.splitlines() if l.startswith("| cnn_seed") or l.startswith("| strong")]
  assert len(rows) == 5
  mean_row = next(l for l in rows if "mean ± std of 2 seeds" in l)
  assert f"**52.0% ± {np.std([0.5, 0.54], ddof=1):.1%}**" in mean_row
  assert "| 52.7% |" in mean_row  # the original study's cnn, protocol seed
  assert "| 52.7% |" not in next(l for l in rows if l.startswith("| strong |"))  # standard
  assert "| **65.0%** |  |" in next(l for l in rows if l.startswith("| strong_seed_s0 |"))
  body = readme.read_text()
  assert "old table" not in body and body.startswith("intro\n") and body.endswith("after\n")
  assert (results / "per_class_accuracy.png").stat().st_size > 0
  assert (results / "val_curves.png").stat().st_size > 0
  assert (results / "cnn_seed_s1" / "metrics.jsonl").read_bytes() == (
      runs / "cnn_seed_s1" / "metrics.jsonl").read_bytes()
  # Small files travel, checkpoints never.
  assert (results / "strong" / "agreement.png").read_bytes() == b"an ensemble's figure"
  assert not (results / "strong" / "checkpoints").exists()
  before = {p.name: p.read_bytes() for p in [readme, *results.glob("*.*")]}
  study.table(results, readme)  # nothing new: nothing changes
  assert before == {p.name: p.read_bytes() for p in [readme, *results.glob("*.*")]}


def test_collect_refuses_an_unfinished_run(tmp_path):
  (tmp_path / "run").mkdir()
  try:
    study.collect(tmp_path / "run", "x", "cmd", "m", tmp_path / "results")
  except SystemExit as e:
    assert "results.json not found" in str(e)
  else:
    raise AssertionError("collect accepted a run without results.json")
  assert not (tmp_path / "results").exists()


def test_summary_table_gives_each_experiment_its_seed_groups_and_ensembles(tmp_path,
                                                                           monkeypatch):
  from fer import plots  # pylint: disable=import-outside-toplevel
  drawn, curves = {}, {}
  monkeypatch.setattr(plots, "per_class_accuracy",
                      lambda panels, classes, path: drawn.update(panels))
  monkeypatch.setattr(plots, "val_curves",
                      lambda panels, path, ylabel, family: curves.update(
                          styles=plots.line_styles(panels["cnn"], family)))
  runs, results = tmp_path / "runs", tmp_path / "results"
  for name, acc, protocol in [("cnn_seed_s0", 0.50, "seed"), ("cnn_seed_s1", 0.54, "seed"),
                              ("cnn_seed_ensemble", 0.57, "seed"),
                              ("cnn_standard_gpu", 0.9, "standard"),  # a variant: not summarised
                              ("strong_s0", 0.71, "standard"), ("strong_e30_s0", 0.6, "standard"),
                              ("strong_nocopies_s0", 0.65, "standard"),  # without copies
                              # the summary's mini-Xception runs are those of 100 epochs
                              ("mini_xception_s0", 0.63, "standard"),
                              ("mini_xception_e100_s0", 0.65, "standard"),
                              ("mini_xception_e100_s1", 0.67, "standard")]:
    study.collect(_fake_run(runs / name, acc, protocol), name, "cmd", "m", results)
  readme = tmp_path / "README.md"
  readme.write_text(f"{study.SUMMARY_START}\nold\n{study.SUMMARY_END}\n"
                    f"{study.START}\n{study.END}\n")
  study.table(results, readme)
  body = readme.read_text()
  assert "old" not in body
  rows = {l.split(" | ")[1]: l.split(" | ")[2:] for l in body.splitlines()
          if l.startswith("| ") and "`configs/" in l}
  assert rows["`configs/cnn.py`"] == [
      "52.7%", f"52.0% ± {np.std([0.5, 0.54], ddof=1):.1%} (2 seeds), ensemble 57.0%",
      "not run", "not run |"]
  assert rows["`configs/strong.py`"] == ["-", "not run", "71.0% (1 run)", "65.0% (1 run) |"]
  assert rows["`configs/vgg16_cached.py`"] == ["43.9%", "not run", "not run", "not run |"]
  assert rows["`configs/mini_xception.py`"] == [
      "-", "not run", f"66.0% ± {np.std([0.65, 0.67], ddof=1):.1%} (2 seeds)", "not run |"]
  # The val curves: a colour and a legend entry per seed group.
  assert curves["styles"] == {"cnn_seed_ensemble": ("C0", "cnn_seed_ensemble (1 run)"),
                              "cnn_seed_s0": ("C1", "cnn_seed (2 runs)"),
                              "cnn_seed_s1": ("C1", None),
                              "cnn_standard_gpu": ("C2", "cnn_standard_gpu (1 run)")}
  # The per-class figure draws the same runs: a panel per protocol, seed means and ensembles.
  assert drawn == {"protocol seed": {"cnn: mean of 2 runs": pytest.approx([0.52] * 7),
                                     "cnn: ensemble": [0.57] * 7},
                   "protocol standard": {"strong: mean of 1 run": [0.71] * 7,
                                         "mini_xception_e100: mean of 2 runs":
                                             pytest.approx([0.66] * 7)}}


def test_committed_tables_are_the_ones_the_committed_runs_give():
  """README.md's summary, ensembles and results tables and experiments/results/results_table.md
  are what `python experiments/study.py table` makes of experiments/results/: nobody edited a
  number by hand, and no collected run is missing from them (run that command after
  `collect`)."""
  text, summary, ensembles = study.tables()
  assert text.count("\n") > 50
  readme = (REPO / "README.md").read_text()
  assert study.ENSEMBLES_START in readme and study.ENSEMBLES_END in readme
  assert study.with_tables(readme, text, summary, ensembles) == readme, (
      "README.md's tables differ from experiments/results/: run `python experiments/study.py table`")
  assert (study.RESULTS / "results_table.md").read_text() == text


def test_ensembles_table_lists_the_standard_ensembles_best_val_first(tmp_path):
  results = tmp_path / "results"
  members = [{"workdir": f"experiments/results/strong_s{k}", "tta": "tencrop", "weight": 1}
             for k in range(3)]
  for name, val, test, protocol, extra in [
      ("strong_ensemble", 0.70, 0.72, "standard",
       {"members": members, "test/accuracy_no_train_copy": 0.69, "val/member_agreement": 0.866}),
      ("mixed_ensemble", 0.71, 0.73, "standard", {"members": members[:2]}),
      ("greedy_ensemble", 0.72, 0.71, "standard",
       {"members": [dict(m, weight=w) for m, w in zip(members, (0, 3, 1))],
        "selection": "greedy"}),
      ("cnn_seed_ensemble", 0.9, 0.9, "seed", {"members": members}),  # another protocol
      ("strong_s0", 0.95, 0.95, "standard", {})]:  # a single run
    d = _fake_run(tmp_path / "runs" / name, test, protocol)
    r = json.loads((d / "results.json").read_text())
    (d / "results.json").write_text(json.dumps({**r, "val/accuracy": val, **extra}))
    study.collect(d, name, "cmd", "m", results)
  rows = study.tables(results)[2].splitlines()[2:]
  assert rows == [
      "| greedy_ensemble | greedy selection by val from 3 runs: 2 kept, 4 picks | 72.0% | "
      "**71.0%** |  |  |",
      "| mixed_ensemble | strong_s0, strong_s1 | 71.0% | **73.0%** |  |  |",
      "| strong_ensemble | strong_s0, strong_s1, strong_s2 | 70.0% | **72.0%** | 69.0% | 86.6% |"]
  readme = tmp_path / "README.md"
  readme.write_text(f"a\n{study.ENSEMBLES_START}\nold\n{study.ENSEMBLES_END}\nb\n")
  study.table(results, readme)
  assert readme.read_text() == (f"a\n{study.ENSEMBLES_START}\n" + study.tables(results)[2]
                                + f"{study.ENSEMBLES_END}\nb\n")
