"""Architecture search: grid or random trials over a space defined beside the config, successive
halving, vmapped groups of trials, resume, and a report. `run(config, workdir)`; see
configs/search.py for the keys and configs/search_space.py for the spaces.

A trial is the base config (configs/<search.base>.py with the command line's overrides) plus one
override dict of the space. Trials are trained on train and scored on val only: the real test
split is dropped right after loading, and inside the search a trial's "test" split *is* the val
split (fer.train.train_and_evaluate evaluates "test" at the end, so its "test/..." numbers in a
trial folder are val numbers). Data is loaded once per search.

Successive halving: every trial trains for `halving.min_epochs`; the best 1/eta by val accuracy
continue, from their checkpoints, to eta times that budget, and so on up to `epochs_per_trial`.

Trials that differ only in VMAPPED_KEYS (learning rate, weight decay, seed) train together:
`train_group` stacks their parameters and optimizer states and runs one jitted program with
`jax.vmap` over them (learning rate and weight decay are per-trial arrays through
`optax.inject_hyperparams`); all members see the same batches in the same order (the first
member's data seed). Dropout rate, batch size and everything else are structure. On XLA:CPU
vmapped convolutions become grouped convolutions and a group of 8 trains about 4x slower than 8
separate runs, so `search.vmap='auto'` trains groups only on an accelerator
(experiments/results/benchmark_vmap_search.md).

Workdir:
  trials.jsonl      append-only, one line per trial and rung (status ok or failed); a rerun skips
                    the (trial, budget) pairs found there and resumes the rest from checkpoints
  trials/<name>/    each trial's own run: config.json, metrics.jsonl, results.json, checkpoints
  groups/<name>/    the stacked checkpoints of a vmapped group
  report.md         the top-k table; search.png: val accuracy against parameters and wall time
  best_config.py    the best trial of the largest budget as a config for `python -m fer.main`
"""

import copy
import dataclasses
import datetime
import hashlib
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from configs import search_space
from fer import checkpointing
from fer import fileio
from fer import metrics as metrics_lib
from fer import optim
from fer import train
from fer.models import build_model

# Per-trial arrays inside a vmapped group; every other config key is structure.
VMAPPED_KEYS = ("optim.learning_rate", "optim.weight_decay", "seed")
# Set by the search per rung, or machine-specific: not part of a trial's identity.
_BUDGET_KEYS = ("train.num_epochs",)
_MACHINE_KEYS = ("input.archive", "input.data_dir")


# ----------------------------------------------------------------------------- trials


def _hash(obj, n=8) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def apply_overrides(base: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `base` with {'group.key': value} overrides; an unknown key is a KeyError."""
  c = copy.deepcopy(base)
  for key, value in overrides.items():
    *groups, name = key.split(".")
    node = c
    for group in groups:
      if group not in node:
        raise KeyError(f"search space key {key!r}: the config has no group {group!r}")
      node = node[group]
    if name not in node:
      raise KeyError(f"search space key {key!r}: the config has no such key")
    node[name] = value
  return c


def trial_base(config) -> ml_collections.ConfigDict:
  """The search config without its `search` group: what every trial starts from."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    if "search" in c:
      del c["search"]
    c.job = "train"
  return c


def trial_key(config) -> str:
  """Identity of a trial config (its budget and data paths left out)."""
  flat = train.flatten_config(config)
  return _hash({k: v for k, v in flat.items() if k not in _BUDGET_KEYS + _MACHINE_KEYS})


def structure_key(config) -> str:
  """Identity of a trial's structure: its config without VMAPPED_KEYS."""
  flat = train.flatten_config(config)
  skip = _BUDGET_KEYS + _MACHINE_KEYS + VMAPPED_KEYS
  return _hash({k: v for k, v in flat.items() if k not in skip}, 6)


@dataclasses.dataclass
class Trial:
  index: int
  overrides: dict
  config: ml_collections.ConfigDict
  id: str = ""
  structure: str = ""
  baseline: bool = False

  def __post_init__(self):
    self.id = trial_key(self.config)
    self.structure = structure_key(self.config)

  @property
  def name(self) -> str:
    return f"{self.index:03d}-{self.id}"


def space_overrides(search_cfg) -> list[dict]:
  """The override dicts of the search's strategy and space, in trial order."""
  if search_cfg.strategy == "grid":
    return search_space.grid_space(search_cfg.space)
  if search_cfg.strategy == "random":
    per = max(1, search_cfg.trials_per_structure)
    out = []
    for i in range(math.ceil(search_cfg.num_trials / per)):
      sample = search_space.random_space(np.random.default_rng([search_cfg.seed, i]),
                                         search_cfg.space)
      out.append(sample)
      for m in range(1, per):  # the same structure with other scalars (a vmapped group)
        draw = search_space.random_space(np.random.default_rng([search_cfg.seed, i, m]),
                                         search_cfg.space)
        out.append({**sample, **{k: draw[k] for k in VMAPPED_KEYS if k in draw}})
    return out[:search_cfg.num_trials]
  raise ValueError(f"search.strategy={search_cfg.strategy!r}: expected grid or random")


def make_trials(config) -> list[Trial]:
  """The search's trials; duplicates dropped; the base config itself flagged (or appended) as the
  baseline when search.include_baseline."""
  base = trial_base(config)
  trials, seen = [], set()
  for overrides in space_overrides(config.search):
    t = Trial(len(trials), dict(overrides), apply_overrides(base, overrides))
    if t.id not in seen:
      seen.add(t.id)
      trials.append(t)
  if config.search.include_baseline:
    baseline = Trial(len(trials), {}, base, baseline=True)
    same = [t for t in trials if t.id == baseline.id]
    if same:
      same[0].baseline = True
    else:
      trials.append(baseline)
  return trials


def rung_epochs(search_cfg) -> list[int]:
  """Epoch budgets of the rungs: [epochs_per_trial] or min_epochs * eta^k, ..., epochs_per_trial."""
  final = int(search_cfg.epochs_per_trial)
  if final < 1:
    raise ValueError(f"search.epochs_per_trial={final}: expected >= 1")
  if not search_cfg.halving.enabled:
    return [final]
  eta, epochs = search_cfg.halving.eta, search_cfg.halving.min_epochs
  if eta < 2 or epochs < 1:
    raise ValueError(f"search.halving: eta={eta} (>= 2) and min_epochs={epochs} (>= 1) expected")
  rungs = []
  while epochs < final:
    rungs.append(int(epochs))
    epochs *= eta
  return rungs + [final]


def promote(trials, records, epochs, eta) -> list[Trial]:
  """The best len/eta (at least 1) of the trials finished ok at `epochs`, plus the baseline."""
  ok = [t for t in trials if records.get((t.id, epochs), {}).get("status") == "ok"]
  ranked = sorted(ok, key=lambda t: (-records[(t.id, epochs)]["val/accuracy"], t.index))
  keep = ranked[:max(1, len(ranked) // eta)]
  keep += [t for t in ok if t.baseline and t not in keep]
  return sorted(keep, key=lambda t: t.index)


def _with_epochs(config, epochs):
  c = copy.deepcopy(config)
  c.train.num_epochs = int(epochs)
  return c


# ----------------------------------------------------------------------------- size and cost


def describe(config, sample_shape, sample_dtype=jnp.uint8) -> dict:
  """{'num_params', 'flops'} (forward FLOPs per image, from XLA's cost analysis) of a trial's
  model; ValueError for a structure that cannot work (e.g. more pooling than pixels)."""
  m = config.model
  if m.name == "cnn" and m.pool != "none":
    size = min(sample_shape[:2]) // 2 ** len(m.conv_features)
    if size < 1:
      raise ValueError(f"bad combination: {len(m.conv_features)} pooling stages shrink the "
                       f"{sample_shape[0]}x{sample_shape[1]} input to nothing")
  model = build_model(m)
  x = jax.ShapeDtypeStruct((1, *sample_shape), sample_dtype)
  variables = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
      jnp.zeros(x.shape, x.dtype), train=False))
  cost = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).cost_analysis()
  flops = (cost or {}).get("flops") if isinstance(cost, dict) else None
  return {"num_params": train.count_params(variables["params"]),
          "flops": None if flops is None else float(flops)}


# ----------------------------------------------------------------------------- vmapped groups


def groupable(config) -> bool:
  """Whether train_group can train this config (no freezing, per-path lr, warm start or TTA)."""
  return (not config.optim.freeze and not config.optim.get("lr_scales") and not config.init_from
          and config.pretrained.weights == "none" and config.eval.tta == "none")


def group_optimizer(optim_cfg, steps_per_epoch, num_epochs, decay: bool):
  """fer.optim.make_optimizer's chain (no freezing or lr_scales) with the base learning rate and
  the weight decay as injected hyperparameters: per-member arrays in the optimizer state.

  `decay`: whether any member has weight decay (adam/sgd add it to the gradient; 0 adds nothing).
  """
  def factory(learning_rate, weight_decay):
    schedule = optim.make_schedule(optim_cfg, steps_per_epoch, num_epochs, base_lr=learning_rate)
    parts = [optax.clip_by_global_norm(optim_cfg.grad_clip_norm)] if optim_cfg.grad_clip_norm else []
    if optim_cfg.name == "adamw":
      parts.append(optax.adamw(schedule, weight_decay=weight_decay,
                               mask=optim._kernel_mask))  # pylint: disable=protected-access
    else:
      if decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=optim._kernel_mask))  # pylint: disable=protected-access
      parts.append(optim._base_optimizer(optim_cfg, schedule))  # pylint: disable=protected-access
    return optax.chain(*parts)

  return optax.inject_hyperparams(factory)(learning_rate=0.0, weight_decay=0.0)


def make_group_init(model, tx, sample_shape, sample_dtype, config=None):
  """init(keys [G], lrs [G], wds [G]) -> a TrainState stacked over G members; member g equals
  fer.train.create_train_state's state for seed g (same init and rng split). `config`: the
  members' shared config (its optim.ema_decay); None: no moving average."""

  def one(rng, lr, wd):
    k_init, k_train = jax.random.split(rng)
    variables = model.init({"params": k_init, "dropout": k_init},
                           jnp.zeros((1,) + tuple(sample_shape), sample_dtype), train=False)
    params = variables["params"]
    opt_state = tx.init(params)
    hyper = dict(opt_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32),
                 weight_decay=jnp.asarray(wd, jnp.float32))  # not weakly typed: no recompile
    batch_stats = variables.get("batch_stats", {})
    return train.TrainState(step=jnp.zeros([], jnp.int32), params=params,
                            batch_stats=batch_stats,
                            opt_state=opt_state._replace(hyperparams=hyper), rng=k_train,
                            ema=train.initial_ema(config, params, batch_stats) if config else {})

  return jax.vmap(one)


def make_group_step(model, tx, config, class_weights=None):
  """fer.train's train step vmapped over a stacked state: every member on the same batch;
  returns per-member (loss [G], correct [G]). `class_weights` as in fer.train.make_train_step."""
  return jax.vmap(train.make_train_step(model, tx, config, class_weights),
                  in_axes=(0, None, None))


def make_group_chunk(model, tx, config, mesh, num_steps: int, class_weights=None):
  """fer.train.make_train_chunk for a stacked state; returns {'loss': [G], 'correct': [G]} sums."""
  return train.make_train_chunk(model, tx, config, mesh, num_steps,
                                train_step=make_group_step(model, tx, config, class_weights))


def make_group_predict(model):
  """predict(stacked variables, images [B, ...]) -> probabilities [B, G, K] (batch first, for
  fer.train.predict_probs)."""

  def predict(variables, images):
    x = images.astype(jnp.float32)
    logits = jax.vmap(lambda v: model.apply(v, x, train=False))(variables)
    return jnp.swapaxes(jax.nn.softmax(logits.astype(jnp.float32), -1), 0, 1)

  return jax.jit(predict)


def _abstract(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def train_group(configs, workdir, data, sources=None, names=None) -> list[dict]:
  """Trains G configs that share a structure (differing in VMAPPED_KEYS only) as one vmapped
  program for configs[0].train.num_epochs epochs, checkpointing the stacked state every epoch
  (a rerun resumes). Scores each member on data['val'] every epoch.

  sources: [(group_dir, member_index)] per config to continue from another group's last
  checkpoint (successive halving) instead of initialising.
  Returns per member: val/accuracy and val/loss of its best epoch, best_epoch, epochs_trained,
  train_seconds (the group's), history (metrics.jsonl rows), diverged (None or a message).
  """
  c0 = configs[0]
  if len({structure_key(c) for c in configs}) != 1:
    raise ValueError("train_group: the configs differ in more than " + ", ".join(VMAPPED_KEYS))
  if not groupable(c0):
    raise ValueError("train_group: optim.freeze, optim.lr_scales, init_from, pretrained "
                     "weights and eval.tta other than none are not supported")
  train.validate_config(c0)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  names = names or [str(i) for i in range(len(configs))]
  train_x = data["train"]["image"]
  num_train, batch_size = len(train_x), c0.input.batch_size
  steps_per_epoch = num_train // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"input.batch_size={batch_size} is larger than the {num_train} training "
                     "images")
  num_epochs, size = c0.train.num_epochs, len(configs)

  mesh = train.make_mesh()
  replicated = NamedSharding(mesh, P())
  model = build_model(c0.model)
  tx = group_optimizer(c0.optim, steps_per_epoch, num_epochs,
                       decay=any(c.optim.weight_decay for c in configs))
  init = jax.jit(make_group_init(model, tx, train_x.shape[1:], train_x.dtype, c0),
                 out_shardings=replicated, compiler_options=train.init_compiler_options())


  with checkpointing.WorkdirLock(workdir):
    fileio.write_json_atomic(workdir / "group.json", {"members": names})
    ckpts = checkpointing.Checkpoints(workdir, max_to_keep=1)
    try:
      restored = checkpointing.Checkpoints.restore(ckpts.last,
                                                   _abstract_group(init, size, replicated))
      if restored is not None:
        _, state, meta = restored
        print(f"Resuming group {workdir.name} after epoch {meta['epoch']}.", flush=True)
      elif sources:
        state, meta = _gather_members(sources, init, replicated)
        meta["members"] = names
      else:
        state = init(jnp.stack([jax.random.PRNGKey(c.seed) for c in configs]),
                     jnp.asarray([c.optim.learning_rate for c in configs], jnp.float32),
                     jnp.asarray([c.optim.weight_decay for c in configs], jnp.float32))
        meta = {"members": names, "epoch": 0, "train_seconds": 0.0,
                "history": [[] for _ in configs], "best": [None] * size,
                "diverged": [None] * size}
      _train_group_epochs(c0, model, tx, mesh, state, meta, data, ckpts, workdir, size)
    finally:
      ckpts.close()
  results = []
  for g in range(size):
    best = meta["best"][g] or {"val/accuracy": None, "val/loss": None, "epoch": 0}
    results.append({"val/accuracy": best["val/accuracy"], "val/loss": best["val/loss"],
                    "best_epoch": best["epoch"], "epochs_trained": meta["epoch"],
                    "train_seconds": meta["train_seconds"], "history": meta["history"][g],
                    "diverged": meta["diverged"][g]})
  return results


def _abstract_group(init, size, sharding):
  """The abstract stacked state of `size` members (for restoring)."""
  keys = jax.ShapeDtypeStruct((size,) + jax.random.PRNGKey(0).shape, jnp.uint32)
  vec = jax.ShapeDtypeStruct((size,), jnp.float32)
  return _abstract(jax.eval_shape(init, keys, vec, vec), sharding)


def _gather_members(sources, init, sharding):
  """(stacked state, meta) of the members `sources` [(group_dir, index)] from their groups'
  last checkpoints."""
  states, metas = {}, {}
  for group_dir in dict.fromkeys(d for d, _ in sources):
    n = len(json.loads((pathlib.Path(group_dir) / "group.json").read_text())["members"])
    ckpts = checkpointing.Checkpoints(group_dir, max_to_keep=1)
    try:
      restored = checkpointing.Checkpoints.restore(ckpts.last, _abstract_group(init, n, sharding))
    finally:
      ckpts.close()
    if restored is None:
      raise checkpointing.CheckpointError(f"{group_dir} holds no checkpoint to continue from")
    _, states[group_dir], metas[group_dir] = restored
  state = jax.tree.map(lambda *xs: jnp.stack(xs),
                       *[jax.tree.map(lambda x, i=i: x[i], states[d]) for d, i in sources])
  pick = lambda key: [metas[d][key][i] for d, i in sources]
  epochs = {metas[d]["epoch"] for d, _ in sources}
  if len(epochs) != 1:
    raise ValueError(f"members to continue were trained for different epochs: {sorted(epochs)}")
  meta = {"epoch": epochs.pop(), "history": pick("history"), "best": pick("best"),
          "diverged": pick("diverged"),
          "train_seconds": max(metas[d]["train_seconds"] for d, _ in sources)}
  return jax.device_put(state, sharding), meta


def _train_group_epochs(c0, model, tx, mesh, state, meta, data, ckpts, workdir, size):
  replicated = NamedSharding(mesh, P())
  train_x, train_y = data["train"]["image"], data["train"]["label"]
  num_train, batch_size = len(train_x), c0.input.batch_size
  steps_per_epoch, num_epochs = num_train // batch_size, c0.train.num_epochs
  images = jax.device_put(train_x, replicated)
  labels = jax.device_put(train_y.astype(np.int32), replicated)
  data_key = jax.random.PRNGKey(c0.seed + 1)  # the same order as fer.train for the first member
  epoch_perm = jax.jit(lambda epoch: jax.random.permutation(jax.random.fold_in(data_key, epoch),
                                                            num_train), out_shardings=replicated)
  class_weights = metrics_lib.class_weights(train_y, train.NUM_CLASSES, c0.optim.class_weights)
  run_epoch = train.make_epoch_runner(
      model, tx, c0, mesh, steps_per_epoch,
      train_step=make_group_step(model, tx, c0, class_weights))
  predict = make_group_predict(model)
  epoch = meta["epoch"]
  with train.stop_on_sigterm() as stop_asked:
    while epoch < num_epochs and not all(meta["diverged"]):
      t0 = time.perf_counter()
      perm = epoch_perm(epoch)
      state, sums = run_epoch(state, images, labels, perm)
      loss = np.asarray(sum(m["loss"] for m in sums)) / steps_per_epoch
      acc = np.asarray(sum(m["correct"] for m in sums)) / (steps_per_epoch * batch_size)
      train_time = time.perf_counter() - t0
      variables = train.eval_variables(state)
      probs = train.predict_probs(predict, variables, data["val"]["image"],
                                  c0.input.eval_batch_size, mesh)
      epoch += 1
      meta["epoch"] = epoch
      meta["train_seconds"] += train_time
      finite = _finite_members(state)
      for g in range(size):
        val = metrics_lib.classification_metrics(probs[:, g], data["val"]["label"], "val")
        row = {"epoch": epoch, "step": epoch * steps_per_epoch, "train/loss": float(loss[g]),
               "train/accuracy": float(acc[g]), "val/loss": val["val/loss"],
               "val/accuracy": val["val/accuracy"],
               "train/images_per_second": steps_per_epoch * batch_size / train_time,
               "epoch_seconds": time.perf_counter() - t0}
        meta["history"][g].append(row)
        if not (finite[g] and math.isfinite(loss[g]) and math.isfinite(val["val/loss"])):
          meta["diverged"][g] = meta["diverged"][g] or (
              f"Training diverged: the loss is {loss[g]} in epoch {epoch}")
        elif meta["best"][g] is None or val["val/accuracy"] > meta["best"][g]["val/accuracy"]:
          meta["best"][g] = {"epoch": epoch, "val/accuracy": val["val/accuracy"],
                             "val/loss": val["val/loss"]}
      # A diverged member is failed for good; zeroing its state keeps the checkpoint finite.
      state = _zero_members(state, np.array([d is not None for d in meta["diverged"]]))
      ckpts.save_last(epoch, state, _json_safe(meta))
      accs = " ".join(f"{r[-1]['val/accuracy']:.3f}" for r in meta["history"])
      print(f"group {workdir.name} ({size} trials) epoch {epoch}/{num_epochs} | "
            f"{size * steps_per_epoch * batch_size / train_time:,.0f} trial-img/s | "
            f"val acc {accs} | {train.format_duration(time.perf_counter() - t0)}",
            flush=True)
      if stop_asked() and epoch < num_epochs:  # saved above, as every epoch
        raise train.Stopped(f"stopped by SIGTERM after epoch {epoch}/{num_epochs} of group "
                            f"{workdir}: the same command resumes it")


@jax.jit
def _finite_members_jit(state):
  flags = [jnp.isfinite(x.reshape(x.shape[0], -1)).all(1) for x in jax.tree.leaves(state)
           if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.stack(flags).all(0)


def _finite_members(state) -> np.ndarray:
  """[G] bools: whether every float of member g's state is finite."""
  return np.asarray(_finite_members_jit(state))


def _zero_members(state, mask):
  """The state with every float of the members where `mask` [G] is set replaced by zeros."""
  if not mask.any():
    return state
  m = jnp.asarray(mask)

  def zero(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return jnp.where(m.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros((), x.dtype), x)

  return jax.tree.map(zero, state)


def _json_safe(obj):
  """NaN/Inf floats as strings: JSON (orbax meta, trials.jsonl) has no NaN."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return str(obj)
  if isinstance(obj, dict):
    return {k: _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  return obj


# ----------------------------------------------------------------------------- the search


def read_records(path) -> list[dict]:
  """trials.jsonl rows; a torn last line (killed mid-write) is ignored."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      print(f"WARNING: ignoring a damaged line of {path}: {line[:80]!r}", flush=True)
  return rows


def _append_record(path, record):
  with open(path, "a") as f:
    f.write(json.dumps(_json_safe(record)) + "\n")
    f.flush()


def load_search_data(config, workdir) -> dict:
  """train and val, loaded once; 'test' is the val split so trials never see test."""
  data = train.load_data(trial_base(config), workdir)
  return {"train": data["train"], "val": data["val"], "test": data["val"]}


def run(config, workdir) -> dict:
  """Runs (or resumes) the search in `workdir`; returns the summary also written to
  workdir/summary.json."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with checkpointing.WorkdirLock(workdir):
    return _run(config, workdir)


def _run(config, workdir):
  s = config.search
  try:
    trials = make_trials(config)
    rungs = rung_epochs(s)
    vmap = use_vmap(s.vmap)
  except (KeyError, ValueError) as e:  # search.strategy, .space, .halving, .vmap, space keys
    raise train.ConfigError(f"Invalid search config: {e.args[0] if e.args else e}") from e
  log_path = workdir / "trials.jsonl"
  records = {(r["trial"], r["epochs"]): r for r in read_records(log_path)}
  counts = {}
  for t in trials:
    counts[t.structure] = counts.get(t.structure, 0) + 1
  grouped = {t.structure for t in trials
             if vmap and counts[t.structure] > 1 and groupable(t.config)}
  print(f"Search: {s.strategy} over space {s.space!r}, {len(trials)} trials "
        f"({len(counts)} structures, {len(grouped)} trained as vmapped groups), rungs "
        f"{rungs} epochs; {len(records)} finished rows in {log_path}.", flush=True)
  data, t_start, alive = None, time.perf_counter(), trials
  for rung, epochs in enumerate(rungs):
    if rung:
      alive = promote(alive, records, rungs[rung - 1], s.halving.eta)
    todo = [t for t in alive if (t.id, epochs) not in records]
    print(f"Rung {rung} ({epochs} epochs): {len(alive)} trials, {len(todo)} to run.", flush=True)
    if todo and data is None:
      data = load_search_data(config, workdir)
    for unit in _units(todo, grouped, s.max_group_size):
      prev = rungs[rung - 1] if rung else None
      if unit[0].structure in grouped:
        rows = _run_group(unit, rung, epochs, prev, records, data, workdir)
      else:
        rows = [_run_plain(unit[0], rung, epochs, data, workdir)]
      for row in rows:
        _append_record(log_path, row)
        records[(row["trial"], epochs)] = row
        _print_row(row)
      jax.clear_caches()
  return write_outputs(config, trials, records, rungs, workdir,
                       time.perf_counter() - t_start)


def use_vmap(setting: str) -> bool:
  """search.vmap: on | off | auto (on except on a CPU: there vmapped convolutions become
  grouped convolutions and a group trains about 4x slower than separate runs,
  experiments/results/benchmark_vmap_search.md)."""
  if setting not in ("on", "off", "auto"):
    raise ValueError(f"search.vmap={setting!r}: expected on, off or auto")
  return setting == "on" or (setting == "auto" and jax.default_backend() != "cpu")


def _units(todo, grouped, max_group_size):
  """Plain trials alone; grouped ones by structure in chunks of max_group_size; index order."""
  units, by_structure = [], {}
  for t in todo:
    if t.structure in grouped:
      by_structure.setdefault(t.structure, []).append(t)
    else:
      units.append([t])
  for members in by_structure.values():
    for i in range(0, len(members), max(1, max_group_size)):
      units.append(members[i:i + max(1, max_group_size)])
  return sorted(units, key=lambda u: u[0].index)


def _row(trial, rung, epochs):
  return {"trial": trial.id, "name": trial.name, "index": trial.index, "rung": rung,
          "epochs": epochs, "status": "failed", "baseline": trial.baseline,
          "overrides": trial.overrides, "structure": trial.structure,
          "val/accuracy": None, "val/loss": None, "best_epoch": None, "num_params": None,
          "flops": None, "wall_seconds": None, "train_seconds": None, "group": None,
          "member_index": None, "group_size": 1, "error": None,
          "workdir": str(pathlib.Path("trials") / trial.name)}


def _error(e):
  return f"{type(e).__name__}: {str(e)[:500]}"


def _finish(row):
  row["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
  return row


def _sample_shape(data):
  x = data["train"]["image"]
  return x.shape[1:], x.dtype


def _run_plain(trial, rung, epochs, data, workdir):
  """One trial through fer.train.train_and_evaluate in trials/<name> (resumes by itself)."""
  row = _row(trial, rung, epochs)
  trial_dir = workdir / row["workdir"]
  print(f"\n== trial {trial.name} (rung {rung}, {epochs} epochs) {_short(trial.overrides)}",
        flush=True)
  t0 = time.perf_counter()
  try:
    row.update(describe(trial.config, *_sample_shape(data)))
    results_path = trial_dir / "results.json"
    if results_path.exists():  # an earlier rung's results: train on from its checkpoint
      done = json.loads(results_path.read_text())
      if done["epochs_trained"] < epochs and not done["stopped_early"]:
        results_path.rename(trial_dir / f"results_{done['epochs_trained']}ep.json")
    results = train.train_and_evaluate(_with_epochs(trial.config, epochs), str(trial_dir),
                                       data=data, resume_may_change=_BUDGET_KEYS)
    row.update({"status": "ok", "val/accuracy": results["val/accuracy"],
                "val/loss": results["val/loss"], "best_epoch": results["best_epoch"],
                "train_seconds": results["train_seconds"]})
  except (checkpointing.WorkdirInUseError, KeyboardInterrupt):
    raise
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = _error(e)
  row["wall_seconds"] = time.perf_counter() - t0
  return _finish(row)


def _run_group(members, rung, epochs, prev_epochs, records, data, workdir):
  """Members sharing a structure through train_group in groups/<name>; each member's metrics and
  results also go to its own trials/<name>."""
  ids = [t.id for t in members]
  group_dir = pathlib.Path("groups") / f"{members[0].structure}-{epochs}ep-{_hash(ids, 6)}"
  rows = [_row(t, rung, epochs) for t in members]
  for i, row in enumerate(rows):
    row.update(group=str(group_dir), member_index=i, group_size=len(members))
  print(f"\n== group {group_dir.name}: {len(members)} trials vmapped (rung {rung}, {epochs} "
        f"epochs) {_short(members[0].overrides, skip=VMAPPED_KEYS)}", flush=True)
  t0 = time.perf_counter()
  try:
    desc = describe(members[0].config, *_sample_shape(data))
    for row in rows:
      row.update(desc)
    sources = None
    if prev_epochs is not None:
      prev = [records[(t.id, prev_epochs)] for t in members]
      if any(p.get("group") is None for p in prev):
        raise ValueError("a member was not trained in a group at the previous rung (was "
                         "search.vmap changed during the search?)")
      sources = [(workdir / p["group"], p["member_index"]) for p in prev]
    results = train_group([_with_epochs(t.config, epochs) for t in members], workdir / group_dir,
                          data, sources=sources, names=[t.name for t in members])
    for t, row, res in zip(members, rows, results):
      _write_member(workdir / row["workdir"], t, epochs, res, group_dir)
      row.update({"val/accuracy": res["val/accuracy"], "val/loss": res["val/loss"],
                  "best_epoch": res["best_epoch"], "train_seconds": res["train_seconds"]})
      if res["diverged"]:
        row["error"] = f"TrainingDivergedError: {res['diverged']}"
      elif res["val/accuracy"] is not None:
        row["status"] = "ok"
  except (checkpointing.WorkdirInUseError, KeyboardInterrupt):
    raise
  except Exception as e:  # pylint: disable=broad-except
    for row in rows:
      row["error"] = _error(e)
  wall = time.perf_counter() - t0
  for row in rows:
    row.update(wall_seconds=wall / len(members), group_wall_seconds=wall)
  return [_finish(row) for row in rows]


def _write_member(trial_dir, trial, epochs, res, group_dir):
  trial_dir.mkdir(parents=True, exist_ok=True)
  config = _with_epochs(trial.config, epochs)
  fileio.write_json_atomic(trial_dir / "config.json", json.loads(config.to_json_best_effort()))
  fileio.write_json_atomic(trial_dir / "metrics.jsonl", _json_safe(res["history"]), jsonl=True)
  summary = {k: v for k, v in res.items() if k != "history"}
  fileio.write_json_atomic(trial_dir / "results.json",
                          _json_safe({**summary, "group": str(group_dir)}))


def _short(overrides, skip=()):
  parts = []
  for key, value in overrides.items():
    if key in skip:
      continue
    name = key.split(".")[-1]
    if isinstance(value, float):
      value = f"{value:.3g}"
    elif isinstance(value, (tuple, list)):
      value = "-".join(map(str, value)) or "none"
    parts.append(f"{name}={value}")
  return " ".join(parts) or "(base config)"


def _print_row(row):
  if row["status"] == "ok":
    print(f"-> {row['name']} ({row['epochs']} epochs): val/accuracy {row['val/accuracy']:.4f}, "
          f"val/loss {row['val/loss']:.4f}, {row['num_params']:,} params, "
          f"{row['wall_seconds']:.0f} s", flush=True)
  else:
    print(f"-> {row['name']} ({row['epochs']} epochs) FAILED: {row['error']}", flush=True)


# ----------------------------------------------------------------------------- outputs


def summarize(trials, records, rungs) -> list[dict]:
  """One row per trial: its latest ok rung (or its failure), total wall seconds over its rungs;
  sorted best first (largest budget, then val accuracy)."""
  rows = []
  for t in trials:
    mine = [records[(t.id, e)] for e in rungs if (t.id, e) in records]
    if not mine:
      continue
    ok = [r for r in mine if r["status"] == "ok"]
    last = dict(ok[-1] if ok else mine[-1])
    last["total_wall_seconds"] = sum(r["wall_seconds"] or 0 for r in mine)
    last["overrides"] = t.overrides
    last["baseline"] = t.baseline
    rows.append(last)
  return sorted(rows, key=lambda r: (r["status"] != "ok", -r["epochs"],
                                     -(r["val/accuracy"] or 0), r["index"]))


def write_outputs(config, trials, records, rungs, workdir, seconds) -> dict:
  from fer import plots  # pylint: disable=import-outside-toplevel
  s = config.search
  rows = summarize(trials, records, rungs)
  ok = [r for r in rows if r["status"] == "ok"]
  best = ok[0] if ok else None
  baseline = next((r for r in rows if r["baseline"]), None)
  trial_by_id = {t.id: t for t in trials}
  group_walls = {}
  for r in records.values():
    key = (r.get("group") or r["trial"], r["epochs"])
    group_walls[key] = r.get("group_wall_seconds") or r["wall_seconds"] or 0.0
  summary = {
      "strategy": s.strategy, "space": s.space, "rungs_epochs": rungs,
      "num_trials": len(trials), "num_rows": len(records),
      "num_failed": sum(r["status"] != "ok" for r in rows),
      "trial_wall_seconds_total": sum(group_walls.values()),
      "this_run_seconds": seconds,
      "best": best and {k: best[k] for k in ("name", "epochs", "val/accuracy", "val/loss",
                                            "num_params", "flops", "overrides")},
      "baseline": baseline and {k: baseline.get(k) for k in (
          "name", "epochs", "status", "val/accuracy", "val/loss", "num_params", "flops")},
  }
  fileio.write_json_atomic(workdir / "summary.json", _json_safe(summary))
  fileio.write_text_atomic(workdir / "report.md", report_markdown(summary, rows, s.top_k, config))
  if ok:
    plots.search_scatter(ok, workdir / "search.png",
                         title=f"{s.strategy} search '{s.space}': {len(trials)} trials, val "
                               "accuracy")
    write_best_config(workdir / "best_config.py", trial_by_id[best["trial"]], best, config,
                      workdir)
  print(f"\nSearch done: {len(ok)}/{len(rows)} trials ok; best {best and best['name']} "
        f"val/accuracy {best and round(best['val/accuracy'], 4)}; report in "
        f"{workdir}/report.md", flush=True)
  return summary


def _fmt(value, spec):
  return "-" if value is None else format(value, spec)


def report_markdown(summary, rows, top_k, config) -> str:
  s = config.search
  lines = [
      f"Search `{s.strategy}` over space `{s.space}` (configs/search_space.py) on top of "
      f"configs/{s.base}.py: {summary['num_trials']} trials, rungs of {summary['rungs_epochs']} "
      f"epochs" + (f" (successive halving, eta {s.halving.eta})" if s.halving.enabled else "") +
      f"; {summary['num_failed']} failed. Trial wall time in total "
      f"{summary['trial_wall_seconds_total'] / 60:.1f} min. Scored on val only.",
      "",
      "| rank | trial | epochs | val acc | val loss | params | MFLOPs | wall s | trial |",
      "|---:|---|---:|---:|---:|---:|---:|---:|---|",
  ]
  ok = [r for r in rows if r["status"] == "ok"]
  shown = ok[:top_k] + [r for r in ok[top_k:] if r["baseline"]]
  for i, r in enumerate(shown):
    rank = ok.index(r) + 1
    flops = None if r["flops"] is None else r["flops"] / 1e6
    group = f" (vmap x{r['group_size']})" if r.get("group_size", 1) > 1 else ""
    lines.append(
        f"| {rank} | {r['name']}{' (baseline)' if r['baseline'] else ''} | {r['epochs']} | "
        f"{r['val/accuracy']:.4f} | {_fmt(r['val/loss'], '.4f')} | {_fmt(r['num_params'], ',')} "
        f"| {_fmt(flops, '.1f')} | {r['total_wall_seconds']:.0f}{group} | "
        f"{_short(r['overrides'])} |")
  failed = [r for r in rows if r["status"] != "ok"]
  if failed:
    lines += ["", "Failed trials:", ""]
    lines += [f"- {r['name']} ({r['epochs']} epochs): {r['error']}" for r in failed]
  lines.append("")
  return "\n".join(lines)


_BEST_CONFIG = '''r"""The best trial of the architecture search in {workdir}: {name}, val/accuracy {acc:.4f}
after {epochs} epochs (the search's budget), {params:,} parameters{flops}.

Written by fer/search.py: configs/{base}.py with OVERRIDES. Train it in full ({num_epochs} epochs):

  python -m fer.main --config={path} --workdir=runs/best
  python -m fer.main --config={path}:runlocal --workdir=/tmp/best   # seconds, synthetic
"""

from configs import common
from configs import {base} as base

OVERRIDES = {{
{overrides}}}


def get_config(arg=None):
  c = base.get_config()
  c.update_from_flattened_dict(OVERRIDES)
  if arg == "runlocal":
    common.apply_runlocal(c)
  return c
'''


def write_best_config(path, trial, row, config, workdir):
  """best_config.py: configs/<base>.py plus every key where the trial differs from it (its
  overrides and the search's command-line overrides; budget and data paths left out)."""
  import importlib  # pylint: disable=import-outside-toplevel
  base_cfg = importlib.import_module(f"configs.{config.search.base}").get_config()
  base_flat, flat = train.flatten_config(base_cfg), train.flatten_config(trial.config)
  skip = ("job",) + _BUDGET_KEYS + _MACHINE_KEYS + ("train.early_stopping_epochs",)
  diff = {k: v for k, v in flat.items() if k not in skip and base_flat.get(k, object()) != v}
  overrides = "".join(f"    {k!r}: {v!r},\n" for k, v in sorted(diff.items()))
  flops = "" if row["flops"] is None else f", {row['flops'] / 1e6:.1f} MFLOPs per image"
  fileio.write_text_atomic(path, _BEST_CONFIG.format(
      workdir=workdir, name=row["name"], acc=row["val/accuracy"], epochs=row["epochs"],
      params=row["num_params"], flops=flops, base=config.search.base,
      num_epochs=base_cfg.train.num_epochs, path=path, overrides=overrides))
