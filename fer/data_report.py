"""The data report: class distributions, exact and near duplicates of the protocol's splits.

  python -m fer.main --config=configs/data_report.py --workdir=W

writes into W:
  class_distribution_{train,val,test}.png  one bar chart per split
  class_distribution.png                   the three splits side by side
  data_report.json                         counts[split][class], totals, duplicate figures
  data_report.md                           the same as markdown tables
  duplicates.json                          every group of identical images, with its members
  near_duplicates.json                     every near-duplicate pair (files, labels, similarity)
                                           and every group they form
  near_duplicates.png                      cross-split example pairs

How exact and near duplicates are found, and how the near-duplicate threshold was chosen:
fer/duplicates.py.
"""

import hashlib
import pathlib
import time

import numpy as np

from fer import duplicates as dup
from fer import fileio
from fer import input_pipeline
from fer import plots
from fer.datasets.fer2013 import CLASSES
from fer.datasets.fer2013 import IMAGE_SIZE

SPLITS = ("train", "val", "test")
MAX_LISTED_CONFLICTS = 25  # label conflicts listed in the markdown (all are in duplicates.json)
NEAR_FIGURE_PAIRS = 12  # cross-split example pairs in near_duplicates.png


def class_counts(labels: np.ndarray) -> dict[str, int]:
  counts = np.bincount(np.asarray(labels), minlength=len(CLASSES))
  return {name: int(n) for name, n in zip(CLASSES, counts)}


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
  if "near_duplicates" in report:
    lines += _near_markdown(report["near_duplicates"], totals)
  lines += ["", "Figures: class_distribution.png, " + ", ".join(
      f"class_distribution_{s}.png" for s in SPLITS)
            + (", near_duplicates.png" if "near_duplicates" in report else "") + ".", ""]
  return "\n".join(lines)


def _near_markdown(near: dict, totals: dict) -> list[str]:
  s = near["summary"]
  lines = [
      "", "## Near duplicates (a superset of the exact ones)", "",
      f"Copies that differ by re-encoding, brightness, contrast, a few pixels of shift or a few "
      f"percent of zoom: {s['pairs']:,} pairs of images have an aligned band-pass similarity "
      f">= {s['threshold']} (identical pairs count as 1; {s['identical_pairs']:,} of the "
      f"pairs are identical), out of {s['candidate_pairs']:,} candidate pairs compared. They "
      f"join into {s['groups']:,} groups of {s['images_in_groups']:,} images (copies of copies "
      f"included). The labels disagree in {s['label_conflict_pairs']:,} pairs "
      f"({s['label_conflict_groups']:,} groups). {s['flat_images']:,} nearly blank images are "
      "matched exactly only. Method and threshold: fer/duplicates.py.", "",
      "| within | pairs | images with a near-copy in the split | label-conflict pairs |",
      "|---|---:|---:|---:|",
  ]
  for split, w in near["within"].items():
    lines.append(f"| {split} | {w['pairs']:,} | {w['images']:,} | "
                 f"{w['label_conflict_pairs']:,} |")
  lines += ["", "| across | pairs | images of the first split with a near-copy in the second | "
            "images of the second split with a near-copy in the first | label-conflict pairs |",
            "|---|---:|---:|---:|---:|"]
  for pair, a in near["across"].items():
    first, second = pair.split("-")
    n_first, n_second = a["images_in_" + first], a["images_in_" + second]
    lines.append(
        f"| {pair} | {a['pairs']:,} | {n_first:,} ({100 * n_first / max(totals[first], 1):.1f}%)"
        f" | {n_second:,} ({100 * n_second / max(totals[second], 1):.1f}%) | "
        f"{a['label_conflict_pairs']:,} |")
  conflicts = [p for p in near["pairs"]
               if p["label_conflict"] and p["a"]["split"] != p["b"]["split"]]
  shown = [p for p in conflicts if not p["exact"]]
  per_pair = MAX_LISTED_CONFLICTS // max(len(near["across"]), 1)
  shown = [p for pair in near["across"] for p in [
      q for q in shown if f"{q['a']['split']}-{q['b']['split']}" == pair][:per_pair]]
  if conflicts:
    lines += ["", f"### Label conflicts across splits ({len(conflicts):,} pairs, "
              f"{len(conflicts) - sum(p['exact'] for p in conflicts):,} of them not identical; "
              f"up to {per_pair} of those per pair of splits, most similar first; all pairs in "
              "near_duplicates.json)", ""]
    for p in shown:
      lines.append(f"- {p['similarity']:.3f}: " + ", ".join(
          f"`{m['file']}` ({m['split']}: {m['label']})" for m in (p["a"], p["b"])))
  return lines


def near_duplicate_figure(near: dict, splits: dict[str, dict[str, np.ndarray]], path,
                          title: str = "near duplicates across splits") -> pathlib.Path:
  """NEAR_FIGURE_PAIRS cross-split pairs, spread evenly over their similarity from the threshold
  up (pixel-identical ones only when too few differ), each image with split, label and file."""
  across = [p for p in near["pairs"] if p["a"]["split"] != p["b"]["split"]]
  shown = [p for p in across if not p["exact"]]
  shown = shown if len(shown) >= NEAR_FIGURE_PAIRS else across
  shown = sorted(shown, key=lambda p: p["similarity"])
  picks = sorted(set(np.linspace(0, len(shown) - 1, min(NEAR_FIGURE_PAIRS, len(shown)))
                     .round().astype(int).tolist())) if shown else []
  items = []
  for pick in picks:
    p = shown[pick]
    faces = [splits[m["split"]]["image"][m["index"]].reshape(IMAGE_SIZE, IMAGE_SIZE)
             for m in (p["a"], p["b"])]
    titles = [f"{m['split']}: {m['label']}\n{m['file'].rsplit('/', 1)[-1]}"
              for m in (p["a"], p["b"])]
    items.append((faces, titles, f"similarity {p['similarity']:.3f}", p["label_conflict"]))
  return plots.image_pairs(items, path, f"{title} (red: labels disagree)")


def run(config, workdir) -> dict:
  """Writes the report (figures, data_report.json/.md, duplicates.json, near_duplicates.json)
  into `workdir`."""
  start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  splits = input_pipeline.load_splits(config.input, with_names=True)
  counts = {s: class_counts(splits[s]["label"]) for s in SPLITS}
  totals = {s: int(len(splits[s]["label"])) for s in SPLITS}
  duplicates = dup.find_duplicates({s: splits[s] for s in SPLITS})
  near_start = time.perf_counter()
  near = dup.find_near_duplicates({s: splits[s] for s in SPLITS})
  near_seconds = time.perf_counter() - near_start
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
      "near_duplicates": {k: v for k, v in near.items() if k not in ("pairs", "groups")},
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
  near_duplicate_figure(near, splits, workdir / "near_duplicates.png",
                        title=f"near duplicates across splits ({report['protocol']} protocol)")
  fileio.write_json_atomic(workdir / "duplicates.json", duplicates["groups"])
  fileio.write_json_atomic(workdir / "near_duplicates.json",
                           {"threshold": near["summary"]["threshold"], "pairs": near["pairs"],
                            "groups": near["groups"]}, indent=None)
  fileio.write_text_atomic(workdir / "data_report.md",
                           _markdown({**report, "duplicates": duplicates, "near_duplicates": near}))
  across = near["across"].get("train-test", {}).get("images_in_test", 0)
  print(f"data report: {totals} images, {duplicates['summary']['duplicate_groups']} duplicate "
        f"groups, {duplicates['summary']['label_conflict_groups']} with conflicting labels; "
        f"{near['summary']['pairs']} near-duplicate pairs ({near_seconds:.1f}s), "
        f"{across} test images with a near-copy in train; written to {workdir} in "
        f"{time.perf_counter() - start:.1f}s", flush=True)
  return report
