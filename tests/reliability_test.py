"""Reliability: kills, damaged checkpoints, a full disk, NaN, config errors and a busy workdir.

Real runs of `python -m fer.main` on tiny synthetic data; FER_FAULT (the test hook in
fer/checkpointing.py) makes a run SIGKILL itself at a chosen point. One uninterrupted reference
run is shared by the module: resumed runs must end bit-identical to it. The subprocesses share a
JAX compilation cache (the same executables, compiled once: runs 2-3x cheaper).
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer import checkpointing
from fer import train
from train_test import checkpoint_state, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config=configs/cnn.py:runlocal", "--config.model.conv_features=(8,16)",
        "--config.model.dense_features=(32,)", "--config.input.synthetic_train_size=448",
        "--config.train.num_epochs=3", "--config.train.steps_per_dispatch=2",
        "--config.checkpoint.max_to_keep=3"]
VOLATILE = ("train/images_per_second", "epoch_seconds", "train_seconds", "git_commit")
_ENV = {}  # the compilation cache's settings, set by the module fixture


def config(**overrides):
  """TINY as a ConfigDict, for runs inside the test process."""
  return tiny_config(**{"train.num_epochs": 3, "checkpoint.max_to_keep": 3, **overrides})


def run_main(workdir, *extra, fault=None, env=None):
  environ = {k: v for k, v in os.environ.items() if k != "FER_FAULT"}
  environ.update(_ENV)
  environ.update(env or {})
  if fault:
    environ["FER_FAULT"] = fault
  return subprocess.run([sys.executable, "-m", "fer.main", f"--workdir={workdir}", *TINY, *extra],
                        cwd=REPO, capture_output=True, text=True, timeout=300, env=environ)


def _ok(proc):
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc


def steps(workdir, which="last"):
  d = pathlib.Path(workdir, "checkpoints", which)
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def history(workdir):
  rows = [json.loads(l) for l in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]


def results(workdir):
  r = json.loads(pathlib.Path(workdir, "results.json").read_text())
  return {k: v for k, v in r.items() if k not in VOLATILE}


def digests(directory):
  """{relative path: sha256} of every file below `directory`."""
  directory = pathlib.Path(directory)
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_run(workdir, reference):
  """The same checkpoints (every array bit for bit), metrics history and results."""
  for which in ("last", "best"):
    assert steps(workdir, which) == steps(reference, which), which
    jax.tree.map(np.testing.assert_array_equal, checkpoint_state(workdir, which),
                 checkpoint_state(reference, which))
  assert history(workdir) == history(reference)
  assert results(workdir) == results(reference)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
  # The session's cache (tests/conftest.py, inherited through os.environ), for every program.
  _ENV.update({"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  yield
  _ENV.clear()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 3-epoch run."""
  workdir = tmp_path_factory.mktemp("reference")
  _ok(run_main(workdir))
  return workdir


def copy_unfinished(reference, workdir):
  """The reference run as if killed during its final evaluation."""
  shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns(".lock"))
  (workdir / "results.json").unlink()
  return workdir


def truncate_largest_file(step_dir):
  biggest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 2])


# ----------------------------------------------------------------------------- kill and resume


def test_run_killed_at_several_points_resumes_to_the_same_result(tmp_path, reference):
  best_epoch = json.loads((reference / "results.json").read_text())["best_epoch"]
  workdir = tmp_path / "w"
  kills = [
      # FER_FAULT, the finalized last/ steps it leaves
      ("kill_after_chunk:4", []),  # mid-epoch 1, before any checkpoint
      # while writing last/E, after best/E (the reference's last improvement) was saved
      (f"kill_in_save:{best_epoch}", list(range(1, best_epoch))),
      ("kill_after_save:3", [1, 2, 3]),  # last/3 finalized, metrics.jsonl not yet rewritten
  ]
  for fault, expected in kills:
    proc = run_main(workdir, fault=fault)
    assert proc.returncode == -signal.SIGKILL, (fault, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "FER_FAULT: SIGKILL" in proc.stdout, fault
    assert steps(workdir) == expected, fault
    if fault.startswith("kill_in_save"):  # killed with the step written but not renamed
      assert list((workdir / "checkpoints" / "last").glob(f"{best_epoch}.orbax-checkpoint-tmp*"))
      assert best_epoch in steps(workdir, "best")
  proc = _ok(run_main(workdir))  # the same command, after a SIGKILL left .lock behind
  assert "Resuming" in proc.stdout
  assert not list((workdir / "checkpoints").glob("*/*.orbax-checkpoint-tmp*"))
  assert_same_run(workdir, reference)


def test_saving_every_two_epochs_ends_like_saving_every_epoch_even_when_killed(tmp_path,
                                                                              reference):
  # TINY: 14 steps of 2 per chunk, so 7 chunks an epoch; epoch 3 runs chunks 15-21.
  every = "--config.checkpoint.every_epochs=2"
  whole = tmp_path / "whole"
  _ok(run_main(whole, every))
  killed = tmp_path / "killed"
  for fault, expected in (("kill_after_chunk:10", []),  # in epoch 2: nothing saved yet
                          ("kill_after_chunk:17", [2])):  # in epoch 3, after last/2
    proc = run_main(killed, every, fault=fault)
    assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-3000:])
    assert steps(killed) == expected, fault
  _ok(run_main(killed, every))
  best = steps(reference, "best")[-1]
  for workdir in (whole, killed):
    assert steps(workdir) == [2, 3]  # every second epoch and the last one
    assert steps(workdir, "best")[-1] == best  # saved late, but the same epoch's state
    jax.tree.map(np.testing.assert_array_equal, checkpoint_state(workdir, "best"),
                 checkpoint_state(reference, "best"))
    jax.tree.map(np.testing.assert_array_equal, checkpoint_state(workdir),
                 checkpoint_state(reference))
    assert history(workdir) == history(reference)
    assert results(workdir) == results(reference)


def test_sigterm_saves_the_epoch_in_progress_and_the_rerun_ends_the_same(tmp_path, reference):
  # Saving only every 3 epochs, so that epoch 1's checkpoint exists only because of SIGTERM,
  # sent in epoch 1's 4th of 7 chunks: the run ends epoch 1, saves it and exits 143.
  workdir, every = tmp_path / "w", "--config.checkpoint.every_epochs=3"
  proc = run_main(workdir, every, fault="term_after_chunk:4")
  assert proc.returncode == 143, (proc.stdout[-2000:], proc.stderr[-3000:])
  assert "FER_FAULT: SIGTERM after chunk 4" in proc.stdout
  assert f"stopped by SIGTERM after epoch 1/3, saved in {workdir}/checkpoints/last/1" in proc.stderr
  assert "Traceback" not in proc.stderr and steps(workdir) == [1] and len(history(workdir)) == 1
  assert "Resuming" in _ok(run_main(workdir, every)).stdout
  assert steps(workdir) == [1, 3]
  jax.tree.map(np.testing.assert_array_equal, checkpoint_state(workdir),
               checkpoint_state(reference))
  jax.tree.map(np.testing.assert_array_equal, checkpoint_state(workdir, "best"),
               checkpoint_state(reference, "best"))
  assert history(workdir) == history(reference)
  assert results(workdir) == results(reference)


def test_ctrl_c_stops_at_once_with_one_line(tmp_path):
  # (A rerun resumes as after a SIGKILL at that point: test_run_killed_at_several_points...)
  workdir = tmp_path / "w"
  proc = run_main(workdir, fault="int_after_chunk:10")  # in epoch 2, after last/1
  assert proc.returncode == 130, (proc.stdout[-2000:], proc.stderr[-3000:])
  assert "FER_FAULT: SIGINT after chunk 10" in proc.stdout
  assert f"fer: interrupted; what {workdir} saved stays" in proc.stderr
  assert "Traceback" not in proc.stderr and steps(workdir) == [1]
  assert "epoch 2/3" not in proc.stdout


def test_a_second_sigterm_reaches_the_handler_from_before():
  outer = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: outer.append(signum))
  try:
    with train.stop_on_sigterm() as stop_asked:
      assert not stop_asked()
      os.kill(os.getpid(), signal.SIGTERM)  # remembered: the loop stops after its epoch
      assert stop_asked() and not outer
      os.kill(os.getpid(), signal.SIGTERM)  # not held back (by default: the process ends)
      assert outer == [signal.SIGTERM]
    os.kill(os.getpid(), signal.SIGTERM)
    assert outer == [signal.SIGTERM] * 2
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_a_best_epoch_waiting_for_the_next_save_is_kept_intact(tmp_path):
  # A learning rate of ~0 without batch norm: val accuracy never beats epoch 1's, so best/1 is
  # saved at epoch 3, after two more epochs have donated the state it was taken from.
  flags = ("--config.optim.learning_rate=1e-30", "--config.model.batch_norm=False")
  every, each = tmp_path / "every3", tmp_path / "each"
  _ok(run_main(every, *flags, "--config.checkpoint.every_epochs=3"))
  _ok(run_main(each, *flags))
  assert steps(every, "best") == steps(each, "best") == [1] and steps(every) == [3]
  jax.tree.map(np.testing.assert_array_equal, checkpoint_state(every, "best"),
               checkpoint_state(each, "best"))
  assert results(every) == results(each)


# ----------------------------------------------------------------------------- damaged checkpoints


def test_damaged_newest_checkpoints_fall_back_to_the_newest_good_one(tmp_path, reference):
  workdir = copy_unfinished(reference, tmp_path / "w")
  shutil.rmtree(workdir / "checkpoints" / "last" / "3")
  truncate_largest_file(workdir / "checkpoints" / "last" / "2")
  proc = _ok(run_main(workdir))
  warnings = [l for l in proc.stdout.splitlines() if l.startswith("WARNING: cannot restore")]
  assert len(warnings) == 2, proc.stdout
  assert "estore checkpoint" not in proc.stderr  # said once, on stdout, not again by logging
  assert re.search(r"checkpoint 3 in \S+/last: missing", warnings[0]), warnings[0]
  # tensorstore's own error: the array, the file and the byte range it could not read
  assert re.search(r"checkpoint 2 in \S+/last: ValueError: .*last/2/state.*byte range",
                   warnings[1]), warnings[1]
  assert "Resuming" in proc.stdout and "after epoch 1" in proc.stdout
  assert_same_run(workdir, reference)  # epochs 2 and 3 trained again, bit for bit


def _damage_all_last(workdir):
  for step_dir in (workdir / "checkpoints" / "last").iterdir():
    truncate_largest_file(step_dir)


def _delete_last(workdir):
  shutil.rmtree(workdir / "checkpoints" / "last")


def _damage_best(workdir):
  for step_dir in (workdir / "checkpoints" / "best").iterdir():  # one: max_to_keep=1
    truncate_largest_file(step_dir)


@pytest.mark.parametrize("damage,message", [
    (_damage_all_last, r"checkpoint 3 in \S+/last: .*checkpoint 2 in .*checkpoint 1 in"),
    (_delete_last, r"checkpoint 3 in \S+/last: missing"),
    (_damage_best, r"checkpoint \d in \S+/best: ValueError"),
], ids=["all-last-damaged", "last-deleted", "best-damaged"])
def test_no_usable_checkpoint_stops_and_never_starts_over(tmp_path, reference, damage, message):
  workdir = copy_unfinished(reference, tmp_path / "w")
  damage(workdir)
  before = digests(workdir / "checkpoints")
  with pytest.raises(checkpointing.CheckpointError, match="No usable checkpoint") as e:
    train.train_and_evaluate(config(), str(workdir))
  assert e.match(message)
  assert digests(workdir / "checkpoints") == before
  assert history(workdir) == history(reference)


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
  """A 16 MiB tmpfs (needs root); unmounted afterwards."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                    capture_output=True, check=False).returncode:
    pytest.skip("cannot mount a tmpfs here (needs root); test_failed_save_* covers the logic")
  yield disk
  subprocess.run(["umount", str(disk)], check=False)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(small_disk, reference):
  workdir = copy_unfinished(reference, small_disk / "w")
  before = digests(workdir / "checkpoints")
  stat = os.statvfs(small_disk)
  filler = small_disk / "filler"
  filler.write_bytes(bytes(stat.f_bavail * stat.f_frsize - 200_000))  # room for logs, not a step
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"(?s)Saving checkpoint 4 .* the disk is full .*No space left on device.*"
                     r"previous checkpoint there \(3\) is intact"):
    train.train_and_evaluate(config(**{"train.num_epochs": 4}), str(workdir),
                             resume_may_change=("train.num_epochs",))
  assert digests(workdir / "checkpoints") == before  # and the failed step left nothing behind


# Tensorstore's own report: the OS error between a long path and a long JSON spec.
_TENSORSTORE_ENOSPC = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "state/mean/.zarray" in OCDBT database at local file "'
    + "/deep" * 60 + '/": Failed to write 123386 bytes to file 31: No space left on device '
    "[tensorstore_spec='" + '{\\"context\\": {}, \\"driver\\": \\"zarr\\"}' * 60
    + "'] [os_error_code='28']")


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), _TENSORSTORE_ENOSPC],
                         ids=["oserror", "tensorstore"])
def test_failed_save_is_reported_and_leaves_the_previous_step(tmp_path, monkeypatch, error):
  """The same without a tmpfs: the write fails with ENOSPC after orbax made its tmp dir."""
  ckpts = checkpointing.Checkpoints(tmp_path)
  state = {"w": jnp.arange(4.0), "step": jnp.int32(1)}
  ckpts.save_last(1, state, {"epoch": 1})
  before = digests(tmp_path / "checkpoints")

  def full_disk(step, **kwargs):
    del kwargs
    (pathlib.Path(ckpts.last.directory) / f"{step}.orbax-checkpoint-tmp").mkdir()
    raise error

  monkeypatch.setattr(ckpts.last, "save", full_disk)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"checkpoint 2 .*the disk is full.*No space left on device.*"
                           r"checkpoint there \(1\) is intact") as e:
    ckpts.save_last(2, state, {"epoch": 2})
  assert "tensorstore_spec" not in str(e.value)
  assert digests(tmp_path / "checkpoints") == before
  ckpts.close()


# ----------------------------------------------------------------------------- NaN / Inf


def test_nan_after_resume_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, reference):
  workdir = copy_unfinished(reference, tmp_path / "w")
  before = digests(workdir / "checkpoints")
  with pytest.raises(train.TrainingDivergedError,
                     match=r"loss is (nan|inf) at step (4[3-9]|5[0-6]);.*epoch 3"):
    train.train_and_evaluate(config(**{"train.num_epochs": 4, "optim.learning_rate": 1e12}),
                             str(workdir),
                             resume_may_change=("train.num_epochs", "optim.learning_rate"))
  assert digests(workdir / "checkpoints") == before


def test_non_finite_state_is_never_saved(tmp_path):
  ckpts = checkpointing.Checkpoints(tmp_path)
  ckpts.save_last(1, {"params": {"w": jnp.ones(3)}}, {"epoch": 1})
  with pytest.raises(checkpointing.NonFiniteStateError,
                     match=r"after epoch 2 .*\['params'\]\['w'\].*epoch 1\) is kept"):
    ckpts.save_last(2, {"params": {"w": jnp.array([1.0, jnp.inf, jnp.nan])}}, {"epoch": 2})
  assert ckpts.last.all_steps() == [1]
  ckpts.close()


# ----------------------------------------------------------------------------- config and workdir


@pytest.mark.parametrize("flag,message", [
    ("--config.train.num_epoch=3", 'Did you mean "num_epochs"'),
    ("--config.train.num_epochs=three", "--config.train.num_epochs=three: invalid literal"),
    ("--config.optim.learning_rate=fast", "could not convert string to float: 'fast'"),
], ids=["unknown-key", "not-an-int", "not-a-float"])
def test_command_line_config_errors_fail_before_any_work(tmp_path, flag, message):
  proc = run_main(tmp_path / "w", flag)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_impossible_values_are_all_named_before_any_work(tmp_path):
  proc = run_main(tmp_path / "w", "--config.train.num_epochs=-1", "--config.input.protocol=halves",
                  "--config.model.name=vit", "--config.checkpoint.every_epochs=0",
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=3"})
  assert proc.returncode != 0
  for message in ("train.num_epochs=-1", "input.protocol='halves'", "model.name='vit'",
                  "checkpoint.every_epochs=0",
                  "input.batch_size=32 is not divisible by the 3 devices"):
    assert message in proc.stderr, (message, proc.stderr[-2000:])
  assert not (tmp_path / "w").exists()


def test_second_run_on_a_busy_workdir_is_refused(tmp_path):
  with checkpointing.WorkdirLock(tmp_path):  # this process is the first run
    proc = run_main(tmp_path)
  assert proc.returncode != 0
  assert f"is in use by another run (pid {os.getpid()})" in proc.stderr, proc.stderr[-2000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
