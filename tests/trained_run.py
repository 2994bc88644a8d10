"""A tiny trained run (CNN with batch norm, 1 epoch on synthetic faces) for the predict, inspect
and export tests: trained once per pytest session, in-process, and shared by their files."""

import pathlib
import subprocess
import sys

from configs import cnn as cnn_config

REPO = pathlib.Path(__file__).resolve().parents[1]
_RUNS = {}


def tiny_config():
  c = cnn_config.get_config("runlocal")
  c.model.conv_features = (8, 16)
  c.model.dense_features = (32,)
  c.model.batch_norm = True  # so the variables hold batch_stats too
  c.input.synthetic_train_size = 64  # 2 steps: the tests need the run's files, not accuracy
  c.input.eval_batch_size = 32
  c.train.steps_per_dispatch = 2
  c.train.num_epochs = 1
  return c


def tiny_run(tmp_path_factory) -> pathlib.Path:
  """The workdir of the shared run; treat it as read-only (copy it to damage it)."""
  if "run" not in _RUNS:
    from fer import train  # pylint: disable=import-outside-toplevel
    workdir = tmp_path_factory.mktemp("tiny_run")
    train.train_and_evaluate(tiny_config(), str(workdir))
    _RUNS["run"] = workdir
  return _RUNS["run"]


def run_module(module: str, *args, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
  """`python -m fer.<module> args...` as a user would run it."""
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout)
