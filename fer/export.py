r"""The trained model for use outside this codebase: a jax.export function and its weights.

  python -m fer.export --workdir=runs/cnn --output=exported/cnn

writes into --output (a temporary folder renamed into place, so it is whole or absent):

  model.jax_export  jax.export serialization (StableHLO) of
                      predict(params, faces uint8 [b, 48, 48, 1]) -> probabilities float32 [b, 7]
                    for any batch size b, lowered for --platforms (default cpu and cuda); the
                    run's test-time augmentation (or --tta) is inside it.
  params.npz        its first argument: the variables, one array per '/'-joined path
                    ('params/conv1/kernel', 'batch_stats/...').
  model.json        classes (probability order), input spec, TTA, platforms, source checkpoint,
                    accuracy, jax version.
  README.md         how to load and call it with numpy and jax alone.

Loading needs neither this code nor flax:

  exported = jax.export.deserialize(open("model.jax_export", "rb").read())
  probs = exported.call(dict(np.load("params.npz")), faces)
"""

from fer import xla_flags

xla_flags.configure_cpu_defaults()  # before jax starts its backend; a no-op off CPU

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import os
import pathlib
import shutil
import sys

from absl import app
from absl import flags
from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from fer import runs
from fer.datasets.fer2013 import CLASSES

FLAGS = flags.FLAGS


def define_flags():
  """The flags, defined only when run as a command (the CLIs share flag names)."""
  flags.DEFINE_string("workdir", None, "A trained run's workdir (its best checkpoint).")
  flags.DEFINE_string("checkpoint", None, "A checkpoint folder instead of the best one; its "
                      "config is found above it, or in --workdir.")
  flags.DEFINE_string("output", None, "The folder to write.")
  flags.DEFINE_enum("tta", None, ["none", "flip", "tencrop"], "Test-time augmentation built "
                    "into the function; default: the run's eval.tta.")
  flags.DEFINE_list("platforms", ["cpu", "cuda"],
                    f"Platforms to lower for, any of {', '.join(PLATFORMS)}.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --output folder.")


MODEL_FILE = "model.jax_export"
PARAMS_FILE = "params.npz"
INFO_FILE = "model.json"
README_FILE = "README.md"
INPUT_SHAPE = "b, 48, 48, 1"
# jax.export's built-in platforms (jax.export.export's docstring). It lowers for any other name
# too, and the export then fails when called: "gpuu" is caught here.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def check_platforms(platforms) -> tuple[str, ...]:
  """`platforms` as a tuple, or ValueError naming the first one jax.export does not know."""
  platforms = tuple(platforms)
  if not platforms:
    raise ValueError(f"--platforms is empty: name one or more of {', '.join(PLATFORMS)}")
  for p in platforms:
    if p not in PLATFORMS:
      raise ValueError(f"--platforms: {p!r} is not a platform jax.export lowers for; choose "
                       f"from {', '.join(PLATFORMS)}")
  return platforms


def flatten_variables(variables: dict) -> dict[str, np.ndarray]:
  """{'params/conv1/kernel': array, ...}: the flat form stored in params.npz."""
  flat = flax.traverse_util.flatten_dict(variables, sep="/")
  return {k: np.asarray(v) for k, v in sorted(flat.items())}


def export_predict(model, variables: dict, tta: str, platforms=("cpu", "cuda")):
  """jax.export.Exported of predict(flat variables, faces uint8 [b, 48, 48, 1]) -> [b, 7]."""
  from fer import train  # pylint: disable=import-outside-toplevel
  platforms = check_platforms(platforms)
  if getattr(model, "conv_impl", "xla") != "xla":
    # Exact fp32 convolutions for every platform (gemm_bf16 is a CPU training speed-up, and its
    # bitcasts don't take the symbolic batch size).
    model = model.clone(conv_impl="xla")
  predict = train.make_predict(model, tta)

  def predict_flat(flat_variables, faces):
    return predict(flax.traverse_util.unflatten_dict(flat_variables, sep="/"), faces)

  flat = flatten_variables(variables)
  param_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
  face_spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(INPUT_SHAPE), jnp.uint8)
  return jax.export.export(jax.jit(predict_flat), platforms=platforms)(param_specs, face_spec)


README = """\
# FER2013 facial-expression classifier

Exported with `python -m fer.export` from {checkpoint} (epoch {epoch},
{val_accuracy}). Loading needs numpy, jax ({jax_version} or a later release; jax keeps
serialized functions loadable for at least six months of releases) and flatbuffers (which
`jax.export.deserialize` imports), not the training code:

```python
import jax
import numpy as np

CLASSES = {classes}  # the order of the probabilities
exported = jax.export.deserialize(open("{model_file}", "rb").read())
params = dict(np.load("{params_file}"))
faces = np.zeros((2, 48, 48, 1), np.uint8)  # your faces: grey, 48x48, 0..255
probs = np.asarray(exported.call(params, faces))  # float32 [2, 7], rows sum to 1
print([CLASSES[i] for i in probs.argmax(-1)])
```

Input: a batch of any size of 8-bit grey faces, 48x48 pixels, cropped roughly from the forehead
to the chin like FER2013's images; convert colour photos with the ITU-R 601 luma weights (PIL's
`convert("L")`). Test-time augmentation built in: {tta}. Lowered for: {platforms}.
"""


def write_export(run: runs.Run, output, tta: str | None = None, platforms=("cpu", "cuda"),
                 overwrite: bool = False) -> pathlib.Path:
  """Writes the export folder (atomically) and returns its path."""
  output = pathlib.Path(output)
  if output.exists() and not output.is_dir():
    raise FileExistsError(f"{output} exists and is not a folder")
  if output.is_dir() and any(output.iterdir()) and not overwrite:
    raise FileExistsError(f"{output} exists and is not empty; pass --overwrite to replace it")
  tta = tta or run.config.eval.get("tta", "none")
  exported = export_predict(run.model, run.variables, tta, platforms)
  info = {
      "format": "jax.export",
      "model_file": MODEL_FILE,
      "params_file": PARAMS_FILE,
      "classes": list(CLASSES),
      "input": {"shape": INPUT_SHAPE, "dtype": "uint8", "range": [0, 255], "channels": "grey"},
      "output": {"shape": "b, 7", "dtype": "float32", "meaning": "probabilities"},
      "tta": tta,
      "platforms": list(exported.platforms),
      "checkpoint": str(run.checkpoint.path.absolute()),
      "epoch": run.checkpoint.epoch,
      "val_accuracy": run.checkpoint.val_accuracy,
      "model": run.config.model.to_dict(),
      "num_params": int(sum(v.size for v in jax.tree.leaves(run.variables["params"]))),
      "jax_version": jax.__version__,
      "serialization_version": exported.calling_convention_version,
  }
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    (tmp / MODEL_FILE).write_bytes(exported.serialize())
    np.savez(tmp / PARAMS_FILE, **flatten_variables(run.variables))
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    (tmp / README_FILE).write_text(README.format(
        checkpoint=run.checkpoint.path, epoch=run.checkpoint.epoch,
        val_accuracy=runs.val_accuracy_line(run, tta), jax_version=jax.__version__,
        model_file=MODEL_FILE, params_file=PARAMS_FILE, classes=CLASSES, tta=tta,
        platforms=", ".join(exported.platforms)))
    for f in tmp.iterdir():
      with open(f, "rb") as fh:
        os.fsync(fh.fileno())
    if output.exists():  # an empty folder, or --overwrite
      old = output.with_name(f".{output.name}.old-{os.getpid()}")
      os.rename(output, old)
      os.rename(tmp, output)
      shutil.rmtree(old)
    else:
      os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return output


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.output:
    raise app.UsageError("--output is required")
  logging.set_verbosity(logging.ERROR)  # orbax's notes on read-only managers are noise here
  try:
    platforms = check_platforms(FLAGS.platforms)  # before loading the run
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  try:
    run = runs.load_for_cli(FLAGS.workdir, FLAGS.checkpoint)
    out = write_export(run, FLAGS.output, FLAGS.tta, platforms, FLAGS.overwrite)
  except (runs.RunError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  size = sum(f.stat().st_size for f in out.iterdir())
  names = ", ".join(sorted(p.name for p in out.iterdir()))
  print(f"Exported {run.checkpoint.path} to {out} ({size / 1e6:.1f} MB): {names}")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
