r"""Architecture search over the CNN of configs/cnn.py (fer/search.py; spaces in search_space.py).

  python -m fer.main --config=configs/search.py --workdir=runs/search            # grid 'small'
  python -m fer.main --config=configs/search.py:random --workdir=runs/search_random
  python -m fer.main --config=configs/search.py:runlocal --workdir=/tmp/search   # synthetic

Kill it and rerun the same command: finished trials are skipped, the rest resume from their
checkpoints. Every key of configs/cnn.py applies to all trials (`--config.input.archive=...`);
the space's overrides go on top. Trials are scored on val only, never on test.

Outputs in the workdir: trials.jsonl (one line per trial and rung), trials/<name>/ (each trial's
run), groups/<name>/ (vmapped groups' checkpoints), report.md (top-k table), search.png (val
accuracy against parameters and wall time), best_config.py (the best trial as a config).

Measured on a shared 2-core AMD EPYC CPU (standard protocol, other runs beside it): the default
grid (12 trials, rungs of 1 and 3 epochs, 22 trial-epochs) took 45 min; the best trial
(batch norm on configs/cnn.py) reached val accuracy 0.561 after 3 epochs, configs/cnn.py 0.503
(experiments/results/search/). :runlocal takes 2-3 min there.
"""

import ml_collections

from configs import cnn
from configs import common


def get_config(arg=None):
  args = set(filter(None, (arg or "").split(",")))
  unknown = args - {"random", "runlocal"}
  if unknown:
    raise ValueError(f"configs/search.py:{arg}: unknown {sorted(unknown)}; expected random "
                     "and/or runlocal")
  c = cnn.get_config()
  c.job = "search"
  c.train.early_stopping_epochs = 0  # trials run their whole budget; halving does the stopping

  s = c.search = ml_collections.ConfigDict()
  s.base = "cnn"  # the configs/ module every trial (and best_config.py) starts from
  s.strategy = "grid"  # grid: every combination of search.space | random: seeded samples
  s.space = "small"  # a name in configs/search_space.py: GRIDS (grid) or SAMPLERS (random)
  s.num_trials = 24  # random only
  s.trials_per_structure = 1  # random only: scalar (lr, weight decay, seed) draws per structure
  s.seed = 0  # random only: sample i is drawn from numpy default_rng([seed, i])
  s.epochs_per_trial = 3  # the final budget of a trial
  s.include_baseline = True  # configs/<base>.py itself is a trial and is never halved away
  # Train trials that differ only in learning rate, weight decay or seed together, vmapped:
  # on | off | auto (off on a CPU, where it is slower: experiments/results/benchmark_vmap_search.md)
  s.vmap = "auto"
  s.max_group_size = 8
  s.top_k = 10

  # Successive halving: rung budgets min_epochs, min_epochs * eta, ... up to epochs_per_trial;
  # after each rung only the best 1/eta of the trials (by val accuracy) go on.
  s.halving = ml_collections.ConfigDict()
  s.halving.enabled = True
  s.halving.eta = 3
  s.halving.min_epochs = 1

  if "random" in args:
    s.strategy = "random"
    s.space = "large"
    s.trials_per_structure = 2
  if "runlocal" in args:
    common.apply_runlocal(c)
    c.input.synthetic_train_size = 448
    s.space = "tiny"
    s.num_trials = 4
    s.epochs_per_trial = 2
    s.halving.eta = 2
    s.top_k = 5
    s.vmap = "on"  # the smoke test runs every path
  return c
