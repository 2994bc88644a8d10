r"""The best trial of the architecture search in runs/search (copied here): 007-a78da32d,
val/accuracy 0.5612 after 3 epochs (the search's budget), 1,733,607 parameters, 60.3 MFLOPs
per image. configs/cnn.py itself reached 0.5026 with the same budget (report.md).

Written by fer/search.py: configs/cnn.py with OVERRIDES. Train it in full (30 epochs):

  python -m fer.main --config=experiments/results/search/best_config.py --workdir=runs/best
  python -m fer.main --config=experiments/results/search/best_config.py:runlocal --workdir=/tmp/best   # seconds, synthetic
"""

from configs import common
from configs import cnn as base

OVERRIDES = {
    'model.batch_norm': True,
}


def get_config(arg=None):
  c = base.get_config()
  c.update_from_flattened_dict(OVERRIDES)
  if arg == "runlocal":
    common.apply_runlocal(c)
  return c
