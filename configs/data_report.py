r"""The data report: class distributions of train/val/test, exact and near duplicates.

  python -m fer.main --config=configs/data_report.py --workdir=runs/data_report
  python -m fer.main --config=configs/data_report.py --workdir=runs/data_report_seed \
      --config.input.protocol=seed
  python -m fer.main --config=configs/data_report.py:runlocal --workdir=/tmp/data_report

Writes class_distribution*.png, data_report.json (counts[split][class], exact and near
duplicates), data_report.md, duplicates.json, near_duplicates.json and near_duplicates.png into
the workdir. On the 2-core CPU: about 20 s (15 s of it the near-duplicate search), plus ~15 s
the first time (building the TFDS dataset from archive.zip); runlocal (synthetic faces) ~10 s.
"""

from configs import common


def get_config(arg=None):
  common.check_arg(arg, "configs/data_report.py")
  c = common.base()
  c.job = "data_report"
  if arg == "runlocal":
    common.apply_runlocal(c)
  return c
