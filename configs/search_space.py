"""The architecture-search spaces, plain Python beside configs/search.py (run by fer/search.py).

A trial is an override dict for the base config (configs/cnn.py), keyed by dotted config path:

  {'model.conv_features': (32, 64, 128, 256), 'model.batch_norm': True,
   'optim.learning_rate': 1e-3}

`grid_space(name)` lists every combination of a small space; `random_space(rng, name)` draws one
sample of a large space from a numpy Generator (the search seeds one Generator per trial, so
sample i does not depend on how many are drawn). Trials that differ only in learning rate, weight
decay and seed (fer.search.VMAPPED_KEYS) are trained together, vmapped, in one jitted program.
"""

import itertools
import math

import numpy as np


def product(choices: dict) -> list[dict]:
  """{key: [values]} -> every combination, the last key varying fastest."""
  keys = list(choices)
  return [dict(zip(keys, values)) for values in itertools.product(*choices.values())]


# ----------------------------------------------------------------------------- grids

def _tiny_grid():
  """Tests and :runlocal: 2 structures x 2 learning rates (two vmapped groups of 2)."""
  return product({
      "model.conv_features": [(4, 8), (8,)],
      "model.dense_features": [(16,)],
      "optim.learning_rate": [1e-3, 3e-3],
  })


def _small_grid():
  """12 trials: batch norm x dense head x 3 learning rates, on configs/cnn.py's conv stack.

  Holds configs/cnn.py itself (no batch norm, dense (512, 256, 128), lr 1e-3). Four structures
  of three learning rates each: four vmapped groups of three.
  """
  return product({
      "model.batch_norm": [False, True],
      "model.dense_features": [(512, 256, 128), (256,)],
      "optim.learning_rate": [3e-4, 1e-3, 3e-3],
  })


def _structure_grid():
  """24 structures at the base learning rate: depth/width x kernel x batch norm x head."""
  return product({
      "model.conv_features": [(32, 64, 128), (32, 64, 128, 256), (64, 128, 256, 512)],
      "model.kernel_size": [3, 5],
      "model.batch_norm": [False, True],
      "model.dense_features": [(512, 256, 128), (256,)],
  })


GRIDS = {"tiny": _tiny_grid, "small": _small_grid, "structure": _structure_grid}


def grid_space(name: str = "small") -> list[dict]:
  if name not in GRIDS:
    raise ValueError(f"search.space={name!r} has no grid: expected one of {', '.join(GRIDS)}")
  return GRIDS[name]()


# ----------------------------------------------------------------------------- random spaces

def _log_uniform(rng, low, high):
  return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _choice(rng, values):
  value = values[int(rng.integers(len(values)))]
  return value.item() if isinstance(value, np.generic) else value


def _tiny_random(rng):
  return {
      "model.conv_features": _choice(rng, [(4,), (4, 8), (8, 8)]),
      "model.dense_features": _choice(rng, [(), (16,)]),
      "model.batch_norm": _choice(rng, [False, True]),
      "optim.learning_rate": _log_uniform(rng, 3e-4, 3e-3),
  }


def _large_random(rng):
  """keras-tuner-like: 2-5 conv blocks of growing width, 0-3 dense layers, and the scalars."""
  num_blocks = int(rng.integers(2, 6))
  width = _choice(rng, [16, 32, 48, 64])
  conv = tuple(min(512, width * 2 ** i) for i in range(num_blocks))
  num_dense = int(rng.integers(0, 4))
  units = sorted((_choice(rng, [64, 128, 256, 512, 1024]) for _ in range(num_dense)),
                 reverse=True)
  return {
      "model.conv_features": conv,
      "model.convs_per_block": _choice(rng, [1, 1, 2]),
      "model.kernel_size": _choice(rng, [3, 3, 5]),
      "model.batch_norm": _choice(rng, [False, True]),
      "model.pool": _choice(rng, ["max", "max", "avg"]),
      "model.conv_dropout": _choice(rng, [0.0, 0.1, 0.25]),
      "model.dense_features": tuple(units),
      "model.dropout": _choice(rng, [0.0, 0.25, 0.5]) if num_dense else 0.0,
      "input.batch_size": _choice(rng, [32, 64, 128]),
      "optim.learning_rate": _log_uniform(rng, 1e-4, 3e-3),
      "optim.weight_decay": _choice(rng, [0.0, 1e-5, 1e-4, 1e-3]),
  }


SAMPLERS = {"tiny": _tiny_random, "large": _large_random}


def random_space(rng: np.random.Generator, name: str = "large") -> dict:
  if name not in SAMPLERS:
    raise ValueError(f"search.space={name!r} has no random sampler: expected one of "
                     f"{', '.join(SAMPLERS)}")
  return SAMPLERS[name](rng)
