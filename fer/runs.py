"""A trained run read back for use: its config, its checkpoints, one checkpoint's variables.

A run's workdir holds `config.json` and `checkpoints/{last,best}/<epoch>/{state,meta}` (see
fer/checkpointing.py). Listing checkpoints reads only orbax metadata (the managers' step lists,
the `meta` JSON item, the arrays' shapes and dtypes), never the arrays. Restoring variables
builds the target from that metadata on this host's first device, so a run trained on 8 GPUs
loads on a laptop.

  run = runs.load(workdir="runs/cnn")                          # its best checkpoint
  run = runs.load(checkpoint="runs/cnn/checkpoints/last/30")   # config.json found above it
  run.model.apply(run.variables, images, train=False)

A `vgg16_head` run (a head trained on cached features) comes back as the whole VGG16: the base
it was trained on (config.pretrained, see fer/features.py) in front of the checkpoint's head.

Anything unusable (no config.json, no checkpoint, a damaged or partial checkpoint) raises
RunError with a message naming the path and what is wrong.
"""

import dataclasses
import gc
import json
import logging
import os
import pathlib
import sys
import types
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fer import checkpointing

KINDS = ("last", "best")
CONFIG_FILE = "config.json"
# Input keys that decide which images are in which split: runs whose outputs are combined
# (ensembles, distillation) must agree on them.
SPLIT_KEYS = ("source", "protocol", "val_fraction", "split_seed", "synthetic_train_size")
_CONFIG_SEARCH_DEPTH = 5  # a checkpoint is RUN/checkpoints/<kind>/<epoch>[/state]


class RunError(checkpointing.CheckpointError):
  """A workdir or checkpoint that cannot be used; the message says which path and why."""


@dataclasses.dataclass
class CheckpointInfo:
  """One checkpoint as its metadata describes it; `problem` is set when it is unusable."""
  kind: str  # last | best | path (given explicitly)
  path: pathlib.Path
  epoch: int | None = None
  step: int | None = None  # train steps done
  val_accuracy: float | None = None
  problem: str = ""


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  model: Any
  variables: dict  # {'params'[, 'batch_stats']}: numpy arrays, ready for model.apply
  checkpoint: CheckpointInfo


# ----------------------------------------------------------------------------- config


def find_config_file(path) -> pathlib.Path:
  """`config.json` in `path` or the nearest folder above it (a run's workdir)."""
  path = pathlib.Path(path).absolute()
  for folder in [path, *path.parents][:_CONFIG_SEARCH_DEPTH + 1]:
    if (folder / CONFIG_FILE).is_file():
      return folder / CONFIG_FILE
  raise RunError(f"No {CONFIG_FILE} in {path} or the {_CONFIG_SEARCH_DEPTH} folders above it: "
                 "pass the run's --workdir, which holds the config the model was trained with.")


def split_differences(a, b) -> list[str]:
  """['input.protocol is 'seed' against 'standard'', ...]: the SPLIT_KEYS on which two runs'
  input configs (dicts or ConfigDicts) differ; [] when they split the data alike."""
  return [f"input.{k} is {a.get(k)!r} against {b.get(k)!r}" for k in SPLIT_KEYS
          if a.get(k) != b.get(k)]


def split_mismatch(workdirs, configs) -> str | None:
  """'<workdir> was trained on other splits than <first>: ...' for the first run whose config's
  input splits the data unlike the first run's (configs: their config dicts); None if all agree."""
  for workdir, config in zip(workdirs[1:], configs[1:]):
    differ = split_differences(config["input"], configs[0]["input"])
    if differ:
      return f"{workdir} was trained on other splits than {workdirs[0]}: {'; '.join(differ)}"
  return None


def load_config(path) -> ml_collections.ConfigDict:
  """The resolved config a run was trained with (`path`: a workdir, checkpoint or the file)."""
  path = pathlib.Path(path)
  file = path if path.is_file() else find_config_file(path)
  try:
    return ml_collections.ConfigDict(json.loads(file.read_text()))
  except (OSError, ValueError) as e:
    raise RunError(f"{file} is not a readable config ({_why(e)})") from e


# ----------------------------------------------------------------------------- checkpoints


def _manager(directory):
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(),
                               options=ocp.CheckpointManagerOptions(read_only=True))


def stray_entries(kind_dir) -> list[str]:
  """Entries of a manager's folder that are no checkpoint (interrupted saves, stray files)."""
  kind_dir = pathlib.Path(kind_dir)
  if not kind_dir.is_dir():
    return []
  out = []
  for p in sorted(kind_dir.iterdir()):
    if p.name.isdigit() and p.is_dir():
      continue
    why = "an interrupted save" if "tmp" in p.name else "not a checkpoint"
    out.append(f"{p.name} ({why}, ignored)")
  return out


def state_metadata(step_dir) -> Any:
  """The state item's tree of orbax ArrayMetadata (shape, dtype): no array is read."""
  state_dir = pathlib.Path(step_dir) / "state"
  if not state_dir.is_dir():
    raise RunError(f"{step_dir}: the `state` item is missing (an incomplete or damaged "
                   "checkpoint)")
  if not (state_dir / "_METADATA").is_file():
    raise RunError(f"{state_dir}: _METADATA is missing (an incomplete or damaged checkpoint)")
  try:
    md = ocp.StandardCheckpointer().metadata(state_dir.absolute()).item_metadata
  except Exception as e:  # orbax raises many types for damaged files
    raise RunError(f"{state_dir}: unreadable metadata ({_why(e)})") from e
  tree = getattr(md, "tree", md)
  if tree is None:  # orbax logs the cause and returns None
    try:
      json.loads((state_dir / "_METADATA").read_text())
    except (OSError, ValueError) as e:
      raise RunError(f"{state_dir}: _METADATA is unreadable ({_why(e)}); the checkpoint is "
                     "damaged") from e
    raise RunError(f"{state_dir}: orbax cannot read the array metadata though _METADATA "
                   "parses: the array store (manifest.ocdbt, d/) is damaged or incomplete")
  if "params" not in tree:
    raise RunError(f"{state_dir}: holds no `params` (not a checkpoint written by fer.train)")
  return tree


def _why(e: Exception) -> str:
  """'Type: the first line of the message', shortened (TensorStore errors run to pages)."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def read_meta(step_dir) -> dict:
  """The checkpoint's `meta` JSON item (epoch, history, best_val_accuracy, ...)."""
  meta_dir = pathlib.Path(step_dir) / "meta"
  if not meta_dir.is_dir():
    raise RunError(f"{step_dir}: the `meta` item is missing (an incomplete or damaged "
                   "checkpoint)")
  try:
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir.absolute())
  except Exception as e:  # orbax raises many types for damaged files
    raise RunError(f"{meta_dir}: unreadable ({_why(e)})") from e
  if not isinstance(meta, dict) or "epoch" not in meta:
    raise RunError(f"{meta_dir}: holds no `epoch` (not a checkpoint written by fer.train)")
  return meta


def describe_checkpoint(step_dir, kind="path") -> CheckpointInfo:
  """Epoch, train step and val accuracy of one checkpoint, or the problem that makes it
  unusable. Reads metadata only."""
  step_dir = pathlib.Path(step_dir)
  if step_dir.name == "state":
    step_dir = step_dir.parent
  info = CheckpointInfo(kind=kind, path=step_dir)
  try:
    if not step_dir.is_dir():
      raise RunError(f"{step_dir} does not exist")
    state_metadata(step_dir)
    meta = read_meta(step_dir)
  except RunError as e:
    info.problem = str(e)
    return info
  info.epoch = int(meta["epoch"])
  rows = [r for r in meta.get("history", []) if r.get("epoch") == info.epoch]
  if rows:
    info.step = rows[-1].get("step")
    info.val_accuracy = rows[-1].get("val/accuracy")
  return info


def list_checkpoints(workdir) -> tuple[list[CheckpointInfo], list[str]]:
  """(every checkpoint of `last/` and `best/`, notes on the folders): metadata only."""
  root = pathlib.Path(workdir) / "checkpoints"
  infos, notes = [], []
  for kind in KINDS:
    kind_dir = root / kind
    if not kind_dir.is_dir():
      notes.append(f"checkpoints/{kind} is missing")
      continue
    try:
      steps = sorted(_manager(kind_dir).all_steps())
    except Exception as e:  # orbax raises many types for damaged folders
      notes.append(f"checkpoints/{kind} is unreadable ({type(e).__name__}: {e})")
      continue
    notes += [f"checkpoints/{kind}/{s}" for s in stray_entries(kind_dir)]
    if not steps:
      notes.append(f"checkpoints/{kind} holds no checkpoint")
    infos += [describe_checkpoint(kind_dir / str(s), kind) for s in steps]
  return infos, notes


def best_checkpoint_dir(workdir) -> pathlib.Path:
  """The step folder of a workdir's best checkpoint (by val accuracy)."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise RunError(f"{workdir} does not exist")
  best = workdir / "checkpoints" / "best"
  if not best.is_dir():
    raise RunError(f"{workdir} has no checkpoints/best: not a trained run's workdir, or its "
                   "training has not finished an epoch yet")
  mgr = _manager(best)
  step = mgr.best_step() if mgr.best_step() is not None else mgr.latest_step()
  if step is None:
    strays = stray_entries(best)
    raise RunError(f"{best} holds no checkpoint" +
                   (f" (only {', '.join(strays)})" if strays else ""))
  return best / str(step)


def resolve_checkpoint(workdir=None, checkpoint=None) -> pathlib.Path:
  """The step folder to use: `checkpoint` if given, else the best one of `workdir`."""
  if checkpoint:
    path = pathlib.Path(checkpoint)
    if (path / "checkpoints" / "best").is_dir():  # a workdir passed as --checkpoint
      return best_checkpoint_dir(path)
    if path.name == "state":
      path = path.parent
    if not path.is_dir():
      raise RunError(f"{path} does not exist")
    if not (path / "state").is_dir():
      raise RunError(f"{path} is neither a run's workdir nor a checkpoint (a folder holding "
                     "`state` and `meta`)")
    return path
  if not workdir:
    raise RunError("Pass --workdir (a trained run) or --checkpoint (a checkpoint folder)")
  return best_checkpoint_dir(workdir)


# ----------------------------------------------------------------------------- arrays


def restore_state(step_dir) -> dict:
  """The whole saved train state of a checkpoint as numpy arrays, on any device topology."""
  tree = state_metadata(step_dir)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  state_dir = (pathlib.Path(step_dir) / "state").absolute()
  try:
    restored = ocp.StandardCheckpointer().restore(state_dir, target)
  except Exception as e:  # orbax raises many types for damaged files
    raise RunError(f"{state_dir}: the arrays cannot be read ({_why(e)}); the checkpoint is "
                   "damaged") from e
  return jax.tree.map(np.asarray, restored)


def restore_variables(step_dir) -> dict:
  """{'params', 'batch_stats'} of a checkpoint, as numpy arrays: the moving average of the
  weights where the run kept one (optim.ema_decay), as training evaluated and selected it."""
  state = restore_state(step_dir)
  state = state.get("ema") or state
  return {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}


def load(workdir=None, checkpoint=None) -> Run:
  """The config, model and variables of a run's best checkpoint or of `checkpoint`."""
  from fer.models import build_model  # pylint: disable=import-outside-toplevel
  step_dir = resolve_checkpoint(workdir, checkpoint)
  config = load_config(workdir or step_dir)
  info = describe_checkpoint(step_dir, "path" if checkpoint else "best")
  if info.problem:
    raise RunError(info.problem)
  try:
    model = build_model(config.model)
  except (ValueError, KeyError, AttributeError) as e:
    raise RunError(f"The config of {workdir or step_dir} does not build a model: {e}") from e
  variables = {k: v for k, v in restore_variables(step_dir).items() if k == "params" or v}
  if config.model.name == "vgg16_head":
    model, variables = _with_vgg16_base(config, variables)
  check_face_input(model, variables, config)
  return Run(config=config, model=model, variables=variables, checkpoint=info)


def _with_vgg16_base(config, variables):
  """A head trained on cached VGG16 features (fer/features.py) with the frozen base it ran on
  put back in front: the whole VGG16 on faces, and its variables."""
  from fer import features  # pylint: disable=import-outside-toplevel
  try:
    base = features.base_params(config)
  except Exception as e:  # WeightsError, OSError, ...: the base weights file is not here
    raise RunError(f"This run trained a head on cached VGG16 features; its checkpoint holds "
                   f"the head only, and the base (pretrained.weights="
                   f"{config.pretrained.weights!r}) cannot be loaded: {_why(e)}") from e
  params = {**base, "head": variables["params"]}
  return features.base_model(config.model), {**variables, "params": params}


def check_face_input(model, variables, config):
  """Raises RunError unless the model maps grey 48x48 faces to 7 logits with these variables
  (traced only: no computation)."""
  from fer.datasets import fer2013  # pylint: disable=import-outside-toplevel
  faces = jax.ShapeDtypeStruct((1,) + fer2013.IMAGE_SHAPE, np.uint8)
  try:
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, faces)
  except Exception as e:  # flax raises many types for mismatched trees and shapes
    raise RunError(
        f"The model of this run (model.name={config.model.name!r}) does not take grey 48x48 "
        f"faces with its checkpoint's variables ({_why(e)})") from e
  if out.shape != (1, fer2013.NUM_CLASSES):
    raise RunError(f"The model of this run outputs {out.shape} for one face, not "
                   f"(1, {fer2013.NUM_CLASSES})")


def workdir_of(checkpoint) -> pathlib.Path | None:
  """The run's workdir that holds `checkpoint` (RUN/checkpoints/<kind>/<epoch>[/state], or RUN
  itself), or None for a checkpoint outside a run."""
  path = pathlib.Path(checkpoint)
  if (path / "checkpoints").is_dir():
    return path
  if path.name == "state":
    path = path.parent
  if path.parent.parent.name == "checkpoints" and path.parents[2].is_dir():
    return path.parents[2]
  return None


def final_results(run: Run) -> dict:
  """The results.json of the run holding `run`'s checkpoint (its final evaluation, of its best
  checkpoint with its eval.tta); {} for a checkpoint outside a run or an unfinished run."""
  workdir = workdir_of(run.checkpoint.path)
  if workdir is None:
    return {}
  try:
    results = json.loads((workdir / "results.json").read_text())
  except (OSError, ValueError):
    return {}
  return results if isinstance(results, dict) else {}


def calibration_temperature(run: Run) -> float:
  """The temperature the run fit on val at its end (results.json), for `--calibrate`; RunError
  when it has none."""
  temperature = final_results(run).get("temperature")
  if not isinstance(temperature, (int, float)):
    raise RunError(f"--calibrate: {run.checkpoint.path} has no fitted temperature (the run's "
                   "results.json has none: an unfinished run, a checkpoint outside a run, or a "
                   "run finished before calibration was added); drop --calibrate")
  return float(temperature)


def val_accuracy_line(run: Run, tta: str) -> str:
  """'val/accuracy A with|without TTA': results.json's figure when it is for this checkpoint's
  epoch and `tta` (the run's final evaluation, with its eval.tta), else the checkpoint's own,
  which the epoch's evaluation measured without TTA."""
  results = final_results(run)
  final = results.get("val/accuracy")
  if (isinstance(final, float) and results.get("tta") == tta and
      results.get("best_epoch") == run.checkpoint.epoch):
    return f"val/accuracy {final:.4f} {'without TTA' if tta == 'none' else f'with {tta} TTA'}"
  acc = run.checkpoint.val_accuracy
  line = f"val/accuracy {'?' if acc is None else f'{acc:.4f}'} without TTA"
  return line if tta == "none" else f"{line}; predicting with {tta} TTA"


def _in_orbax(code: types.CodeType) -> bool:
  """Whether a function's code lives in the orbax package."""
  return f"{os.sep}orbax{os.sep}" in code.co_filename


def _is_checkpoint_read_error(exc) -> bool:
  """Whether an exception comes from orbax or TensorStore reading checkpoint files."""
  if exc is None:
    return False
  tb = exc.__traceback__
  while tb is not None:
    if _in_orbax(tb.tb_frame.f_code):
      return True
    tb = tb.tb_next
  return any(word in str(exc) for word in ("TensorStore", "OCDBT"))


class _OrbaxLeftoverFilter(logging.Filter):
  """Drops asyncio's 'Future/Task exception was never retrieved' for checkpoint read errors."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    return not (str(record.msg).split("\n", 1)[0].endswith("exception was never retrieved")
                and _is_checkpoint_read_error(exc))


def quiet_orbax_read_noise():
  """Drops what orbax leaves behind when a damaged checkpoint fails to restore, which Python
  prints after the clean error, a few or dozens, at random: 'Exception ignored' tracebacks of
  its abandoned read coroutines, raising when collected, and of TensorStore's callbacks into its
  closed event loop ('RuntimeError: Event loop is closed'); and asyncio's log lines for the
  failed reads' futures ('Future exception was never retrieved'). Installed for the rest of the
  process (for the CLIs); every other unraisable exception and asyncio error is still
  reported."""
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _OrbaxLeftoverFilter) for f in asyncio_log.filters):
    asyncio_log.addFilter(_OrbaxLeftoverFilter())
  previous = sys.unraisablehook
  if getattr(previous, "quiets_orbax", False):
    return

  def hook(unraisable):
    exc, obj = unraisable.exc_value, unraisable.object
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    if isinstance(obj, types.CoroutineType) and _in_orbax(obj.cr_code):
      return
    previous(unraisable)

  hook.quiets_orbax = True
  sys.unraisablehook = hook


def load_for_cli(workdir, checkpoint) -> Run:
  """load() for a CLI: a damaged checkpoint's RunError without orbax's leftover noise."""
  quiet_orbax_read_noise()
  try:
    return load(workdir, checkpoint)
  except RunError:
    gc.collect()  # the abandoned reads are collected now, under the filter, not at exit
    raise
