r"""Is run B better than run A, or is the difference noise? Paired tests on the same faces.

  python -m fer.compare --a=runs/strong_half_s0 --b=runs/strong_half_distilled_s0
  python -m fer.compare --a=runs/strong_ensemble --b=runs/strong_mx_ensemble --out=cmp.json

A and B are finished runs or ensembles (fer.ensemble's output) trained on the same splits; their
saved probabilities (val_probs.npy, test_probs.npy) are scored against that protocol's labels.
On FER2013's 3,589 test faces one run's accuracy has a standard error of about 0.75 points, but
two runs are judged on the same faces, so what decides is where they disagree. Per split:

- the accuracy of A and of B, and B - A with a 95% paired bootstrap interval (`--resamples`
  draws of the faces with replacement, the same draws for both runs; `--seed`);
- McNemar's exact test: of the faces exactly one of the two gets right (n_A only A, n_B only
  B), the two-sided probability of a split at least this uneven if neither run were better
  (binomial, p = 1/2);
- for test, where the data set marks the faces with a near copy in train (FER2013), the same on
  the faces without one.

An interval that holds 0, or p above 0.05, says the data cannot tell the two apart. This is the
variation of the test faces only: another seed of the same config moves a run by its seed
spread too (the README's "mean ± std" rows), so compare configs by several seeds or ensembles
of them. Selection is still by val; test is read as it is.

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
  """The paired bootstrap interval of mean(b_right) - mean(a_right): faces drawn with
  replacement, the same draws for both."""
  diff = np.asarray(b_right, np.int8) - np.asarray(a_right, np.int8)
  rng = np.random.default_rng(seed)
  means, chunk = [], max(1, 2_000_000 // max(len(diff), 1))
  for start in range(0, resamples, chunk):
    draws = rng.integers(0, len(diff), size=(min(chunk, resamples - start), len(diff)))
    means.append(diff[draws].mean(axis=1))
  means = np.concatenate(means)
  low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(low), float(high)


def paired(a_right, b_right, resamples: int = 10_000, seed: int = 0) -> dict:
  """Accuracies, difference, its 95% bootstrap interval and McNemar's p of two runs' paired
  correctness (bool [N] each)."""
  a_right, b_right = np.asarray(a_right, bool), np.asarray(b_right, bool)
  low, high = bootstrap_interval(a_right, b_right, resamples, seed)
  return {"faces": int(len(a_right)), "a/accuracy": float(a_right.mean()),
          "b/accuracy": float(b_right.mean()),
          "difference": float(b_right.mean() - a_right.mean()), "interval_95": [low, high],
          "only_a_right": int(np.sum(a_right & ~b_right)),
          "only_b_right": int(np.sum(b_right & ~a_right)), "mcnemar_p": mcnemar_p(a_right, b_right)}


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
  """The paired comparison of runs a and b (workdirs) on val and test (and test without near
  copies where the data marks them). `data`: the splits (default: loaded from a's config)."""
  a, b = pathlib.Path(a), pathlib.Path(b)
  try:
    configs = [json.loads(runs.find_config_file(w).read_text()) for w in (a, b)]
  except (runs.RunError, OSError, ValueError) as e:
    raise CompareError(str(e)) from e
  differ = runs.split_differences(configs[1]["input"], configs[0]["input"])
  if differ:
    raise CompareError(f"{b} was trained on other splits than {a}: {'; '.join(differ)}. "
                       "Compare runs of one protocol.")
  if data is None:
    from fer import input_pipeline  # pylint: disable=import-outside-toplevel
    data = input_pipeline.load_splits(runs.load_config(a).input)
  out = {"a": str(a), "b": str(b), "resamples": resamples, "seed": seed}
  for split in SPLITS:
    labels = np.asarray(data[split]["label"])
    right = [_probs(w, split, len(labels)).argmax(1) == labels for w in (a, b)]
    out[split] = paired(*right, resamples, seed)
    if split == "test" and "train_copy" in data[split]:
      clean = ~np.asarray(data[split]["train_copy"], bool)
      out["test_no_train_copy"] = paired(right[0][clean], right[1][clean], resamples, seed)
  return out


def to_table(result: dict) -> str:
  lines = [f"A: {result['a']}", f"B: {result['b']}",
           f"{'split':<20} {'faces':>6} {'A':>7} {'B':>7} {'B - A':>7}  {'95% interval':<17} "
           f"{'only A':>6} {'only B':>6} {'McNemar p':>10}"]
  for split in (*SPLITS, "test_no_train_copy"):
    if split in result:
      r = result[split]
      low, high = r["interval_95"]
      interval = f"[{100 * low:+.2f}, {100 * high:+.2f}]"
      lines.append(
          f"{split:<20} {r['faces']:>6,} {100 * r['a/accuracy']:>6.2f}% "
          f"{100 * r['b/accuracy']:>6.2f}% {100 * r['difference']:>+7.2f}  {interval:<17} "
          f"{r['only_a_right']:>6} {r['only_b_right']:>6} {r['mcnemar_p']:>10.3g}")
  lines.append(f"(points; a 95% interval holding 0, or p > 0.05: the faces cannot tell A and B "
               f"apart; {result['resamples']:,} paired bootstrap draws)")
  return "\n".join(lines) + "\n"


_A = flags.DEFINE_string("a", None, "A finished run's (or ensemble's) workdir.")
_B = flags.DEFINE_string("b", None, "The run to compare with it.")
_OUT = flags.DEFINE_string("out", None, "Also write the numbers to this JSON file.")
_RESAMPLES = flags.DEFINE_integer("resamples", 10_000, "Bootstrap draws of the faces.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap draws.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _A.value or not _B.value:
    raise app.UsageError("--a and --b: the two runs' workdirs.")
  if _RESAMPLES.value < 100:
    raise app.UsageError(f"--resamples={_RESAMPLES.value}: at least 100")
  logging.set_verbosity(logging.ERROR)
  try:
    result = compare(_A.value, _B.value, resamples=_RESAMPLES.value, seed=_SEED.value)
  except (CompareError, runs.RunError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sys.stdout.write(to_table(result))
  if _OUT.value:
    fileio.write_json_atomic(_OUT.value, result)
    print(f"Wrote {_OUT.value}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  app.run(main)
