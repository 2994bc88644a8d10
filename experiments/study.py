r"""The study's bookkeeping: collect finished runs into experiments/results/, and rebuild the
README's results table from them (nothing typed in by hand).

  python experiments/study.py collect runs/cnn_standard --name=cnn_standard \
      --command="python -m fer.main --config=configs/cnn.py --workdir=runs/cnn_standard"
  python experiments/study.py table      # rewrites experiments/results/results_table.md and
                                         # the README's summary, ensembles and results tables

`collect` copies a finished run's small files (results.json, config.json, metrics.jsonl with the
per-epoch history, the PNGs, the val/test probabilities; never checkpoints or data) and writes
run.json with the command and the machine that ran it.
`table` is idempotent: with no new runs it changes nothing.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import re
import shutil
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
SUMMARY_START, SUMMARY_END = "<!-- summary:start -->", "<!-- summary:end -->"
ENSEMBLES_START, ENSEMBLES_END = "<!-- ensembles:start -->", "<!-- ensembles:end -->"

# The original Keras study's test accuracies (protocol `seed`), by config name.
ORIGINAL = {"cnn": 0.527, "augment": 0.566, "vgg16_cached": 0.439, "vgg16_frozen": 0.393}
# The README's first table: each experiment of the original study (and ours beyond it) with its
# config and the name its runs go by (<runs>[_<protocol>]_s<k>, <runs>_..._ensemble), beside what
# those runs measured in each protocol.
EXPERIMENTS = (
    ("tuned CNN (4 conv, 3 dense, softmax)", "cnn", "cnn"),
    ("the same CNN + augmentation + dropout", "augment", "augment"),
    ("VGG16 conv base run once, cached features, dense head", "vgg16_cached", "vgg16_cached"),
    ("frozen VGG16 + head end-to-end on augmented input", "vgg16_frozen", "vgg16_frozen"),
    ("(their future work) fine-tune the top VGG16 block", "vgg16_finetune", "vgg16_finetune"),
    ("beyond the study: VGG-style network, ten-crop TTA", "strong", "strong"),
    ("the same with half the filters, 3x faster on a CPU", "strong_half", "strong_half"),
    ("beyond the study: mini-Xception (Arriaga et al. 2017: 66%), 58k parameters, a model of "
     "your own; 100 epochs (`--config.train.num_epochs=100`)", "mini_xception",
     "mini_xception_e100"),
    ("beyond the study: a ResNet-18 layout at half width (32-256 filters), 50 epochs "
     "(`--config.model.conv_features=\"(32,64,128,256)\" --config.train.num_epochs=50`)",
     "strong_resnet", "strong_resnet_half_e50"),
    ("the same ResNet at half width, the config's 100 epochs "
     "(`--config.model.conv_features=\"(32,64,128,256)\"`)", "strong_resnet",
     "strong_resnet_half"),
)
# The protocols of the summary table's columns and the per-class figure's panels.
PROTOCOLS = ("seed", "standard")
# Runs named <config>_nocopies_s<k>: protocol standard with input.drop_train_copies (a column of
# the summary table of their own).
NOCOPIES = "nocopies"
# val/test probabilities (100 KB each) let `python -m fer.ensemble` rebuild ensembles from here.
SMALL_FILES = ("results.json", "config.json", "metrics.jsonl", "confusion_matrix.png",
               "learning_curves.png", "reliability.png", "agreement.png", "val_probs.npy",
               "test_probs.npy")


def cpu_model() -> str:
  """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def machine() -> str:
  return f"{cpu_model()}, {os.cpu_count()} cores"


def _write_text(path, text):
  """Atomically (fer.fileio): a kill mid-write leaves the old README, table or run.json whole."""
  sys.path.insert(0, str(REPO))
  from fer import fileio  # pylint: disable=import-outside-toplevel
  fileio.write_text_atomic(path, text)


def collect(run_dir, name, command, machine_desc=None, results_root=RESULTS):
  run_dir = pathlib.Path(run_dir)
  if not (run_dir / "results.json").is_file():
    raise SystemExit(f"{run_dir}/results.json not found: the run has not finished")
  out = pathlib.Path(results_root) / name
  out.mkdir(parents=True, exist_ok=True)
  for f in SMALL_FILES:
    if (run_dir / f).is_file():
      shutil.copy2(run_dir / f, out / f)
  results = json.loads((run_dir / "results.json").read_text())
  info = {"command": command, "machine": machine_desc or machine(),
          "devices": f"{results['device_count']} x {results['device_kind']}"}
  _write_text(out / "run.json", json.dumps(info, indent=2) + "\n")  # last: marks it collected
  print(f"collected {run_dir} -> {out}")


# The config files, longest name first, so a run name finds the config it was named after.
CONFIGS = sorted((p.stem for p in (REPO / "configs").glob("*.py") if not p.stem.startswith("_")),
                 key=len, reverse=True)


def _config_name(name: str) -> str | None:
  """The config a run is named after: 'strong' for strong_e30_s0, 'vgg16_cached' for
  vgg16_cached_scratch; None where the name starts with no config's."""
  return next((c for c in CONFIGS if name.startswith(c)), None)


def _original(name: str, protocol: str, model_name: str = "") -> float | None:
  """The original study's number (protocol seed only) for a run named after one of its configs
  (none for configs beyond the study, such as strong, whatever model they build), else for its
  model's name."""
  if protocol != "seed":
    return None
  key = _config_name(name)
  return ORIGINAL.get(model_name if key is None else key)


def _seed_group(name: str) -> str | None:
  """'strong' for a run named 'strong_s2' (one seed of a group); None for other names."""
  match = re.fullmatch(r"(.+)_s\d+", name)
  return match.group(1) if match else None


@dataclasses.dataclass(frozen=True)
class _Run:
  """A collected run: its folder and its results.json, config.json and run.json, read once for
  every table and figure."""
  dir: pathlib.Path
  results: dict
  config: dict
  info: dict

  @property
  def name(self) -> str:
    return self.dir.name

  @property
  def protocol(self) -> str:
    return self.config["input"]["protocol"]

  @property
  def host(self) -> str:
    """'<machine>; <devices>', from run.json."""
    return f"{self.info['machine']}; {self.info['devices']}"

  def original(self, name: str | None = None) -> float | None:
    """The original study's test accuracy for this run's config (or for the group `name`)."""
    return _original(name or self.name, self.protocol,
                     self.config.get("model", {}).get("name", ""))


def _runs(results_root) -> list[_Run]:
  """The runs collected in results_root (folders with results.json and run.json), by name."""
  dirs = sorted(d for d in pathlib.Path(results_root).iterdir()
                if (d / "results.json").is_file() and (d / "run.json").is_file())
  return [_Run(d, *(json.loads((d / f).read_text())
                    for f in ("results.json", "config.json", "run.json"))) for d in dirs]


def _row(run: _Run) -> str:
  r, original = run.results, run.original()
  return (f"| {run.name} | {run.protocol} | {r['val/accuracy']:.1%} | "
          f"**{r['test/accuracy']:.1%}** | {'' if original is None else f'{original:.1%}'} | "
          f"{r['test/macro_f1']:.3f} | {r['num_params']:,} | {r['epochs_trained']} "
          f"({r['best_epoch']}) | {r['train_seconds'] / 60:.0f} min | {run.host} | "
          f"`{run.info['command']}` |")


def _seed_rows(runs: list[_Run]):
  """One summary row per group of runs named <base>_s<seed> (2 or more): mean and spread."""
  groups = {}
  for run in runs:
    if group := _seed_group(run.name):
      groups.setdefault(group, []).append(run)
  rows = []
  for base, members in sorted(groups.items()):
    if len(members) < 2:
      continue
    rs = [m.results for m in members]
    val, test = (np.array([r[k] for r in rs]) for k in ("val/accuracy", "test/accuracy"))
    original = members[0].original(base)
    hosts = [m.host for m in members]
    if len(set(hosts)) == 1:
      where = hosts[0]
      time = f"{np.mean([r['train_seconds'] for r in rs]) / 60:.0f} min each"
    else:  # members ran on different machines: no mean time, each machine named
      where = "mixed: " + " / ".join(
          f"{', '.join(m.name for m, h in zip(members, hosts) if h == host)} on {host}"
          for host in sorted(set(hosts)))
      time = "see the runs"
    rows.append(
        f"| {base} (mean ± std of {len(rs)} seeds) | {members[0].protocol} | {val.mean():.1%} ± "
        f"{val.std(ddof=1):.1%} | **{test.mean():.1%} ± {test.std(ddof=1):.1%}** | "
        f"{'' if original is None else f'{original:.1%}'} | "
        f"{np.mean([r['test/macro_f1'] for r in rs]):.3f} | {rs[0]['num_params']:,} | | "
        f"{time} | {where} | runs {', '.join(m.name for m in members)} |")
  return rows


def _headline(runs: list[_Run], config, protocol, variant: str = "") -> tuple[dict, dict]:
  """The headline runs of `config` in `protocol`, as ({seed run: results.json}, {ensemble:
  results.json}): those named <config>[_<protocol>]_s<k> and ..._ensemble, or with a `variant`
  <config>_<variant>_s<k> and ..._ensemble (other variants, such as strong_e30_s0 or
  cnn_standard_gpu, are left to the results table)."""
  infix = f"_{re.escape(variant)}" if variant else f"(_{protocol})?"
  name = re.compile(rf"{re.escape(config)}{infix}_(s\d+|ensemble)")
  matching = {run.name: run.results for run in runs
              if name.fullmatch(run.name) and run.protocol == protocol}
  ensembles = {n: r for n, r in matching.items() if n.endswith("_ensemble")}
  return {n: r for n, r in matching.items() if n not in ensembles}, ensembles


def _headlines(runs: list[_Run]) -> dict:
  """(runs, protocol) -> _headline's (seeds, ensembles), for each of EXPERIMENTS: for the
  summary table and the per-class figure."""
  out = {(name, protocol): _headline(runs, name, protocol)
         for *_, name in EXPERIMENTS for protocol in PROTOCOLS}
  out.update({(name, NOCOPIES): _headline(runs, name, "standard", NOCOPIES)
              for *_, name in EXPERIMENTS})
  return out


def _summary_cell(seeds, ensembles):
  """What the headline runs of a config measured in a protocol: '<mean> ± <std> (<n> seeds),
  ensemble <acc>'."""
  accs = [r["test/accuracy"] for r in seeds.values()]
  parts = []
  if len(accs) > 1:
    parts.append(f"{np.mean(accs):.1%} ± {np.std(accs, ddof=1):.1%} ({len(accs)} seeds)")
  elif accs:
    parts.append(f"{accs[0]:.1%} (1 run)")
  parts += [f"ensemble {r['test/accuracy']:.1%}" for r in ensembles.values()]
  return ", ".join(parts) or "not run"


def _summary(headlines):
  lines = ["| experiment | config | original study (`seed`) | ours, `seed` | "
           "ours, `standard` (PrivateTest) | ours, `standard`, trained without the near copies "
           "of val/test faces |", "|---|---|---:|---:|---:|---:|"]
  for what, config, name in EXPERIMENTS:
    original = ORIGINAL.get(config)
    lines.append(f"| {what} | `configs/{config}.py` | "
                 f"{'-' if original is None else f'{original:.1%}'} | "
                 f"{_summary_cell(*headlines[name, 'seed'])} | "
                 f"{_summary_cell(*headlines[name, 'standard'])} | "
                 f"{_summary_cell(*headlines[name, NOCOPIES])} |")
  return "\n".join(lines) + "\n"


def _members(r) -> str:
  """An ensemble's members as run names (`name x2` for a weight of 2); for a greedy selection,
  how many of how many runs it kept."""
  names = [(pathlib.PurePath(m["workdir"]).name, m.get("weight", 1)) for m in r["members"]]
  kept = [(n, w) for n, w in names if w]
  if r.get("selection") not in (None, "none"):
    return (f"{r['selection']} selection by val from {len(names)} runs: {len(kept)} kept, "
            f"{sum(w for _, w in kept)} picks")
  return ", ".join(n if w == 1 else f"{n} x{w}" for n, w in kept)


def _ensembles(runs: list[_Run]) -> str:
  """The ensembles of protocol `standard`, best val accuracy first: members, val and test
  accuracy, test accuracy on the faces without a near copy in Training, and how often two
  members agree on val (README, "A strong config and ensembles")."""
  lines = ["| ensemble | members | val acc | test acc | test acc, faces without a near copy in "
           "Training | members agree (val) |", "|---|---|---:|---:|---:|---:|"]
  rows = []
  for run in runs:
    r = run.results
    if "members" not in r or run.protocol != "standard":
      continue
    no_copy, agree = r.get("test/accuracy_no_train_copy"), r.get("val/member_agreement")
    rows.append((-r["val/accuracy"], -r["test/accuracy"], run.name,
                 f"| {run.name} | {_members(r)} | {r['val/accuracy']:.1%} | "
                 f"**{r['test/accuracy']:.1%}** | {'' if no_copy is None else f'{no_copy:.1%}'} | "
                 f"{'' if agree is None else f'{agree:.1%}'} |"))
  return "\n".join(lines + [row for *_, row in sorted(rows)]) + "\n"


def between(body, start, end, text):
  """body with the text between the markers start and end replaced by text (if both are in)."""
  if start not in body or end not in body:
    return body
  return body[:body.index(start) + len(start)] + "\n" + text + body[body.index(end):]


def _per_class_figure(headlines, results_root):
  """experiments/results/per_class_accuracy.png: the summary's runs, test accuracy per class:
  a panel per protocol, per config the mean over its seeds and its ensemble."""
  sys.path.insert(0, str(REPO))
  from fer import plots  # pylint: disable=import-outside-toplevel
  panels, classes = {}, None
  for protocol in PROTOCOLS:
    bars = {}
    for *_, name in EXPERIMENTS:
      seeds, ensembles = headlines[name, protocol]
      if seeds:
        bars[f"{name}: mean of {len(seeds)} run{'s' * (len(seeds) > 1)}"] = np.mean(
            np.array([r["test/per_class_accuracy"] for r in seeds.values()], dtype=np.float64),
            axis=0).tolist()
      for r in ensembles.values():
        size = r.get("ensemble_size")
        bars[f"{name}: ensemble" + (f" of {size}" if size else "")] = r[
            "test/per_class_accuracy"]
      classes = next((r["classes"] for r in (*seeds.values(), *ensembles.values())), classes)
    if bars:
      panels[f"protocol {protocol}"] = bars
  if panels:
    plots.per_class_accuracy(panels, classes, results_root / "per_class_accuracy.png")


def _curves_figure(runs: list[_Run], results_root):
  """experiments/results/val_curves.png: val accuracy per epoch of every run that kept its
  metrics.jsonl, one panel per config, a colour per seed group (cnn_seed_s0..s2 alike)."""
  sys.path.insert(0, str(REPO))
  from fer import plots  # pylint: disable=import-outside-toplevel
  panels = {}
  for run in runs:
    if (run.dir / "metrics.jsonl").is_file():
      rows = [json.loads(l) for l in (run.dir / "metrics.jsonl").read_text().splitlines() if l]
      config = _config_name(run.name) or run.name.split("_")[0]
      panels.setdefault(config, {})[run.name] = [r["val/accuracy"] for r in rows]
  if panels:
    plots.val_curves(panels, results_root / "val_curves.png",
                     ylabel="val accuracy after each epoch (no TTA)",
                     family=lambda name: _seed_group(name) or name)


def _tables(runs: list[_Run], headlines: dict) -> tuple[str, str, str]:
  lines = ["| run | protocol | val acc | test acc | original study (test) | test macro-F1 | "
           "parameters | epochs (best) | train time | machine | command |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
  lines += [_row(run) for run in runs]
  lines += _seed_rows(runs)
  return "\n".join(lines) + "\n", _summary(headlines), _ensembles(runs)


def tables(results_root=RESULTS) -> tuple[str, str, str]:
  """The results table (a row per collected run, then a mean row per seed group), the
  summary table and the ensembles table, as markdown, from the runs in `results_root`; writes
  nothing."""
  runs = _runs(results_root)
  return _tables(runs, _headlines(runs))


def with_tables(body: str, text: str, summary: str, ensembles: str) -> str:
  """The README text body with the results table text, the summary table and the ensembles
  table put in."""
  body = between(between(body, START, END, text), SUMMARY_START, SUMMARY_END, summary)
  return between(body, ENSEMBLES_START, ENSEMBLES_END, ensembles)


def table(results_root=RESULTS, readme=REPO / "README.md"):
  """Rewrites results_table.md, per_class_accuracy.png, val_curves.png and the README's tables
  (the summary, the ensembles and the results) from the runs collected in `results_root`; with
  no new runs nothing changes."""
  results_root, readme = pathlib.Path(results_root), pathlib.Path(readme)
  runs = _runs(results_root)
  headlines = _headlines(runs)
  text, summary, ensembles = _tables(runs, headlines)
  _write_text(results_root / "results_table.md", text)
  _per_class_figure(headlines, results_root)
  _curves_figure(runs, results_root)
  body = readme.read_text()
  new = with_tables(body, text, summary, ensembles)
  if new != body:
    _write_text(readme, new)
  print(text)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser("collect")
  c.add_argument("run_dir")
  c.add_argument("--name", required=True)
  c.add_argument("--command", required=True)
  c.add_argument("--machine", default=None)
  sub.add_parser("table")
  args = p.parse_args()
  if args.cmd == "collect":
    collect(args.run_dir, args.name, args.command, args.machine)
  else:
    table()


if __name__ == "__main__":
  main()
