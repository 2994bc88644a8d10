"""fer.inspect and the metadata side of fer.runs: checkpoint listing and parameter tree without
reading arrays, parameter comparison, and clear messages for damaged or partial checkpoints."""

import json
import pathlib
import re
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from fer import checkpointing
from fer import inspect as inspect_lib
from fer import runs
from fer import train
import trained_run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return trained_run.tiny_run(tmp_path_factory)


@pytest.fixture
def damaged(workdir, tmp_path):
  """A copy of the run to damage."""
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(".lock"))
  return copy


def _only_dir(path: pathlib.Path) -> pathlib.Path:
  (step,) = [p for p in path.iterdir() if p.name.isdigit()]
  return step


def test_lists_checkpoints_config_and_parameter_tree_from_metadata(workdir, monkeypatch):
  def no_arrays(*args, **kwargs):
    raise AssertionError("inspect read arrays")

  monkeypatch.setattr(ocp.StandardCheckpointer, "restore", no_arrays)
  report, ok = inspect_lib.inspect_run(workdir)
  assert ok, report
  meta = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  for kind in ("last", "best"):
    row = re.search(rf"^  {kind} +1 +(\d+) +([\d.]+) +checkpoints/{kind}/1$", report, re.M)
    assert row, report
    assert int(row.group(1)) == meta["step"]
    assert float(row.group(2)) == pytest.approx(meta["val/accuracy"], abs=1e-4)
  assert "conv_features:\n  - 8\n  - 16" in report.replace("    ", "  ")
  monkeypatch.undo()
  variables = runs.restore_variables(runs.best_checkpoint_dir(workdir))
  total = train.count_params(variables["params"])
  assert re.search(rf"^  total +{total:,} +\(\d+ tensors\)$", report, re.M), report
  assert re.search(r"^    kernel +\(3, 3, 1, 8\) +float32 +72$", report, re.M), report
  conv1 = sum(v.size for v in variables["params"]["conv1"].values())
  assert re.search(rf"^  conv1 +{conv1:,}$", report, re.M), report
  assert "Batch-norm statistics:" in report and "Optimizer state:" in report


def test_compare_shows_an_unchanged_base_and_a_changed_head(workdir, damaged):
  """As for a frozen base: the copy's head is changed, everything else is kept bit for bit."""
  step_dir = runs.best_checkpoint_dir(damaged)
  state = runs.restore_state(step_dir)
  meta = runs.read_meta(step_dir)
  state["params"]["head"]["kernel"] = state["params"]["head"]["kernel"] + 0.5
  shutil.rmtree(damaged / "checkpoints" / "best")
  ckpts = checkpointing.Checkpoints(damaged)
  ckpts.save_best(meta["epoch"], state, meta, 0.5)
  ckpts.close()

  diffs = {d.path: d for d in inspect_lib.compare_variables(
      runs.restore_variables(runs.best_checkpoint_dir(workdir)),
      runs.restore_variables(runs.best_checkpoint_dir(damaged)))}
  assert diffs["params/head/kernel"].status == "differs"
  assert diffs["params/head/kernel"].max_abs_diff == pytest.approx(0.5)
  assert all(d.status == "same" for p, d in diffs.items() if p != "params/head/kernel")
  report, ok = inspect_lib.inspect_run(workdir, compare=damaged, show_config=False)
  assert ok
  assert "    params/conv1: unchanged" in report
  assert "    params/head: 1 same, 1 differs" in report
  assert f"{len(diffs) - 1} of {len(diffs)} tensors identical" in report


def test_compare_names_missing_and_reshaped_tensors():
  a = {"params": {"conv1": {"kernel": np.zeros((3, 3))}, "head": {"bias": np.zeros(7)}}}
  b = {"params": {"conv1": {"kernel": np.zeros((3, 4))}, "dense": {"bias": np.zeros(2)}}}
  statuses = {d.path: d.status for d in inspect_lib.compare_variables(a, b)}
  assert statuses == {"params/conv1/kernel": "shape", "params/head/bias": "only_a",
                      "params/dense/bias": "only_b"}


def _remove_state(run):
  shutil.rmtree(_only_dir(run / "checkpoints" / "best") / "state")
  return "the `state` item is missing"


def _remove_metadata(run):
  (_only_dir(run / "checkpoints" / "best") / "state" / "_METADATA").unlink()
  return "_METADATA is missing"


def _garble_metadata(run):
  (_only_dir(run / "checkpoints" / "best") / "state" / "_METADATA").write_text("{not json")
  return "_METADATA is unreadable (JSONDecodeError"


def _remove_array_index(run):
  for f in (_only_dir(run / "checkpoints" / "best") / "state" / "d").iterdir():
    f.unlink()
  return "the array store (manifest.ocdbt, d/) is damaged or incomplete"


def _garble_meta(run):
  (_only_dir(run / "checkpoints" / "best") / "meta" / "metadata").write_text("{not json")
  return "meta: unreadable (JSONDecodeError"


def _empty_best(run):
  step = _only_dir(run / "checkpoints" / "best")
  step.rename(step.with_name(f"{step.name}.orbax-checkpoint-tmp-1234"))  # an interrupted save
  return "holds no checkpoint (only 1.orbax-checkpoint-tmp-1234 (an interrupted save"


# orbax leaves un-awaited reads of a damaged array store behind: its noise, not a failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_remove_state, _remove_metadata, _garble_metadata,
                                    _remove_array_index, _garble_meta, _empty_best])
def test_damaged_checkpoint_is_named_with_what_is_wrong(damaged, damage):
  expected = damage(damaged)
  report, ok = inspect_lib.inspect_run(damaged, show_config=False)
  assert not ok
  assert expected in report, report
  assert str(damaged / "checkpoints" / "best") in report
  # The last/ checkpoint is intact and still listed.
  assert re.search(r"^  last +1 +\d+ +[\d.]+ +checkpoints/last/1$", report, re.M), report
  with pytest.raises(runs.RunError, match=re.escape(expected.split(" (")[0])):
    runs.load(damaged)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_array_data_is_a_clear_error(damaged):
  step_dir = runs.best_checkpoint_dir(damaged)
  for f in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir():
    f.unlink()
  runs.state_metadata(step_dir)  # the metadata is intact: listing works, loading cannot
  with pytest.raises(runs.RunError, match=r"the arrays cannot be read \(.*\); the checkpoint "
                     r"is damaged$"):
    runs.restore_variables(step_dir)


def test_not_a_run(tmp_path):
  report, ok = inspect_lib.inspect_run(tmp_path)
  assert not ok and "has no checkpoints/ folder" in report and "No config.json" in report
  report, ok = inspect_lib.inspect_run(tmp_path / "nowhere")
  assert not ok and "does not exist" in report


def test_a_checkpoint_alone_is_inspected_within_its_run(workdir, tmp_path):
  step_dir = workdir / "checkpoints" / "last" / "1"
  report, ok = inspect_lib.inspect_run(checkpoint=step_dir)
  assert ok, report
  assert report.startswith(f"Run {workdir}\nCheckpoints:")  # the run that holds it
  assert re.search(r"^  best +1 .* checkpoints/best/1$", report, re.M), report
  assert "Config:" in report and f"Parameters of {step_dir} (from its metadata)" in report
  assert inspect_lib.inspect_run(checkpoint=step_dir / "state")[0] == report  # its state: same
  # Copied out of its run, with no config above it: its parameters, and the config missing.
  alone = tmp_path / "ckpt"
  shutil.copytree(step_dir, alone)
  report, ok = inspect_lib.inspect_run(checkpoint=alone)
  assert not ok and report.startswith(f"Checkpoint {alone} (not in a run's checkpoints/")
  assert "Config: No config.json" in report and f"Parameters of {alone}" in report


def test_cli(workdir, damaged):
  proc = trained_run.run_module("fer.inspect", f"--workdir={workdir}", f"--compare={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Checkpoints:" in proc.stdout and "Config:" in proc.stdout
  assert "tensors identical" in proc.stdout
  step_dir = workdir / "checkpoints" / "last" / "1"
  proc = trained_run.run_module("fer.inspect", f"--checkpoint={step_dir}", "--show_config=false")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Parameters of {step_dir}" in proc.stdout and "Checkpoints:" in proc.stdout
  _remove_state(damaged)
  proc = trained_run.run_module("fer.inspect", f"--workdir={damaged}")
  assert proc.returncode == 1
  assert "DAMAGED" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
