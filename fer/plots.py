"""Matplotlib figures written into the workdir.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas: no display, no pyplot
global state, safe in tests and on headless machines.
"""

import io
import pathlib
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter
import numpy as np

from fer import fileio


def _save(fig: Figure, path) -> pathlib.Path:
  """The figure as an image file (format from the suffix), written atomically."""
  path = pathlib.Path(path)
  FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format=path.suffix.lstrip(".").lower() or "png", dpi=100,
              bbox_inches="tight")
  return fileio.write_bytes_atomic(path, buffer.getvalue())


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


def _heatmap(matrix, row_names, column_names, path, title, xlabel="", ylabel="", vmin=0.0,
             size=(6.5, 5.5), annotate=True):
  """A matrix as coloured cells (Blues, vmin..1) with each value written in its cell."""
  fig = Figure(figsize=size)
  ax = fig.subplots()
  im = ax.imshow(matrix, cmap="Blues", vmin=vmin, vmax=1)
  ax.set_xticks(range(len(column_names)), column_names, rotation=45, ha="right")
  ax.set_yticks(range(len(row_names)), row_names)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if annotate:
    middle = (vmin + 1) / 2
    for i in range(len(row_names)):
      for j in range(len(column_names)):
        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                color="white" if matrix[i, j] > middle else "black")
  fig.colorbar(im, ax=ax, fraction=0.046)
  ax.set_title(title)
  return _save(fig, path)


def confusion_matrix(cm, class_names, path, title=""):
  """A row-normalised confusion matrix (true class per row) with the counts' percentages."""
  cm = np.asarray(cm, np.float64)
  norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
  return _heatmap(norm, class_names, class_names, path,
                  title or "confusion matrix (row-normalised)", xlabel="predicted", ylabel="true")


def agreement_matrix(matrix, names: Sequence[str], path, title="") -> pathlib.Path:
  """How often each two ensemble members predict the same class (symmetric, ones on the
  diagonal); the colour scale starts at the lowest agreement, so close values stay apart. Values
  are written in the cells up to 12 members."""
  matrix = np.asarray(matrix, np.float64)
  side = min(4.0 + 0.55 * len(names), 16.0)
  return _heatmap(matrix, names, names, path, title or "members' agreement",
                  vmin=float(np.floor(matrix.min() * 20) / 20), size=(side + 1.5, side),
                  annotate=len(names) <= 12)


def learning_curves(history, path):
  """Train/val loss and accuracy per epoch from the metrics history (list of dicts)."""
  epochs = [r["epoch"] for r in history]
  fig = Figure(figsize=(10, 4))
  ax_loss, ax_acc = fig.subplots(1, 2)
  for split, style in (("train", "-"), ("val", "--")):
    ax_loss.plot(epochs, [r[f"{split}/loss"] for r in history], style, label=split)
    ax_acc.plot(epochs, [r[f"{split}/accuracy"] for r in history], style, label=split)
  ax_loss.set_xlabel("epoch")
  ax_loss.set_ylabel("loss")
  ax_acc.set_xlabel("epoch")
  ax_acc.set_ylabel("accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  return _save(fig, path)


def emotion_timeline(times, panels: Mapping[str, np.ndarray], class_names, path,
                     title="") -> pathlib.Path:
  """Class probabilities over time, a panel per entry of `panels` ({panel title: probs [T, C]},
  a NaN row where that face is not seen): a line per class, and below it the top class of
  each time as a coloured strip."""
  times = np.asarray(times, np.float64)
  fig = Figure(figsize=(10, 0.6 + 3.6 * len(panels)))
  axes = fig.subplots(2 * len(panels), 1, sharex=True, squeeze=False,
                      gridspec_kw={"height_ratios": [6, 1] * len(panels)})[:, 0]
  if title:
    fig.suptitle(title)
  for (panel, probs), ax, strip in zip(panels.items(), axes[0::2], axes[1::2]):
    probs = np.asarray(probs, np.float64)
    for c, name in enumerate(class_names):
      ax.plot(times, probs[:, c], color=f"C{c}", label=name, linewidth=1.2,
              marker="." if len(times) < 60 else None)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax.set_title(panel, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    if len(times):  # each time's strip reaches to the next time (the last: one step further)
      step = times[-1] - times[-2] if len(times) > 1 else 1.0
      edges = np.append(times, times[-1] + step)
      for k in np.flatnonzero(~np.isnan(probs).any(axis=1)):
        strip.axvspan(edges[k], edges[k + 1], color=f"C{int(np.argmax(probs[k]))}",
                      linewidth=0)
      strip.set_xlim(edges[0], edges[-1])
    strip.set_yticks([])
    strip.set_ylabel("top", rotation=0, ha="right", va="center")
  axes[-1].set_xlabel("time (s)")
  return _save(fig, path)


def line_styles(runs: Sequence[str], family=lambda run: run) -> dict:
  """{run: (colour, legend label or None)}: the runs of one family (`family(run)`, e.g. the seeds
  of one config) share a colour and one legend entry, '<family> (<n> runs)'."""
  members = {}
  for run in runs:
    members.setdefault(family(run), []).append(run)
  styles = {}
  for i, (name, group) in enumerate(members.items()):
    for j, run in enumerate(group):
      label = f"{name} ({len(group)} run{'s' if len(group) > 1 else ''})" if j == 0 else None
      styles[run] = (f"C{i % 10}", label)
  return styles


def val_curves(panels: Mapping[str, Mapping[str, Sequence[float]]], path,
               ylabel="val accuracy", family=lambda run: run):
  """One panel per group of runs (e.g. per config), one line per run: val accuracy after each
  epoch (epochs numbered from 1); runs of one `family` share a colour (line_styles)."""
  fig = Figure(figsize=(5 * len(panels), 4))
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (panel, runs) in zip(axes, panels.items()):
    styles = line_styles(list(runs), family)
    for run, accuracy in runs.items():
      colour, label = styles[run]
      ax.plot(range(1, len(accuracy) + 1), accuracy, color=colour, label=label, linewidth=1)
    ax.set_title(panel)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
    ax.spines[["top", "right"]].set_visible(False)
  return _save(fig, path)


def search_scatter(rows, path, title=""):
  """Architecture search: val accuracy against parameter count (log when it spans more than 10x)
  and against wall time, one point per trial coloured by its epoch budget; the best is a star,
  the baseline a square."""
  fig = Figure(figsize=(11, 4.2))
  axes = fig.subplots(1, 2, sharey=True)
  budgets = sorted({r["epochs"] for r in rows})
  colours = {e: f"C{i}" for i, e in enumerate(budgets)}
  best = max(rows, key=lambda r: (r["epochs"], r["val/accuracy"]))
  for ax, key, label in ((axes[0], "num_params", "parameters"),
                         (axes[1], "total_wall_seconds", "wall time per trial (s)")):
    for e in budgets:
      pts = [r for r in rows if r["epochs"] == e]
      ax.scatter([r[key] for r in pts], [r["val/accuracy"] for r in pts], s=28,
                 color=colours[e], alpha=0.8, label=f"{e} epochs")
    for r, marker, name in ((best, "*", "best"),) + tuple(
        (r, "s", "baseline") for r in rows if r.get("baseline")):
      ax.scatter([r[key]], [r["val/accuracy"]], s=160 if marker == "*" else 70,
                 facecolors="none", edgecolors="black", marker=marker, label=name)
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
  counts = [r["num_params"] for r in rows]
  if max(counts) > 10 * min(counts):
    axes[0].set_xscale("log")
  axes[0].xaxis.set_major_formatter(FuncFormatter(
      lambda v, _: f"{v / 1e6:.1f}M" if v >= 1e6 else f"{v / 1e3:.0f}k"))
  axes[0].xaxis.set_minor_formatter(NullFormatter())
  axes[0].margins(x=0.08)
  axes[0].set_ylabel("val accuracy")
  axes[1].legend(frameon=False, fontsize=8)
  fig.suptitle(title or "architecture search")
  return _save(fig, path)


def per_class_accuracy(panels: Mapping[str, Mapping[str, Sequence[float]]], class_names, path,
                       title="per-class test accuracy"):
  """Grouped bars, one panel per group of runs (e.g. per protocol): one group of bars per class,
  one bar per run (its accuracy on that class). Labels '<group>: <what>' share a colour per
  <group> across panels; a label with 'ensemble' in it is hatched."""
  groups = list(dict.fromkeys(l.split(":")[0] for bars in panels.values() for l in bars))
  colours = {g: f"C{i % 10}" for i, g in enumerate(groups)}
  fig = Figure(figsize=(max(9, 1.6 * len(class_names)), 3.6 * len(panels)))
  axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
  for ax, (panel, bars) in zip(axes, panels.items()):
    width = 0.8 / max(len(bars), 1)
    for i, (label, values) in enumerate(bars.items()):
      xs = [c + (i - (len(bars) - 1) / 2) * width for c in range(len(class_names))]
      ax.bar(xs, [np.nan if v is None else v for v in values], width, label=label,
             color=colours[label.split(":")[0]], edgecolor="white", linewidth=0.5,
             hatch="///" if "ensemble" in label else None)
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy (recall)")
    ax.set_title(f"{title}, {panel}" if len(panels) > 1 else title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize=7, ncol=2, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
  return _save(fig, path)


def reliability_diagram(panels: Mapping[str, Mapping[str, tuple]], path,
                        title="calibration (top-class confidence)", min_count=10):
  """Reliability diagrams, one panel per model: {panel: {label: (mean confidence, accuracy,
  count) per bin}} (metrics.reliability_bins), one line per label (e.g. before and after
  temperature scaling) against the diagonal of a calibrated model, and the share of images per
  bin below it. Bins with fewer than `min_count` images get no point (their accuracy is noise).
  """
  fig = Figure(figsize=(4.2 * len(panels), 5.2))
  axes = fig.subplots(2, len(panels), squeeze=False, sharex=True,
                      gridspec_kw={"height_ratios": (3, 1)})
  for column, (panel, curves) in enumerate(panels.items()):
    ax, ax_count = axes[0, column], axes[1, column]
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="calibrated")
    for i, (label, (confidence, accuracy, count)) in enumerate(curves.items()):
      used = np.asarray(count) >= min_count
      ax.plot(np.asarray(confidence)[used], np.asarray(accuracy)[used], "o-", color=f"C{i}",
              markersize=3, linewidth=1, label=label)
      edges = np.linspace(0, 1, len(count) + 1)
      ax_count.stairs(np.asarray(count) / max(np.sum(count), 1), edges, color=f"C{i}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(panel, fontsize=9)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=7, loc="upper left")
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("share of images")
    for a in (ax, ax_count):
      a.spines[["top", "right"]].set_visible(False)
  fig.suptitle(title)
  return _save(fig, path)


def image_pairs(items, path, title="", columns=4) -> pathlib.Path:
  """Grey images side by side in pairs, `columns` pairs a row: items of ((image a, image b),
  (title a, title b), caption under the pair, highlight: titles in red)."""
  rows = max(1, -(-len(items) // columns))
  fig = Figure(figsize=(2.6 * columns, 2.1 * rows))
  axes = fig.subplots(rows, 2 * columns, squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for k, (images, titles, caption, highlight) in enumerate(items):
    row, column = divmod(k, columns)
    for side, (image, text) in enumerate(zip(images, titles)):
      ax = axes[row, 2 * column + side]
      ax.imshow(image, cmap="gray", vmin=0, vmax=255)
      ax.set_title(text, fontsize=6, color="tab:red" if highlight else "black")
    left = axes[row, 2 * column]
    left.text(1.04, -0.08, caption, transform=left.transAxes, ha="center", va="top", fontsize=7)
  fig.suptitle(title, fontsize=9)
  return _save(fig, path)


def _face_with_heat(ax, face, heat, title, fontsize=7, color=None, alpha=0.4):
  """A grey face with its heat map over it (either may be None) and a title."""
  if face is not None:
    ax.imshow(face, cmap="gray", vmin=0, vmax=255)
  if heat is not None:
    ax.imshow(heat, cmap="jet", alpha=alpha, vmin=0, vmax=1)
  ax.set_title(title, fontsize=fontsize, **({"color": color} if color else {}))


def grad_cam_grid(rows, path, title="Grad-CAM") -> pathlib.Path:
  """A row per class (fer.explain.explain_split's rows): the mean face with the mean heat map
  of the faces the network gets right, then example faces with the heat map of the predicted
  class, its name and probability (green when right, red when wrong)."""
  cols = 1 + max((len(r["faces"]) for r in rows), default=0)
  fig = Figure(figsize=(1.35 * cols, 1.5 * len(rows)))
  axes = fig.subplots(len(rows), cols, squeeze=False)
  for ax in axes.flat:
    ax.set_axis_off()
  for r, row in enumerate(rows):
    _face_with_heat(axes[r, 0], row["mean_face"], row["mean_heat"], f"{row['name']}: mean",
                    fontsize=8, alpha=0.45)
    for c, face in enumerate(row["faces"], start=1):
      _face_with_heat(axes[r, c], face["image"], face["heat"],
                      f"{face['pred']} {face['prob']:.0%}",
                      color="tab:green" if face["right"] else "tab:red")
  fig.suptitle(title, fontsize=10)
  fig.subplots_adjust(top=1 - 0.5 / fig.get_figheight())  # the title close above the rows
  return _save(fig, path)


def grad_cam_faces(items, path, title="Grad-CAM", columns=6) -> pathlib.Path:
  """Faces (fer.explain.explain_photos' items) in a grid, each with its heat map, the predicted
  class and probability above it and its label (the file) below."""
  rows = max(1, -(-len(items) // columns))
  cols = min(columns, max(1, len(items)))
  fig = Figure(figsize=(1.45 * cols, 1.7 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat:
    ax.set_axis_off()
  for ax, item in zip(axes.flat, items):
    _face_with_heat(ax, item["image"], item["heat"], f"{item['pred']} {item['prob']:.0%}")
    ax.text(0.5, -0.04, item["label"][:22], transform=ax.transAxes, ha="center", va="top",
            fontsize=6)
  fig.suptitle(title, fontsize=10)
  return _save(fig, path)
