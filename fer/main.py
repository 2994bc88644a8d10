r"""Entry point: `python -m fer.main --config=configs/augment.py --workdir=runs/augment`.

Any config key can be overridden (`--config.optim.learning_rate=3e-4`); every config takes
`:runlocal` (`--config=configs/augment.py:runlocal`) for a seconds-long smoke test on a CPU.
`config.job` picks the job: train (default), data_report or search.

Over several hosts (a TPU pod slice, GPU nodes), every process runs the same command with
`--multihost` and the same `--workdir` on a shared filesystem; process 0 writes the outputs
(README, "Many devices and hosts").
"""

from fer import xla_flags

xla_flags.configure_cpu_defaults()  # before jax starts its backend; a no-op off CPU

import os  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Train as one data-parallel job over several processes or hosts: "
    "jax.distributed.initialize() first (TPU pods, SLURM, Open MPI and Kubernetes are "
    "detected; elsewhere pass the three flags below). Same command and --workdir everywhere.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "With --multihost: HOST:PORT of process 0, where no cluster is "
    "detected (or $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --multihost: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --multihost: this one's, 0..N-1.")


def _message(e: BaseException) -> str:
  """The innermost text of an exception (ml_collections nests KeyErrors in AttributeErrors)."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
  lines = text.strip("'").replace("\\n", "\n").replace("\\'", "'").split("\n")
  if isinstance(e, KeyError) or "Did you mean" in text:
    lines[0] = f"unknown key {lines[0].strip(chr(39))!r}."
  return " ".join(lines)


def _last_line(text: str) -> str:
  """The last non-blank line: the reason in the tracebacks and path lists ml_collections puts
  into its config-file errors."""
  return [l.strip() for l in text.splitlines() if l.strip()][-1]


def parse_flags(argv):
  """absl's flag parsing, with a one-line error (no traceback) for a bad --config override or a
  config file that cannot be loaded (missing, or its get_config refusing its argument)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Error whilst parsing config file" in text or "Attempted [" in text:
      # ml_collections puts the config module's traceback (or the paths it tried) in the text:
      # its last line is the reason.
      sys.exit(f"fer: config error: cannot read the config file: {text.splitlines()[0]} "
               f"{_last_line(text)}")
    sys.exit(f"fer: {text}\nPass --helpshort or --helpfull to see help on flags.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"fer: config error: {_message(e)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config = flags.FLAGS.config
  try:
    job = config.get("job", "train")
  except OSError as e:  # ml_collections defers a missing config file's error to the first use
    sys.exit(f"fer: config error: cannot read the config file --config="
             f"{flags.FLAGS['config'].config_filename}: {_last_line(str(e))}")
  if _MULTIHOST.value:
    start_multihost(job)
  try:
    run(job, config)
  except KeyboardInterrupt as e:
    train = sys.modules.get("fer.train")  # imported by the jobs that can raise train.Stopped
    if train is not None and isinstance(e, train.Stopped):  # SIGTERM, after saving its epoch
      print(f"fer: {e}", file=sys.stderr, flush=True)
      sys.exit(128 + 15)  # what a shell reports for a process SIGTERM ended
    # Ctrl-C: at once, without a traceback from wherever JAX was.
    print("fer: interrupted" + (
        f"; what {_WORKDIR.value} saved stays (checkpoints are written whole or not at all): "
        "the same command resumes from its last checkpoint." if job in ("train", "search")
        else "."), file=sys.stderr, flush=True)
    sys.exit(128 + 2)
  except (ValueError, FloatingPointError, RuntimeError) as e:
    # The project's own errors (invalid config, data, checkpoints, a busy workdir, divergence)
    # say what is wrong and how to fix it; a traceback adds nothing. Others propagate.
    if type(e).__module__.startswith("fer."):
      sys.exit(f"fer: {type(e).__name__}: {e}")
    raise


def start_multihost(job):
  """Joins this process to the others (jax.distributed); only process 0 keeps its stdout."""
  import jax  # pylint: disable=import-outside-toplevel
  if job != "train":
    sys.exit(f"fer: config.job={job} runs in one process: drop --multihost.")
  try:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  except (ValueError, RuntimeError) as e:
    sys.exit(f"fer: --multihost: JAX's distributed runtime did not start ({e}). Outside a "
             "detected cluster (TPU pod, SLURM, Open MPI, Kubernetes) pass "
             "--coordinator_address=HOST:PORT --num_processes=N --process_id=I to every process.")
  if jax.process_index() > 0:  # the same progress as process 0's; errors still go to stderr
    sys.stdout = open(os.devnull, "w", encoding="utf-8")  # pylint: disable=consider-using-with


def run(job, config):
  if job == "train":
    from fer import train  # pylint: disable=import-outside-toplevel
    train.train_and_evaluate(config, _WORKDIR.value)
  elif job == "data_report":
    from fer import data_report  # pylint: disable=import-outside-toplevel
    data_report.run(config, _WORKDIR.value)
  elif job == "search":
    from fer import search  # pylint: disable=import-outside-toplevel
    search.run(config, _WORKDIR.value)
  else:
    raise app.UsageError(f"config.job={job!r}: expected train, data_report or search")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
