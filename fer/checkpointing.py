"""Orbax checkpoints of a run: `last/` every epoch for resume, `best/` by val accuracy.

Each checkpoint holds the whole train state (step, params, batch stats, optimizer state, rng)
and a JSON `meta` item (epoch, history, early-stopping counters, elapsed time), so a killed run
continues exactly. The checkpoint id is the number of completed epochs.
"""

import fcntl
import os
import pathlib

from absl import logging
import orbax.checkpoint as ocp

BEST_METRIC = "val/accuracy"


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected."""


class WorkdirInUseError(RuntimeError):
  """Another process holds the workdir's lock."""


class WorkdirLock:
  """An exclusive lock on `workdir/.lock` for the life of a run (released on any exit)."""

  def __init__(self, workdir):
    self.path = pathlib.Path(workdir) / ".lock"
    self._fd = None

  def __enter__(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise WorkdirInUseError(
          f"The workdir {self.path.parent} is in use by another run (pid {holder}). Wait for it "
          "to finish, stop it, or pass another --workdir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _manager(directory, max_to_keep, best=False):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=False,
      best_fn=(lambda m: m[BEST_METRIC]) if best else None,
      best_mode="max",
  )
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


class Checkpoints:
  """The `last/` and `best/` managers of one workdir."""

  def __init__(self, workdir, max_to_keep: int = 2):
    root = pathlib.Path(workdir) / "checkpoints"
    self.last = _manager(root / "last", max_to_keep)
    self.best = _manager(root / "best", 1, best=True)

  @staticmethod
  def _save(mgr, epoch, state, meta, metrics=None):
    try:
      mgr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              meta=ocp.args.JsonSave(meta)),
               metrics=metrics, force=True)
      mgr.wait_until_finished()
    except OSError as e:
      raise CheckpointError(
          f"Saving checkpoint {epoch} into {mgr.directory} failed: {e}. The previous checkpoint "
          "there is intact; free disk space or fix permissions and rerun the same command to "
          "resume.") from e

  def save_last(self, epoch, state, meta):
    self._save(self.last, epoch, state, meta)

  def save_best(self, epoch, state, meta, val_accuracy):
    self._save(self.best, epoch, state, meta, {BEST_METRIC: float(val_accuracy)})

  @staticmethod
  def restore(mgr, abstract_state, step=None):
    """Restores (step, state, meta) from `step` or the newest usable checkpoint of `mgr`.

    A damaged newest checkpoint is skipped with a warning naming the problem; if checkpoints
    exist but none can be read, raises CheckpointError (never silently starts over).
    Returns None when the manager holds no checkpoint at all.
    """
    steps = sorted(mgr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      return None
    problems = []
    for s in steps:
      try:
        restored = mgr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        if problems:
          logging.warning("Using checkpoint %d of %s after skipping damaged ones: %s", s,
                          mgr.directory, "; ".join(problems))
        return s, restored.state, restored.meta
      except Exception as e:  # orbax raises many types for damaged files
        msg = f"checkpoint {s} in {mgr.directory}: {type(e).__name__}: {str(e)[:300]}"
        logging.warning("Cannot restore %s", msg)
        print(f"WARNING: cannot restore {msg}", flush=True)
        problems.append(msg)
    raise CheckpointError(
        "No usable checkpoint, though checkpoints exist: " + "; ".join(problems) +
        ". If the model or optimizer config changed since those were written, use a new "
        "--workdir (with --config.init_from=<this workdir> to start from its weights); if they "
        "are damaged, move them away to start over.")

  def close(self):
    self.last.close()
    self.best.close()
