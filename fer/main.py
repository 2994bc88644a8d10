r"""Entry point: `python -m fer.main --config=configs/augment.py --workdir=runs/augment`.

Any config key can be overridden (`--config.optim.learning_rate=3e-4`); every config takes
`:runlocal` (`--config=configs/augment.py:runlocal`) for a seconds-long smoke test on a CPU.
`config.job` picks the job: train (default), data_report or search.
"""

from fer import xla_flags

xla_flags.configure_cpu_defaults()  # before jax starts its backend; a no-op off CPU

import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _message(e: BaseException) -> str:
  """The innermost text of an exception (ml_collections nests KeyErrors in AttributeErrors)."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
  lines = text.strip("'").replace("\\n", "\n").replace("\\'", "'").split("\n")
  if isinstance(e, KeyError) or "Did you mean" in text:
    lines[0] = f"unknown key {lines[0].strip(chr(39))!r}."
  return " ".join(lines)


def parse_flags(argv):
  """absl's flag parsing, with a one-line error (no traceback) for a bad --config override."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"fer: config error: {_message(e)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config = flags.FLAGS.config
  job = config.get("job", "train")
  try:
    run(job, config)
  except (ValueError, FloatingPointError, RuntimeError) as e:
    # The project's own errors (invalid config, data, checkpoints, a busy workdir, divergence)
    # say what is wrong and how to fix it; a traceback adds nothing. Others propagate.
    if type(e).__module__.startswith("fer."):
      sys.exit(f"fer: {type(e).__name__}: {e}")
    raise


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
