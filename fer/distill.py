r"""Knowledge distillation: a network trained on its labels and on finished runs' probabilities.

  python -m fer.distill --teachers=runs/strong_s0,runs/strong_s1,runs/strong_s2 \
      --out=runs/teachers_strong.npz
  python -m fer.main --config=configs/strong.py --config.distill.targets=runs/teachers_strong.npz \
      --workdir=runs/strong_distilled_s0

The first command runs the teachers' best checkpoints (chosen on val by their own runs) over
every Training image of their protocol, with each teacher's `eval.tta` (or `--tta`), and saves
the mean probabilities with a fingerprint of each image. A run with `distill.targets` then trains
on targets `(1 - distill.weight) * one_hot(label) + distill.weight * teacher`, the teacher's
probabilities softened by `distill.temperature` (p ** (1 / T), renormalised), under the same
augmentation, mixing, label smoothing and class weights as without. Its train images are matched
to the teachers' by content, so a run that drops images (input.drop_train_copies) uses the same
file; a run on other val/test splits than the teachers' is refused: they would have trained on
its val or test images. Nothing but the Training images goes into the file.
"""

from fer import xla_flags

xla_flags.configure_cpu_defaults()  # before jax starts its backend; a no-op off CPU

# pylint: disable=g-import-not-at-top,wrong-import-position
import hashlib
import json
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from fer import fileio
from fer import runs
from fer.datasets.fer2013 import NUM_CLASSES


class DistillError(ValueError):
  """Teacher targets that cannot be made or used; the message names the file or run and why."""


def fingerprints(images: np.ndarray) -> np.ndarray:
  """uint8 [N, 16]: the first 16 bytes of each image's sha256 (over its shape and pixels)."""
  images = np.ascontiguousarray(images)
  shape = repr(images.shape[1:]).encode()
  return np.frombuffer(b"".join(hashlib.sha256(shape + image.tobytes()).digest()[:16]
                                for image in images), np.uint8).reshape(len(images), 16)


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
  """probs ** (1 / T), renormalised per row: T > 1 flattens, T < 1 sharpens, T = 1 keeps."""
  if temperature == 1:
    return probs.astype(np.float32)
  logp = np.log(np.clip(probs.astype(np.float64), 1e-12, None)) / temperature
  p = np.exp(logp - logp.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def make_targets(teachers, out, tta: str = "", data=None) -> dict:
  """Writes the teachers' mean train probabilities to `out` (.npz); returns its summary."""
  from fer import input_pipeline  # pylint: disable=import-outside-toplevel
  from fer import train  # pylint: disable=import-outside-toplevel
  teachers = [pathlib.Path(t) for t in teachers]
  if not teachers:
    raise DistillError("--teachers: give at least one finished run's workdir")
  if tta not in ("", *train.TTA_MODES):
    raise DistillError(f"--tta={tta!r}: expected none, flip or tencrop (or empty: each run's own)")
  out = pathlib.Path(out)
  if out.suffix != ".npz":
    raise DistillError(f"--out={out}: expected a file name ending in .npz")
  configs = [runs.load_config(t) for t in teachers]
  for teacher, config in zip(teachers[1:], configs[1:]):
    differ = runs.split_differences(config.input, configs[0].input)
    if differ:
      raise DistillError(f"{teacher} was trained on other splits than {teachers[0]}: "
                         f"{'; '.join(differ)}. Distil from runs of one protocol.")
  split_input = {k: configs[0].input.get(k) for k in runs.SPLIT_KEYS}
  if data is None:
    input_config = configs[0].input.copy_and_resolve_references()
    input_config.drop_train_copies = False  # every Training image: any student's subset matches
    data = input_pipeline.load_splits(input_config)
  images, labels = data["train"]["image"], data["train"]["label"]
  mesh = train.make_mesh()
  probs, members = [], []
  for teacher, config in zip(teachers, configs):
    start = time.perf_counter()
    run = runs.load(teacher)
    member_tta = tta or config.eval.get("tta", "none")
    p = train.predict_probs(train.make_predict(run.model, member_tta), run.variables, images,
                            int(config.input.eval_batch_size), mesh)
    accuracy = float((p.argmax(1) == labels).mean())
    members.append({"workdir": str(teacher), "tta": member_tta, "train/accuracy": accuracy})
    probs.append(p)
    print(f"{teacher}: train/accuracy {accuracy:.4f} on {len(images):,} images "
          f"({train.tta_words(member_tta)}, {time.perf_counter() - start:.0f} s)", flush=True)
  mean = np.mean(probs, axis=0).astype(np.float32)
  summary = {"teachers": members, "split_input": split_input, "num_images": len(images),
             "train/accuracy": float((mean.argmax(1) == labels).mean()),
             "mean_confidence": float(mean.max(1).mean())}
  write_targets(out, mean, images, summary)
  print(f"Teacher targets of {len(teachers)} run(s) for {len(images):,} Training images: "
        f"train/accuracy {summary['train/accuracy']:.4f}, mean top probability "
        f"{summary['mean_confidence']:.3f}. Written to {out}; train with "
        f"--config.distill.targets={out}", flush=True)
  return summary


def write_targets(out, probs: np.ndarray, images: np.ndarray, summary: dict):
  """The targets file: probabilities [N, K] of `images` [N, ...], their fingerprints, and
  `summary` (which must hold 'split_input', the teachers' SPLIT_KEYS values, and 'teachers')."""
  fileio.save_npz_atomic(out, probs=probs.astype(np.float32), fingerprints=fingerprints(images),
                         summary=np.array(json.dumps(summary)))


def _how_to_make(path) -> str:
  return (f"make it with `python -m fer.distill --teachers=<finished runs> --out={path}`, or set "
          "--config.distill.targets='' to train without a teacher")


def load_targets(config, images: np.ndarray) -> tuple[np.ndarray, dict]:
  """Teacher probabilities [N, K] (softened by config.distill.temperature) for the run's train
  `images`, matched by content, and the file's summary. Raises DistillError (naming the file)
  for a missing or damaged file, other splits than the run's, or images the file lacks."""
  path = pathlib.Path(config.distill.targets)
  if not path.is_file():
    raise DistillError(f"distill.targets={str(path)!r} does not exist: {_how_to_make(path)}")
  try:
    with np.load(path, allow_pickle=False) as f:
      probs, prints = f["probs"], f["fingerprints"]
      summary = json.loads(str(f["summary"]))
  except (OSError, ValueError, KeyError, EOFError) as e:
    raise DistillError(f"{path} is not a teacher-targets file ({type(e).__name__}: {e}): "
                       f"{_how_to_make(path)}") from e
  if probs.shape != (len(prints), NUM_CLASSES) or prints.shape[1:] != (16,):
    raise DistillError(f"{path}: probs {probs.shape} and fingerprints {prints.shape} do not fit "
                       f"together (expected [N, {NUM_CLASSES}] and [N, 16]): "
                       f"{_how_to_make(path)}")
  differ = runs.split_differences(summary.get("split_input", {}), config.input)
  if differ:
    raise DistillError(
        f"{path} was made by teachers trained on other splits than this run's ("
        + "; ".join(differ) + "): they may have trained on this run's val or test images. "
        "Make targets from runs of this run's protocol.")
  index = {row.tobytes(): i for i, row in enumerate(prints)}
  rows = [index.get(row.tobytes(), -1) for row in fingerprints(images)]
  missing = sum(r < 0 for r in rows)
  if missing:
    raise DistillError(f"{path} has no teacher probabilities for {missing:,} of this run's "
                       f"{len(images):,} train images: it was made for other images (another "
                       f"data set or image size); {_how_to_make(path)}")
  return soften(probs[rows], config.distill.temperature), summary


def define_flags():
  """The CLI's flags, defined only when this module is the program (others define --out too)."""
  flags.DEFINE_list("teachers", None, "Finished run workdirs whose best checkpoints label the "
                    "Training images.")
  flags.DEFINE_string("out", None, "The .npz file to write the teacher targets to.")
  flags.DEFINE_string("tta", "", "none | flip | tencrop for every teacher; empty: each run's "
                      "own eval.tta.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)  # orbax's notes on read-only managers are noise here
  f = flags.FLAGS
  try:
    make_targets(f.teachers, f.out, f.tta)
  except (ValueError, RuntimeError) as e:
    if isinstance(e, DistillError) or type(e).__module__.startswith("fer."):
      sys.exit(f"fer.distill: {type(e).__name__}: {e}")
    raise


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["teachers", "out"])
  app.run(main)
