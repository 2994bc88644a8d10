r"""Where a trained network looks: Grad-CAM heat maps (Selvaraju et al. 2017) of a run's faces.

  python -m fer.explain --workdir=runs/strong_s0 --out=runs/strong_s0/grad_cam.png
  python -m fer.explain --workdir=runs/cnn --split=test --per_class=6 --out=cam.png
  python -m fer.explain --workdir=runs/strong_s0 --out=mine.png photo.jpg photos/

The figure has a row per class: the mean face and the mean heat map over the split's faces of
that class that the run gets right, then the first `--per_class` faces of that class in the
split (right or wrong), each with the heat map of the class the run predicts, that class and
its probability (green when right, red when wrong). It prints per class how many faces the run
gets right and how the heat of those faces divides between the upper half of the face (brows,
eyes) and the lower half (mouth).

With image files or folders after the flags, it explains the faces in them instead of a split:
each photo is searched for faces and each face is cropped as `fer.predict` does it
(`--no_detect`: each image is a cropped face); the figure shows each face with the heat map of
the class the run predicts, and a line per face is printed (file, face box, that class, its
probability, the heat's share in the upper half of the face). Files that are no image or hold no
face are listed; the exit status is 1 when no face was found at all. It is 2, after a one-line
error, when the run or checkpoint cannot be used (or, for photos, OpenCV has no face detector).

The heat map of a face for class c: the last feature map a module of the network returns
(A [h, w, k]: the last conv layer after its batch norm in the CNN and VGG16, the last residual
block in the ResNet), each channel weighted by the mean over the map of the gradient of c's
logit with respect to it, summed over channels, rectified, upsampled to 48x48 and scaled to
[0, 1] per face. `--method=layercam` (Jiang et al. 2021) weighs each place of each channel by
its own positive gradient instead of the channel's mean gradient: where the head is a dense
layer over the flattened map (the CNN), the place of a feature matters to it, and Grad-CAM's
mean gives that up. One plain forward and backward pass per face: no test-time augmentation.
The split defaults to val; nothing here selects a model, so reading test is no leak either.
"""

from fer import xla_flags

xla_flags.configure_cpu_defaults()  # before jax starts its backend; a no-op off CPU

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import pathlib
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fer import runs
from fer.datasets.fer2013 import CLASSES

FLAGS = flags.FLAGS

METHODS = ("gradcam", "layercam")
_TITLES = {"gradcam": "Grad-CAM", "layercam": "LayerCAM"}


def define_flags():
  """The flags, defined only when run as a command (the CLIs share flag names)."""
  flags.DEFINE_string("workdir", None,
                      "A trained run's workdir (its best checkpoint and config.json are used).")
  flags.DEFINE_string("checkpoint", None,
                      "A checkpoint folder (RUN/checkpoints/last/<epoch>) instead of the best one.")
  flags.DEFINE_enum("split", "val", ["train", "val", "test"],
                    "The split of the run's data (its config's input keys) to explain.")
  flags.DEFINE_integer("per_class", 4, "Example faces per class in the figure.")
  flags.DEFINE_string("out", None, "Where to write the figure (.png).")
  flags.DEFINE_integer("batch_size", 256, "Faces per forward/backward pass.")
  flags.DEFINE_bool("no_detect", False, "Photos: take each image as an already cropped face.")
  flags.DEFINE_float("margin", 0.1, "Photos: margin around each detected face, as a fraction "
                     "of the face box's side (as fer.predict).")
  flags.DEFINE_enum("method", "gradcam", list(METHODS),
                    "gradcam: channel weights = the gradient's mean over the map; layercam: "
                    "the positive gradient at each place (sharper where the head is dense).")


def feature_layer(model, variables, images) -> tuple[str, ...]:
  """The path of the module whose output is the network's last 4-D feature map (traced only)."""
  seen = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and getattr(out, "ndim", 0) == 4:
      seen.append(context.module.path)
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images[:1])
  if not seen:
    raise ValueError(f"{type(model).__name__} has no module that returns a 4-D feature map: "
                     "Grad-CAM needs a convolutional network")
  return seen[-1]


def make_grad_cam(model, layer: tuple[str, ...], method: str = "gradcam"):
  """cam(variables, images uint8 [N, 48, 48, 1], classes int [N] or -1 for the predicted one)
  -> (heat maps float32 [N, 48, 48] in [0, 1], probabilities [N, 7]), jitted."""
  if method not in METHODS:
    raise ValueError(f"method={method!r}: expected one of {METHODS}")

  def forward(variables, images, delta):
    captured = {}

    def perturb(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and context.module.path == layer:
        captured["a"] = out
        out = out + delta.astype(out.dtype)  # zero: only its gradient, dlogit/dA, is wanted
      return out

    with nn.intercept_methods(perturb):
      logits = model.apply(variables, images, train=False).astype(jnp.float32)
    return logits, captured["a"].astype(jnp.float32)

  @jax.jit
  def cam(variables, images, classes):

    def score(delta):  # one forward pass: the chosen logits' sum, and what the maps need
      logits, acts = forward(variables, images, delta)
      chosen = jnp.where(classes < 0, jnp.argmax(logits, -1), classes)
      return jnp.take_along_axis(logits, chosen[:, None], axis=1).sum(), (logits, acts)

    shape = jax.eval_shape(lambda: forward(variables, images, jnp.zeros(()))[1]).shape
    grads, (logits, acts) = jax.grad(score, has_aux=True)(jnp.zeros(shape))
    if method == "gradcam":
      weights = grads.mean(axis=(1, 2), keepdims=True)  # per face and channel
    else:  # layercam: per face, channel and place
      weights = jax.nn.relu(grads)
    heat = jax.nn.relu((weights * acts).sum(-1))  # [N, h, w]
    heat = jax.image.resize(heat, (heat.shape[0],) + images.shape[1:3], "bilinear")
    heat = heat / jnp.maximum(heat.max(axis=(1, 2), keepdims=True), 1e-12)
    return heat, jax.nn.softmax(logits, -1)

  return cam


def grad_cam(model, variables, images: np.ndarray, classes=None, batch_size: int = 256,
             layer=None, method: str = "gradcam") -> tuple[np.ndarray, np.ndarray]:
  """Heat maps [N, 48, 48] in [0, 1] for `classes` (default: each face's predicted class) and
  the probabilities [N, 7], in padded fixed-size batches (one compile)."""
  images = np.asarray(images)
  n = len(images)
  classes = np.full(n, -1, np.int32) if classes is None else np.asarray(classes, np.int32)
  if classes.shape != (n,):
    raise ValueError(f"classes: expected one per image ({n}), got shape {classes.shape}")
  cam = make_grad_cam(model, layer or feature_layer(model, variables, images), method)
  size = max(1, min(batch_size, n))
  heats, probs = [], []
  for start in range(0, n, size):
    x, c = images[start:start + size], classes[start:start + size]
    pad = size - len(x)
    h, p = cam(variables, np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]),
               np.concatenate([c, np.full(pad, -1, np.int32)]))
    heats.append(np.asarray(h)[:len(x)])
    probs.append(np.asarray(p)[:len(x)])
  return np.concatenate(heats), np.concatenate(probs)


@dataclasses.dataclass
class ClassSummary:
  name: str
  faces: int
  right: int
  upper_share: float  # of the right faces' heat, the share in the image's upper half


def explain_split(model, variables, images, labels, per_class: int = 4, batch_size: int = 256,
                  class_names=CLASSES, method: str = "gradcam", layer=None
                  ) -> tuple[list[dict[str, Any]], list[ClassSummary]]:
  """The figure's rows (see fer.plots.grad_cam_grid) and the per-class summary."""
  heats, probs = grad_cam(model, variables, images, batch_size=batch_size, layer=layer,
                          method=method)
  preds = probs.argmax(-1)
  rows, summary = [], []
  for k, name in enumerate(class_names):
    idx = np.flatnonzero(labels == k)
    right = idx[preds[idx] == k]
    mean_heat = heats[right].mean(0) if len(right) else None
    if mean_heat is not None:  # on the faces' own [0, 1] scale, for the figure
      mean_heat = mean_heat / max(float(mean_heat.max()), 1e-12)
    upper = (float(upper_share(heats[right].sum(0, keepdims=True))[0]) if len(right)
             else float("nan"))
    summary.append(ClassSummary(name, len(idx), len(right), upper))
    rows.append({
        "name": name,
        "mean_face": images[idx, ..., 0].mean(0) if len(idx) else None,
        "mean_heat": mean_heat,
        "faces": [{"image": images[i, ..., 0], "heat": heats[i],
                   "pred": class_names[preds[i]], "prob": float(probs[i, preds[i]]),
                   "right": bool(preds[i] == k)} for i in idx[:per_class]],
    })
  return rows, summary


def format_summary(summary: list[ClassSummary]) -> str:
  lines = [f"{'class':<10} {'faces':>6} {'right':>6}  heat of the right faces: upper / lower half"]
  for s in summary:
    share = ("-" if s.right == 0 else f"{s.upper_share:.0%} / {1 - s.upper_share:.0%}")
    lines.append(f"{s.name:<10} {s.faces:>6} {s.right:>6}  {share}")
  return "\n".join(lines) + "\n"


def upper_share(heat: np.ndarray) -> np.ndarray:
  """The share of each heat map [N, h, w] in the upper half of the face."""
  half = heat.shape[1] // 2
  return heat[:, :half].sum((1, 2)) / np.maximum(heat.sum((1, 2)), 1e-12)


def format_faces(items: list[dict[str, Any]]) -> str:
  """A line per face (file, box, predicted class, its probability, upper-half share), in
  columns as wide as their widest entry."""
  rows = [[it["file"], ", ".join(str(int(v)) for v in it["box"]), it["pred"], f"{it['prob']:.0%}",
           f"{it['upper']:.0%}"] for it in items]
  heads = ["file", "box (x, y, w, h)", "emotion", "prob", "upper half"]
  widths = [max(len(r[i]) for r in [heads] + rows) for i in range(len(heads))]
  right = (False, False, False, True, False)  # the probability is right-aligned
  line = lambda cells: "  ".join(c.rjust(w) if r else c.ljust(w)
                                 for c, w, r in zip(cells, widths, right)).rstrip()
  return "\n".join(line(r) for r in [heads] + rows) + "\n"


def explain_photos(run, paths, out, method="gradcam", detector=None, margin=0.1,
                   batch_size=256) -> int:
  """The photo mode (module doc; `detector`: fer.faces.FaceDetector, None for cropped faces):
  prints a line per face, writes the figure; returns the exit status."""
  from fer import plots  # pylint: disable=import-outside-toplevel
  from fer import predict  # pylint: disable=import-outside-toplevel
  files, problems = predict.find_images(paths)
  images, where, more = predict.extract_faces(files, detector, margin,
                                              predict.Progress(len(files)))
  for p in problems + more:
    print(f"{p.file}: {p.problem}", file=sys.stderr)
  if not len(images):
    print("error: no face found in the images given", file=sys.stderr)
    return 1
  heats, probs = grad_cam(run.model, run.variables, images, batch_size=batch_size, method=method)
  preds, shares = probs.argmax(-1), upper_share(heats)
  items, seen = [], {}
  for (file, box), image, heat, k, p, share in zip(where, images, heats, preds, probs, shares):
    seen[file] = seen.get(file, 0) + 1
    items.append({"image": image[..., 0], "heat": heat, "pred": CLASSES[k], "prob": float(p[k]),
                  "label": f"{pathlib.Path(file).name} #{seen[file]}", "file": file, "box": box,
                  "upper": float(share)})
  sys.stdout.write(format_faces(items))
  path = plots.grad_cam_faces(items, out, title=f"{_TITLES[method]}, {len(items)} faces")
  print(f"Wrote {path}", file=sys.stderr)
  return 0


def main(argv):
  if not FLAGS.out:
    raise app.UsageError("--out: where to write the figure, e.g. --out=grad_cam.png")
  if FLAGS.per_class < 0:
    raise app.UsageError(f"--per_class={FLAGS.per_class}: expected 0 or more")
  logging.set_verbosity(logging.ERROR)  # orbax's notes on read-only managers are noise here
  from fer import faces as faces_lib  # pylint: disable=import-outside-toplevel
  from fer import input_pipeline  # pylint: disable=import-outside-toplevel
  from fer import plots  # pylint: disable=import-outside-toplevel
  try:
    run = runs.load_for_cli(FLAGS.workdir, FLAGS.checkpoint)
    if len(argv) > 1:
      detector = None if FLAGS.no_detect else faces_lib.FaceDetector()
    else:
      data = input_pipeline.load_splits(run.config.input)[FLAGS.split]
  except (runs.RunError, OSError, ValueError, RuntimeError) as e:  # RuntimeError: no cascade
    print(f"error: {e}", file=sys.stderr)
    return 2
  if len(argv) > 1:
    return explain_photos(run, argv[1:], FLAGS.out, FLAGS.method, detector, FLAGS.margin,
                          FLAGS.batch_size)
  layer = feature_layer(run.model, run.variables, data["image"])
  print(f"Model: {run.checkpoint.path} (epoch {run.checkpoint.epoch}); {_TITLES[FLAGS.method]} of "
        f"{'/'.join(layer)} on {len(data['image'])} {FLAGS.split} faces ...",
        file=sys.stderr, flush=True)
  rows, summary = explain_split(run.model, run.variables, data["image"], data["label"],
                                FLAGS.per_class, FLAGS.batch_size, method=FLAGS.method,
                                layer=layer)
  sys.stdout.write(format_summary(summary))
  path = plots.grad_cam_grid(
      rows, FLAGS.out, title=f"{_TITLES[FLAGS.method]} of {'/'.join(layer)}, {FLAGS.split} faces")
  print(f"Wrote {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
