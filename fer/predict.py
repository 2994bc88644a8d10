r"""Emotions in photos, with a trained run.

  python -m fer.predict --workdir=runs/cnn photo.jpg photos/
  python -m fer.predict --workdir=runs/cnn --format=csv --output=emotions.csv photos/
  python -m fer.predict --workdir=runs/cnn --annotate=annotated/ photos/
  python -m fer.predict --checkpoint=runs/cnn/checkpoints/last/30 --no_detect faces/

Each JPEG, PNG, WebP, BMP or TIFF image (any size, colour or grey; folders are searched
recursively) is searched for frontal faces (fer/faces.py); each face is cropped and preprocessed
like the training data, and all faces are classified together, in fixed-size batches. One row per face: the file, the face
box (x, y, w, h), the top emotion and the 7 probabilities. `--no_detect` takes each image as an
already cropped face. Test-time augmentation is the run's `eval.tta` unless `--tta` says
otherwise; the val accuracy printed first is the one measured with that TTA where the run has it
(results.json), else the checkpoint's own evaluation, without TTA, and says which.

The table goes to stdout; with `--format=json|csv` that format goes to stdout instead, or to
`--output` (the table then still goes to stdout). Files that are no image, unreadable, or hold
no face are reported one by one (as is a folder without files); the rest still run. Progress
goes to stderr. The exit status is 1 when no face at all could be classified, 2 when the run or
checkpoint cannot be used (a one-line error names it), else 0.
"""

from fer import xla_flags

xla_flags.configure_cpu_defaults()  # before jax starts its backend; a no-op off CPU

# pylint: disable=g-import-not-at-top,wrong-import-position
import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import sys
import time
from typing import Callable, Sequence, TextIO

from absl import app
from absl import flags
from absl import logging
import numpy as np

from fer import faces as faces_lib
from fer import fileio
from fer import runs
from fer.datasets.fer2013 import CLASSES

FLAGS = flags.FLAGS


def define_model_flags():
  """The flags of the commands that find and classify faces with a trained run (this one and
  fer.video)."""
  flags.DEFINE_string("workdir", None,
                      "A trained run's workdir (its best checkpoint and config.json are used).")
  flags.DEFINE_string("checkpoint", None,
                      "A checkpoint folder (RUN/checkpoints/last/<epoch>) instead of the best "
                      "one; its config is found above it, or in --workdir.")
  flags.DEFINE_enum("tta", None, ["none", "flip", "tencrop"],
                    "Test-time augmentation; default: the run's eval.tta.")
  flags.DEFINE_float("margin", 0.1, "Context around a detected face, as a fraction of its "
                     "box's side added on each side.")
  flags.DEFINE_integer("min_face", 24, "Smallest face searched for, in pixels.")
  flags.DEFINE_integer("batch_size", 256, "Faces per model call.")
  flags.DEFINE_bool("calibrate", False, "Temperature-scale the probabilities with the run's "
                    "temperature (fit on val at the end of training; results.json): "
                    "confidences that match accuracy. The predicted emotions stay the same.")


def define_flags():
  """The flags, defined only when run as a command (the CLIs share flag names)."""
  define_model_flags()
  flags.DEFINE_bool("no_detect", False, "Take each image as an already cropped face.")
  flags.DEFINE_enum("format", "table", ["table", "json", "csv"], "Output format.")
  flags.DEFINE_string("output", None,
                      "Write the --format json/csv output (default: by the name's suffix) to "
                      "this file, atomically, and print the table.")
  flags.DEFINE_string("annotate", None,
                      "Write a copy of each image with boxes and labels drawn into this folder.")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # annotated copies keep these; others become PNG


@dataclasses.dataclass
class FaceResult:
  file: str
  face: int  # 1-based index within its file, left to right
  box: faces_lib.Box
  probs: np.ndarray  # [7], in CLASSES order

  @property
  def emotion(self) -> str:
    return CLASSES[int(np.argmax(self.probs))]

  @property
  def probability(self) -> float:
    return float(np.max(self.probs))


@dataclasses.dataclass
class Problem:
  file: str
  problem: str


@dataclasses.dataclass
class Results:
  faces: list[FaceResult]
  problems: list[Problem]
  checkpoint: str = ""
  tta: str = "none"
  temperature: float | None = None  # probabilities calibrated with it (--calibrate), or raw


# ----------------------------------------------------------------------------- finding files


def find_images(paths: Sequence[str]) -> tuple[list[str], list[Problem]]:
  """Files to read: each given file, and every file under each given folder (recursively,
  sorted, hidden ones skipped). Missing paths are problems."""
  return find_files(paths, lambda name: True, f"no image in this folder or its subfolders "
                    f"(looked for {faces_lib.FORMAT_WORDS} files)")


def find_files(paths: Sequence[str], keep: Callable[[str], bool],
               none_found: str) -> tuple[list[str], list[Problem]]:
  """Each given file, and the files under each given folder whose name `keep` takes
  (recursively, sorted, hidden ones skipped; `none_found` is the problem of a folder without
  any). Missing paths are problems."""
  files, problems = [], []
  for p in paths:
    path = pathlib.Path(p)
    if path.is_dir():
      found = []
      for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and keep(f)]
      if not found:
        problems.append(Problem(str(path), none_found))
      files += found
    elif path.exists():
      files.append(str(path))
    else:
      problems.append(Problem(str(path), "does not exist"))
  return files, problems


# ----------------------------------------------------------------------------- the pipeline


class Progress:
  """'[k/n] files, m faces, r files/s, ETA' lines on `stream`, every `every_seconds`."""

  def __init__(self, total: int, stream: TextIO | None = sys.stderr, every_seconds: float = 2.0,
               min_total: int = 20):
    self.total, self.stream, self.every = total, stream, every_seconds
    self.enabled = stream is not None and total >= min_total
    self.start = self.last = time.perf_counter()

  def update(self, done: int, num_faces: int):
    if not self.enabled:
      return
    now = time.perf_counter()
    if now - self.last < self.every and done < self.total:
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / max(rate, 1e-9)
    print(f"  [{done}/{self.total}] files read, {num_faces} faces, {rate:.1f} files/s, "
          f"ETA {int(eta) // 60}:{int(eta) % 60:02d}", file=self.stream, flush=True)


def extract_faces(files: Sequence[str], detector=None, margin: float = 0.1,
                  progress: Progress | None = None, skip_detection: str = "pass --no_detect"):
  """(faces uint8 [N, 48, 48, 1], [(file, box)], [Problem]) for every face of every file.

  `detector` has detect(grey) -> [Box]; None takes each image as a cropped face.
  `skip_detection`: how the calling command turns detection off, for the no-face hint.
  """
  crops, where, problems = [], [], []
  for i, file in enumerate(files):
    try:
      grey = faces_lib.to_grey(faces_lib.read_image(file))
    except faces_lib.ImageError as e:
      problems.append(Problem(file, str(e)))
    else:
      if detector is None:
        boxes, file_margin = [faces_lib.whole_image_box(grey)], 0.0
      else:
        boxes, file_margin = detector.detect(grey), margin
      if not boxes:
        problems.append(Problem(file, faces_lib.no_face_problem(grey, skip_detection)))
      for box in boxes:
        crops.append(faces_lib.crop_face(grey, box, file_margin))
        where.append((file, box))
    if progress is not None:
      progress.update(i + 1, len(crops))
  images = (np.stack(crops) if crops else
            np.zeros((0, faces_lib.FACE_SIZE, faces_lib.FACE_SIZE, 1), np.uint8))
  return images, where, problems


def make_classifier(run: runs.Run, tta: str, batch_size: int = 256) -> Callable:
  """classify(faces uint8 [N, 48, 48, 1]) -> probabilities [N, 7], in padded fixed-size batches."""
  from fer import train  # pylint: disable=import-outside-toplevel
  predict = train.make_predict(run.model, tta)
  mesh = train.make_mesh()

  def classify(images: np.ndarray) -> np.ndarray:
    # Round small inputs up to a multiple of 32: few distinct shapes to compile.
    size = max(1, min(batch_size, 32 * math.ceil(len(images) / 32)))
    return train.predict_probs(predict, run.variables, images, size, mesh)

  return classify


def predict_files(run: runs.Run, paths: Sequence[str], detector=None, margin: float = 0.1,
                  tta: str | None = None, batch_size: int = 256,
                  progress_stream: TextIO | None = sys.stderr,
                  progress_every_seconds: float = 2.0,
                  temperature: float | None = None) -> Results:
  """Every face in `paths` (files and folders), classified with `run`'s model.

  `detector` (detect(grey) -> [Box]) finds the faces; None takes each image as a cropped face.
  With a `temperature`, the probabilities are temperature-scaled (metrics.apply_temperature).
  """
  tta = tta or run.config.eval.get("tta", "none")
  files, problems = find_images(paths)
  progress = Progress(len(files), progress_stream, progress_every_seconds)
  images, where, more = extract_faces(files, detector, margin, progress)
  problems += more
  probs = (make_classifier(run, tta, batch_size)(images) if len(images) else
           np.zeros((0, len(CLASSES))))
  if temperature and len(probs):
    from fer import metrics  # pylint: disable=import-outside-toplevel
    probs = metrics.apply_temperature(probs, temperature)
  results, counts = [], {}
  for (file, box), p in zip(where, probs):
    counts[file] = counts.get(file, 0) + 1
    results.append(FaceResult(file, counts[file], box, np.asarray(p, np.float64)))
  order = {f: i for i, f in enumerate(files)}
  problems.sort(key=lambda pr: order.get(pr.file, -1))
  return Results(results, problems, str(run.checkpoint.path), tta, temperature)


# ----------------------------------------------------------------------------- outputs


def to_json(results: Results) -> str:
  return json.dumps({
      "checkpoint": results.checkpoint,
      "tta": results.tta,
      "temperature": results.temperature,
      "classes": list(CLASSES),
      "faces": [{"file": r.file, "face": r.face, "box": list(r.box), "emotion": r.emotion,
                 "probability": r.probability,
                 "probabilities": {c: float(p) for c, p in zip(CLASSES, r.probs)}}
                for r in results.faces],
      "problems": [dataclasses.asdict(p) for p in results.problems],
  }, indent=2) + "\n"


CSV_COLUMNS = ("file", "face", "x", "y", "width", "height", "emotion", "probability", *CLASSES,
               "problem")


def to_csv(results: Results) -> str:
  """One row per face, then one per problem (its `problem` column set, the rest empty)."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(CSV_COLUMNS)
  for r in results.faces:
    writer.writerow([r.file, r.face, *r.box, r.emotion, f"{r.probability:.6f}",
                     *(f"{p:.6f}" for p in r.probs), ""])
  for p in results.problems:
    writer.writerow([p.file] + [""] * (len(CSV_COLUMNS) - 2) + [p.problem])
  return out.getvalue()


def to_table(results: Results) -> str:
  heads = ["file", "face", "box x,y,w,h", "emotion", "p"] + [c[:8] for c in CLASSES]
  rows = [[r.file, str(r.face), ",".join(map(str, r.box)), r.emotion, f"{r.probability:.2f}",
           *(f"{p:.2f}" for p in r.probs)] for r in results.faces]
  widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(heads)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  lines = [line(heads)] + [line(row) for row in rows]
  if not rows:
    lines = ["no face classified"]
  for p in results.problems:
    lines.append(f"{p.file}: {p.problem}")
  n_files = len({r.file for r in results.faces})
  lines.append(f"{len(results.faces)} faces in {n_files} files; {len(results.problems)} files "
               f"with problems (TTA {results.tta}).")
  return "\n".join(lines) + "\n"


def draw_faces(rgb: np.ndarray, labelled_boxes, color=(255, 220, 0)) -> np.ndarray:
  """Draws each (box, label) of `labelled_boxes` into the uint8 [H, W, 3] image `rgb`, in
  place: the box, and the label on a filled band above it (below it at the image's top)."""
  import cv2  # pylint: disable=import-outside-toplevel
  thickness = max(1, round(min(rgb.shape[:2]) / 300))
  for (x, y, w, h), label in labelled_boxes:
    cv2.rectangle(rgb, (x, y), (x + w - 1, y + h - 1), color, thickness)
    scale = max(0.35, w / 250)
    (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    ty = y - 4 if y - th - base - 4 >= 0 else min(y + h + th + 4, rgb.shape[0] - base)
    cv2.rectangle(rgb, (x, ty - th - base), (x + tw, ty + base), color, -1)
    cv2.putText(rgb, label, (x, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness,
                cv2.LINE_AA)
  return rgb


def annotate(results: Results, out_dir, files: Sequence[str] | None = None) -> list[pathlib.Path]:
  """A copy of each image (those in `files`, default: those with faces) with boxes and labels
  drawn, into `out_dir`. Never overwrites an input; names that collide get a suffix."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  by_file: dict[str, list[FaceResult]] = {}
  for r in results.faces:
    by_file.setdefault(r.file, []).append(r)
  files = list(by_file) if files is None else list(files)
  inputs = {pathlib.Path(f).resolve() for f in files}
  written, used = [], set()
  for file in files:
    try:
      img = faces_lib.read_image(file)
    except faces_lib.ImageError:
      continue
    if img.mode in faces_lib.WIDE_MODES:  # 16-bit, float: scaled, not clipped
      rgb = np.repeat(faces_lib.to_grey(img)[..., None], 3, axis=2)
    else:
      rgb = np.array(img.convert("RGB"))
    draw_faces(rgb, [(r.box, f"{r.emotion} {r.probability:.2f}") for r in by_file.get(file, [])])
    src = pathlib.Path(file)
    suffix = src.suffix.lower() if src.suffix.lower() in IMAGE_SUFFIXES else ".png"
    target, k = out_dir / f"{src.stem}{suffix}", 1
    while target in used or target.resolve() in inputs:
      target, k = out_dir / f"{src.stem}_{k}{suffix}", k + 1
    used.add(target)
    fmt = "JPEG" if suffix in (".jpg", ".jpeg") else "PNG"
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    from PIL import Image  # pylint: disable=import-outside-toplevel
    Image.fromarray(rgb).save(tmp, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    os.replace(tmp, target)
    written.append(target)
  return written


# ----------------------------------------------------------------------------- CLI


def load_model_flags(detect: bool = True):
  """(run, detector or None, tta, temperature or None) as define_model_flags' flags say, after
  printing the model line to stderr. Raises runs.RunError (or RuntimeError: no detector)."""
  run = runs.load_for_cli(FLAGS.workdir, FLAGS.checkpoint)
  detector = faces_lib.FaceDetector(min_size=FLAGS.min_face) if detect else None
  temperature = runs.calibration_temperature(run) if FLAGS.calibrate else None
  tta = FLAGS.tta or run.config.eval.get("tta", "none")
  print(f"Model: {run.checkpoint.path} (epoch {run.checkpoint.epoch}, "
        f"{runs.val_accuracy_line(run, tta)})", file=sys.stderr, flush=True)
  if temperature is not None:
    print(f"Probabilities calibrated with temperature {temperature:.3f} (fit on val by the "
          "run's final evaluation).", file=sys.stderr, flush=True)
  return run, detector, tta, temperature


def main(argv):
  logging.set_verbosity(logging.ERROR)  # orbax's notes on read-only managers are noise here
  paths = argv[1:]
  if not paths:
    raise app.UsageError("Name one or more image files or folders.")
  fmt = FLAGS.format
  if FLAGS.output and fmt == "table":
    fmt = pathlib.Path(FLAGS.output).suffix.lower().lstrip(".")
    if fmt not in ("json", "csv"):
      raise app.UsageError("--output needs --format=json or --format=csv (or a .json/.csv name)")
  try:
    run, detector, tta, temperature = load_model_flags(detect=not FLAGS.no_detect)
  except (runs.RunError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  results = predict_files(run, paths, detector, FLAGS.margin, tta, FLAGS.batch_size,
                          temperature=temperature)
  text = {"json": to_json, "csv": to_csv, "table": to_table}[fmt](results)
  if FLAGS.output:
    fileio.write_text_atomic(FLAGS.output, text)
    print(f"Wrote {FLAGS.output}", file=sys.stderr)
    sys.stdout.write(to_table(results))
  else:
    sys.stdout.write(text)
  if FLAGS.annotate:
    files, _ = find_images(paths)
    written = annotate(results, FLAGS.annotate, files)
    print(f"Wrote {len(written)} annotated images into {FLAGS.annotate}", file=sys.stderr)
  if not results.faces:
    print("error: no face found in the images given", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
