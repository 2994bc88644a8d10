"""Matplotlib figures written into the workdir.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas: no display, no pyplot
global state, safe in tests and on headless machines.
"""

import pathlib
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  return path


def class_distribution(counts: Mapping[str, int], path, title: str) -> pathlib.Path:
  """A bar per class with its count on top (like the original study's figures)."""
  names, values = list(counts), [int(v) for v in counts.values()]
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  bars = ax.bar(names, values, color="tab:blue")
  ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8, padding=2)
  ax.set_title(f"{title} ({sum(values):,} images)")
  ax.set_xlabel("class")
  ax.set_ylabel("images")
  ax.margins(y=0.12)
  ax.spines[["top", "right"]].set_visible(False)
  return _save(fig, path)


def class_distributions(counts: Mapping[str, Mapping[str, int]], path, title: str,
                        classes: Sequence[str] | None = None) -> pathlib.Path:
  """Grouped bars: one group per class, one bar per split (counts[split][class])."""
  splits = list(counts)
  classes = list(classes or next(iter(counts.values())))
  fig = Figure(figsize=(9, 4.5))
  ax = fig.subplots()
  width = 0.8 / max(len(splits), 1)
  for i, split in enumerate(splits):
    xs = [c + (i - (len(splits) - 1) / 2) * width for c in range(len(classes))]
    values = [int(counts[split].get(name, 0)) for name in classes]
    bars = ax.bar(xs, values, width, label=f"{split} ({sum(values):,})")
    ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=6, padding=1, rotation=90)
  ax.set_xticks(range(len(classes)), classes)
  ax.set_title(title)
  ax.set_xlabel("class")
  ax.set_ylabel("images")
  ax.margins(y=0.15)
  ax.legend(frameon=False)
  ax.spines[["top", "right"]].set_visible(False)
  return _save(fig, path)
