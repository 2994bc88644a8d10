"""The data report: class distributions and exact duplicates of the protocol's train/val/test.

  python -m fer.main --config=configs/data_report.py --workdir=W

writes into W:
  class_distribution_{train,val,test}.png  one bar chart per split
  class_distribution.png                   the three splits side by side
  data_report.json                         counts[split][class], totals, duplicate figures
  data_report.md                           the same as markdown tables
  duplicates.json                          every group of identical images, with its members

Duplicates are exact: identical 48x48 pixels. They are counted within each split, across each
pair of splits (leakage between train and the evaluation splits), and where the copies'
labels disagree. Exact only: a copy that was re-encoded (the Kaggle archive's training JPEGs
went through a resize round trip) differs in a few grey levels and is not found.
"""

import hashlib
import itertools
import pathlib
import time

import numpy as np

from fer import fileio
from fer import input_pipeline
from fer import plots
from fer.datasets.fer2013 import CLASSES

SPLITS = ("train", "val", "test")
MAX_LISTED_CONFLICTS = 25  # label conflicts listed in the markdown (all are in duplicates.json)


def class_counts(labels: np.ndarray) -> dict[str, int]:
  counts = np.bincount(np.asarray(labels), minlength=len(CLASSES))
  return {name: int(n) for name, n in zip(CLASSES, counts)}


def find_duplicates(splits: dict[str, dict[str, np.ndarray]]) -> dict:
  """Exact-duplicate figures over splits {'train', 'val', 'test'}: {'image', 'label'[, 'file_name']}.

  Returns {'summary': ..., 'within': {split: ...}, 'across': {'a-b': ...}, 'groups': [...]},
  where each group is a list of {'split', 'index', 'file', 'label'} with identical pixels.
  """
  names = list(splits)
  images = np.concatenate([splits[s]["image"].reshape(len(splits[s]["image"]), -1)
                           for s in names])
  labels = np.concatenate([splits[s]["label"] for s in names])
  split_of = np.concatenate([np.full(len(splits[s]["label"]), i) for i, s in enumerate(names)])
  index_of = np.concatenate([np.arange(len(splits[s]["label"])) for s in names])
  files = np.concatenate([
      splits[s]["file_name"] if "file_name" in splits[s]
      else np.array([f"{s}[{i}]" for i in range(len(splits[s]["label"]))]) for s in names])

  rows = np.ascontiguousarray(images).view(np.dtype((np.void, images.shape[1])))[:, 0]
  _, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
  dup_ids = np.flatnonzero(counts > 1)
  order = np.argsort(inverse, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)])
  members = {g: order[starts[g]:starts[g + 1]] for g in dup_ids}

  groups, conflicting = [], []
  within = {s: {"groups": 0, "extra_copies": 0, "label_conflicts": 0} for s in names}
  across = {f"{a}-{b}": {"shared_images": 0, "images_in_" + b: 0, "label_conflicts": 0}
            for a, b in itertools.combinations(names, 2)}
  for g in dup_ids:
    rows_g = members[g]
    group = [{"split": names[split_of[r]], "index": int(index_of[r]), "file": str(files[r]),
              "label": CLASSES[labels[r]]} for r in rows_g]
    conflict = len(set(labels[rows_g].tolist())) > 1
    groups.append({"copies": len(rows_g), "label_conflict": conflict, "members": group})
    if conflict:
      conflicting.append(groups[-1])
    for i, s in enumerate(names):
      in_s = rows_g[split_of[rows_g] == i]
      if len(in_s) > 1:
        within[s]["groups"] += 1
        within[s]["extra_copies"] += len(in_s) - 1
        within[s]["label_conflicts"] += len(set(labels[in_s].tolist())) > 1
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
      in_a, in_b = rows_g[split_of[rows_g] == i], rows_g[split_of[rows_g] == j]
      if len(in_a) and len(in_b):
        pair = across[f"{a}-{b}"]
        pair["shared_images"] += 1
        pair["images_in_" + b] += len(in_b)
        pair["label_conflicts"] += len(set(labels[np.concatenate([in_a, in_b])].tolist())) > 1

  constant = images.min(axis=1) == images.max(axis=1)
  summary = {
      "images": int(len(labels)),
      "distinct_images": int(len(counts)),
      "duplicate_groups": int(len(dup_ids)),
      "images_in_duplicate_groups": int(counts[dup_ids].sum()),
      "extra_copies": int((counts[dup_ids] - 1).sum()),
      "label_conflict_groups": len(conflicting),
      "constant_images": int(constant.sum()),
  }
  groups.sort(key=lambda g: (not g["label_conflict"], -g["copies"], g["members"][0]["file"]))
  return {"summary": summary, "within": within, "across": across, "groups": groups}


def _markdown(report: dict) -> str:
  counts, totals = report["counts"], report["totals"]
  lines = [
      "# FER2013 data report", "",
      f"Source: `{report['source']}`; protocol `{report['protocol']}`"
      + (f" (split_seed {report['split_seed']})" if report["protocol"] != "standard" else "")
      + ".", "",
      "## Images per class", "",
      "| class | " + " | ".join(SPLITS) + " | total |",
      "|---|" + "---:|" * (len(SPLITS) + 1),
  ]
  for name in CLASSES:
    row = [counts[s][name] for s in SPLITS]
    lines.append(f"| {name} | " + " | ".join(
        f"{n:,} ({100 * n / max(totals[s], 1):.1f}%)" for n, s in zip(row, SPLITS))
                 + f" | {sum(row):,} |")
  lines.append("| total | " + " | ".join(f"{totals[s]:,}" for s in SPLITS)
               + f" | {sum(totals.values()):,} |")
  d = report["duplicates"]
  s = d["summary"]
  lines += [
      "", "## Exact duplicates (identical pixels)", "",
      f"{s['images']:,} images, {s['distinct_images']:,} distinct. {s['duplicate_groups']:,} "
      f"pixel contents occur more than once ({s['images_in_duplicate_groups']:,} images, "
      f"{s['extra_copies']:,} extra copies); in {s['label_conflict_groups']:,} of them the "
      f"copies' labels disagree. {s['constant_images']:,} images are a single grey level.", "",
      "| within | groups | extra copies | label conflicts |", "|---|---:|---:|---:|",
  ]
  for split, w in d["within"].items():
    lines.append(f"| {split} | {w['groups']:,} | {w['extra_copies']:,} | "
                 f"{w['label_conflicts']:,} |")
  lines += ["", "| across | shared images | copies in the second split | label conflicts |",
            "|---|---:|---:|---:|"]
  for pair, a in d["across"].items():
    second = pair.split("-")[1]
    lines.append(f"| {pair} | {a['shared_images']:,} | {a['images_in_' + second]:,} | "
                 f"{a['label_conflicts']:,} |")
  conflicts = [g for g in d["groups"] if g["label_conflict"]]
  if conflicts:
    lines += ["", f"### Label conflicts (first {min(len(conflicts), MAX_LISTED_CONFLICTS)} "
              f"of {len(conflicts)}; all in duplicates.json)", ""]
    for g in conflicts[:MAX_LISTED_CONFLICTS]:
      lines.append("- " + ", ".join(f"`{m['file']}` ({m['split']}: {m['label']})"
                                    for m in g["members"]))
  lines += ["", "Figures: class_distribution.png, " + ", ".join(
      f"class_distribution_{s}.png" for s in SPLITS) + ".", ""]
  return "\n".join(lines)


def run(config, workdir) -> dict:
  """Writes the report (figures, data_report.json/.md, duplicates.json) into `workdir`."""
  start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  splits = input_pipeline.load_splits(config.input, with_names=True)
  counts = {s: class_counts(splits[s]["label"]) for s in SPLITS}
  totals = {s: int(len(splits[s]["label"])) for s in SPLITS}
  duplicates = find_duplicates({s: splits[s] for s in SPLITS})
  source = config.input.source
  if source == "fer2013":
    source = str(input_pipeline.prepare(config.input.archive, config.input.data_dir,
                                        verbose=False).info.metadata.get("source", source))
  report = {
      "source": source,
      "protocol": config.input.protocol if config.input.source == "fer2013" else "synthetic",
      "split_seed": config.input.split_seed,
      "classes": list(CLASSES),
      "counts": counts,
      "totals": totals,
      "duplicates": {k: v for k, v in duplicates.items() if k != "groups"},
      "content_sha256": {s: hashlib.sha256(splits[s]["image"].tobytes()
                                           + splits[s]["label"].tobytes()).hexdigest()
                         for s in SPLITS},
  }
  for s in SPLITS:
    plots.class_distribution(counts[s], workdir / f"class_distribution_{s}.png",
                             title=f"{s} class distribution")
  plots.class_distributions(counts, workdir / "class_distribution.png",
                            title=f"class distribution ({report['protocol']} protocol)")
  fileio.write_json_atomic(workdir / "data_report.json", report)
  fileio.write_json_atomic(workdir / "duplicates.json", duplicates["groups"])
  fileio.write_text_atomic(workdir / "data_report.md", _markdown({**report, "duplicates": duplicates}))
  print(f"data report: {totals} images, {duplicates['summary']['duplicate_groups']} duplicate "
        f"groups, {duplicates['summary']['label_conflict_groups']} with conflicting labels; "
        f"written to {workdir} in {time.perf_counter() - start:.1f}s", flush=True)
  return report
