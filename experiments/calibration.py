r"""How well calibrated are the study's runs? ECE and NLL on test before and after temperature
scaling fit on val, for every run in experiments/results/ with saved probabilities.

  FER2013_ARCHIVE=/path/to/archive.zip python experiments/calibration.py

Reads each run's val_probs.npy / test_probs.npy and config.json (the labels come from the data
the run's protocol names), checks that the probabilities reproduce the run's recorded val and
test accuracy, and writes experiments/results/calibration.md (a row per run) and
experiments/results/calibration.png (reliability diagrams of a few runs). Training runs made
since this analysis existed carry the same figures in their own results.json (`test/ece`,
`temperature`, `test/ece_calibrated`) and reliability.png.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
sys.path.insert(0, str(REPO / "experiments"))

# pylint: disable=wrong-import-position
import ml_collections  # noqa: E402

import study  # noqa: E402
from fer import fileio  # noqa: E402
from fer import input_pipeline  # noqa: E402
from fer import metrics  # noqa: E402
from fer import plots  # noqa: E402

COMMAND = "python experiments/calibration.py"
# The figure's panels: the CNN, the augmented CNN, a strong network and its ensemble (standard).
FIGURE_RUNS = ("cnn_standard_s0", "augment_standard_s0", "strong_s0", "strong_ensemble")


def _labels(config: dict, cache: dict) -> dict:
  """{'val', 'test'}: int labels of the splits the run's input config names (loaded once each)."""
  key = tuple(config["input"].get(k) for k in ("protocol", "val_fraction", "split_seed"))
  if key not in cache:
    cfg = ml_collections.ConfigDict(config["input"])
    cfg.archive, cfg.data_dir = "", ""  # this machine's: $FER2013_ARCHIVE, $FER_DATA_DIR
    data = input_pipeline.load_splits(cfg)
    cache[key] = {s: data[s]["label"] for s in ("val", "test")}
  return cache[key]


def analyse(results_dir: pathlib.Path) -> tuple[list[dict], dict]:
  """A row per run with saved probabilities, and the figure's reliability bins."""
  rows, panels, cache = [], {}, {}
  for run in sorted(p for p in results_dir.iterdir() if (p / "test_probs.npy").is_file()):
    config = json.loads((run / "config.json").read_text())
    recorded = json.loads((run / "results.json").read_text())
    labels = _labels(config, cache)
    probs = {s: np.load(run / f"{s}_probs.npy") for s in ("val", "test")}
    for s in ("val", "test"):
      accuracy = float((probs[s].argmax(1) == labels[s]).mean())
      if abs(accuracy - recorded[f"{s}/accuracy"]) > 1e-9:
        raise SystemExit(f"{run}/{s}_probs.npy gives {s} accuracy {accuracy:.4f}, but its "
                         f"results.json says {recorded[f'{s}/accuracy']:.4f}: other data?")
    test = metrics.classification_metrics(probs["test"], labels["test"], "test")
    scaled = metrics.calibration(probs["val"], labels["val"], probs["test"], labels["test"])
    rows.append({"run": run.name, "protocol": config["input"]["protocol"],
                 "tta": recorded.get("tta", "none"), "test/accuracy": test["test/accuracy"],
                 "test/loss": test["test/loss"], "test/ece": test["test/ece"],
                 "test/confidence": float(probs["test"].max(1).mean()), **scaled})
    if run.name in FIGURE_RUNS:
      panels[run.name] = metrics.reliability_curves(probs["test"], labels["test"],
                                                    scaled["temperature"])
  return rows, {name: panels[name] for name in FIGURE_RUNS if name in panels}


def markdown(rows: list[dict]) -> str:
  lines = [
      "# Calibration of the study's runs (test split)", "",
      f"    {COMMAND}", "",
      f"Machine: {study.machine()} (no training: reads the committed probabilities).", "",
      "ECE: expected calibration error, 15 equal-width bins of top-class confidence (0 = "
      "calibrated). Temperature scaling divides the log-probabilities by T, fit on val by NLL, "
      "and leaves every prediction unchanged; `after` is test after it. Mean confidence "
      "above accuracy: overconfident.", "",
      "| run | protocol | TTA | test acc | mean confidence | NLL | ECE | T (val) | NLL after "
      "| ECE after |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['run']} | {r['protocol']} | {r['tta']} | {r['test/accuracy']:.1%} "
        f"| {r['test/confidence']:.1%} | {r['test/loss']:.3f} | {r['test/ece']:.3f} "
        f"| {r['temperature']:.2f} | {r['test/loss_calibrated']:.3f} "
        f"| {r['test/ece_calibrated']:.3f} |")
  lines += ["", "![reliability diagrams](calibration.png)", ""]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--results", default=str(study.RESULTS),
                      help="folder of collected runs (default: experiments/results)")
  args = parser.parse_args(argv)
  results_dir = pathlib.Path(args.results)
  rows, panels = analyse(results_dir)
  fileio.write_bytes_atomic(results_dir / "calibration.md", markdown(rows).encode())
  if panels:
    plots.reliability_diagram(panels, results_dir / "calibration.png",
                              title="test-set reliability before and after temperature scaling")
  for r in rows:
    print(f"{r['run']:28s} acc {r['test/accuracy']:.3f} ECE {r['test/ece']:.3f} -> "
          f"{r['test/ece_calibrated']:.3f} (T={r['temperature']:.2f})")
  print(f"Wrote {results_dir / 'calibration.md'}")


if __name__ == "__main__":
  main()
