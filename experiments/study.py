r"""The study's bookkeeping: collect finished runs into experiments/results/, and rebuild the
README's results table from them (nothing typed in by hand).

  python experiments/study.py collect runs/cnn_standard --name=cnn_standard \
      --command="python -m fer.main --config=configs/cnn.py --workdir=runs/cnn_standard"
  python experiments/study.py table      # rewrites experiments/results/results_table.md and
                                         # the README between the results markers

`collect` copies a finished run's small files (results.json, config.json, the PNGs; never
checkpoints or data) and writes run.json with the command and the machine that ran it.
`table` is idempotent: with no new runs it changes nothing.
"""

import argparse
import json
import os
import pathlib
import platform
import shutil

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# The original Keras study's test accuracies (protocol `seed`), by config name.
ORIGINAL = {"cnn": 0.527, "augment": 0.566, "vgg16_cached": 0.439, "vgg16_frozen": 0.393}
SMALL_FILES = ("results.json", "config.json", "confusion_matrix.png", "learning_curves.png")


def machine() -> str:
  try:
    model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                 if l.startswith("model name"))
  except (OSError, StopIteration):
    model = platform.processor() or platform.machine()
  return f"{model}, {os.cpu_count()} cores"


def collect(run_dir, name, command, machine_desc=None):
  run_dir = pathlib.Path(run_dir)
  if not (run_dir / "results.json").is_file():
    raise SystemExit(f"{run_dir}/results.json not found: the run has not finished")
  out = RESULTS / name
  out.mkdir(parents=True, exist_ok=True)
  for f in SMALL_FILES:
    if (run_dir / f).is_file():
      shutil.copy2(run_dir / f, out / f)
  results = json.loads((run_dir / "results.json").read_text())
  info = {"command": command, "machine": machine_desc or machine(),
          "devices": f"{results['device_count']} x {results['device_kind']}"}
  (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")
  print(f"collected {run_dir} -> {out}")


def _row(name, d):
  r = json.loads((d / "results.json").read_text())
  c = json.loads((d / "config.json").read_text())
  info = json.loads((d / "run.json").read_text())
  base = c.get("model", {}).get("name", "")
  config_name = next((k for k in sorted(ORIGINAL, key=len, reverse=True)
                      if name.startswith(k)), base)
  protocol = c["input"]["protocol"]
  original = ORIGINAL.get(config_name) if protocol == "seed" else None
  return (f"| {name} | {protocol} | {r['val/accuracy']:.1%} | **{r['test/accuracy']:.1%}** | "
          f"{'' if original is None else f'{original:.1%}'} | {r['test/macro_f1']:.3f} | "
          f"{r['num_params']:,} | {r['epochs_trained']} ({r['best_epoch']}) | "
          f"{r['train_seconds'] / 60:.0f} min | {info['machine']}; {info['devices']} | "
          f"`{info['command']}` |")


def table():
  dirs = sorted(d for d in RESULTS.iterdir() if (d / "results.json").is_file()
                and (d / "run.json").is_file())
  lines = ["| run | protocol | val acc | test acc | original study (test) | test macro-F1 | "
           "parameters | epochs (best) | train time | machine | command |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
  lines += [_row(d.name, d) for d in dirs]
  text = "\n".join(lines) + "\n"
  (RESULTS / "results_table.md").write_text(text)
  readme = REPO / "README.md"
  body = readme.read_text()
  if START in body and END in body:
    new = body[:body.index(START) + len(START)] + "\n" + text + body[body.index(END):]
    if new != body:
      readme.write_text(new)
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
