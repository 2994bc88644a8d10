"""experiments/run_study.py: the whole study in one command, skipping complete runs."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import run_study  # pylint: disable=wrong-import-position


def every_run(root, seeds=2):
  return {e.name: e for e in run_study.experiments(root, seeds=seeds)}


def test_the_study_lists_every_experiment_in_a_runnable_order(tmp_path):
  names = [e.name for e in run_study.experiments(tmp_path, seeds=2)]
  assert names == ["data_report", "search", "cnn_standard_s0", "augment_standard_s0",
                   "cnn_standard_s1", "augment_standard_s1",
                   "cnn_standard_ensemble", "augment_standard_ensemble",
                   "cnn_seed_s0", "augment_seed_s0", "cnn_seed_s1", "augment_seed_s1",
                   "cnn_seed_ensemble", "augment_seed_ensemble",
                   "cnn_nocopies_s0", "augment_nocopies_s0", "cnn_nocopies_s1",
                   "augment_nocopies_s1", "cnn_nocopies_ensemble", "augment_nocopies_ensemble",
                   "augment_teachers", "augment_distilled_s0", "cnn_distilled_s0",
                   "augment_distilled_s1", "cnn_distilled_s1", "augment_distilled_ensemble",
                   "cnn_distilled_ensemble",
                   "vgg16_cached", "vgg16_frozen", "vgg16_finetune",
                   "strong_s0", "strong_s1", "strong_ensemble",
                   "strong_seed_s0", "strong_seed_s1", "strong_seed_ensemble",
                   "strong_half_s0", "strong_half_s1", "strong_half_ensemble",
                   "mini_xception_e100_s0", "mini_xception_e100_s1",
                   "mini_xception_e100_ensemble"]
  every = every_run(tmp_path)
  assert run_study.command(every["strong_seed_s1"]) == (
      f"python -m fer.main --config=configs/strong.py --workdir={tmp_path / 'strong_seed_s1'} "
      "--config.input.protocol=seed --config.seed=1")
  assert run_study.command(every["augment_nocopies_s1"]) == (
      f"python -m fer.main --config=configs/augment.py --workdir={tmp_path / 'augment_nocopies_s1'} "
      "--config.input.drop_train_copies=True --config.seed=1")
  teachers, student = every["augment_teachers"], every["augment_distilled_s1"]
  targets = tmp_path / "augment_teachers" / "targets.npz"
  assert run_study.command(teachers) == (
      f"python -m fer.distill --teachers={tmp_path / 'augment_nocopies_s0'},"
      f"{tmp_path / 'augment_nocopies_s1'} --out={targets}")
  assert teachers.after == ("augment_nocopies_s0", "augment_nocopies_s1")
  assert (teachers.done_file, teachers.collect) == ("targets.npz", False)
  assert f"--config.distill.targets={targets}" in student.argv
  assert "--config.input.drop_train_copies=True" in student.argv
  assert student.after == ("augment_teachers",)
  cnn_student = every["cnn_distilled_s0"]
  assert "--config=configs/cnn.py" in cnn_student.argv and cnn_student.after == student.after
  assert f"--config.distill.targets={targets}" in cnn_student.argv
  by_name = {e.name: e for e in run_study.experiments(tmp_path, seeds=2, vgg16_weights="none")
             if e.name.startswith("vgg16")}
  assert f"--config.init_from={tmp_path / 'vgg16_frozen_scratch'}" in by_name[
      "vgg16_finetune_scratch"].argv
  assert "--config.pretrained.weights=none" in by_name["vgg16_cached_scratch"].argv
  assert by_name["vgg16_finetune_scratch"].after == ("vgg16_frozen_scratch",)
  assert run_study.command(every["strong_half_s1"]) == (
      "python -m fer.main --config=configs/strong_half.py "
      f"--workdir={tmp_path / 'strong_half_s1'} --config.seed=1")
  assert run_study.command(every["mini_xception_e100_s0"]) == (
      "python -m fer.main --config=configs/mini_xception.py "
      f"--workdir={tmp_path / 'mini_xception_e100_s0'} --config.train.num_epochs=100 "
      "--config.seed=0")
  assert every["mini_xception_e100_ensemble"].after == ("mini_xception_e100_s0",
                                                       "mini_xception_e100_s1")
  assert every["strong_seed_ensemble"].after == ("strong_seed_s0", "strong_seed_s1")
  assert every["augment_standard_ensemble"].argv == (
      "fer.ensemble", f"--workdirs={tmp_path / 'augment_standard_s0'},"
      f"{tmp_path / 'augment_standard_s1'}", f"--out={tmp_path / 'augment_standard_ensemble'}")


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
  # The same run in a plan: complete, so collected again, with the plan's command and machine.
  plan = tmp_path / "plan.txt"
  plan.write_text("cnn_standard_s0 --config=configs/cnn.py --config.seed=0\n")
  assert run_study.main(["--root", str(root), "--plan", str(plan), "--runlocal", "--results",
                         str(results), "--machine=a GPU box"]) == 0
  assert finished.stat().st_mtime_ns == stamp
  info = json.loads((results / "cnn_standard_s0" / "run.json").read_text())
  assert info == {"command": f"python -m fer.main --config=configs/cnn.py:runlocal "
                             f"--config.seed=0 --workdir={root / 'cnn_standard_s0'}",
                  "machine": "a GPU box", "devices": "1 x cpu"}


def test_an_unknown_selection_is_an_error(tmp_path, capsys):
  assert run_study.main(["--root", str(tmp_path), "--only=nothing"]) == 2
  assert "matches no experiment" in capsys.readouterr().err


_FAKE = """
import json, pathlib, sys, time
import os
workdir, outcome = pathlib.Path(sys.argv[1]), sys.argv[2]
seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
pid = workdir.parent / f"{workdir.name}.pid"  # atomically: a reader never sees it empty
pid.with_suffix(".tmp").write_text(str(os.getpid()))
os.replace(pid.with_suffix(".tmp"), pid)
start = time.time()
time.sleep(seconds)
if outcome == "fail":
  sys.exit(3)
workdir.mkdir(parents=True, exist_ok=True)
(workdir / "results.json").write_text(json.dumps({"start": start, "end": time.time()}))
"""


def _fakes(tmp_path, monkeypatch, root):
  """fake(name, outcome, after=()): an Experiment running fake_experiment.py into root/name."""
  (tmp_path / "fake_experiment.py").write_text(_FAKE)
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  return lambda name, outcome, after=(): run_study.Experiment(
      name, ("fake_experiment", str(root / name), outcome), collect=False, after=after)


def test_parallel_runs_overlap_and_dependents_wait_or_are_skipped(tmp_path, monkeypatch, capsys):
  root = tmp_path / "study"
  fake = _fakes(tmp_path, monkeypatch, root)
  monkeypatch.setattr(run_study, "experiments", lambda *a, **k: [
      fake("a", "ok"), fake("b", "ok"), fake("bad", "fail"),
      fake("a_and_b", "ok", after=("a", "b")), fake("needs_bad", "ok", after=("bad",))])
  assert run_study.main(["--root", str(root), "--parallel=3"]) == 1
  times = {n: json.loads((root / n / "results.json").read_text()) for n in ("a", "b", "a_and_b")}
  assert times["b"]["start"] < times["a"]["end"]  # a and b ran at the same time
  assert times["a_and_b"]["start"] >= max(times["a"]["end"], times["b"]["end"])
  assert not (root / "needs_bad").exists()
  out = capsys.readouterr()
  assert "needs_bad: not run, it needs bad, which failed" in out.out
  assert "bad: FAILED (exit 3)" in out.out and "failed: bad, needs_bad" in out.err
  assert (root / "a.log").is_file()


def test_a_chain_behind_a_failed_run_is_skipped_when_nothing_else_runs(tmp_path, monkeypatch,
                                                                      capsys):
  root = tmp_path / "study"
  fake = _fakes(tmp_path, monkeypatch, root)
  monkeypatch.setattr(run_study, "experiments", lambda *a, **k: [
      fake("bad", "fail"), fake("needs_bad", "ok", after=("bad",)),
      fake("needs_that", "ok", after=("needs_bad",))])
  assert run_study.main(["--root", str(root)]) == 1
  out = capsys.readouterr()
  assert "needs_bad: not run, it needs bad, which failed" in out.out
  assert "needs_that: not run, it needs needs_bad, which failed" in out.out
  assert "failed: bad, needs_bad, needs_that" in out.err


_DRIVER = """
import pathlib, sys
sys.path.insert(0, {repo!r})
from experiments import run_study
root = pathlib.Path(sys.argv[1])
run_study.experiments = lambda *a, **k: [
    run_study.Experiment(n, ("fake_experiment", str(root / n), "ok", "60"), collect=False)
    for n in ("a", "b", "c")]
sys.exit(run_study.main(["--root", str(root), "--parallel=2"]))
"""


def test_sigterm_stops_the_runs_in_flight(tmp_path, monkeypatch):
  (tmp_path / "fake_experiment.py").write_text(_FAKE)
  (tmp_path / "driver.py").write_text(_DRIVER.format(repo=str(REPO)))
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  root = tmp_path / "study"
  proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(root)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  started = [root / "a.pid", root / "b.pid"]
  deadline = time.monotonic() + 60
  while not all(p.is_file() for p in started) and time.monotonic() < deadline:
    time.sleep(0.1)
  pids = [int(p.read_text()) for p in started]
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, (out, err)
  assert "a: stopped after" in out and "b: stopped after" in out and "interrupted" in err
  for pid in pids:  # the fake runs are gone too, and c never started
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)
  assert not (root / "c.pid").exists()


# ----------------------------------------------------------------------------- --plan, --deadline_s


def test_a_plan_lists_its_runs_each_into_its_own_workdir(tmp_path):
  plan = tmp_path / "plan.txt"
  plan.write_text("# two runs\n\nresnet_s0 --config=configs/strong_resnet.py --config.seed=0  # x\n"
                  "cnn_a --config=configs/cnn.py '--config.model.dense_features=(32, 16)'")
  resnet, cnn = run_study.read_plan(plan, tmp_path)
  assert resnet.name == "resnet_s0" and resnet.collect and resnet.done_file == "results.json"
  assert run_study.command(resnet) == (f"python -m fer.main --config=configs/strong_resnet.py "
                                       f"--config.seed=0 --workdir={tmp_path / 'resnet_s0'}")
  assert cnn.argv[2] == "--config.model.dense_features=(32, 16)"  # shell quoting
  assert run_study.read_plan(plan, tmp_path, runlocal=True)[1].argv[1] == (
      "--config=configs/cnn.py:runlocal")


def test_count_prints_how_many_runs_are_not_complete(tmp_path, capsys):
  # experiments/offline_gpu.sh shares the GPU among this many runs.
  plan = tmp_path / "plan.txt"
  plan.write_text("a --config=configs/cnn.py\nb --config=configs/cnn.py\n")
  args = ["--root", str(tmp_path / "r"), "--plan", str(plan), "--count"]
  assert run_study.main(args) == 0 and capsys.readouterr().out == "2\n"
  (tmp_path / "r" / "a").mkdir(parents=True)
  (tmp_path / "r" / "a" / "results.json").write_text("{}")
  assert run_study.main(args) == 0 and capsys.readouterr().out == "1\n"
  assert run_study.main(args + ["--only=a"]) == 0 and capsys.readouterr().out == "0\n"


def test_a_plan_skips_runs_collected_by_an_earlier_checkout(tmp_path, capsys):
  # A fresh checkout has experiments/results/<name>/ but no runs/<name>/: not trained again.
  plan = tmp_path / "plan.txt"
  plan.write_text("a --config=configs/cnn.py\nb --config=configs/cnn.py\n")
  results = tmp_path / "results"
  (results / "a").mkdir(parents=True)
  (results / "a" / "results.json").write_text("{}")
  args = ["--root", str(tmp_path / "r"), "--plan", str(plan), "--results", str(results)]
  assert run_study.main(args + ["--count"]) == 0 and capsys.readouterr().out == "1\n"
  assert run_study.main(args + ["--dry_run"]) == 0
  out = capsys.readouterr().out
  assert f"a: complete ({results / 'a' / 'results.json'}), skipped" in out, out
  assert "b: would run" in out, out
  assert not (tmp_path / "r" / "a").exists()


@pytest.mark.parametrize("text, expected", [
    ("only_a_name\n", ":1: bad line 'only_a_name'"),
    ("# a comment\nbad/name --config=configs/cnn.py\n", ":2: bad line 'bad/name"),
    ("a configs/cnn.py\n", ":1: bad line 'a configs/cnn.py'"),
    ("a --config=configs/cnn.py\na --config=configs/augment.py", ":2: the name a is used twice"),
    ("a --config=configs/cnn.py --workdir=/tmp/x\n", ":1: drop --workdir"),
    ("a --config.seed=1\n", ":1: a has no --config=<file>"),
    ("a --config=configs/cnn.py '--config.seed=1\n", ":1: No closing quotation"),
    ("# nothing but a comment\n\n", ": no runs in it"),
])
def test_a_plan_it_cannot_use_is_refused_naming_the_line(tmp_path, capsys, text, expected):
  plan = tmp_path / "plan.txt"
  plan.write_text(text)
  assert run_study.main(["--root", str(tmp_path / "r"), "--plan", str(plan)]) == 2
  err = capsys.readouterr().err
  assert f"{plan}{expected}" in err, err
  assert not (tmp_path / "r").exists()
  assert run_study.main(["--root", str(tmp_path), "--plan", str(tmp_path / "nope.txt")]) == 2
  assert "nope.txt: cannot read the plan: No such file" in capsys.readouterr().err


def test_the_deadline_stops_the_runs_in_flight_and_starts_no_more(tmp_path, monkeypatch, capsys):
  root = tmp_path / "study"
  (tmp_path / "fake_experiment.py").write_text(_FAKE)
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  monkeypatch.setattr(run_study, "experiments", lambda *a, **k: [
      run_study.Experiment(n, ("fake_experiment", str(root / n), "ok", "60"), collect=False)
      for n in ("a", "b", "c")])
  t0 = time.monotonic()
  assert run_study.main(["--root", str(root), "--parallel=2", "--deadline_s=3",
                         "--grace_s=5"]) == 124
  assert time.monotonic() - t0 < 30  # not the fakes' 60 s
  out = capsys.readouterr().out
  assert "the deadline (--deadline_s=3) has come; stopping a, b; not started: c" in out, out
  assert "a: stopped after" in out and "b: stopped after" in out
  for name in ("a", "b"):
    with pytest.raises(ProcessLookupError):
      os.kill(int((root / f"{name}.pid").read_text()), 0)
  assert not (root / "c.pid").exists()
