r"""A trained run on another labelled data set: a folder of class folders (cross-dataset tests).

  python -m fer.evaluate --workdir=runs/strong_s0 --data=CK+48 --out=runs/eval_ckplus
  python -m fer.evaluate --workdir=runs/strong_s0 --data=my_photos --detect --out=runs/eval_photos
  python -m fer.evaluate --workdir=runs/strong_s0,runs/strong_s1 --data=CK+48 --out=runs/eval_ens
  python -m fer.evaluate --workdir=runs/strong_s0 --data=RAF-DB/test \
      --class_map=1:surprise,2:fear,3:disgust,4:happy,5:sad,6:angry,7:neutral --out=runs/eval_raf

--data holds one folder per class of images (JPEG, PNG, WebP, BMP, TIFF; searched recursively).
Folder names are matched to the 7 classes case-insensitively, by name or a usual alias (anger,
happiness, sadness, surprised, fearful, disgusted, ...: ALIASES); `--class_map` names the others
(folder:class, e.g. RAF-DB's numbered folders). Folders of any other name (contempt, ...) are
left out and listed. Images are taken as cropped faces, as FER2013's are; with `--detect` each
image's largest detected face is used (whole photographs, one person each), and an image
without a face is listed as a problem and left out. The faces go through the model as in
fer.predict (the run's eval.tta unless --tta says otherwise); several --workdir runs are an
ensemble, their probabilities averaged, as fer.ensemble does.

--out gets results.json (accuracy, per-class accuracy and counts, macro-F1, confusion matrix,
expected calibration error, what was left out and why; for data sets without some classes, such
as CK+48 without neutral, also the accuracy choosing among the classes present only),
predictions.csv (file, face box, true class, predicted class, the 7 probabilities) and
confusion_matrix.png; a summary goes to stdout. --out may not be a run's workdir or lie inside
--data.
Exit status 2 when the run or the data cannot be used (a one-line error names it), else 0.
"""

from fer import xla_flags

xla_flags.configure_cpu_defaults()  # before jax starts its backend; a no-op off CPU

# pylint: disable=g-import-not-at-top,wrong-import-position
import csv
import io
import pathlib
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from fer import faces as faces_lib
from fer import fileio
from fer import metrics as metrics_lib
from fer import predict
from fer import runs
from fer.datasets.fer2013 import CLASSES

# Folder names (lower case) taken for each class besides its own name.
ALIASES = {  # as in CK+, FER+, AffectNet and RAF-DB's usual folder and label names
    "angry": ("anger",),
    "disgust": ("disgusted",),
    "fear": ("fearful", "afraid", "scared"),
    "happy": ("happiness", "joy"),
    "sad": ("sadness",),
    "surprise": ("surprised", "suprise"),  # the misspelling is a folder name in some sets
    "neutral": (),
}


TOP_LEVEL = "(files beside the class folders)"  # how find_labelled lists them as left out


class DataError(ValueError):
  """The --data folder or --class_map cannot be used; the message says why and what to do."""


def parse_class_map(text: str) -> dict[str, str]:
  """'folder:class,...' -> {folder (lower case): class}; classes by name or alias."""
  out = {}
  for item in filter(None, (s.strip() for s in (text or "").split(","))):
    folder, sep, name = item.partition(":")
    cls = class_of(name)
    if not sep or not folder.strip() or cls is None:
      raise DataError(f"--class_map item {item!r}: expected folder:class with class one of "
                      f"{', '.join(CLASSES)}")
    out[folder.strip().lower()] = cls
  return out


def class_of(name: str, class_map: dict[str, str] | None = None) -> str | None:
  """The class a folder name stands for (class_map first, then names and ALIASES), or None."""
  key = name.strip().lower()
  if class_map and key in class_map:
    return class_map[key]
  for cls in CLASSES:
    if key == cls or key in ALIASES[cls]:
      return cls
  return None


def find_labelled(data, class_map: dict[str, str] | None = None):
  """([(file, class index)], {folder: number of files} left out): every image under each class
  folder of `data`, in sorted order."""
  root = pathlib.Path(data)
  if not root.is_dir():
    raise DataError(f"--data={data}: not a folder (expected one folder per class, e.g. "
                    f"{root}/happy/*.jpg)")
  labelled, skipped = [], {}
  entries = [e for e in root.iterdir() if not e.name.startswith(".")]
  loose = [f for f in entries if f.is_file()]
  if loose:
    skipped[TOP_LEVEL] = len(loose)
  folders = sorted(d for d in entries if d.is_dir())
  names = ", ".join(d.name for d in folders[:12]) or "no folders at all"
  unused = sorted(set(class_map or {}) - {d.name.lower() for d in folders})
  if unused:
    raise DataError(f"--class_map names folders that {data} does not hold: {', '.join(unused)} "
                    f"(its folders: {names})")
  for folder in folders:
    files, _ = predict.find_images([str(folder)])  # other files: problems, listed later
    cls = class_of(folder.name, class_map)
    if cls is None:
      skipped[folder.name] = len(files)
    else:
      labelled += [(f, CLASSES.index(cls)) for f in files]
  if not labelled:
    splits = [d.name for d in folders if any(
        class_of(s.name) for s in d.iterdir() if s.is_dir())]
    hint = (f"; {', '.join(splits)} hold{'s' * (len(splits) == 1)} class folders: pass "
            f"--data={root / splits[0]}" if splits else "")
    raise DataError(
        f"--data={data}: no images in class folders (found: {names}{hint}). Expected folders "
        f"named after the classes ({', '.join(CLASSES)}) or an alias (ALIASES in "
        f"fer/evaluate.py), or name them with --class_map=folder:class,...")
  return labelled, skipped


def check_out(out, data) -> pathlib.Path:
  """`out` made (empty or an earlier evaluation's), refused where writing would damage a
  run or feed the results back into the data: a run's workdir, or a folder inside --data."""
  out = pathlib.Path(out)
  if any((out / name).exists() for name in ("config.json", "checkpoints", "metrics.jsonl")):
    raise DataError(f"--out={out} holds a training run (config.json, checkpoints): its "
                    "results.json would be overwritten. Give the evaluation a folder of its own.")
  if out.resolve() == pathlib.Path(data).resolve() or pathlib.Path(
      data).resolve() in out.resolve().parents:
    raise DataError(f"--out={out} is inside --data={data}: its files would count as images "
                    "of a class the next time. Give the evaluation a folder outside the data.")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"--out={out}: cannot create it ({type(e).__name__}: {e})") from None
  return out


class LargestFace:
  """A detector that keeps the largest face an image holds (one subject per labelled image)."""

  def __init__(self, detector):
    self.detector = detector

  def detect(self, grey):
    boxes = self.detector.detect(grey)
    return [max(boxes, key=lambda b: b.w * b.h)] if boxes else []


def evaluate(run: runs.Run | Sequence[runs.Run], data, out,
             class_map: dict[str, str] | None = None, detector=None, tta: str | None = None,
             batch_size: int = 256, progress_stream=sys.stderr, found=None) -> dict:
  """Classifies every labelled image under `data` with `run` (or an ensemble: several runs, whose
  probabilities are averaged, each with its own eval.tta unless `tta` is given) and writes the
  results into `out` (module docstring); returns results.json's content. `found`: what
  find_labelled(data, class_map) returned, where the caller has it already."""
  members = [run] if isinstance(run, runs.Run) else list(run)
  ttas = [tta or m.config.eval.get("tta", "none") for m in members]
  labelled, skipped = found or find_labelled(data, class_map)
  out = check_out(out, data)
  files = [f for f, _ in labelled]
  progress = predict.Progress(len(files), progress_stream)
  detector = None if detector is None else LargestFace(detector)
  images, where, problems = predict.extract_faces(files, detector, progress=progress,
                                                  skip_detection="drop --detect")
  if not len(images):
    raise DataError(f"--data={data}: none of its {len(files)} images could be used (first "
                    f"problem: {problems[0].file}: {problems[0].problem})")
  label_of = dict(labelled)
  labels = np.array([label_of[f] for f, _ in where], np.int32)
  probs = np.mean([predict.make_classifier(m, member_tta, batch_size)(images)
                   for m, member_tta in zip(members, ttas)], axis=0)
  metrics = metrics_lib.classification_metrics(probs, labels, "eval")
  counts = np.bincount(labels, minlength=len(CLASSES))
  # Data sets without some classes (CK+48 has no neutral): the usual figure there picks among
  # the classes present only.
  present = np.where(counts > 0, probs, -1.0).argmax(1)
  results = {
      "data": str(data),
      "checkpoint": "/".join(str(m.checkpoint.path) for m in members),
      "epoch": "/".join(str(m.checkpoint.epoch) for m in members),
      "tta": "/".join(sorted(set(ttas))),
      "ensemble_size": len(members),
      "detect": detector is not None,
      "classes": list(CLASSES),
      "images": len(files),
      "faces": int(len(labels)),
      "per_class_count": counts.tolist(),
      **metrics,
      "eval/accuracy_present_classes": float((present == labels).mean()),
      "class_map": dict(sorted((class_map or {}).items())),
      "skipped_folders": skipped,
      "problems": [{"file": p.file, "problem": p.problem} for p in problems],
  }
  fileio.write_json_atomic(out / "results.json", results)
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(["file", "x", "y", "w", "h", "label", "predicted", *CLASSES])
  for (file, box), y, p in zip(where, labels, probs):
    writer.writerow([file, *box, CLASSES[y], CLASSES[int(np.argmax(p))],
                     *(f"{v:.6f}" for v in p)])
  fileio.write_text_atomic(out / "predictions.csv", buffer.getvalue())
  from fer import plots  # pylint: disable=import-outside-toplevel
  plots.confusion_matrix(np.array(metrics["eval/confusion_matrix"]), CLASSES,
                         out / "confusion_matrix.png",
                         title=f"{pathlib.Path(data).name}: accuracy "
                               f"{metrics['eval/accuracy']:.3f}")
  return results


def summary(results: dict) -> str:
  """The results as a few lines: accuracy, per class, what was left out."""
  from fer import train  # pylint: disable=import-outside-toplevel
  how = "/".join(map(train.tta_words, results["tta"].split("/"))) + (
      f", ensemble of {results['ensemble_size']}" if results["ensemble_size"] > 1 else "") + (
      ", largest detected face per image" if results["detect"] else "")
  lines = [f"{results['faces']:,} faces from {results['data']}: accuracy "
           f"{results['eval/accuracy']:.4f}, macro-F1 {results['eval/macro_f1']:.4f}, ECE "
           f"{results['eval/ece']:.3f} ({how})"]
  if 0 in results["per_class_count"]:
    lines.append(f"Accuracy choosing among the {sum(n > 0 for n in results['per_class_count'])} "
                 f"classes present only: {results['eval/accuracy_present_classes']:.4f}")
  for cls, n, acc in zip(CLASSES, results["per_class_count"],
                         results["eval/per_class_accuracy"]):
    lines.append(f"  {cls:9s} {n:6,} faces  " + ("-" if acc is None else f"{acc:.3f}"))
  if results["skipped_folders"]:
    lines.append("Left out, folders that name no class: " + ", ".join(
        f"{k} ({v} images)" for k, v in results["skipped_folders"].items()))
  if results["problems"]:
    lines.append(f"Left out, {len(results['problems'])} images (results.json lists each), e.g. "
                 f"{results['problems'][0]['file']}: {results['problems'][0]['problem']}")
  return "\n".join(lines) + "\n"


def define_flags():
  flags.DEFINE_list("workdir", None, "A trained run's workdir (its best checkpoint), or several, "
                    "comma-separated: an ensemble (their probabilities averaged).")
  flags.DEFINE_string("checkpoint", None, "A checkpoint folder instead of the best one.")
  flags.DEFINE_string("data", None, "A folder of class folders of face images.")
  flags.DEFINE_string("out", None, "Folder for results.json, predictions.csv and the figure.")
  flags.DEFINE_string("class_map", "", "folder:class pairs for folders named otherwise, "
                      "comma-separated (e.g. 1:surprise,2:fear).")
  flags.DEFINE_bool("detect", False, "Use each image's largest detected face (whole photos); "
                    "default: each image is a cropped face.")
  flags.DEFINE_integer("min_face", 24, "Smallest face searched for with --detect, in pixels.")
  flags.DEFINE_enum("tta", None, ["none", "flip", "tencrop"],
                    "Test-time augmentation; default: the run's eval.tta.")
  flags.DEFINE_integer("batch_size", 256, "Faces per model call.")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)  # orbax's notes on read-only managers are noise here
  f = flags.FLAGS
  try:
    class_map = parse_class_map(f.class_map)
    found = find_labelled(f.data, class_map)  # a wrong folder fails before the model loads
    check_out(f.out, f.data)
    if f.checkpoint and len(f.workdir or []) > 1:
      raise DataError("--checkpoint names one model: give it alone, or --workdir=A,B,... for an "
                      "ensemble of runs' best checkpoints")
    members = [runs.load_for_cli(w, f.checkpoint) for w in (f.workdir or [None])]
    detector = faces_lib.FaceDetector(min_size=f.min_face) if f.detect else None
    for m in members:
      tta = f.tta or m.config.eval.get("tta", "none")
      print(f"Model: {m.checkpoint.path} (epoch {m.checkpoint.epoch}, "
            f"{runs.val_accuracy_line(m, tta)})", file=sys.stderr, flush=True)
    results = evaluate(members, f.data, f.out, class_map, detector, f.tta, f.batch_size,
                       found=found)
  except (DataError, runs.RunError, RuntimeError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sys.stdout.write(summary(results))
  print(f"Results in {f.out}/results.json, predictions.csv, confusion_matrix.png",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["data", "out"])
  app.run(main)
