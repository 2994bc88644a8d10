"""experiments/offline_gpu.sh: a plan it cannot read stops it before anything is installed or
started, with the line and what was expected (experiments/run_study.py reads it: its tests
cover the plan's format, the deadline and the collection)."""

import os
import pathlib
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "offline_gpu.sh"


def _run(tmp_path, *args, **env):
  return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                        env={"PATH": os.environ["PATH"], "OUT": str(tmp_path / "out"),
                             "DEADLINE_S": "60", **env}, check=False)


@pytest.mark.parametrize("line, expected", [
    ("only_a_name\n", ":1: bad line 'only_a_name'"),
    ("# nothing but a comment\n\n", ": no runs in it"),
    # The last line, without its newline, is read too.
    ("a --config=configs/cnn.py\na --config=configs/augment.py", ":2: the name a is used twice"),
])
def test_a_bad_plan_is_refused_before_anything_runs(tmp_path, line, expected):
  plan = tmp_path / "plan.txt"
  plan.write_text(line)
  r = _run(tmp_path, "run", str(plan))
  assert r.returncode == 2, r.stderr
  assert f"{plan}{expected}" in r.stderr, r.stderr
  assert not (tmp_path / "out").exists() and "pip" not in r.stdout + r.stderr


def test_missing_plan_and_unknown_command(tmp_path):
  r = _run(tmp_path, "run", str(tmp_path / "nope.txt"))
  assert r.returncode == 2 and "nope.txt: cannot read the plan" in r.stderr
  r = _run(tmp_path, "frobnicate")
  assert r.returncode == 2 and "usage:" in r.stderr
