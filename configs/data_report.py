r"""The data report: class distributions of train/val/test and exact duplicates.

  python -m fer.main --config=configs/data_report.py --workdir=runs/data_report
  python -m fer.main --config=configs/data_report.py --workdir=runs/data_report_seed \
      --config.input.protocol=seed
  python -m fer.main --config=configs/data_report.py:runlocal --workdir=/tmp/data_report

Writes class_distribution*.png, data_report.json (counts[split][class]), data_report.md and
duplicates.json into the workdir. On a 2-core CPU: ~15 s the first time (building the TFDS
dataset from archive.zip), ~5 s afterwards; runlocal (synthetic faces) ~2 s.
"""

from configs import common


def get_config(arg=None):
  common.check_arg(arg, "configs/data_report.py")
  c = common.base()
  c.job = "data_report"
  if arg == "runlocal":
    common.apply_runlocal(c)
  return c
