r"""The whole study in one command: every experiment into --root, skipping runs already complete.

  python experiments/run_study.py --root=runs/study                  # everything
  python experiments/run_study.py --root=runs/study --only=cnn,augment --seeds=3
  python experiments/run_study.py --root=runs/study --dry_run        # list, run nothing

Experiments (names as in the README's results table): data_report, search, cnn_standard_s<k>,
augment_standard_s<k> (protocol `standard`), cnn_seed_s<k>, augment_seed_s<k> (protocol `seed`,
the original study's), vgg16_cached, vgg16_frozen, vgg16_finetune, strong_s<k> and
strong_ensemble, strong_seed_s<k> and strong_seed_ensemble, for k < --seeds.
`--only` takes name prefixes. A run is complete when its workdir holds its final file
(results.json; data_report.json for the data report; best_config.py for the search); a killed
run resumes from its last checkpoint when the command is repeated. Each finished training run is
collected into --results/<name>/ (`experiments/study.py collect`: results, config, figures, the
command and this machine), then `python experiments/study.py table` rebuilds the README table.

Data: $FER2013_ARCHIVE (and $FER_DATA_DIR) as for fer.main. The VGG16 runs need the pretrained
weights (fer/pretrained.py says how to get them); `--vgg16_weights=none` trains them from
scratch instead, under names ending in `_scratch`. On the 2-core CPU the full study takes days
(strong and VGG16 dominate); on one GPU, under an hour.
"""

import argparse
import dataclasses
import pathlib
import shlex
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import study  # pylint: disable=wrong-import-position


@dataclasses.dataclass(frozen=True)
class Experiment:
  name: str
  argv: tuple[str, ...]  # after `python -m`
  done_file: str = "results.json"
  collect: bool = True


def _train(name, config, *overrides, root, runlocal, done_file="results.json", collect=True):
  config = f"{config}:runlocal" if runlocal else config
  argv = ("fer.main", f"--config={config}", f"--workdir={root / name}", *overrides)
  return Experiment(name, argv, done_file, collect)


def experiments(root: pathlib.Path, seeds: int, vgg16_weights: str = "keras",
                runlocal: bool = False) -> list[Experiment]:
  """The study, in the order it runs (the ensemble after its members, fine-tuning after the
  frozen run it starts from)."""
  t = lambda *a, **k: _train(*a, root=root, runlocal=runlocal, **k)  # pylint: disable=unnecessary-lambda-assignment
  out = [t("data_report", "configs/data_report.py", done_file="data_report.json", collect=False),
         t("search", "configs/search.py", done_file="best_config.py", collect=False)]
  for k in range(seeds):
    out.append(t(f"cnn_standard_s{k}", "configs/cnn.py", f"--config.seed={k}"))
    out.append(t(f"augment_standard_s{k}", "configs/augment.py", f"--config.seed={k}"))
  for k in range(seeds):
    out.append(t(f"cnn_seed_s{k}", "configs/cnn.py", "--config.input.protocol=seed",
                 f"--config.seed={k}"))
    out.append(t(f"augment_seed_s{k}", "configs/augment.py", "--config.input.protocol=seed",
                 f"--config.seed={k}"))
  suffix = "" if vgg16_weights != "none" else "_scratch"
  weights = (f"--config.pretrained.weights={vgg16_weights}",)
  frozen = f"vgg16_frozen{suffix}"
  out += [t(f"vgg16_cached{suffix}", "configs/vgg16_cached.py", *weights),
          t(frozen, "configs/vgg16_frozen.py", *weights),
          t(f"vgg16_finetune{suffix}", "configs/vgg16_finetune.py", *weights,
            f"--config.init_from={root / frozen}")]
  for tag, protocol in (("", ()), ("_seed", ("--config.input.protocol=seed",))):
    members = [root / f"strong{tag}_s{k}" for k in range(seeds)]
    out += [t(m.name, "configs/strong.py", *protocol, f"--config.seed={k}")
            for k, m in enumerate(members)]
    if seeds >= 2:
      out.append(Experiment(f"strong{tag}_ensemble", (
          "fer.ensemble", f"--workdirs={','.join(map(str, members))}",
          f"--out={root / f'strong{tag}_ensemble'}")))
  return out


def command(e: Experiment) -> str:
  return shlex.join(["python", "-m", *e.argv])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--root", required=True, help="folder of the study's workdirs")
  p.add_argument("--only", default="", help="comma-separated name prefixes (default: all)")
  p.add_argument("--seeds", type=int, default=3, help="seeds of the cnn, augment and strong runs")
  p.add_argument("--vgg16_weights", default="keras", help="keras | torchvision | none (scratch)")
  p.add_argument("--results", default=str(study.RESULTS), help="where finished runs are collected")
  p.add_argument("--dry_run", action="store_true", help="print what would run, run nothing")
  p.add_argument("--runlocal", action="store_true", help="every config with :runlocal (smoke test)")
  args = p.parse_args(argv)
  root = pathlib.Path(args.root)
  prefixes = [s for s in args.only.split(",") if s]
  todo = [e for e in experiments(root, args.seeds, args.vgg16_weights, args.runlocal)
          if not prefixes or any(e.name.startswith(x) for x in prefixes)]
  if not todo:
    print(f"--only={args.only!r} matches no experiment", file=sys.stderr)
    return 2
  failed = []
  for i, e in enumerate(todo, 1):
    workdir = root / e.name
    if (workdir / e.done_file).is_file():
      print(f"[{i}/{len(todo)}] {e.name}: complete ({workdir / e.done_file}), skipped", flush=True)
    elif args.dry_run:
      print(f"[{i}/{len(todo)}] {e.name}: would run {command(e)}", flush=True)
      continue
    else:
      print(f"[{i}/{len(todo)}] {e.name}: {command(e)}", flush=True)
      start = time.perf_counter()
      proc = subprocess.run([sys.executable, "-m", *e.argv], cwd=REPO, check=False)
      minutes = (time.perf_counter() - start) / 60
      if proc.returncode != 0 or not (workdir / e.done_file).is_file():
        print(f"[{i}/{len(todo)}] {e.name}: FAILED (exit {proc.returncode}) after "
              f"{minutes:.1f} min; rerun the same command to resume it", flush=True)
        failed.append(e.name)
        continue
      print(f"[{i}/{len(todo)}] {e.name}: done in {minutes:.1f} min", flush=True)
    if e.collect and not args.dry_run:
      study.collect(workdir, e.name, command(e), results_root=pathlib.Path(args.results))
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  if not args.dry_run:
    print("all complete; `python experiments/study.py table` rebuilds the README table")
  return 0


if __name__ == "__main__":
  sys.exit(main())
