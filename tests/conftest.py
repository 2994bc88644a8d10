"""Shared pytest fixtures, and one XLA compilation cache per test session."""

import os
import shutil
import signal
import tempfile

import pytest

import fer2013_fakes
import trained_run


@pytest.fixture
def fer2013_zip(tmp_path):
  """A tiny Kaggle-layout archive.zip: 7 classes x 3 split prefixes x 2 JPEGs (42 images)."""
  return fer2013_fakes.write_zip(tmp_path / "archive.zip", fer2013_fakes.kaggle_members())


# The tiny trained run (trained_run.tiny_run: trained once per worker process) that the predict,
# video, evaluate, export, ensemble, compare and distill tests read; treat it as read-only (copy
# it to change it). fer is imported inside: jax must start after pytest_configure.


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """The tiny run's workdir."""
  return trained_run.tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def run(run_dir):
  """The tiny run loaded (fer.runs.Run: model, variables, config, best checkpoint)."""
  from fer import runs  # pylint: disable=import-outside-toplevel
  return runs.load(run_dir)


@pytest.fixture(scope="module")
def data():
  """The splits of the tiny run's config (synthetic faces)."""
  from fer import input_pipeline  # pylint: disable=import-outside-toplevel
  return input_pipeline.load_splits(trained_run.tiny_config().input)


_CACHE = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
  """Tests (and the fer.main processes they start) compile many of the same programs: a
  persistent compilation cache in a fresh temp dir, set before jax is imported and inherited by
  subprocesses, lets them compile each once (the suite took 454 s with it, 503 s without, on the
  2-core CPU). Nothing carries over between sessions; a cache dir set by the caller is kept."""
  del config
  # A suite started in the background by a script (`pytest ... &` without job control) has SIGINT
  # ignored, and so would the fer.main processes it starts (Python then installs no
  # KeyboardInterrupt handler): handled here, they start with it as in a terminal.
  if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  if _CACHE not in os.environ:
    os.environ[_CACHE] = tempfile.mkdtemp(prefix="fer-test-jax-cache-")
    os.environ[_OWNER] = str(os.getpid())


_OWNER = "FER_TEST_JAX_CACHE_OWNER"  # the pid of the process that made the cache dir


def pytest_unconfigure(config):
  """The process that made the cache removes it; xdist's workers, which inherit the
  environment and end one by one, leave it to the controller that outlives them."""
  del config
  if os.environ.get(_OWNER) == str(os.getpid()):
    del os.environ[_OWNER]
    shutil.rmtree(os.environ.pop(_CACHE), ignore_errors=True)
