r"""Test accuracy of the standard-protocol runs on the PrivateTest faces with and without a near
copy in train.

  FER2013_ARCHIVE=/path/to/archive.zip FER_DATA_DIR=/path/to/tfds python3 experiments/leakage.py

Loads the standard protocol's splits (fer.input_pipeline.load_splits; test = PrivateTest, in the
order the runs' test_probs.npy rows follow), finds near duplicates as the data report does
(fer.duplicates.find_near_duplicates), checks that every run's saved test probabilities give
its results.json test/accuracy back (argmax), and writes experiments/results/leakage.md: per run
the accuracy on the test faces whose near-duplicate group holds a train image and on the others,
the first split by whether all those train copies carry the test face's label. About a minute
on a 2-core CPU (the near-duplicate search).
"""

import argparse
import datetime
import json
import math
import pathlib
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import data_report as data_report_config  # pylint: disable=wrong-import-position
from experiments import study  # pylint: disable=wrong-import-position
from fer import duplicates  # pylint: disable=wrong-import-position
from fer import fileio  # pylint: disable=wrong-import-position
from fer import input_pipeline  # pylint: disable=wrong-import-position

RUNS = ("cnn_standard_s0", "cnn_standard_s1", "cnn_standard_s2", "cnn_standard_ensemble",
        "cnn_nocopies_s0",
        "augment_standard_s0", "augment_standard_s1", "augment_standard_s2",
        "augment_standard_ensemble", "augment_nocopies_s0", "strong_s0", "strong_s1",
        "strong_s2", "strong_s3",
        "strong_cpu_s0", "strong_ensemble")


def test_copies_in_train(near: dict, num_test: int) -> np.ndarray:
  """int [num_test]: 0 no near copy in train, 1 copies in train all with the test face's label,
  2 some train copy labelled otherwise (a test face counts when its group holds a train image)."""
  out = np.zeros(num_test, int)
  for group in near["groups"]:
    train_labels = {m["label"] for m in group["members"] if m["split"] == "train"}
    if train_labels:
      for m in group["members"]:
        if m["split"] == "test":
          out[m["index"]] = 1 if train_labels == {m["label"]} else 2
  return out


def _accuracy(correct: np.ndarray) -> str:
  return f"{len(correct):,} | {100 * correct.mean():.1f}%" if len(correct) else f"0 | -"


def _difference(a: np.ndarray, b: np.ndarray) -> str:
  """Accuracy difference a - b in points with a 95% normal-approximation interval."""
  pa, pb = a.mean(), b.mean()
  half = 1.96 * math.sqrt(pa * (1 - pa) / len(a) + pb * (1 - pb) / len(b))
  return f"{100 * (pa - pb):+.1f} ± {100 * half:.1f}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--results", default=str(ROOT / "experiments" / "results"))
  parser.add_argument("--runs", default=",".join(RUNS))
  parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "leakage.md"))
  args = parser.parse_args(argv)
  start = time.perf_counter()
  config = data_report_config.get_config()  # standard protocol; archive/data dir from env
  splits = input_pipeline.load_splits(config.input, with_names=True)
  near = duplicates.find_near_duplicates(splits)
  labels = splits["test"]["label"]
  copies = test_copies_in_train(near, len(labels))

  rows = []
  for run in args.runs.split(","):
    run_dir = pathlib.Path(args.results) / run
    probs = np.load(run_dir / "test_probs.npy")
    saved = json.loads((run_dir / "results.json").read_text())["test/accuracy"]
    correct = probs.argmax(axis=1) == labels
    if len(probs) != len(labels) or abs(correct.mean() - saved) > 1e-9:
      raise ValueError(f"{run}: test_probs.npy gives accuracy {correct.mean():.6f} on "
                       f"{len(probs)} rows, results.json {saved:.6f} on {len(labels)} faces: "
                       "not the standard protocol's test split in load_splits order")
    rows.append(f"| {run} | {100 * saved:.2f}% | {_accuracy(correct[copies == 0])} | "
                f"{_accuracy(correct[copies > 0])} | "
                f"{_difference(correct[copies > 0], correct[copies == 0])} | "
                f"{_accuracy(correct[copies == 1])} | {_accuracy(correct[copies == 2])} |")

  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False, cwd=ROOT).stdout.strip()
  s = near["summary"]
  lines = [
      "# Test accuracy with and without a near copy in train", "",
      f"Command: `python3 experiments/{pathlib.Path(__file__).name}"
      + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
      + "` (FER2013_ARCHIVE, FER_DATA_DIR set)  ",
      f"Machine: {study.machine()}; {time.perf_counter() - start:.0f} s  ",
      f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}, commit {commit}", "",
      f"Standard protocol, test = PrivateTest ({len(labels):,} faces). A test face has a near copy "
      f"in train when its near-duplicate group (fer.duplicates: aligned band-pass similarity "
      f">= {s['threshold']}, copies of copies included) holds a train image: "
      f"{(copies > 0).sum():,} faces ({100 * (copies > 0).mean():.1f}%), of which "
      f"{(copies == 1).sum():,} have train copies all labelled as the test face and "
      f"{(copies == 2).sum():,} a train copy labelled otherwise. Each run's test_probs.npy "
      "reproduces its results.json test/accuracy (argmax).", "",
      "| run | test accuracy | no copy in train: n | accuracy | copy in train: n | accuracy | "
      "difference (points, 95% CI) | same label in train: n | accuracy | other label in "
      "train: n | accuracy |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
      *rows, "",
  ]
  fileio.write_text_atomic(args.out, "\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
