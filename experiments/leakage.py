r"""Test accuracy of every collected run on the test faces with and without a near copy in its
train split, per protocol.

  FER2013_ARCHIVE=/path/to/archive.zip FER_DATA_DIR=/path/to/tfds python3 experiments/leakage.py

Loads each protocol's splits (fer.input_pipeline.load_splits: the order the runs' test_probs.npy
rows follow), finds near duplicates as the data report does
(fer.duplicates.find_near_duplicates), checks that every run's saved test probabilities give
its results.json test/accuracy back (argmax), and writes experiments/results/leakage.md: per run
the accuracy on the test faces whose near-duplicate group holds a train image and on the others,
the first split by whether all those train copies carry the test face's label. About a minute
per protocol on a 2-core CPU (the near-duplicate search).
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
  return f"{len(correct):,} | {100 * correct.mean():.1f}%" if len(correct) else "0 | -"


def _difference(a: np.ndarray, b: np.ndarray) -> str:
  """Accuracy difference a - b in points with a 95% normal-approximation interval."""
  pa, pb = a.mean(), b.mean()
  half = 1.96 * math.sqrt(pa * (1 - pa) / len(a) + pb * (1 - pb) / len(b))
  return f"{100 * (pa - pb):+.1f} ± {100 * half:.1f}"


def _run_dirs(results: pathlib.Path, names: str) -> list[pathlib.Path]:
  """The runs named (comma-separated), else every run in `results` that saved test probabilities."""
  if names:
    return [results / n for n in names.split(",")]
  return sorted(d for d in results.iterdir() if all(
      (d / f).is_file() for f in ("test_probs.npy", "results.json", "config.json")))


def _split_key(input_cfg: dict) -> tuple:
  """What fixes a run's splits: protocol, split seed (and val fraction where it counts)."""
  protocol = input_cfg.get("protocol", "standard")
  return (protocol, 0 if protocol == "standard" else input_cfg.get("split_seed", 0),
          input_cfg.get("val_fraction", 0.5) if protocol == "val_fraction" else None)


def _section(key: tuple, runs: list[pathlib.Path]) -> list[str]:
  """The table of the runs that share the splits `key`: their test faces split by whether their
  near-duplicate group holds a train image (of the full train split: drop_train_copies runs
  trained without those copies, which is the point of comparing them)."""
  protocol, split_seed, val_fraction = key
  config = data_report_config.get_config()  # archive/data dir from the environment
  config.input.protocol, config.input.split_seed = protocol, split_seed
  if val_fraction is not None:
    config.input.val_fraction = val_fraction
  splits = input_pipeline.load_splits(config.input)
  near = duplicates.find_near_duplicates(splits)
  labels = splits["test"]["label"]
  copies = test_copies_in_train(near, len(labels))
  rows = []
  for run_dir in runs:
    probs = np.load(run_dir / "test_probs.npy")
    saved = json.loads((run_dir / "results.json").read_text())["test/accuracy"]
    correct = probs.argmax(axis=1) == labels if len(probs) == len(labels) else None
    if correct is None or abs(correct.mean() - saved) > 1e-9:
      raise ValueError(f"{run_dir}: test_probs.npy ({len(probs)} rows) does not give its "
                       f"results.json test/accuracy {saved:.6f} on the {len(labels)} test faces "
                       f"of protocol {protocol} (split_seed {split_seed}) in load_splits order")
    rows.append(f"| {run_dir.name} | {100 * saved:.2f}% | {_accuracy(correct[copies == 0])} | "
                f"{_accuracy(correct[copies > 0])} | "
                f"{_difference(correct[copies > 0], correct[copies == 0])} | "
                f"{_accuracy(correct[copies == 1])} | {_accuracy(correct[copies == 2])} |")
  test_is = {"standard": "PrivateTest", "seed": "PublicTest + PrivateTest",
             "val_fraction": "PrivateTest"}[protocol]
  train_is = {"standard": "Training", "seed": "half of Training (the other half is val)",
              "val_fraction": f"{1 - (val_fraction or 0):.0%} of Training"}[protocol]
  return [
      f"## Protocol `{protocol}`" + (f", split_seed {split_seed}" if protocol != "standard"
                                     else ""), "",
      f"Test = {test_is} ({len(labels):,} faces), train = {train_is}. "
      f"{(copies > 0).sum():,} test faces ({100 * (copies > 0).mean():.1f}%) have a near copy "
      f"in train, of which {(copies == 1).sum():,} have train copies all labelled as the test "
      f"face and {(copies == 2).sum():,} a train copy labelled otherwise.", "",
      "| run | test accuracy | no copy in train: n | accuracy | copy in train: n | accuracy | "
      "difference (points, 95% CI) | same label in train: n | accuracy | other label in "
      "train: n | accuracy |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
      *rows, ""]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--results", default=str(ROOT / "experiments" / "results"))
  parser.add_argument("--runs", default="", help="comma-separated run names (default: every run "
                      "in --results with test_probs.npy)")
  parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "leakage.md"))
  args = parser.parse_args(argv)
  start = time.perf_counter()
  groups = {}
  for run_dir in _run_dirs(pathlib.Path(args.results), args.runs):
    config = json.loads((run_dir / "config.json").read_text())
    if config["input"].get("source", "fer2013") == "fer2013":
      groups.setdefault(_split_key(config["input"]), []).append(run_dir)
  sections = [line for key in sorted(groups, key=lambda k: (k[0] != "standard", k))
              for line in _section(key, groups[key])]
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False, cwd=ROOT).stdout.strip()
  lines = [
      "# Test accuracy with and without a near copy in train", "",
      f"Command: `python3 experiments/{pathlib.Path(__file__).name}"
      + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
      + "` (FER2013_ARCHIVE, FER_DATA_DIR set)  ",
      f"Machine: {study.machine()}; {time.perf_counter() - start:.0f} s  ",
      f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}, commit {commit}", "",
      "A test face has a near copy in train when its near-duplicate group (fer.duplicates: "
      f"aligned band-pass similarity >= {duplicates.NEAR_THRESHOLD}, copies of copies included) "
      "holds a train image. Runs named *_nocopies_* trained without those train images "
      "(input.drop_train_copies): for them the split says whether the face had a copy they were "
      "kept from. Each run's test_probs.npy reproduces its results.json test/accuracy (argmax).",
      "", *sections]
  fileio.write_text_atomic(args.out, "\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
