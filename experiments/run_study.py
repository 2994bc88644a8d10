r"""The whole study in one command: every experiment into --root, skipping runs already complete.

  python experiments/run_study.py --root=runs/study                  # everything
  python experiments/run_study.py --root=runs/study --only=cnn,augment --seeds=3
  python experiments/run_study.py --root=runs/study --dry_run        # list, run nothing
  python experiments/run_study.py --root=runs/study --only=strong --seeds=4 --parallel=4  # one GPU

Experiments (names as in the README's results table): data_report, search, cnn_standard_s<k>,
augment_standard_s<k> (protocol `standard`), cnn_seed_s<k>, augment_seed_s<k> (protocol `seed`,
the original study's), cnn_nocopies_s<k>, augment_nocopies_s<k> (protocol `standard`, trained
without the Training images that have a near copy in val or test), augment_teachers (their
probabilities on Training: fer.distill), augment_distilled_s<k> and cnn_distilled_s<k> (augment
and cnn, without the copies, trained on those and the labels), vgg16_cached, vgg16_frozen,
vgg16_finetune, strong_s<k>, strong_seed_s<k>, strong_half_s<k>, mini_xception_e100_s<k>, for k <
--seeds, and with 2 seeds or more each family's <family>_ensemble (cnn_standard_ensemble, ...,
strong_seed_ensemble, strong_half_ensemble, mini_xception_e100_ensemble). The README's
strong_ensemble has a fourth seed: `--only=strong_s0,strong_s1,strong_s2,strong_s3,strong_ensemble
--seeds=4`. `--only` takes name prefixes (`--only=strong` is strong_*, strong_seed_* and
strong_half_*). A run is complete when its workdir holds its final file
(results.json; data_report.json for the data report; best_config.py for the search); a killed
run resumes from its last checkpoint when the command is repeated. Each finished training run is
collected into --results/<name>/ (`experiments/study.py collect`: results, config, figures, the
command and this machine), then `python experiments/study.py table` rebuilds the README table.
`--parallel=N` runs up to N at once, each logging to <root>/<name>.log, for one GPU shared by
several of these small networks (the GPU rows of the results table were trained 3-9 at a time
on one H100). Ensembles wait for their members and fine-tuning for its frozen run; a run whose
dependency failed is not started. SIGTERM (a scheduler's, `timeout`'s) or Ctrl-C stops the runs
in flight with it; the same command resumes them.

A plan instead of the study (`--plan FILE`): one fer.main run per line, `<name> <fer.main
flags>` (# comments and blank lines skipped), each into <root>/<name>, collected like the study's:
  python experiments/run_study.py --root=runs/gpu --plan=experiments/gpu_plan.txt --parallel=2 \
      --deadline_s=480 --results=runs/gpu/collected
`--deadline_s=S`: S seconds after the start, the runs still going get SIGTERM (fer.main then
saves the epoch it is in and stops; SIGKILL --grace_s later if it has not), nothing more is
started, and the command exits 124; repeating it resumes them. experiments/offline_gpu.sh runs a
plan this way on a GPU machine with a time limit. A plan's run already collected into
--results/<name>/ counts as complete even when its workdir is gone (a fresh checkout has no
runs/): delete the collected folder to train it again.

Data: $FER2013_ARCHIVE (and $FER_DATA_DIR) as for fer.main. The VGG16 runs need the pretrained
weights (fer/pretrained.py says how to get them); `--vgg16_weights=none` trains them from
scratch instead, under names ending in `_scratch`. On the 2-core CPU the full study takes days
(strong and VGG16 dominate); on one GPU, under an hour.
"""

import argparse
import dataclasses
import os
import pathlib
import re
import shlex
import signal
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
  after: tuple[str, ...] = ()  # experiments that must finish first (where they are selected)

  def done(self, root: pathlib.Path) -> pathlib.Path:
    """The file whose presence in `root` says this experiment is complete."""
    return root / self.name / self.done_file


def _train(name, config, *overrides, root, runlocal, done_file="results.json", collect=True,
           after=()):
  config = f"{config}:runlocal" if runlocal else config
  argv = ("fer.main", f"--config={config}", f"--workdir={root / name}", *overrides)
  return Experiment(name, argv, done_file, collect, tuple(after))


def experiments(root: pathlib.Path, seeds: int, vgg16_weights: str = "keras",
                runlocal: bool = False) -> list[Experiment]:
  """The study, in the order it runs (the ensemble after its members, fine-tuning after the
  frozen run it starts from)."""
  t = lambda *a, **k: _train(*a, root=root, runlocal=runlocal, **k)  # pylint: disable=unnecessary-lambda-assignment

  def ensemble(name):
    """The ensemble of the seeds of `name` (e.g. cnn_standard: cnn_standard_s0, ...)."""
    members = [root / f"{name}_s{k}" for k in range(seeds)]
    return Experiment(f"{name}_ensemble", (
        "fer.ensemble", f"--workdirs={','.join(map(str, members))}",
        f"--out={root / f'{name}_ensemble'}"), after=tuple(m.name for m in members))

  out = [t("data_report", "configs/data_report.py", done_file="data_report.json", collect=False),
         t("search", "configs/search.py", done_file="best_config.py", collect=False)]
  for protocol in ("standard", "seed"):
    args = ("--config.input.protocol=seed",) if protocol == "seed" else ()
    for k in range(seeds):
      out.append(t(f"cnn_{protocol}_s{k}", "configs/cnn.py", *args, f"--config.seed={k}"))
      out.append(t(f"augment_{protocol}_s{k}", "configs/augment.py", *args, f"--config.seed={k}"))
    if seeds >= 2:
      out += [ensemble(f"cnn_{protocol}"), ensemble(f"augment_{protocol}")]
  # Protocol standard without the Training images that have a near copy in val or test.
  clean = "--config.input.drop_train_copies=True"
  for k in range(seeds):
    out.append(t(f"cnn_nocopies_s{k}", "configs/cnn.py", clean, f"--config.seed={k}"))
    out.append(t(f"augment_nocopies_s{k}", "configs/augment.py", clean, f"--config.seed={k}"))
  if seeds >= 2:
    out += [ensemble("cnn_nocopies"), ensemble("augment_nocopies")]
  # Distillation: the augment_nocopies seeds label Training (fer.distill); students of the same
  # config, and of configs/cnn.py, train on those targets and the labels.
  targets = root / "augment_teachers" / "targets.npz"
  teachers = tuple(f"augment_nocopies_s{k}" for k in range(seeds))
  out.append(Experiment("augment_teachers", (
      "fer.distill", f"--teachers={','.join(str(root / n) for n in teachers)}", f"--out={targets}"),
      done_file=targets.name, collect=False, after=teachers))
  for k in range(seeds):
    for student in ("augment", "cnn"):
      out.append(t(f"{student}_distilled_s{k}", f"configs/{student}.py", clean,
                   f"--config.distill.targets={targets}", f"--config.seed={k}",
                   after=("augment_teachers",)))
  if seeds >= 2:
    out += [ensemble("augment_distilled"), ensemble("cnn_distilled")]
  suffix = "" if vgg16_weights != "none" else "_scratch"
  weights = (f"--config.pretrained.weights={vgg16_weights}",)
  frozen = f"vgg16_frozen{suffix}"
  out += [t(f"vgg16_cached{suffix}", "configs/vgg16_cached.py", *weights),
          t(frozen, "configs/vgg16_frozen.py", *weights),
          t(f"vgg16_finetune{suffix}", "configs/vgg16_finetune.py", *weights,
            f"--config.init_from={root / frozen}", after=(frozen,))]
  # strong in both protocols, then the summary table's rows beyond it: half its filters (a laptop
  # CPU's config) and the 58k-parameter mini-Xception, a model of its own (model.name =
  # module:Class), on twice its config's 50 epochs.
  for name, config, *args in (("strong", "strong"),
                              ("strong_seed", "strong", "--config.input.protocol=seed"),
                              ("strong_half", "strong_half"),
                              ("mini_xception_e100", "mini_xception",
                               "--config.train.num_epochs=100")):
    out += [t(f"{name}_s{k}", f"configs/{config}.py", *args, f"--config.seed={k}")
            for k in range(seeds)]
    if seeds >= 2:
      out.append(ensemble(name))
  return out


_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def read_plan(path, root: pathlib.Path, runlocal: bool = False) -> list[Experiment]:
  """The runs of a plan file: `<name> <fer.main flags>` a line (shell quoting), into root/name.
  A line it cannot use is a ValueError naming the file, the line and what was expected."""
  path = pathlib.Path(path)
  try:
    lines = path.read_text().splitlines()
  except OSError as e:
    raise ValueError(f"{path}: cannot read the plan: {e.strerror or e}") from e
  out, seen = [], {}
  for number, line in enumerate(lines, 1):
    where = f"{path}:{number}"
    try:
      words = shlex.split(line, comments=True)
    except ValueError as e:
      raise ValueError(f"{where}: {e} in {line.strip()!r}") from e
    if not words:
      continue
    name, flags = words[0], words[1:]
    if not _NAME.fullmatch(name) or not flags or not all(f.startswith("--") for f in flags):
      raise ValueError(f"{where}: bad line {line.strip()!r}: expected '<name> <fer.main flags>' "
                       "(a name of letters, digits, '_', '.', '-', then --flags)")
    if name in seen:
      raise ValueError(f"{where}: the name {name} is used twice (line {seen[name]} has it; each "
                       "run needs its own workdir)")
    if any(f.startswith("--workdir") for f in flags):
      raise ValueError(f"{where}: drop --workdir: the run goes to --root/{name}")
    if not any(f.startswith("--config=") for f in flags):
      raise ValueError(f"{where}: {name} has no --config=<file> (e.g. --config=configs/strong.py)")
    seen[name] = number
    if runlocal:
      flags = [f"{f}:runlocal" if f.startswith("--config=") and ":" not in f else f
               for f in flags]
    out.append(Experiment(name, ("fer.main", *flags, f"--workdir={root / name}")))
  if not out:
    raise ValueError(f"{path}: no runs in it (expected lines '<name> <fer.main flags>')")
  return out


def command(e: Experiment) -> str:
  return shlex.join(["python", "-m", *e.argv])


class _Running:
  """One experiment's child process; with --parallel above 1 its output goes to a log file."""

  def __init__(self, e: Experiment, root: pathlib.Path, parallel: int):
    self.e, self.start, self.log = e, time.perf_counter(), None
    env = dict(os.environ)
    if parallel > 1:
      self.log = root / f"{e.name}.log"
      root.mkdir(parents=True, exist_ok=True)
      # Several runs on one GPU: each may take its share of the memory, not JAX's default 75%.
      env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / parallel:.3f}")
    out = open(self.log, "w") if self.log else None  # pylint: disable=consider-using-with
    try:
      self.proc = subprocess.Popen([sys.executable, "-m", *e.argv], cwd=REPO, env=env,
                                   stdout=out, stderr=subprocess.STDOUT if out else None)
    finally:
      if out:
        out.close()  # the child holds its own handle

  def minutes(self) -> float:
    return (time.perf_counter() - self.start) / 60


def _raise_interrupt(signum, frame):
  del frame
  raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--root", required=True, help="folder of the study's workdirs")
  p.add_argument("--only", default="", help="comma-separated name prefixes (default: all)")
  p.add_argument("--seeds", type=int, default=3, help="seeds of the cnn, augment and strong runs")
  p.add_argument("--vgg16_weights", default="keras", help="keras | torchvision | none (scratch)")
  p.add_argument("--results", default=str(study.RESULTS), help="where finished runs are collected")
  p.add_argument("--dry_run", action="store_true", help="print what would run, run nothing")
  p.add_argument("--count", action="store_true",
                 help="print only how many runs are not complete yet (a number), run nothing")
  p.add_argument("--runlocal", action="store_true", help="every config with :runlocal (smoke test)")
  p.add_argument("--parallel", type=int, default=1,
                 help="runs at once (one GPU fits several small runs; each then logs to "
                      "<root>/<name>.log and gets 0.9/N of the GPU memory)")
  p.add_argument("--plan", default="",
                 help="a file of runs, '<name> <fer.main flags>' a line, instead of the study")
  p.add_argument("--deadline_s", type=float, default=0,
                 help="seconds after which the runs in flight get SIGTERM and none starts "
                      "(exit 124; the same command resumes); 0: none")
  p.add_argument("--grace_s", type=float, default=60,
                 help="seconds a run may take to stop after SIGTERM before it gets SIGKILL")
  p.add_argument("--machine", default="",
                 help="the machine's description for the collected runs (default: its CPU)")
  args = p.parse_args(argv)
  root = pathlib.Path(args.root)
  if args.parallel < 1:
    p.error(f"--parallel={args.parallel}: expected 1 or more")
  prefixes = [s for s in args.only.split(",") if s]
  try:
    every = (read_plan(args.plan, root, args.runlocal) if args.plan else
             experiments(root, args.seeds, args.vgg16_weights, args.runlocal))
  except ValueError as e:
    print(f"run_study: {e}", file=sys.stderr)
    return 2
  todo = [e for e in every if not prefixes or any(e.name.startswith(x) for x in prefixes)]
  if not todo:
    print(f"--only={args.only!r} matches no experiment", file=sys.stderr)
    return 2

  def complete(e) -> pathlib.Path | None:
    """The final file that says e is complete: in its workdir, or for a plan's run (nothing reads
    those workdirs afterwards) in the copy an earlier checkout collected into --results."""
    if e.done(root).is_file():
      return e.done(root)
    collected = pathlib.Path(args.results) / e.name / e.done_file
    return collected if args.plan and collected.is_file() else None

  if args.count:
    print(sum(not complete(e) for e in todo))
    return 0
  number = {e.name: i for i, e in enumerate(todo, 1)}
  tag = lambda e: f"[{number[e.name]}/{len(todo)}] {e.name}"  # pylint: disable=unnecessary-lambda-assignment
  selected = set(number)
  pending, running, done, failed = list(todo), [], set(), []

  def finish(e):
    done.add(e.name)
    if e.collect and not args.dry_run:
      study.collect(root / e.name, e.name, command(e), args.machine or None,
                    results_root=pathlib.Path(args.results))

  def epochs(e) -> str:
    metrics = root / e.name / "metrics.jsonl"
    n = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    return f", {n} epochs logged" if e.argv[0] == "fer.main" else ""

  start, past_deadline = time.perf_counter(), False

  # A scheduler's SIGTERM (or Ctrl-C) stops the runs in flight too, not only this process:
  # they resume from their last checkpoint when the same command is repeated.
  previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    while pending or running:
      if args.deadline_s and time.perf_counter() - start >= args.deadline_s:
        past_deadline = True
        print(f"run_study: the deadline (--deadline_s={args.deadline_s:g}) has come; stopping "
              f"{', '.join(r.e.name for r in running) or 'nothing'}"
              + (f"; not started: {', '.join(e.name for e in pending)}" if pending else ""),
              flush=True)
        break
      for e in list(pending):  # start, in order, what may start
        deps = [d for d in e.after if d in selected]
        if any(d in failed for d in deps):
          pending.remove(e)
          failed.append(e.name)
          print(f"{tag(e)}: not run, it needs {', '.join(d for d in deps if d in failed)}, "
                "which failed", flush=True)
        elif done_file := complete(e):
          pending.remove(e)
          print(f"{tag(e)}: complete ({done_file}), skipped", flush=True)
          if done_file == e.done(root):  # (already collected otherwise)
            finish(e)
          else:
            done.add(e.name)
        elif args.dry_run:
          pending.remove(e)
          print(f"{tag(e)}: would run {command(e)}", flush=True)
        elif len(running) < args.parallel and all(d in done for d in deps):
          pending.remove(e)
          running.append(_Running(e, root, args.parallel))
          log = f" (log: {running[-1].log})" if running[-1].log else ""
          print(f"{tag(e)}: {command(e)}{log}", flush=True)
      if running and all(r.proc.poll() is None for r in running):
        time.sleep(0.2)
      for r in [r for r in running if r.proc.poll() is not None]:
        running.remove(r)
        if r.proc.returncode != 0 or not r.e.done(root).is_file():
          print(f"{tag(r.e)}: FAILED (exit {r.proc.returncode}) after {r.minutes():.1f} min; "
                "rerun the same command to resume it", flush=True)
          failed.append(r.e.name)
        else:
          print(f"{tag(r.e)}: done in {r.minutes():.1f} min", flush=True)
          finish(r.e)
      if pending and not running and not args.dry_run and all(  # (failed deps: swept next)
          any(d in selected and d not in done and d not in failed for d in e.after)
          for e in pending):
        raise AssertionError(f"run_study: {[e.name for e in pending]} wait on each other")
  except KeyboardInterrupt as e:
    print(f"run_study: interrupted ({e or 'Ctrl-C'})", file=sys.stderr, flush=True)
    return 130
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    for r in running:  # fer.main saves the epoch it is in and exits
      r.proc.terminate()
    grace_end = time.perf_counter() + args.grace_s
    for r in running:
      try:
        r.proc.wait(timeout=max(0.0, grace_end - time.perf_counter()))
      except subprocess.TimeoutExpired:
        r.proc.kill()
        r.proc.wait()
        print(f"{tag(r.e)}: still going {args.grace_s:g} s after SIGTERM: killed", flush=True)
      print(f"{tag(r.e)}: stopped after {r.minutes():.1f} min{epochs(r.e)}; rerun the same "
            "command to resume it", flush=True)
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
  if past_deadline:
    return 124
  if failed:
    return 1
  if not args.dry_run:
    print("all complete; `python experiments/study.py table` rebuilds the README table")
  return 0


if __name__ == "__main__":
  sys.exit(main())
