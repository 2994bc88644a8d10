r"""Is run B better than run A, or is the difference noise? Paired tests on the same faces.

  python -m fer.compare --a=runs/strong_half_s0 --b=runs/strong_half_distilled_s0
  python -m fer.compare --a=runs/strong_ensemble --b=runs/strong_mx_ensemble --out=cmp.json
  python -m fer.compare --a=runs/augment_s0,runs/augment_s1,runs/augment_s2 \
      --b=runs/augment_distilled_s0,runs/augment_distilled_s1,runs/augment_distilled_s2

A and B are finished runs or ensembles (fer.ensemble's output), or each a comma-separated list
of runs (seeds of one config, compared by their mean accuracy), all trained on the same splits;
their saved probabilities (val_probs.npy, test_probs.npy) are scored against that protocol's
labels.
On FER2013's 3,589 test faces one run's accuracy has a standard error of about 0.75 points, but
two runs are judged on the same faces, so what decides is where they disagree. Per split:

- the accuracy of A and of B, and B - A with a 95% paired bootstrap interval (`--resamples`
  draws of the faces with replacement, the same draws for both sides; `--seed`); a side of
  several runs also has its runs drawn with replacement in each draw (a hierarchical bootstrap),
  so that the interval holds their seed spread too;
- where each side is one run, McNemar's exact test: of the faces exactly one of the two gets
  right (n_A only A, n_B only B), the two-sided probability of a split at least this uneven if
  neither run were better (binomial, p = 1/2);
- for test, where the data set marks the faces with a near copy in train (FER2013), the same on
  the faces without one; and the same for each class's test faces (seven tests at once: by
  chance alone one of them falls below p = 0.05 about a third of the time).

An interval that holds 0, or p above 0.05, says the data cannot tell the two apart. For one run
a side, that is the variation of the faces only: another seed of the same config moves a run by
its seed spread too, so compare configs by several seeds a side. With 3-4 seeds a side the
runs' draw is coarse: take the interval as a guide, not an exact 95%. Selection is still by
val; test is read as it is.

Prints a table; `--out` also writes the numbers as JSON. Exit status 2 when a run cannot be
read or the two were trained on other splits.
"""

from fer import xla_flags

xla_flags.configure_cpu_defaults()  # before jax starts its backend; a no-op off CPU

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import math
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

from fer import fileio
from fer import runs
from fer.datasets.fer2013 import CLASSES

SPLITS = ("val", "test")


class CompareError(ValueError):
  """The runs cannot be compared; the message names the run and why."""


def mcnemar_p(a_right, b_right) -> float:
  """Two-sided exact McNemar p-value of paired correctness (bool [N] each)."""
  a_right, b_right = np.asarray(a_right, bool), np.asarray(b_right, bool)
  only_a, only_b = int(np.sum(a_right & ~b_right)), int(np.sum(b_right & ~a_right))
  n = only_a + only_b
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
  return min(1.0, 2 * tail / 2 ** n)


def bootstrap_interval(a_right, b_right, resamples: int = 10_000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
  """The bootstrap interval of B's accuracy minus A's from their correctness, bool [N] (one
  run) or [runs, N] (several: their mean accuracy). Each draw takes the faces with replacement,
  the same for both sides (paired), and, on a side of several runs, its runs with replacement
  too (a hierarchical bootstrap: seed noise counts as well as the faces')."""
  a_right, b_right = np.atleast_2d(a_right), np.atleast_2d(b_right)
  n = a_right.shape[1]
  rng = np.random.default_rng(seed)
  diffs, chunk = [], max(1, 2_000_000 // max(n, 1))
  for start in range(0, resamples, chunk):
    draws = rng.integers(0, n, size=(min(chunk, resamples - start), n))
    side = []
    for right in (a_right, b_right):
      accuracy = right[:, draws].mean(axis=-1).T  # [draws, runs]
      if len(right) > 1:
        picks = rng.integers(0, len(right), size=accuracy.shape)
        accuracy = np.take_along_axis(accuracy, picks, axis=1)
      side.append(accuracy.mean(axis=1))
    diffs.append(side[1] - side[0])
  low, high = np.quantile(np.concatenate(diffs), [(1 - level) / 2, (1 + level) / 2])
  return float(low), float(high)


def paired(a_right, b_right, resamples: int = 10_000, seed: int = 0) -> dict:
  """Accuracies, difference and its 95% bootstrap interval of two sides' correctness (bool [N]
  for one run, [runs, N] for several), and McNemar's p and the faces only one side gets right
  where each side is one run."""
  a_right, b_right = np.atleast_2d(np.asarray(a_right, bool)), np.atleast_2d(
      np.asarray(b_right, bool))
  low, high = bootstrap_interval(a_right, b_right, resamples, seed)
  a_acc, b_acc = a_right.mean(axis=1), b_right.mean(axis=1)
  out = {"faces": int(a_right.shape[1]), "a/accuracy": float(a_acc.mean()),
         "b/accuracy": float(b_acc.mean()), "difference": float(b_acc.mean() - a_acc.mean()),
         "interval_95": [low, high], "only_a_right": None, "only_b_right": None,
         "mcnemar_p": None}
  if len(a_right) == len(b_right) == 1:
    a1, b1 = a_right[0], b_right[0]
    out.update(only_a_right=int(np.sum(a1 & ~b1)), only_b_right=int(np.sum(b1 & ~a1)),
               mcnemar_p=mcnemar_p(a1, b1))
  else:
    out.update({"a/run_accuracies": a_acc.tolist(), "b/run_accuracies": b_acc.tolist()})
  return out


def _probs(workdir: pathlib.Path, split: str, n: int) -> np.ndarray:
  path = workdir / f"{split}_probs.npy"
  try:
    probs = np.load(path)
  except (OSError, ValueError) as e:
    raise CompareError(f"{path}: cannot read it ({e}); is the run finished? (runs save their "
                       "probabilities at their end; fer.ensemble --tta=... --out=DIR makes them "
                       "for a run that did not)") from e
  if probs.ndim != 2 or len(probs) != n:
    raise CompareError(f"{path}: probabilities of shape {probs.shape}, expected ({n}, classes): "
                       "made on other data than this protocol's")
  return probs


def compare(a, b, data=None, resamples: int = 10_000, seed: int = 0) -> dict:
  """The paired comparison of sides a and b (a workdir, or a list of them: seeds of one config,
  compared by their mean) on val and test (and test without near copies where the data marks
  them). `data`: the splits (default: loaded from the first run's config)."""
  sides = [[pathlib.Path(w) for w in ([x] if isinstance(x, (str, pathlib.Path)) else x)]
           for x in (a, b)]
  workdirs = sides[0] + sides[1]
  if not sides[0] or not sides[1]:
    raise CompareError("each side needs at least one run")
  try:
    configs = [json.loads(runs.find_config_file(w).read_text()) for w in workdirs]
  except (runs.RunError, OSError, ValueError) as e:
    raise CompareError(str(e)) from e
  mismatch = runs.split_mismatch(workdirs, configs)
  if mismatch:
    raise CompareError(f"{mismatch}. Compare runs of one protocol.")
  if data is None:
    from fer import input_pipeline  # pylint: disable=import-outside-toplevel
    data = input_pipeline.load_splits(runs.load_config(workdirs[0]).input)
  out = {"a": [str(w) for w in sides[0]], "b": [str(w) for w in sides[1]],
         "resamples": resamples, "seed": seed}
  for split in SPLITS:
    labels = np.asarray(data[split]["label"])
    right = [np.stack([_probs(w, split, len(labels)).argmax(1) == labels for w in side])
             for side in sides]
    out[split] = paired(*right, resamples, seed)
    if split == "test" and "train_copy" in data[split]:
      clean = ~np.asarray(data[split]["train_copy"], bool)
      out["test_no_train_copy"] = paired(right[0][:, clean], right[1][:, clean], resamples,
                                         seed)
    if split == "test":
      out["test_per_class"] = {
          name: paired(right[0][:, labels == c], right[1][:, labels == c], resamples, seed)
          for c, name in enumerate(CLASSES) if np.any(labels == c)}
  return out


def _cell(value, width: int, spec: str = "") -> str:
  """value right-aligned in width (formatted by spec); '-' where there is none."""
  return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def _line(label: str, r: dict) -> str:
  low, high = r["interval_95"]
  interval = f"[{100 * low:+.2f}, {100 * high:+.2f}]"
  return (f"{label:<20} {r['faces']:>6,} {100 * r['a/accuracy']:>6.2f}% "
          f"{100 * r['b/accuracy']:>6.2f}% {100 * r['difference']:>+7.2f}  {interval:<17} "
          f"{_cell(r['only_a_right'], 6)} {_cell(r['only_b_right'], 6)} "
          f"{_cell(r['mcnemar_p'], 10, '.3g')}")


def to_table(result: dict) -> str:
  side = lambda runs_: (runs_[0] if len(runs_) == 1 else
                        f"the mean of {len(runs_)} runs: {', '.join(runs_)}")
  lines = [f"A: {side(result['a'])}", f"B: {side(result['b'])}",
           f"{'split':<20} {'faces':>6} {'A':>7} {'B':>7} {'B - A':>7}  {'95% interval':<17} "
           f"{'only A':>6} {'only B':>6} {'McNemar p':>10}"]
  lines += [_line(split, result[split]) for split in (*SPLITS, "test_no_train_copy")
            if split in result]
  if result.get("test_per_class"):
    lines.append("test, by class:")
    lines += [_line(f"  {name}", r) for name, r in result["test_per_class"].items()]
  several = max(len(result["a"]), len(result["b"])) > 1
  lines.append(f"(points; a 95% interval holding 0, or p > 0.05: the data cannot tell A and B "
               f"apart; {result['resamples']:,} bootstrap draws of the faces"
               f"{', and of the runs of a side of several' if several else ''})")
  return "\n".join(lines) + "\n"


FLAGS = flags.FLAGS


def define_flags():
  """The flags, defined only when run as a command (the CLIs share flag names)."""
  flags.DEFINE_list("a", None, "A finished run's (or ensemble's) workdir, or several (seeds of "
                    "one config: compared by their mean accuracy).")
  flags.DEFINE_list("b", None, "The run(s) to compare with them.")
  flags.DEFINE_string("out", None, "Also write the numbers to this JSON file.")
  flags.DEFINE_integer("resamples", 10_000, "Bootstrap draws of the faces.")
  flags.DEFINE_integer("seed", 0, "Seed of the bootstrap draws.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.a or not FLAGS.b:
    raise app.UsageError("--a and --b: the two runs' workdirs.")
  if FLAGS.resamples < 100:
    raise app.UsageError(f"--resamples={FLAGS.resamples}: at least 100")
  logging.set_verbosity(logging.ERROR)
  try:
    result = compare(FLAGS.a, FLAGS.b, resamples=FLAGS.resamples, seed=FLAGS.seed)
  except (CompareError, runs.RunError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sys.stdout.write(to_table(result))
  if FLAGS.out:
    fileio.write_json_atomic(FLAGS.out, result)
    print(f"Wrote {FLAGS.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
