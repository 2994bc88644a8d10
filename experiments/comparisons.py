r"""The README's table of paired comparisons between committed runs (fer.compare).

  FER2013_ARCHIVE=/path/to/archive.zip FER_DATA_DIR=/path/to/tfds python3 experiments/comparisons.py

Runs fer.compare.compare on each pair of COMPARISONS (runs in experiments/results/; a side of
several runs is their seeds, compared by their mean), and writes experiments/results/
comparisons.md (the table with the command, machine and date) and the same table between the
README's compare markers. Needs the data (the labels, and which test faces have a near copy in
train); 10-15 s a comparison on the 2-core CPU.
"""

import argparse
import datetime
import pathlib
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import study  # pylint: disable=wrong-import-position
from fer import compare  # pylint: disable=wrong-import-position
from fer import fileio  # pylint: disable=wrong-import-position

START, END = "<!-- compare:start -->", "<!-- compare:end -->"
# (A, B): run names in experiments/results/, or "<name>_s0..s<k>" for the seeds s0..sk.
COMPARISONS = (
    ("cnn_nocopies_s0", "augment_nocopies_s0"),
    ("strong_s0", "strong_half_s0"),
    ("strong_half_s0", "strong_half_distilled_s0"),
    ("strong_half_s0", "strong_half_e200_s0"),
    ("strong_half_s0", "strong_half_sam_s0"),
    ("strong_e50_s0", "strong_resnet_half_e50_s0"),
    ("strong_half_ensemble", "strong_ensemble"),
    ("strong_half_ensemble", "strong_half_e200_ensemble"),
    ("strong_ensemble", "strong_mx_ensemble"),
    ("strong_mx_ensemble", "strong_mx_e200_ensemble"),
    ("strong_half_e200_ensemble", "strong_half_resnet_ensemble"),
    ("strong_mx_e200_ensemble", "strong_mx_resnet_ensemble"),
    ("strong_half_resnet_ensemble", "strong_half_resnet2_ensemble"),
    ("strong_mx_e200_ensemble", "strong_mx_resnet2_ensemble"),
    ("strong_half_e200_ensemble", "strong_half_resnet100_ensemble"),
    ("strong_mx_e200_ensemble", "strong_mx_resnet100_ensemble"),
    ("strong_half_resnet100_ensemble", "strong_half_resnet100x2_ensemble"),
    ("strong_half_resnet100x2_ensemble", "greedy_all_ensemble"),
    ("greedy_ensemble", "greedy_all_ensemble"),
    ("strong_s0..s3", "strong_half_s0..s2"),
    ("strong_half_s0..s2", "strong_half_e200_s0"),
    ("strong_half_s0..s2", "strong_half_sam_s0"),
    ("strong_half_s0..s2", "strong_resnet_half_e50_s0"),
    ("strong_half_s0..s2", "strong_resnet_half_e50_s0..s1"),
    ("strong_half_s0..s2", "strong_resnet_half_s0"),
    ("strong_resnet_half_e50_s0..s1", "strong_resnet_half_s0"),
    ("strong_half_s0..s2", "strong_resnet_half_s0..s1"),
    ("strong_resnet_half_e50_s0..s1", "strong_resnet_half_s0..s1"),
    ("cnn_nocopies_s0..s2", "cnn_distilled_s0..s2"),
    ("augment_nocopies_s0..s2", "augment_distilled_s0..s2"),
)


def runs_of(side: str) -> list[str]:
  """'x_s0..s2' -> ['x_s0', 'x_s1', 'x_s2']; a name -> [name]."""
  if ".." not in side:
    return [side]
  head, last = side.split("..")
  stem, first = head.rsplit("_s", 1)
  return [f"{stem}_s{k}" for k in range(int(first), int(last.lstrip("s")) + 1)]


def _points(x: float) -> str:
  return f"{100 * x:+.2f}"


def row(a: str, b: str, result: dict) -> str:
  """A table row: the sides, val and test B - A, the test interval and McNemar's p (one run a
  side), and B - A on the test faces without a near copy in train."""
  test, clean = result["test"], result.get("test_no_train_copy")
  low, high = test["interval_95"]
  label = lambda side: side if ".." not in side else f"{side} ({len(runs_of(side))} seeds)"
  p = "-" if test["mcnemar_p"] is None else f"{test['mcnemar_p']:.2g}"
  return (f"| {label(a)} | {label(b)} | {_points(result['val']['difference'])} | "
          f"{_points(test['difference'])} | [{_points(low)}, {_points(high)}] | {p} | "
          f"{_points(clean['difference']) if clean else '-'} |")


def table(rows: list[str]) -> str:
  return "\n".join([
      "| A | B | val B - A | test B - A | 95% interval (test) | McNemar p (test) | "
      "no near copy: B - A |",
      "|---|---|---:|---:|---|---:|---:|", *rows]) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--results", default=str(study.RESULTS))
  parser.add_argument("--out", default=str(study.RESULTS / "comparisons.md"))
  parser.add_argument("--readme", default=str(study.REPO / "README.md"))
  args = parser.parse_args(argv)
  results_dir, start, rows = pathlib.Path(args.results), time.perf_counter(), []
  for a, b in COMPARISONS:
    result = compare.compare([results_dir / r for r in runs_of(a)],
                             [results_dir / r for r in runs_of(b)])
    rows.append(row(a, b, result))
    print(rows[-1], flush=True)
  text = table(rows)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False, cwd=ROOT).stdout.strip()
  fileio.write_text_atomic(args.out, "\n".join([
      "# Paired comparisons of committed runs (fer.compare)", "",
      f"Command: `python3 experiments/{pathlib.Path(__file__).name}"
      + "".join(f" {shlex.quote(x)}" for x in (argv if argv is not None else sys.argv[1:]))
      + "` (FER2013_ARCHIVE, FER_DATA_DIR set)  ",
      f"Machine: {study.machine()}; {time.perf_counter() - start:.0f} s  ",
      f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}, commit {commit}", "",
      "Differences in points; the interval is fer.compare's 95% bootstrap interval (10,000 "
      "draws of the faces, and of the seeds of a side of several); McNemar's exact test where "
      "each side is one run.", "", text]))
  readme = pathlib.Path(args.readme)
  body = readme.read_text()
  new = study.between(body, START, END, text)
  if new != body:
    fileio.write_text_atomic(readme, new)
  print(f"Wrote {args.out} and the README's table.")


if __name__ == "__main__":
  main()
