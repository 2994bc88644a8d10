"""Orbax checkpoints of a run: `last/` every epoch for resume, `best/` by val accuracy.

Each checkpoint holds the whole train state (step, params, batch stats, optimizer state, rng)
and a JSON `meta` item (epoch, history, early-stopping counters, elapsed time), so a killed run
continues exactly. The checkpoint id is the number of completed epochs.

What a run survives (tests/reliability_test.py; the README's "Guarantees" section):
- A kill at any moment. Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it
  when complete, so a killed save leaves no half checkpoint; the next run removes the leftover
  tmp dirs. Its first save also removes checkpoints at or after the epoch it saves: they belong
  to the interrupted run (a `best/` saved just before the kill, a damaged `last/`) and the
  resumed run rewrites them.
- A damaged or deleted newest checkpoint: `restore` falls back to the previous one with a
  warning naming the problem. `checkpoints/saved.json` records the newest step saved into each
  directory, so a deleted one is noticed too; when none is usable, CheckpointError (never a
  silent fresh start over an existing run).
- A failed save (disk full, no permission): CheckpointError saying so; the previous checkpoint
  is untouched and the half-written one is removed.
- A state holding NaN or Inf is never saved (NonFiniteStateError): the newest checkpoint stays
  the last good one.
"""

import dataclasses
import errno
import fcntl
import json
import os
import pathlib
import re
import shutil
import signal
import sys

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fer import fileio

BEST_METRIC = "val/accuracy"
_RECORD = "saved.json"  # in checkpoints/: {"last": newest step saved, "best": ...}


class CheckpointError(RuntimeError):
  """A checkpoint cannot be read or written where one was expected."""


class NonFiniteStateError(CheckpointError, FloatingPointError):
  """The state to be saved holds NaN or Inf: training diverged."""


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


# ----------------------------------------------------------------------------- test hook
# FER_FAULT makes a process SIGKILL itself at one chosen point so that tests can interrupt a
# real run deterministically (tests/reliability_test.py). Unset in normal use: then nothing
# here does anything.
#   kill_after_chunk:N  after this process dispatched its N-th train chunk (train.py calls
#                       fault_point("chunk") after each)
#   kill_in_save:E      while saving last/E: its files are written, the step is not finalized
#   kill_after_save:E   right after last/E is finalized, before anything else is written
#   term_after_chunk:N  SIGTERM (not SIGKILL) after the N-th train chunk: the run saves the
#                       epoch it is in and stops (fer.train.stop_on_sigterm)
#   int_after_chunk:N   SIGINT (Ctrl-C) after the N-th train chunk

_fault_counts = {}


def _fault():
  kind, _, n = os.environ.get("FER_FAULT", "").partition(":")
  return kind, int(n) if n else None


def _kill(where):
  print(f"FER_FAULT: SIGKILL {where}", flush=True)
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def fault_point(name, value=None):
  """Test hook: SIGKILLs this process at `kill_after_<name>:N` (N-th call, or value == N), or
  sends it SIGTERM or SIGINT at `term_after_<name>:N` or `int_after_<name>:N`."""
  kind, n = _fault()
  signals = {f"term_after_{name}": signal.SIGTERM, f"int_after_{name}": signal.SIGINT}
  if kind not in (f"kill_after_{name}", *signals):
    return
  _fault_counts[name] = _fault_counts.get(name, 0) + 1
  if n == (_fault_counts[name] if value is None else value):
    if kind in signals:
      print(f"FER_FAULT: {signals[kind].name} after {name} {n}", flush=True)
      os.kill(os.getpid(), signals[kind])
    else:
      _kill(f"after {name} {n}")


class _KillBeforeFinalize(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """The default local temporary path, killing the process before last/E is renamed."""

  async def finalize(self):
    final = pathlib.Path(self.get_final())
    if final.parent.name == "last" and final.name == str(_fault()[1]):
      _kill(f"in the save of {final} (written, not finalized)")
    await super().finalize()


# ----------------------------------------------------------------------------- checkpoints


def _manager(directory, max_to_keep, best=False):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=False,
      cleanup_tmp_directories=True,  # half-written steps of a killed or failed save
      best_fn=(lambda m: m[BEST_METRIC]) if best else None,
      best_mode="max",
      temporary_path_class=_KillBeforeFinalize if _fault()[0] == "kill_in_save" else None,
  )
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def _read_record(root):
  path = pathlib.Path(root) / _RECORD
  try:
    return json.loads(path.read_text()) if path.exists() else {}
  except (OSError, ValueError) as e:
    logging.warning("Ignoring unreadable %s: %s", path, e)
    return {}


def _causes(e):
  """`e` and the exceptions it was raised from, outermost first."""
  chain = [e]
  while len(chain) < 10 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  return chain


def _describe(e, limit=600):
  """`Type: message` of the innermost cause of `e` on one line, its middle elided past `limit`:
  orbax wraps the precise tensorstore or JSON error (which array, file and byte range, and the
  OS error at the end) in vaguer ones."""
  e = _causes(e)[-1]
  # Tensorstore ends its errors with its whole spec as JSON (~1.5 KB), after the OS error: drop
  # it, or eliding the middle would cut out the OS error (e.g. "No space left on device").
  text = re.sub(r"\s*\[tensorstore_spec='[^']*'\]", "", " ".join(str(e).split()))
  if len(text) > limit:
    text = f"{text[:limit // 2]} ... {text[-limit // 2:]}"
  return f"{type(e).__name__}: {text}"


def _disk_full(e):
  return any(getattr(x, "errno", None) == errno.ENOSPC or "No space left on device" in str(x)
             for x in _causes(e))


def _non_finite_leaves(state):
  """Paths of the floating-point leaves of `state` holding NaN or Inf."""
  bad = []
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
    if jnp.issubdtype(dtype, jnp.inexact) and not bool(jnp.isfinite(x).all()):
      bad.append(jax.tree_util.keystr(path))
  return bad


def _stored(state):
  """What a checkpoint holds of `state` (or of its abstract twin): a TrainState without a moving
  average of its weights (`ema` empty: optim.ema_decay off) goes without that field, as runs
  saved it before the field existed, so those checkpoints and these read alike."""
  if dataclasses.is_dataclass(state) and hasattr(state, "ema") and not state.ema:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "ema"}
  return state


def _warn(message: str):
  """'WARNING: message' on stdout, beside the progress lines; once per run, by process 0 (every
  process of a multi-host run restores the same checkpoints)."""
  if jax.process_index() == 0:
    print(f"WARNING: {message}", flush=True)


class Checkpoints:
  """The `last/` and `best/` managers of one workdir."""

  def __init__(self, workdir, max_to_keep: int = 2):
    self.root = pathlib.Path(workdir) / "checkpoints"
    self.last = _manager(self.root / "last", max_to_keep)
    self.best = _manager(self.root / "best", 1, best=True)
    self._pruned = False

  def _set_record(self, mgr, step):
    if jax.process_index() > 0:  # several processes share the workdir: process 0 writes
      return
    record = _read_record(self.root)
    name = pathlib.Path(mgr.directory).name
    if step is None:
      record.pop(name, None)
    else:
      record[name] = step
    try:
      fileio.write_json_atomic(self.root / _RECORD, record, indent=None)
    except OSError as e:  # the checkpoint itself is saved; only deletions go unnoticed
      logging.warning("Cannot update %s: %s", self.root / _RECORD, e)

  def _prune_from(self, epoch):
    """Removes checkpoints at or after `epoch`: written by an interrupted run past the epoch this
    one resumed from (or skipped as damaged); this run is about to rewrite them."""
    for mgr in (self.last, self.best):
      stale = [s for s in mgr.all_steps() if s >= epoch]
      for s in stale:
        logging.warning("Removing checkpoint %d of %s, left by an interrupted run; this run "
                        "rewrites it.", s, mgr.directory)
        mgr.delete(s)
      if stale:
        self._set_record(mgr, mgr.latest_step())

  def _save(self, mgr, epoch, state, meta, metrics=None):
    if not self._pruned:
      self._prune_from(epoch)
      self._pruned = True
    bad = _non_finite_leaves(state)
    if bad:
      last = self.last.latest_step()
      kept = (f"the last good checkpoint (epoch {last}) is kept in {self.last.directory}"
              if last is not None else "no checkpoint had been written yet")
      raise NonFiniteStateError(
          f"Training diverged: after epoch {epoch} the state holds NaN or Inf (in "
          f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}), so checkpoint {epoch} was "
          f"not saved; {kept}. Lower optim.learning_rate or set optim.grad_clip_norm.")
    try:
      mgr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(_stored(state)),
                                              meta=ocp.args.JsonSave(meta)),
               metrics=metrics, force=True)
      mgr.wait_until_finished()
    except Exception as e:  # tensorstore reports a full disk as ValueError, orbax as OSError
      for tmp in pathlib.Path(mgr.directory).glob(f"{epoch}.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space the failed write took
      previous = [s for s in mgr.all_steps() if s < epoch]
      intact = (f"the previous checkpoint there ({max(previous)}) is intact"
                if previous else "no earlier checkpoint exists there")
      raise CheckpointError(
          f"Saving checkpoint {epoch} into {mgr.directory} failed"
          f"{': the disk is full' if _disk_full(e) else ''} ({_describe(e)}). Its partial "
          f"files were removed and {intact}. Free disk space or fix permissions and rerun the "
          "same command to resume.") from e
    self._set_record(mgr, epoch)
    if mgr is self.last:
      fault_point("save", epoch)

  def save_last(self, epoch, state, meta):
    self._save(self.last, epoch, state, meta)

  def save_best(self, epoch, state, meta, val_accuracy):
    self._save(self.best, epoch, state, meta, {BEST_METRIC: float(val_accuracy)})

  @staticmethod
  def restore(mgr, abstract_state, step=None):
    """Restores (step, state, meta) from `step` or the newest usable checkpoint of `mgr`.

    A damaged or missing newest checkpoint is skipped with a warning naming the problem; if
    checkpoints were saved but none can be read, raises CheckpointError (never silently starts
    over). Returns None when no checkpoint was ever saved there.
    """
    directory = pathlib.Path(mgr.directory)
    steps = sorted(mgr.all_steps(), reverse=True) if step is None else [step]
    problems = []
    if step is None:
      saved = _read_record(directory.parent).get(directory.name)
      if saved is not None and (not steps or steps[0] < saved):
        msg = (f"checkpoint {saved} in {directory}: missing (it was saved, then deleted or "
               "moved)")
        _warn(f"cannot restore {msg}")
        problems.append(msg)
    for s in steps:
      try:
        target = _stored(abstract_state)
        restored = mgr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        if problems:
          _warn(f"using checkpoint {s} of {mgr.directory} instead")
        state = restored.state
        if target is not abstract_state:
          state = abstract_state.replace(**state)
        return s, state, restored.meta
      except Exception as e:  # orbax raises many types for damaged files
        msg = f"checkpoint {s} in {mgr.directory}: {_describe(e)}"
        _warn(f"cannot restore {msg}")
        problems.append(msg)
    if not problems:
      return None
    raise CheckpointError(
        "No usable checkpoint, though checkpoints were saved: " + "; ".join(problems) +
        ". If the model or optimizer config changed since those were written, use a new "
        "--workdir (with --config.init_from=<this workdir> to start from its weights); if they "
        "are damaged or gone, move the workdir's checkpoints/ away to start over.")

  def close(self):
    self.last.close()
    self.best.close()
