r"""Ensembles: average the class probabilities of several finished runs.

  python -m fer.ensemble --workdirs=runs/strong_s0,runs/strong_s1,runs/strong_s2 \
      --out=runs/strong_ensemble

Each member contributes the probabilities of its best checkpoint (chosen on val by its own run)
on val and test, as the run saved them at its end (`val_probs.npy`, `test_probs.npy`, made with
the run's `eval.tta`). With `--tta=none|flip|tencrop`, or for a member without saved
probabilities, the best checkpoint is restored and evaluated here instead; with `--tta`, one
run is accepted too (its best checkpoint re-evaluated with that TTA, an analysis: the run's own
test figure stays the one it reported). `--tta` may also give one mode per run, in the order of
--workdirs, empty for a run's saved probabilities: `--tta=,tencrop` keeps the first run's and
re-evaluates the second's best checkpoint with ten crops. The members must be
trained on the same splits (same data protocol); the ensemble is scored against that protocol's
labels. Which runs to ensemble is a choice to make on val accuracy; test is only reported.

`--select=greedy` makes that choice: ensemble selection (Caruana et al. 2004) on val. From the
candidate runs it adds, one round at a time and with replacement, the run whose addition gives
the best val accuracy (ties: the lower val NLL), and keeps the rounds' best ensemble by val; a
run picked k times weighs k. Test plays no part in the choice.

Writes into --out: results.json (val/test accuracy, macro-F1, per-class accuracy and confusion
matrix, as a training run does, plus each member's own accuracies and weight (with --select,
candidates left out weigh 0) and how often two members predict the same class,
`<split>/pairwise_agreement` (a matrix, members in order) and its mean over pairs
`<split>/member_agreement`, and calibration: `<split>/ece`, the `temperature` fit on val and
test's ECE and NLL after it), config.json (the first member's config and the member list; with
--select, the first chosen member's, the candidates and weights), val_probs.npy, test_probs.npy,
confusion_matrix.png, reliability.png and agreement.png (val's pairwise agreement: which members
are most alike, and which add most variety).
"""

from fer import xla_flags

xla_flags.configure_cpu_defaults()  # before jax starts its backend; a no-op off CPU

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

from fer import fileio
from fer import metrics as metrics_lib
from fer import runs
from fer import train
from fer.datasets.fer2013 import CLASSES

SPLITS = ("val", "test")


class EnsembleError(ValueError):
  """The members cannot be ensembled (missing runs, different splits); the message says why."""


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise EnsembleError(f"{path}: cannot read it ({e}); is the run finished?") from e


def _member_probs(workdir: pathlib.Path, results: dict, tta: str, data, mesh) -> tuple[dict, str]:
  """{'val', 'test'} -> probabilities [N, 7] of the member's best checkpoint, and their TTA.
  `results` is the member's results.json."""
  saved = {s: workdir / f"{s}_probs.npy" for s in SPLITS}
  if not tta and all(p.is_file() for p in saved.values()):
    return {s: np.load(p) for s, p in saved.items()}, results.get("tta", "none")
  tta = tta or results.get("tta", "none")
  run = runs.load(workdir)
  predict = train.make_predict(run.model, tta)
  batch = int(run.config.input.eval_batch_size)
  return {s: train.predict_probs(predict, run.variables, data[s]["image"], batch, mesh)
          for s in SPLITS}, tta


def _member_ttas(tta: str, n: int) -> list[str]:
  """--tta as one mode per member: none, flip or tencrop (re-evaluate the best checkpoint), or ''
  (the probabilities the run saved). One mode is for all members; a list has one per member."""
  ttas = tta.split(",") if "," in tta else [tta] * n
  if len(ttas) != n:
    raise EnsembleError(f"--tta={tta!r} gives {len(ttas)} modes for {n} runs: give one mode for "
                        f"all runs, or one per run in the order of --workdirs")
  for mode in ttas:
    if mode not in ("", *train.TTA_MODES):
      raise EnsembleError(f"--tta={tta!r}: {mode!r} is not none, flip or tencrop (or empty: the "
                          f"run's saved probabilities)")
  return ttas


SELECT_MODES = ("none", "greedy")


def agreement(probs) -> np.ndarray:
  """How often each two members predict the same class: from probabilities [M, N, K] a
  symmetric [M, M] matrix of the share of the N images where both argmaxes agree (ones on the
  diagonal)."""
  votes = np.asarray(probs).argmax(-1)
  return (votes[:, None, :] == votes[None, :, :]).mean(-1)


def greedy_selection(val_probs, labels, rounds: int) -> np.ndarray:
  """Ensemble selection with replacement (Caruana et al. 2004) on val probabilities [M, N, K]:
  each round adds the member whose addition gives the best val accuracy (ties: lower val NLL,
  then the earlier member); returns each member's count [M] in the best round's ensemble (ties:
  lower NLL, then the earlier round, so the smaller ensemble)."""
  probs = np.asarray(val_probs, np.float64)
  labels = np.asarray(labels)
  total = np.zeros(probs.shape[1:])
  counts = np.zeros(len(probs), np.int64)
  best, best_counts = None, counts
  for r in range(1, rounds + 1):
    candidates = (total + probs) / r
    accuracy = (candidates.argmax(-1) == labels).mean(-1)
    nll = [metrics_lib.nll(c, labels) for c in candidates]
    pick = min(range(len(probs)), key=lambda m: (-accuracy[m], nll[m]))
    total += probs[pick]
    counts[pick] += 1
    if best is None or (accuracy[pick], -nll[pick]) > best:
      best, best_counts = (accuracy[pick], -nll[pick]), counts.copy()
  return best_counts


def ensemble(workdirs, out, tta: str = "", data=None, select: str = "none",
             rounds: int = 50) -> dict:
  """Averages the members' probabilities (weighted by `select`'s choice on val); writes and
  returns the ensemble's results."""
  from fer import input_pipeline  # pylint: disable=import-outside-toplevel
  from fer import plots  # pylint: disable=import-outside-toplevel
  workdirs = [pathlib.Path(w) for w in workdirs]
  ttas = _member_ttas(tta, len(workdirs))
  if len(workdirs) < (1 if any(ttas) else 2):
    raise EnsembleError(f"an ensemble needs at least two runs (or one with --tta, which "
                        f"re-evaluates its best checkpoint), got {len(workdirs)}")
  if select not in SELECT_MODES:
    raise EnsembleError(f"--select={select!r}: expected none (all runs, equal weights) or greedy")
  if select == "greedy" and (len(workdirs) < 2 or rounds < 1):
    raise EnsembleError(f"--select=greedy chooses among at least two runs in at least one round, "
                        f"got {len(workdirs)} runs and --rounds={rounds}")
  resolved = [w.resolve() for w in workdirs]
  twice = sorted({str(w) for w, r in zip(workdirs, resolved) if resolved.count(r) > 1})
  if twice:
    raise EnsembleError(f"{', '.join(twice)} given more than once: each run is one member")
  out = pathlib.Path(out)
  if any(w == out.resolve() or w in out.resolve().parents
         for w in resolved) or (out / "checkpoints").exists():
    raise EnsembleError(f"--out={out} is (inside) a run's workdir: its results.json and "
                        f"probabilities would be overwritten. Give the ensemble a folder of its own.")
  configs = [_read_json(runs.find_config_file(w)) for w in workdirs]
  member_results = [_read_json(w / "results.json") for w in workdirs]
  mismatch = runs.split_mismatch(workdirs, configs)
  if mismatch:
    raise EnsembleError(f"{mismatch}. Ensemble runs of one protocol.")
  if data is None:
    data = input_pipeline.load_splits(runs.load_config(workdirs[0]).input)
  mesh = train.make_mesh()
  probs = {s: [] for s in SPLITS}
  members = []
  for workdir, result, mode in zip(workdirs, member_results, ttas):
    member, member_tta = _member_probs(workdir, result, mode, data, mesh)
    entry = {"workdir": str(workdir), "tta": member_tta}
    for s in SPLITS:
      if member[s].shape != (len(data[s]["label"]), len(CLASSES)):
        raise EnsembleError(f"{workdir}: {s} probabilities have shape {member[s].shape}, expected "
                            f"({len(data[s]['label'])}, {len(CLASSES)}): other data than the labels")
      probs[s].append(member[s])
      entry[f"{s}/accuracy"] = float((member[s].argmax(1) == data[s]["label"]).mean())
    members.append(entry)
    print(f"{workdir}: val/accuracy {entry['val/accuracy']:.4f}, test/accuracy "
          f"{entry['test/accuracy']:.4f} ({train.tta_words(member_tta)})", flush=True)

  weights = (greedy_selection(probs["val"], data["val"]["label"], rounds) if select == "greedy"
             else np.ones(len(workdirs), np.int64))
  for entry, weight in zip(members, weights):
    entry["weight"] = int(weight)
  kept = np.flatnonzero(weights)
  if select == "greedy":
    print(f"Chosen on val ({rounds} rounds): " + ", ".join(
        f"{workdirs[i]} x{weights[i]}" for i in kept), flush=True)
  probs = {s: [probs[s][i] for i in kept] for s in SPLITS}
  chosen = [member_results[i] for i in kept]

  out.mkdir(parents=True, exist_ok=True)
  split_metrics, means = {}, {}
  for s in SPLITS:
    mean = means[s] = np.average(probs[s], axis=0, weights=weights[kept]).astype(np.float32)
    fileio.save_npy_atomic(out / f"{s}_probs.npy", mean)
    split_metrics.update(metrics_lib.classification_metrics(mean, data[s]["label"], s))
    # How often two members predict the same class (per pair, and the mean over pairs): near 1,
    # little to gain.
    if len(kept) > 1:
      agree = agreement(probs[s])
      split_metrics[f"{s}/pairwise_agreement"] = agree.round(6).tolist()
      split_metrics[f"{s}/member_agreement"] = float(agree[np.triu_indices(len(kept), 1)].mean())
  results = {
      "val/accuracy": split_metrics["val/accuracy"],
      "test/accuracy": split_metrics["test/accuracy"],
      "ensemble_size": len(kept),
      "selection": select,
      "members": members,
      # What prediction needs (the chosen members); training took every candidate.
      "num_params": int(sum(r["num_params"] for r in chosen)),
      "train_seconds": float(sum(r["train_seconds"] for r in member_results)),
      "epochs_trained": max(r["epochs_trained"] for r in chosen),
      "best_epoch": "/".join(str(r["best_epoch"]) for r in chosen),
      "tta": "/".join(sorted({members[i]["tta"] for i in kept})),
      "classes": list(CLASSES),
      # What trained the members (the ensemble itself only averages); members from several
      # kinds of machine list each kind.
      "device_kind": " / ".join(sorted({r.get("device_kind", "?") for r in chosen})),
      "device_count": max(r.get("device_count", 1) for r in chosen),
      "platform": " / ".join(sorted({r.get("platform", "?") for r in chosen})),
      "git_commit": train.git_commit(),
      **split_metrics,
      **metrics_lib.calibration(means["val"], data["val"]["label"], means["test"],
                                data["test"]["label"]),
  }
  if "train_copy" in data["test"]:
    results.update(metrics_lib.copy_metrics(means["test"], data["test"]["label"],
                                            data["test"]["train_copy"]))
  config = dict(configs[kept[0]], ensemble_members=[str(workdirs[i]) for i in kept])
  if select != "none":
    config.update(ensemble_weights=[int(weights[i]) for i in kept],
                  ensemble_candidates=[str(w) for w in workdirs], ensemble_rounds=rounds)
  fileio.write_json_atomic(out / "config.json", config)
  fileio.write_json_atomic(out / "results.json", results)
  plots.reliability_diagram(
      {"test": metrics_lib.reliability_curves(means["test"], data["test"]["label"],
                                              results["temperature"])},
      out / "reliability.png", title=f"ensemble of {len(kept)}: test reliability")
  plots.confusion_matrix(np.array(results["test/confusion_matrix"]), CLASSES,
                         out / "confusion_matrix.png",
                         title=f"ensemble of {len(kept)}: test accuracy "
                               f"{results['test/accuracy']:.3f}")
  if len(kept) > 1:
    plots.agreement_matrix(results["val/pairwise_agreement"],
                           [pathlib.PurePath(workdirs[i]).name for i in kept],
                           out / "agreement.png",
                           title=f"ensemble of {len(kept)}: how often two members agree (val)")
  dropped = all(configs[i].get("input", {}).get("drop_train_copies", False) for i in kept)
  agree_words = (f"; the members agree on {results['val/member_agreement']:.1%} of val images "
                 f"(mean over pairs)" if len(kept) > 1 else "")
  print(f"Ensemble of {len(kept)}: val/accuracy {results['val/accuracy']:.4f}, test/accuracy "
        f"{results['test/accuracy']:.4f}, test/macro_f1 {results['test/macro_f1']:.4f}, test/ece "
        f"{results['test/ece']:.3f} (after temperature {results['temperature']:.2f} fit on val: "
        f"{results['test/ece_calibrated']:.3f}){agree_words}."
        f"{train.copy_words(results, dropped)} Results in {out}/results.json", flush=True)
  return results


_WORKDIRS = flags.DEFINE_list("workdirs", None, "Finished run workdirs to ensemble.")
_OUT = flags.DEFINE_string("out", None, "Directory for the ensemble's results.")
_TTA = flags.DEFINE_string("tta", "", "none | flip | tencrop: re-evaluate the best checkpoints "
                           "with this TTA; empty: use the probabilities the runs saved; a "
                           "comma-separated list: one of these per run (e.g. ',tencrop').")
_SELECT = flags.DEFINE_enum("select", "none", SELECT_MODES,
                           "none: all runs, equal weights; greedy: choose runs and weights on val "
                           "(ensemble selection with replacement).")
_ROUNDS = flags.DEFINE_integer("rounds", 50, "--select=greedy: how many runs to add at most.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)  # orbax's notes on read-only managers are noise here
  try:
    ensemble(_WORKDIRS.value, _OUT.value, _TTA.value, select=_SELECT.value,
             rounds=_ROUNDS.value)
  except (ValueError, RuntimeError) as e:
    # This module runs as __main__ here, so its own errors are named apart from fer.*'s.
    if isinstance(e, EnsembleError) or type(e).__module__.startswith("fer."):
      sys.exit(f"fer.ensemble: {type(e).__name__}: {e}")
    raise


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdirs", "out"])
  app.run(main)
