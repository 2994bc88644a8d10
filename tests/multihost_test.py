"""Training as one job over two processes (`fer.main --multihost`, JAX's distributed runtime with
CPU collectives over gloo): the same numbers as one process with as many devices, files written
once, and a run killed in both processes resumes exactly."""

import json
import os
import socket
import subprocess

import pytest

from train_test import REPO, _run_main, main_command

_EPOCHS = "--config.train.num_epochs=2"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(workdir, *extra, env=None, env1=None):
  """Both processes of a 2-process run (1 CPU device each): their (returncode, stdout, stderr),
  process 0 first. `env1`: more environment for process 1 only."""
  port = _free_port()
  procs = []
  for pid in range(2):
    cmd = main_command(workdir, "--multihost", f"--coordinator_address=localhost:{port}",
                       "--num_processes=2", f"--process_id={pid}", *extra)
    procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True,
                                  env={**os.environ, "XLA_FLAGS": "", **(env or {}),
                                       **((env1 or {}) if pid else {})}))
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:
      p.kill()
  return outs


def _metrics(workdir):
  return [{k: v for k, v in json.loads(line).items() if "second" not in k}
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The same run in one process with 2 devices: its workdir."""
  workdir = tmp_path_factory.mktemp("one_process")
  proc = _run_main(workdir, _EPOCHS, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_two_processes_match_one_process_with_two_devices(tmp_path, one_process):
  (rc0, out0, err0), (rc1, out1, err1) = _run_two_processes(tmp_path, _EPOCHS)
  assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
  assert "2 x cpu in 2 processes" in out0
  assert "epoch 2/2" in out0 and "epoch 2/2" not in out1  # process 0 alone reports

  assert _metrics(tmp_path) == _metrics(one_process)
  multi = json.loads((tmp_path / "results.json").read_text())
  one = json.loads((one_process / "results.json").read_text())
  assert multi["process_count"] == 2 and one["process_count"] == 1
  for key in ("val/accuracy", "test/accuracy", "test/loss", "best_epoch"):
    assert multi[key] == one[key], key
  for name in ("config.json", "confusion_matrix.png", "val_probs.npy", "test_probs.npy"):
    assert (tmp_path / name).is_file(), name


def test_two_processes_killed_after_a_checkpoint_resume_exactly(tmp_path, one_process):
  killed = _run_two_processes(tmp_path, _EPOCHS, env={"FER_FAULT": "kill_after_save:1"})
  assert all(rc != 0 for rc, _, _ in killed)
  assert "FER_FAULT: SIGKILL" in killed[0][1]
  assert not (tmp_path / "results.json").exists()

  (rc0, out0, err0), (rc1, _, err1) = _run_two_processes(tmp_path, _EPOCHS)
  assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
  assert "Resuming" in out0 and "after epoch 1" in out0
  assert _metrics(tmp_path) == _metrics(one_process)


def test_sigterm_to_one_process_stops_both_after_the_same_epoch(tmp_path):
  # Process 1 alone gets SIGTERM, in epoch 1 of 2: both save epoch 1 and exit 143 (none waits
  # forever in a collective for a partner that stopped).
  outs = _run_two_processes(tmp_path, _EPOCHS, env1={"FER_FAULT": "term_after_chunk:1"})
  assert [rc for rc, _, _ in outs] == [143, 143], [err[-2000:] for _, _, err in outs]
  assert "FER_FAULT: SIGTERM" not in outs[0][1]
  for _, _, err in outs:
    assert "stopped by SIGTERM after epoch 1/2" in err
  assert len(_metrics(tmp_path)) == 1 and (tmp_path / "checkpoints" / "last" / "1").is_dir()


@pytest.mark.parametrize("extra,message", [
    ((), "pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I"),
    (("--config.job=search",), "config.job=search runs in one process: drop --multihost"),
])
def test_multihost_misuse_is_explained(tmp_path, extra, message):
  proc = _run_main(tmp_path, "--multihost", *extra)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
