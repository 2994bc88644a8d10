"""train_and_evaluate(config, workdir): data on device, a jitted multi-step train loop over a
one-axis `data` mesh, validation every epoch, orbax checkpoints, and one final test evaluation.

The same code runs on one CPU, many (fake) CPU devices, a GPU, a TPU, or several processes
(hosts) started with `fer.main --multihost`: the batch is sharded over the `data` axis of all
devices, parameters and the uint8 data set are replicated, the state is donated. Every process
computes the same state and metrics; process 0 alone writes files (orbax coordinates the
checkpoints), so the workdir must be one shared directory.
"""

import contextlib
import copy
import json
import math
import pathlib
import re
import signal
import subprocess
import threading
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from fer import augment
from fer import checkpointing
from fer import fileio
from fer import metrics as metrics_lib
from fer import native
from fer import optim
from fer.datasets.fer2013 import CLASSES, NUM_CLASSES
from fer.models import build_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # base key; step i uses fold_in(rng, i), so a resumed run repeats exactly
  # optim.ema_decay > 0: {'params', 'batch_stats'} averaged over the steps, the weights that are
  # evaluated, selected and saved as the model (eval_variables); else {}, and then absent from
  # checkpoints, which stay those of the runs before it (fer.checkpointing).
  ema: Any = flax.struct.field(default_factory=dict)


class TrainingDivergedError(FloatingPointError):
  pass


class ConfigError(ValueError):
  """Impossible config values, found before any work starts."""


class Stopped(KeyboardInterrupt):
  """Training stopped on SIGTERM after saving the epoch it was in; the same command resumes it.
  An interruption like Ctrl-C's, so that handlers of Exception (the search's) let it through."""


# ----------------------------------------------------------------------------- config checks

TTA_MODES = ("none", "flip", "tencrop")  # eval.tta: see _tta_views

_CHOICES = {
    "input.source": ("fer2013", "synthetic"),
    "input.protocol": ("standard", "seed", "val_fraction"),
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.schedule": ("constant", "cosine", "step"),
    "optim.class_weights": metrics_lib.CLASS_WEIGHTS,
    "eval.tta": TTA_MODES,
    "model.dtype": ("float32", "bfloat16"),
}


def validate_config(config):
  """Raises ValueError naming the key for impossible values, before any work starts."""
  problems = []
  for key, choices in _CHOICES.items():
    group, name = key.split(".")
    value = config[group][name]
    if value not in choices:
      problems.append(f"{key}={value!r}: expected one of {', '.join(choices)}")
  if not any(p.startswith("model.dtype") for p in problems):  # names an unknown model.name
    try:
      build_model(config.model)
    except ValueError as e:
      problems.append(str(e))
  positive = {"train.num_epochs": config.train.num_epochs,
              "input.batch_size": config.input.batch_size,
              "input.eval_batch_size": config.input.eval_batch_size,
              "train.steps_per_dispatch": config.train.steps_per_dispatch,
              "optim.learning_rate": config.optim.learning_rate}
  for key, value in positive.items():
    if not isinstance(value, (int, float)) or value <= 0:
      problems.append(f"{key}={value!r}: expected a positive number")
  every = config.checkpoint.every_epochs
  if not isinstance(every, int) or isinstance(every, bool) or every < 1:
    problems.append(f"checkpoint.every_epochs={every!r}: expected a whole number of epochs >= 1")
  if not 0 < config.input.val_fraction < 1:
    problems.append(f"input.val_fraction={config.input.val_fraction!r}: expected 0 < f < 1")
  ndev = jax.device_count()
  if isinstance(config.input.batch_size, int) and config.input.batch_size % ndev:
    problems.append(f"input.batch_size={config.input.batch_size} is not divisible by the "
                    f"{ndev} devices; use a multiple of {ndev}")
  if jax.process_count() > 1 and config.model.name == "vgg16_head":
    problems.append("model.name='vgg16_head' (a head on cached VGG16 features) caches its "
                    "features in one process: run it without --multihost")
  for key in ("augment.mixup_alpha", "augment.cutmix_alpha"):
    group, name = key.split(".")
    if not isinstance(config[group][name], (int, float)) or config[group][name] < 0:
      problems.append(f"{key}={config[group][name]!r}: expected >= 0 (0 turns it off)")
  if config.distill.targets:
    if not 0 <= config.distill.weight <= 1:
      problems.append(f"distill.weight={config.distill.weight!r}: expected 0 <= w <= 1 (the "
                      "teacher's share of the targets)")
    if not isinstance(config.distill.temperature, (int, float)) or config.distill.temperature <= 0:
      problems.append(f"distill.temperature={config.distill.temperature!r}: expected > 0")
    if config.model.name == "vgg16_head":
      problems.append("distill.targets with model.name='vgg16_head': teacher targets are matched "
                      "to images, and this model trains on cached features")
  for key in ("model.dropout", "model.conv_dropout", "augment.erase_prob", "optim.ema_decay"):
    group, name = key.split(".")
    if not 0 <= config[group][name] < 1:
      problems.append(f"{key}={config[group][name]!r}: expected 0 <= p < 1")
  sam_rho = config.optim.sam_rho
  if not isinstance(sam_rho, (int, float)) or sam_rho < 0:
    problems.append(f"optim.sam_rho={sam_rho!r}: expected >= 0 (0 turns it off)")
  elif sam_rho and config.optim.freeze:
    problems.append(f"optim.sam_rho={sam_rho!r} with optim.freeze={config.optim.freeze!r}: SAM "
                    "would move the frozen weights too; train without one of them")
  if problems:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- the jitted steps


def _variables(params, batch_stats):
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def eval_variables(state: TrainState) -> dict:
  """The variables that are evaluated and kept: the moving average of the weights (and batch
  statistics) where optim.ema_decay is on, else the trained ones."""
  if state.ema:
    return _variables(state.ema["params"], state.ema["batch_stats"])
  return _variables(state.params, state.batch_stats)


def initial_ema(config, params, batch_stats) -> dict:
  """TrainState.ema at the start: a copy of the variables with optim.ema_decay, else {}."""
  if not config.optim.ema_decay:
    return {}
  return jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})


def ema_decay_at(ema_decay: float, step):
  """The moving average's decay at `step`: min(ema_decay, (1 + step) / (10 + step)), short at
  first so that the random initial weights fade within the first hundred or so steps."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def make_train_step(model, tx, config, class_weights=None):
  """train_step(state, images, labels) -> (state, (loss, number correct)): one optimizer step
  on one batch (augmentation and mixing inside, per-step keys from fold_in(rng, step); with
  config.optim.sam_rho, a sharpness-aware one).
  `class_weights` [K]: the loss weights that config.optim.class_weights asks for, from
  fer.metrics.class_weights(train labels, ...). With config.distill.targets, `labels` is the
  pair (int labels [B], teacher probabilities [B, K]) and the targets mix the two."""
  aug_cfg = config.augment
  label_smoothing = config.optim.label_smoothing
  distill_weight = config.distill.weight if config.distill.targets else None
  ema_decay = config.optim.ema_decay
  sam_rho = config.optim.sam_rho
  if (config.optim.class_weights != "none") != (class_weights is not None):
    raise ValueError(f"optim.class_weights={config.optim.class_weights!r} and class_weights "
                     f"{'missing' if class_weights is None else 'given'}: pass "
                     "fer.metrics.class_weights(train labels, NUM_CLASSES, "
                     "config.optim.class_weights), None for 'none'")

  def train_step(state, images, labels):
    key = jax.random.fold_in(state.rng, state.step)
    k_aug, k_mix, k_drop = jax.random.split(key, 3)
    x = augment.augment(k_aug, images, aug_cfg)
    if distill_weight is None:
      targets = jax.nn.one_hot(labels, NUM_CLASSES)
    else:
      labels, teacher = labels
      targets = ((1 - distill_weight) * jax.nn.one_hot(labels, NUM_CLASSES)
                 + distill_weight * teacher)
    x, targets = augment.mix(k_mix, x, targets, aug_cfg)

    def loss_fn(params):
      variables = _variables(params, state.batch_stats)
      mutable = ["batch_stats"] if state.batch_stats else False
      out = model.apply(variables, x, train=True, rngs={"dropout": k_drop}, mutable=mutable)
      logits, new_vars = out if mutable else (out, {})
      loss = metrics_lib.cross_entropy(logits, targets, label_smoothing, class_weights)
      return loss, (logits, new_vars.get("batch_stats", state.batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    if sam_rho:  # SAM: descend with the gradient at the weights rho up the gradient (same batch,
      # augmentation and dropout; loss, accuracy and batch statistics stay the first pass's)
      scale = sam_rho / (optax.tree.norm(grads) + 1e-12)
      grads = jax.grad(lambda p: loss_fn(p)[0])(
          jax.tree.map(lambda p, g: p + scale * g, state.params, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    if ema_decay:
      d = ema_decay_at(ema_decay, state.step)
      new_state = new_state.replace(ema=jax.tree.map(
          lambda e, x: d * e + (1 - d) * x, state.ema,
          {"params": params, "batch_stats": batch_stats}))
    return new_state, (loss, correct)

  return train_step


def make_train_chunk(model, tx, config, mesh, num_steps: int, train_step=None):
  """A jitted function running `num_steps` train steps as one straight-line program.

  chunk(state, images, labels, perm, start) -> (state, {'loss': sum, 'correct': sum}) where
  `start` is the epoch's step index of the chunk's first step, and step i of the chunk trains on
  images[perm[(start + i) * B : (start + i + 1) * B]]. `train_step` defaults to
  make_train_step(model, tx, config); the search passes a vmapped one (stacked states).
  """
  batch_size = config.input.batch_size
  data_sharding = NamedSharding(mesh, P("data"))
  train_step = train_step or make_train_step(model, tx, config)

  def chunk(state, images, labels, perm, start):
    # A straight-line program of `num_steps` steps: on XLA:CPU (jaxlib 0.10.2) convolutions
    # inside a while loop (lax.scan, even unroll=True at length 1) run 10-45x slower.
    losses, correct = [], []
    for i in range(num_steps):
      idx = jax.lax.dynamic_slice(perm, ((start + i) * batch_size,), (batch_size,))
      idx = jax.lax.with_sharding_constraint(idx, data_sharding)
      x = jax.lax.with_sharding_constraint(images[idx], data_sharding)
      y = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a[idx], data_sharding),
                       labels)  # labels [N], or (labels, teacher probabilities [N, K])
      state, (loss, n_correct) = train_step(state, x, y)
      losses.append(loss)
      correct.append(n_correct)
    return state, {"loss": sum(losses), "correct": sum(correct)}

  return jax.jit(chunk, donate_argnums=0)


def make_epoch_runner(model, tx, config, mesh, steps_per_epoch: int, train_step=None):
  """run(state, images, labels, perm, on_chunk=None) -> (state, per-chunk metric sums): one
  whole epoch as chunks of `config.train.steps_per_dispatch` steps (plus one remainder chunk).
  `on_chunk(steps_done, state, sums)` is called after each chunk is dispatched. `train_step`
  as in make_train_chunk."""
  k = min(config.train.steps_per_dispatch, steps_per_epoch)
  fns = {k: make_train_chunk(model, tx, config, mesh, k, train_step)}
  remainder = steps_per_epoch % k
  if remainder:
    fns[remainder] = make_train_chunk(model, tx, config, mesh, remainder, train_step)
  schedule = [(i * k, k) for i in range(steps_per_epoch // k)]
  if remainder:
    schedule.append((steps_per_epoch - remainder, remainder))

  def run(state, images, labels, perm, on_chunk=None):
    sums = []
    for start, n in schedule:
      state, m = fns[n](state, images, labels, perm, start)
      sums.append(m)
      if on_chunk is not None:
        on_chunk(start + n, state, sums)
    return state, sums

  return run


def _tta_views(images, tta: str):
  """Test-time views of a batch [N, H, W, C]: [V, N, H, W, C]."""
  if tta == "none":
    return images[None]
  if tta == "flip":
    return jnp.stack([images, images[:, :, ::-1]])
  if tta == "tencrop":  # 4 corners + centre of the image padded by 4 (edge), and their flips
    n, h, w, c = images.shape
    pad = 4
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    offsets = [(0, 0), (0, 2 * pad), (2 * pad, 0), (2 * pad, 2 * pad), (pad, pad)]
    crops = [padded[:, y:y + h, x:x + w] for y, x in offsets]
    return jnp.stack(crops + [v[:, :, ::-1] for v in crops])
  raise ValueError(f"eval.tta={tta!r}: expected none, flip or tencrop")


def tta_words(tta: str) -> str:
  """'no TTA', 'flip TTA', 'tencrop TTA': for messages."""
  return "no TTA" if tta == "none" else f"{tta} TTA"


def make_predict(model, tta: str):
  """jitted predict(variables, images uint8) -> softmax probabilities, averaged over TTA views.

  The views go through the network one after the other (lax.map, not vmap): ten-crop TTA then
  needs the activation memory of one batch, not of ten (a vmapped ten-crop evaluation of
  configs/strong.py at eval batch 500 took over 16 GB on the CPU).
  """

  def predict(variables, images):
    views = _tta_views(images.astype(jnp.float32), tta)
    logits = jax.lax.map(lambda v: model.apply(variables, v, train=False), views)
    return jax.nn.softmax(logits.astype(jnp.float32), -1).mean(0)

  return jax.jit(predict)


def predict_probs(predict_fn, variables, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """Probabilities for every image, in fixed-size padded batches sharded over `data`."""
  ndev = mesh.devices.size
  batch_size = int(math.ceil(batch_size / ndev) * ndev)
  sharding = NamedSharding(mesh, P("data"))
  out = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
    probs = predict_fn(variables, jax.device_put(batch, sharding))
    if not probs.is_fully_addressable:  # several processes: each holds its devices' rows
      probs = multihost_utils.process_allgather(probs, tiled=True)
    out.append(np.asarray(probs)[:n])
  return np.concatenate(out) if out else np.zeros((0, NUM_CLASSES), np.float32)


# ----------------------------------------------------------------------------- state


def make_mesh():
  """A one-axis `data` mesh over every device (GSPMD-style, `Auto` axis)."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def init_compiler_options() -> dict | None:
  """XLA options for a program run once, such as a model's random initialisers: on the CPU the
  lowest optimisation level, which compiles them 5-7x faster (configs/strong.py's init 1.3 s
  against 6.1 s on the 2-core CPU, the tiny ResNet of its runlocal 1.1 s against 7.8 s) for a
  last-bit difference in a few percent of the weights. Every init that must equal
  create_train_state's (fer.search's groups, fer.features' seeded VGG16 base) compiles with
  these; other backends compile as usual."""
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def create_train_state(config, model, tx_fn, mesh, sample_shape, sample_dtype=jnp.uint8):
  """Initialises a replicated TrainState with a sharded `jit(init)` (no host round trip)."""
  replicated = NamedSharding(mesh, P())

  def init(rng):
    k_init, k_train = jax.random.split(rng)
    variables = model.init({"params": k_init, "dropout": k_init},
                           jnp.zeros((1,) + tuple(sample_shape), sample_dtype), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx_fn(params).init(params), rng=k_train,
                      ema=initial_ema(config, params, batch_stats))

  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  shardings = jax.tree.map(lambda _: replicated, abstract)
  state = jax.jit(init, out_shardings=shardings, compiler_options=init_compiler_options())(rng)
  return state, shardings


def _abstract(state_or_shapes, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state_or_shapes, shardings)


# ----------------------------------------------------------------------------- outputs


class _Writer:
  """metrics.jsonl (rewritten atomically from the history) and TensorBoard events; nothing where
  not `active` (processes 1.. of a multi-process run)."""

  def __init__(self, workdir, active=True):
    self.workdir = pathlib.Path(workdir)
    self.active = active
    self._tb = None
    if not active:
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(str(self.workdir / "tb"))
    except ImportError:  # pragma: no cover
      logging.warning("tensorboardX is not installed: no TensorBoard events")

  def write(self, history, new_row):
    if not self.active:
      return
    fileio.write_json_atomic(self.workdir / "metrics.jsonl", history, jsonl=True)
    if self._tb is not None:
      for k, v in new_row.items():
        if isinstance(v, (int, float)) and k not in ("epoch", "step"):
          self._tb.add_scalar(k, v, new_row["step"])
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parent, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def format_duration(seconds) -> str:
  """H:MM:SS, for progress lines."""
  seconds = int(max(0, seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def load_data(config, workdir):
  """{'train', 'val', 'test'} -> {'image', 'label'} arrays: the images (uint8 [N, 48, 48, 1]) or,
  for a model trained on cached features, those features (FER2013's test also 'train_copy':
  input_pipeline.load_splits)."""
  if config.model.name == "vgg16_head":
    from fer import features  # pylint: disable=import-outside-toplevel
    return features.load_or_compute(config, workdir)
  from fer import input_pipeline  # pylint: disable=import-outside-toplevel
  return input_pipeline.load_splits(config.input)


# ----------------------------------------------------------------------------- the loop


@contextlib.contextmanager
def stop_on_sigterm():
  """SIGTERM (a scheduler's preemption notice, `timeout`, run_study's deadline) asks the loop
  to stop after the epoch in progress, saved; a second SIGTERM ends the process at once. Yields
  a function saying whether a stop was asked, agreed by all processes of a multi-process run
  (each may get the signal in a different epoch: they stop at the first one any of them saw).
  Outside the main thread, where Python cannot handle signals, nothing changes."""
  asked = []
  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.getsignal(signal.SIGTERM) if main_thread else None
  previous = signal.SIG_DFL if previous is None else previous  # set outside Python

  def handler(signum, frame):
    del frame
    asked.append(signum)
    signal.signal(signal.SIGTERM, previous)
    print("SIGTERM: stopping after this epoch, which is saved (a second SIGTERM stops at once).",
          flush=True)

  def stop_asked() -> bool:
    if jax.process_count() == 1:
      return bool(asked)
    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(asked)))))

  if main_thread:
    signal.signal(signal.SIGTERM, handler)
  try:
    yield stop_asked
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data: dict | None = None, resume_may_change: tuple = ()) -> dict:
  """Trains, checkpoints, resumes, and evaluates the test split once at the end.

  `data`, a dict as `load_data` returns it, is used instead of loading (fer/search.py passes
  its preloaded splits). A run in `workdir` resumes only under the same config, but for the keys
  in RESUME_MAY_CHANGE and `resume_may_change` (the search's rungs raise train.num_epochs).
  Returns the results dict that is also written to `workdir/results.json`.
  """
  validate_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with checkpointing.WorkdirLock(workdir) if is_primary() else contextlib.nullcontext():
    check_same_config(config, workdir, RESUME_MAY_CHANGE + tuple(resume_may_change))
    return _train_and_evaluate(config, workdir, data)


def is_primary() -> bool:
  """Whether this process writes the run's files: always, but for processes 1.. of a
  multi-process run (fer.main --multihost)."""
  return jax.process_index() == 0


def _load_data_once(config, workdir):
  """load_data, by process 0 first where several processes share the data dir (a first run
  prepares it), then by the others."""
  if jax.process_count() == 1:
    return load_data(config, workdir)
  if not is_primary():
    multihost_utils.sync_global_devices("fer: data prepared")
  data = load_data(config, workdir)
  if is_primary():
    multihost_utils.sync_global_devices("fer: data prepared")
  return data


# Keys a run may be resumed with other values of: where the data is, how evaluation is batched,
# how often it checkpoints and logs. Anything else would mix two configs in one run.
RESUME_MAY_CHANGE = ("input.archive", "input.data_dir", "input.eval_batch_size",
                     "checkpoint.every_epochs", "train.log_every_steps",
                     "train.steps_per_dispatch")


def flatten_config(config) -> dict:
  """{'model.conv_features': (32, 64), ...} of a ConfigDict or nested dict."""
  d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update({f"{key}.{k}": v for k, v in flatten_config(value).items()})
    else:
      out[key] = value
  return out


def check_same_config(config, workdir, may_change=RESUME_MAY_CHANGE):
  """Raises ConfigError when `workdir` holds a run (a checkpoint or results) started with other
  values for keys outside `may_change` (config.json against `config`). Keys only one side has
  (added to or dropped from the configs since) are not compared."""
  old_file = workdir / "config.json"
  last = workdir / "checkpoints" / "last"
  started = (workdir / "results.json").exists() or (
      last.is_dir() and any(p.name.isdigit() for p in last.iterdir()))
  if not (started and old_file.is_file()):
    return
  try:
    old = flatten_config(json.loads(old_file.read_text()))
  except ValueError as e:
    raise ConfigError(f"{old_file} is not readable JSON ({e}); restore it from a copy, or use a "
                      "new --workdir") from e
  new = flatten_config(json.loads(config.to_json_best_effort()))
  changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
             if old[k] != new[k] and k not in may_change]
  if changed:
    raise ConfigError(
        f"{workdir} holds a run started with another config ({old_file}): "
        + "; ".join(changed) + ". Continuing it would mix the two configs: use a new --workdir "
        "for the new one, or repeat the run's own values to resume it.")


def _train_and_evaluate(config, workdir, data=None):
  results_path = workdir / "results.json"
  if results_path.exists():
    results = json.loads(results_path.read_text())
    print(f"{workdir} is complete: val/accuracy {results['val/accuracy']:.4f}, test/accuracy "
          f"{results['test/accuracy']:.4f}. Delete {results_path} to evaluate again.", flush=True)
    return results
  if is_primary():
    fileio.write_json_atomic(workdir / "config.json", json.loads(config.to_json_best_effort()))

  data = _load_data_once(config, workdir) if data is None else data
  train_x, train_y = data["train"]["image"], data["train"]["label"]
  num_train = len(train_x)
  batch_size = config.input.batch_size
  steps_per_epoch = num_train // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"input.batch_size={batch_size} is larger than the {num_train} training "
                     "images")
  num_epochs = config.train.num_epochs

  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  model = build_model(config.model)
  tx_fn = lambda params: optim.make_optimizer(config.optim, params, steps_per_epoch,
                                              num_epochs)[0]
  try:
    state, shardings = create_train_state(config, model, tx_fn, mesh, train_x.shape[1:],
                                          train_x.dtype)
  except (ValueError, TypeError, ZeroDivisionError, re.error) as e:
    # The model does not fit the images (e.g. more pooling stages than pixels), or the optimiser
    # config does not fit the model (optim.freeze matching nothing, a bad regex).
    raise ConfigError(f"config.model / config.optim cannot be set up for {train_x.shape[1:]} "
                      f"inputs: {type(e).__name__}: {e}") from e
  tx = tx_fn(state.params)
  num_params = count_params(state.params)

  ckpts = checkpointing.Checkpoints(workdir, config.checkpoint.max_to_keep)
  meta = {"epoch": 0, "history": [], "best_val_accuracy": -1.0, "best_epoch": 0,
          "epochs_without_improvement": 0, "train_seconds": 0.0, "stopped_early": False}
  restored = checkpointing.Checkpoints.restore(ckpts.last, _abstract(state, shardings))
  if restored is not None:
    _, state, meta = restored
    print(f"Resuming {workdir} after epoch {meta['epoch']} (step {int(state.step)}).", flush=True)
    if is_primary():  # metrics.jsonl may lag a kill
      fileio.write_json_atomic(workdir / "metrics.jsonl", meta["history"], jsonl=True)
  elif config.init_from or config.pretrained.weights != "none":
    state = _initialise_from(config, state, shardings)

  devices = jax.devices()
  print(f"{num_params:,} parameters; {num_train} train / {len(data['val']['image'])} val / "
        f"{len(data['test']['image'])} test images; {len(devices)} x {devices[0].device_kind}"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
        + f"; batch {batch_size}, {steps_per_epoch} steps per epoch"
        + (f"; conv_impl {model.conv_impl}" if hasattr(model, "conv_impl") else "")
        + ("; fer.native CPU kernels" if native.available() else "") + ".",
        flush=True)

  class_weights = metrics_lib.class_weights(train_y, NUM_CLASSES, config.optim.class_weights)
  if class_weights is not None:
    print(f"Loss weights per class ({config.optim.class_weights}, from the train split): "
          + ", ".join(f"{c} {w:.2f}" for c, w in zip(CLASSES, class_weights)) + ".", flush=True)

  images = jax.device_put(train_x, replicated)
  labels = jax.device_put(train_y.astype(np.int32), replicated)
  teachers = None
  if config.distill.targets:
    from fer import distill  # pylint: disable=import-outside-toplevel
    soft, teachers = distill.load_targets(config, train_x)
    labels = (labels, jax.device_put(soft, replicated))
    if is_primary():
      agree = float((soft.argmax(1) == train_y).mean())
      print(f"Distilling from {len(teachers['teachers'])} teacher run(s) "
            f"({', '.join(t['workdir'] for t in teachers['teachers'])}; {config.distill.targets}): "
            f"targets = {1 - config.distill.weight:g} x label + {config.distill.weight:g} x "
            f"teacher probabilities at temperature {config.distill.temperature:g}; the teachers "
            f"agree with {agree:.1%} of the train labels.", flush=True)
  data_key = jax.random.PRNGKey(config.seed + 1)
  epoch_perm = jax.jit(lambda epoch: jax.random.permutation(jax.random.fold_in(data_key, epoch),
                                                            num_train), out_shardings=replicated)
  run_epoch = make_epoch_runner(model, tx, config, mesh, steps_per_epoch,
                                train_step=make_train_step(model, tx, config, class_weights))
  predict = make_predict(model, "none")
  writer = _Writer(workdir, active=is_primary())
  log_every = max(1, config.train.log_every_steps)

  try:
    epoch = meta["epoch"]
    epoch_walls = []
    every, pending_best = config.checkpoint.every_epochs, None
    with stop_on_sigterm() as stop_asked:
      while epoch < num_epochs and not meta["stopped_early"]:
        t0 = time.perf_counter()
        perm = epoch_perm(epoch)
        log = {"step": 0, "time": t0}

        def on_chunk(done, state, sums, epoch=epoch, log=log):
          checkpointing.fault_point("chunk")  # test hook (FER_FAULT); a no-op otherwise
          if done - log["step"] < log_every or done >= steps_per_epoch:
            return
          loss_so_far = float(sum(s["loss"] for s in sums)) / done
          _check_finite(loss_so_far, int(state.step), ckpts, workdir)
          now = time.perf_counter()
          rate = (done - log["step"]) * batch_size / max(now - log["time"], 1e-9)
          eta = (steps_per_epoch - done) * batch_size / rate
          print(f"  epoch {epoch + 1}/{num_epochs} step {done}/{steps_per_epoch} | "
                f"{rate:,.0f} img/s | loss {loss_so_far:.4f} | epoch ETA {format_duration(eta)}",
                flush=True)
          log.update(step=done, time=now)

        state, sums = run_epoch(state, images, labels, perm, on_chunk)
        train_loss = float(sum(s["loss"] for s in sums)) / steps_per_epoch
        train_acc = float(sum(s["correct"] for s in sums)) / (steps_per_epoch * batch_size)
        _check_finite(train_loss, int(state.step), ckpts, workdir)
        train_time = time.perf_counter() - t0

        variables = eval_variables(state)
        val_probs = predict_probs(predict, variables, data["val"]["image"],
                                  config.input.eval_batch_size, mesh)
        val = metrics_lib.classification_metrics(val_probs, data["val"]["label"], "val")
        epoch += 1
        meta["train_seconds"] += train_time
        row = {"epoch": epoch, "step": int(state.step), "train/loss": train_loss,
               "train/accuracy": train_acc, "val/loss": val["val/loss"],
               "val/accuracy": val["val/accuracy"],
               "train/images_per_second": steps_per_epoch * batch_size / train_time,
               "train/learning_rate": float(optim.make_schedule(
                   config.optim, steps_per_epoch, num_epochs)(int(state.step))),
               "epoch_seconds": time.perf_counter() - t0}
        meta["history"].append(row)
        meta["epoch"] = epoch
        improved = val["val/accuracy"] > meta["best_val_accuracy"]
        if improved:
          meta["best_val_accuracy"] = val["val/accuracy"]
          meta["best_epoch"] = epoch
          meta["epochs_without_improvement"] = 0
        else:
          meta["epochs_without_improvement"] += 1
        patience = config.train.early_stopping_epochs
        if patience and meta["epochs_without_improvement"] >= patience:
          meta["stopped_early"] = True
        # SIGTERM: this epoch is saved and the run stops (one with epochs to go; else it ends).
        stop = stop_asked() and epoch < num_epochs and not meta["stopped_early"]
        save_now = epoch % every == 0 or epoch == num_epochs or meta["stopped_early"] or stop
        if improved:  # else saved with the next last/: a copy, as the next epoch donates `state`
          pending_best = ((epoch, state, meta, val["val/accuracy"]) if save_now else
                          (epoch, jax.tree.map(lambda x: x.copy(), state), copy.deepcopy(meta),
                           val["val/accuracy"]))
        if save_now:
          if pending_best:
            ckpts.save_best(*pending_best)
            pending_best = None
          ckpts.save_last(epoch, state, meta)
        writer.write(meta["history"], row)
        # The ETA uses the median of this process's last 5 epochs, so one slow epoch (a paused
        # process, a busy machine) does not swing it.
        epoch_walls.append(time.perf_counter() - t0)
        remaining = (num_epochs - epoch) * float(np.median(epoch_walls[-5:]))
        print(f"epoch {epoch}/{num_epochs} | {row['train/images_per_second']:,.0f} img/s | "
              f"train loss {train_loss:.4f} acc {train_acc:.4f} | val loss {val['val/loss']:.4f} "
              f"acc {val['val/accuracy']:.4f}{' *' if improved else ''} | "
              f"{format_duration(row['epoch_seconds'])} per epoch, "
              f"ETA {format_duration(remaining)}",
              flush=True)
        if meta["stopped_early"]:
          print(f"Early stop: no better val accuracy for {patience} epochs.", flush=True)
        if stop:
          raise Stopped(f"stopped by SIGTERM after epoch {epoch}/{num_epochs}, saved in "
                        f"{workdir}/checkpoints/last/{epoch}: the same command resumes it")

    results = _final_evaluation(config, workdir, ckpts, state, shardings, data, mesh, model,
                                meta, num_params, teachers)
  finally:
    writer.close()
    ckpts.close()
  return results


def _check_finite(loss, step, ckpts, workdir):
  if not math.isfinite(loss):
    last = ckpts.last.latest_step()
    kept = (f"the last good checkpoint (epoch {last}) is kept in {workdir}/checkpoints/last"
            if last is not None else "no checkpoint had been written yet")
    raise TrainingDivergedError(
        f"Training diverged: the loss is {loss} at step {step}; {kept}. Lower "
        "optim.learning_rate, set optim.grad_clip_norm, or check the input data.")


def _initialise_from(config, state, shardings):
  """Params (and batch stats) from `config.init_from` and/or pretrained weights; the rest of the
  state stays freshly initialised."""
  from fer import pretrained  # pylint: disable=import-outside-toplevel
  params, batch_stats = state.params, state.batch_stats
  # A head-only model (vgg16_head) trains on features that already hold the pretrained base.
  if config.pretrained.weights != "none" and config.model.name != "vgg16_head":
    loaded = pretrained.load_pretrained(config.pretrained)
    params = pretrained.merge_params(params, loaded, reset_regex=r"^head")
  if config.init_from:
    try:
      src = load_variables(config.init_from)
    except checkpointing.CheckpointError as e:  # runs.RunError: missing, unfinished, damaged
      raise ConfigError(f"config.init_from={config.init_from!r}: {e}. Point it at a finished "
                        "run's workdir or checkpoint (train that run first), or set "
                        "--config.init_from='' to start without it.") from e
    params = pretrained.merge_params(params, src["params"], reset_regex=None)
    if src.get("batch_stats"):
      batch_stats = pretrained.merge_params(batch_stats, src["batch_stats"], reset_regex=None)
  state = state.replace(params=params, batch_stats=batch_stats,
                        ema=initial_ema(config, params, batch_stats))
  return jax.device_put(state, shardings)


def load_variables(path) -> dict:
  """{'params', 'batch_stats'} (numpy) of a run's best checkpoint (a workdir) or of a checkpoint
  dir, whatever device topology it was saved on."""
  from fer import runs  # pylint: disable=import-outside-toplevel
  return runs.restore_variables(runs.resolve_checkpoint(checkpoint=path))


def copy_words(results: dict, dropped: bool = False) -> str:
  """' On the test faces without a near copy in train (N have one): test/accuracy A.' where
  results have it (FER2013 runs), else ''. With `dropped` (input.drop_train_copies), the copies
  were in train before the run dropped them, and the sentence says so."""
  clean = results.get("test/accuracy_no_train_copy")
  if clean is None:
    return ""
  n = results["test/train_copies"]
  had = (f"{n:,} had one, which input.drop_train_copies took out of train" if dropped else
         f"{n:,} have one")
  return (f" On the test faces without a near copy in train ({had}): test/accuracy "
          f"{clean:.4f}.")


def _final_evaluation(config, workdir, ckpts, state, shardings, data, mesh, model, meta,
                      num_params, teachers=None):
  """Restores the best checkpoint (by val accuracy) and evaluates val and, once, test.
  `teachers`: the summary of the distill.targets file, if any (its runs go into results)."""
  from fer import plots  # pylint: disable=import-outside-toplevel
  best = checkpointing.Checkpoints.restore(ckpts.best, _abstract(state, shardings))
  if best is None:
    raise checkpointing.CheckpointError(f"{workdir}/checkpoints/best holds no checkpoint")
  best_epoch, best_state, _ = best
  variables = eval_variables(best_state)
  predict = make_predict(model, config.eval.tta)
  split_metrics, split_probs = {}, {}
  for split in ("val", "test"):
    # Ten-crop TTA over PrivateTest takes minutes on a CPU: say what runs and how long it took.
    if is_primary():
      print(f"Evaluating the best checkpoint (epoch {best_epoch}) on {split}: "
            f"{len(data[split]['label'])} images, {tta_words(config.eval.tta)} ...", flush=True)
    start = time.perf_counter()
    probs = predict_probs(predict, variables, data[split]["image"],
                          config.input.eval_batch_size, mesh)
    split_metrics[split] = metrics_lib.classification_metrics(probs, data[split]["label"], split)
    split_probs[split] = probs
    if is_primary():
      print(f"  {split}/accuracy {split_metrics[split][f'{split}/accuracy']:.4f} "
            f"({time.perf_counter() - start:.0f} s)", flush=True)
      fileio.save_npy_atomic(workdir / f"{split}_probs.npy", probs.astype(np.float32))
  devices = jax.devices()
  results = {
      "val/accuracy": split_metrics["val"]["val/accuracy"],
      "test/accuracy": split_metrics["test"]["test/accuracy"],
      "num_params": num_params,
      "train_seconds": meta["train_seconds"],
      "best_epoch": best_epoch,
      "epochs_trained": meta["epoch"],
      "stopped_early": meta["stopped_early"],
      "tta": config.eval.tta,
      "classes": list(CLASSES),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "process_count": jax.process_count(),
      "platform": devices[0].platform,
      "conv_impl": getattr(model, "conv_impl", None),  # model.conv_impl=auto, resolved
      "native_kernels": native.available(),  # fer.native's C++ kernels (CPU only)
      "git_commit": git_commit(),
      **split_metrics["val"], **split_metrics["test"],
      **metrics_lib.calibration(split_probs["val"], data["val"]["label"], split_probs["test"],
                                data["test"]["label"]),
  }
  if teachers:
    results["distill_teachers"] = [t["workdir"] for t in teachers["teachers"]]
  if "train_copy" in data["test"]:  # FER2013: a quarter of PrivateTest has a copy in Training
    results.update(metrics_lib.copy_metrics(split_probs["test"], data["test"]["label"],
                                            data["test"]["train_copy"]))
  if is_primary():
    plots.reliability_diagram(
        {"test": metrics_lib.reliability_curves(split_probs["test"], data["test"]["label"],
                                                results["temperature"])},
        workdir / "reliability.png", title="calibration: test reliability")
    plots.confusion_matrix(np.array(results["test/confusion_matrix"]), CLASSES,
                           workdir / "confusion_matrix.png",
                           title=f"test accuracy {results['test/accuracy']:.3f}")
    plots.learning_curves(meta["history"], workdir / "learning_curves.png")
    fileio.write_json_atomic(workdir / "results.json", results)
  print(f"Best epoch {best_epoch}: val/accuracy {results['val/accuracy']:.4f}, test/accuracy "
        f"{results['test/accuracy']:.4f}, test/macro_f1 {results['test/macro_f1']:.4f} "
        f"({tta_words(config.eval.tta)})."
        f"{copy_words(results, config.input.get('drop_train_copies', False))} Results in "
        f"{workdir}/results.json", flush=True)
  return results
