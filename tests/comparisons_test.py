"""experiments/comparisons.py: the README's table of paired comparisons and its source."""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import comparisons  # pylint: disable=wrong-import-position
from experiments import study  # pylint: disable=wrong-import-position


def test_sides_name_runs_or_seed_ranges():
  assert comparisons.runs_of("strong_ensemble") == ["strong_ensemble"]
  assert comparisons.runs_of("strong_s0..s3") == [f"strong_s{k}" for k in range(4)]
  assert comparisons.runs_of("cnn_nocopies_s1..s2") == ["cnn_nocopies_s1", "cnn_nocopies_s2"]


def test_every_compared_run_is_committed_with_its_probabilities():
  for pair in comparisons.COMPARISONS:
    for side in pair:
      for run in comparisons.runs_of(side):
        for name in ("config.json", "val_probs.npy", "test_probs.npy"):
          assert (study.RESULTS / run / name).is_file(), (run, name)


def test_row_format():
  one = {"val": {"difference": 0.0123}, "test": {
      "difference": -0.005, "interval_95": [-0.0151, 0.0049], "mcnemar_p": 0.2567},
         "test_no_train_copy": {"difference": 0.001}}
  assert comparisons.row("a", "b", one) == (
      "| a | b | +1.23 | -0.50 | [-1.51, +0.49] | 0.26 | +0.10 |")
  seeds = {**one, "test": {**one["test"], "mcnemar_p": None}}
  del seeds["test_no_train_copy"]
  assert comparisons.row("a_s0..s2", "b_s0..s1", seeds) == (
      "| a_s0..s2 (3 seeds) | b_s0..s1 (2 seeds) | +1.23 | -0.50 | [-1.51, +0.49] | - | - |")


def test_readme_holds_the_table_the_script_wrote():
  """README.md's compare block is experiments/results/comparisons.md's table (both written by
  `python3 experiments/comparisons.py`): no number edited by hand, none left behind."""
  readme = (REPO / "README.md").read_text()
  block = readme[readme.index(comparisons.START) + len(comparisons.START):
                 readme.index(comparisons.END)].strip("\n")
  written = (study.RESULTS / "comparisons.md").read_text()
  assert block.count("\n") == len(comparisons.COMPARISONS) + 1
  assert block + "\n" in written
