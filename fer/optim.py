"""Optimizer and learning-rate schedule from `config.optim`; freezing by parameter-path regex."""

import re

from absl import logging
import flax
import optax


def param_paths(params) -> dict:
  """{'conv1/kernel': leaf, ...}: the '/'-joined paths that the freeze regexes match."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


def _path_tree(params, fn):
  """A tree shaped like `params` whose leaves are fn(path)."""
  return flax.traverse_util.unflatten_dict({k: fn(k) for k in param_paths(params)}, sep="/")


def make_schedule(cfg, steps_per_epoch: int, num_epochs: int, base_lr: float | None = None):
  lr = cfg.learning_rate if base_lr is None else base_lr
  total = max(1, steps_per_epoch * num_epochs)
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  if cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, total - warmup))
  elif cfg.schedule == "step":
    every = max(1, cfg.step_decay_epochs * steps_per_epoch)
    boundaries = {every * k: cfg.step_decay_factor for k in range(1, total // every + 1)}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    raise ValueError(f"optim.schedule={cfg.schedule!r}: expected constant, cosine or step")
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def _kernel_mask(params):
  return _path_tree(params, lambda path: path.endswith("kernel"))


def _base_optimizer(cfg, schedule):
  if cfg.name == "adam":
    return optax.adam(schedule)
  if cfg.name == "adamw":
    return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=_kernel_mask)
  if cfg.name == "sgd":
    return optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
  raise ValueError(f"optim.name={cfg.name!r}: expected adam, adamw or sgd")


def make_optimizer(cfg, params, steps_per_epoch: int, num_epochs: int):
  """Returns (optax transformation, lr schedule) for `params`.

  Weight decay applies to kernels only; for adamw it is decoupled (scaled by the learning
  rate), for adam/sgd it is added to the gradient (L2). Parameters whose path matches
  `cfg.freeze` get no update and no optimizer state. `cfg.lr_scales` is a tuple of
  (regex, factor) pairs that scale the learning rate of matching parameters (fine-tuning).
  """
  paths = list(param_paths(params))
  freeze = re.compile(cfg.freeze) if cfg.freeze else None
  frozen = [p for p in paths if freeze and freeze.search(p)]
  if freeze and not frozen:
    raise ValueError(f"optim.freeze={cfg.freeze!r} matches no parameter; paths look like "
                     f"{paths[:3]}")
  if frozen:
    logging.info("Frozen (no updates, no optimizer state): %d of %d tensors, e.g. %s",
                 len(frozen), len(paths), frozen[:3])
  scales = [(re.compile(rx), float(f)) for rx, f in (cfg.get("lr_scales") or ())]

  def label(path):
    if freeze and freeze.search(path):
      return "frozen"
    for i, (rx, _) in enumerate(scales):
      if rx.search(path):
        return f"scale{i}"
    return "default"

  def chain_for(lr_factor):
    schedule = make_schedule(cfg, steps_per_epoch, num_epochs, cfg.learning_rate * lr_factor)
    parts = []
    if cfg.grad_clip_norm:
      parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    if cfg.weight_decay and cfg.name != "adamw":  # L2 on kernels; adamw decays decoupled
      parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=_kernel_mask))
    parts.append(_base_optimizer(cfg, schedule))
    return optax.chain(*parts), schedule

  transforms = {"frozen": optax.set_to_zero()}
  default, schedule = chain_for(1.0)
  transforms["default"] = default
  for i, (_, f) in enumerate(scales):
    transforms[f"scale{i}"] = chain_for(f)[0]
  labels = _path_tree(params, label)
  return optax.multi_transform(transforms, labels), schedule

