r"""What a trained run holds, from its orbax metadata.

  python -m fer.inspect --workdir=runs/cnn
  python -m fer.inspect --checkpoint=runs/cnn/checkpoints/last/30
  python -m fer.inspect --workdir=runs/vgg16_finetune --compare=runs/vgg16_frozen

Lists the run's checkpoints (last/ and best/: epoch, train step, val accuracy), prints the
config it was trained with and the parameter tree of its best checkpoint (or `--checkpoint`)
with shapes, dtypes and counts per module and in total. Given only `--checkpoint`, the run is
the workdir that holds it (RUN/checkpoints/<kind>/<epoch>); a checkpoint outside a run is shown
alone. None of this reads an array: it comes
from the managers' step lists, the `meta` JSON item and the state's array metadata.

`--compare=OTHER` (a workdir or a checkpoint folder) loads both checkpoints' parameters and
says which tensors are bit-identical, which differ (and by how much) and which exist in one only;
for example that a frozen VGG16 base is unchanged by fine-tuning the head.

A missing, damaged or partial checkpoint is reported with the path and what is wrong; the exit
status is then 1.
"""

from fer import xla_flags

xla_flags.configure_cpu_defaults()  # before jax starts its backend; a no-op off CPU

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import math
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

from fer import runs

FLAGS = flags.FLAGS


def define_flags():
  """The flags, defined only when run as a command (the CLIs share flag names)."""
  flags.DEFINE_string("workdir", None, "A trained run's workdir.")
  flags.DEFINE_string("checkpoint", None, "The checkpoint folder whose parameters to show and "
                      "compare; default: the run's best.")
  flags.DEFINE_string("compare", None, "Another workdir (its best checkpoint) or checkpoint "
                      "folder to compare parameters with.")
  flags.DEFINE_bool("show_config", True, "Print the run's config.")


# ----------------------------------------------------------------------------- trees


def _flatten(tree, prefix=()) -> dict[tuple, object]:
  """{path tuple: leaf} of a nested dict; lists (optimizer states) are indexed."""
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  elif tree is None:
    return {}
  else:
    return {prefix: tree}
  out = {}
  for k, v in items:
    out.update(_flatten(v, prefix + (str(k),)))
  return out


def _size(shape) -> int:
  return int(math.prod(shape))


def format_tree(tree, title: str) -> list[str]:
  """Lines of a tree of array metadata (or arrays): modules with their parameter counts, and
  every leaf with its shape, dtype and count."""
  leaves = _flatten(tree)
  if not leaves:
    return [f"{title}: none"]
  rows = []  # (indent, name, shape, dtype, count)
  seen = set()
  for path in sorted(leaves):
    for depth in range(len(path) - 1):
      module = path[:depth + 1]
      if module not in seen:
        seen.add(module)
        count = sum(_size(leaves[p].shape) for p in leaves if p[:depth + 1] == module)
        rows.append((depth, module[-1], "", "", count))
    leaf = leaves[path]
    rows.append((len(path) - 1, path[-1], str(tuple(leaf.shape)), str(np.dtype(leaf.dtype)),
                 _size(leaf.shape)))
  total = sum(_size(l.shape) for l in leaves.values())
  name_w = max(2 * d + len(n) for d, n, *_ in rows)
  shape_w = max(len(r[2]) for r in rows)
  lines = [f"{title}:", f"  {'name'.ljust(name_w)}  {'shape'.ljust(shape_w)}  {'dtype':8}  "
           f"{'count':>12}"]
  for depth, name, shape, dtype, count in rows:
    lines.append(f"  {('  ' * depth + name).ljust(name_w)}  {shape.ljust(shape_w)}  "
                 f"{dtype:8}  {count:>12,}")
  lines.append(f"  {'total'.ljust(name_w)}  {''.ljust(shape_w)}  {'':8}  {total:>12,}  "
               f"({len(leaves)} tensors)")
  return lines


# ----------------------------------------------------------------------------- checkpoints


def format_checkpoints(workdir) -> tuple[list[str], bool]:
  """(lines, ok): one row per checkpoint of last/ and best/, then the notes."""
  infos, notes = runs.list_checkpoints(workdir)
  lines = ["Checkpoints:"]
  if infos:
    lines.append(f"  {'kind':5} {'epoch':>5} {'step':>8}  {'val/accuracy':>12}  path")
  root = pathlib.Path(workdir)
  for info in infos:
    rel = info.path.relative_to(root) if info.path.is_relative_to(root) else info.path
    if info.problem:
      lines.append(f"  {info.kind:5} {'?':>5} {'?':>8}  {'?':>12}  {rel}  DAMAGED: "
                   f"{info.problem}")
      continue
    acc = "?" if info.val_accuracy is None else f"{info.val_accuracy:.4f}"
    step = "?" if info.step is None else str(info.step)
    lines.append(f"  {info.kind:5} {info.epoch:>5} {step:>8}  {acc:>12}  {rel}")
  lines += [f"  note: {n}" for n in notes]
  ok = bool(infos) and not any(i.problem for i in infos)
  return lines, ok


# ----------------------------------------------------------------------------- comparison


@dataclasses.dataclass
class Difference:
  path: str
  status: str  # same | differs | shape | only_a | only_b
  max_abs_diff: float = 0.0
  detail: str = ""


def compare_variables(a: dict, b: dict) -> list[Difference]:
  """Tensor by tensor: bit-identical (`same`), `differs` (with the largest |a - b|), `shape`
  (shapes or dtypes disagree), or present in one tree only (`only_a`, `only_b`)."""
  fa = {"/".join(k): v for k, v in _flatten(a).items()}
  fb = {"/".join(k): v for k, v in _flatten(b).items()}
  out = []
  for path in sorted(set(fa) | set(fb)):
    if path not in fb:
      out.append(Difference(path, "only_a"))
    elif path not in fa:
      out.append(Difference(path, "only_b"))
    else:
      x, y = np.asarray(fa[path]), np.asarray(fb[path])
      if x.shape != y.shape or x.dtype != y.dtype:
        out.append(Difference(path, "shape", detail=f"{x.shape} {x.dtype} vs {y.shape} "
                                                     f"{y.dtype}"))
      elif np.array_equal(x, y):
        out.append(Difference(path, "same"))
      else:
        diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
        out.append(Difference(path, "differs", float(np.max(diff)),
                              f"{np.mean(diff > 0):.0%} of values"))
  return out


def _module_of(path: str) -> str:
  parts = path.split("/")
  return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


def format_comparison(diffs: list[Difference], name_a: str, name_b: str) -> list[str]:
  """The comparison as lines: one per tensor, one per module, and a summary (A = name_a)."""
  labels = {"same": "same", "differs": "differs", "shape": "shape differs",
            "only_a": "only in A", "only_b": "only in B"}
  width = max([len(d.path) for d in diffs] + [4])
  lines = [f"Parameters compared: A = {name_a}", f"                     B = {name_b}",
           f"  {'path'.ljust(width)}  {'status':14} max |A-B|"]
  for d in diffs:
    extra = f"{d.max_abs_diff:.3g}  ({d.detail})" if d.status == "differs" else d.detail
    lines.append(f"  {d.path.ljust(width)}  {labels[d.status]:14} {extra}".rstrip())
  modules: dict[str, list[str]] = {}
  for d in diffs:
    modules.setdefault(_module_of(d.path), []).append(d.status)
  lines.append("  per module:")
  for module, statuses in modules.items():
    if all(s == "same" for s in statuses):
      state = "unchanged"
    elif all(s == "differs" for s in statuses):
      state = "changed"
    else:
      state = ", ".join(f"{statuses.count(s)} {labels[s]}" for s in labels if s in statuses)
    lines.append(f"    {module}: {state}")
  n_same = sum(d.status == "same" for d in diffs)
  lines.append(f"  {n_same} of {len(diffs)} tensors identical.")
  return lines


# ----------------------------------------------------------------------------- CLI


def inspect_run(workdir=None, checkpoint=None, compare=None,
                show_config=True) -> tuple[str, bool]:
  """(the report, ok). `workdir` defaults to the run that holds `checkpoint`."""
  if workdir is None and checkpoint is None:
    raise ValueError("inspect_run: pass a workdir or a checkpoint")
  workdir = runs.workdir_of(checkpoint) if workdir is None else pathlib.Path(workdir)
  ok = True
  if workdir is None:
    lines = [f"Checkpoint {checkpoint} (not in a run's checkpoints/ folder: no other "
             "checkpoint to list)"]
  elif not workdir.is_dir():
    return f"error: {workdir} does not exist\n", False
  elif not (workdir / "checkpoints").is_dir():
    lines = [f"Run {workdir}",
             f"error: {workdir} has no checkpoints/ folder: not a trained run's workdir, or its "
             "training has not finished an epoch yet"]
    ok = False
  else:
    lines, ok = format_checkpoints(workdir)
    lines.insert(0, f"Run {workdir}")
  if show_config:
    try:
      config = runs.load_config(runs.find_config_file(workdir) if checkpoint is None else
                                checkpoint)
      lines += ["Config:"] + ["  " + l for l in str(config).rstrip().splitlines()]
    except runs.RunError as e:
      lines.append(f"Config: {e}")
      ok = False
  try:
    step_dir = runs.resolve_checkpoint(workdir, checkpoint)
    tree = runs.state_metadata(step_dir)
  except runs.RunError as e:
    lines.append(f"Parameters: {e}")
    return "\n".join(lines) + "\n", False
  lines += format_tree(tree["params"], f"Parameters of {step_dir} (from its metadata)")
  if tree.get("batch_stats"):
    lines += format_tree(tree["batch_stats"], "Batch-norm statistics")
  n_opt = sum(_size(m.shape) for m in _flatten(tree.get("opt_state")).values())
  lines.append(f"Optimizer state: {n_opt:,} values")
  if compare:
    try:
      other_dir = runs.resolve_checkpoint(checkpoint=compare)
      a = runs.restore_variables(step_dir)
      b = runs.restore_variables(other_dir)
    except runs.RunError as e:
      lines.append(f"Comparison: {e}")
      return "\n".join(lines) + "\n", False
    diffs = compare_variables({k: v for k, v in a.items() if v}, {k: v for k, v in b.items() if v})
    lines += format_comparison(diffs, str(step_dir), str(other_dir))
  return "\n".join(lines) + "\n", ok


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir and not FLAGS.checkpoint:
    raise app.UsageError("Pass --workdir (a trained run) or --checkpoint (a checkpoint folder)")
  logging.set_verbosity(logging.ERROR)
  runs.quiet_orbax_read_noise()  # --compare restores arrays
  report, ok = inspect_run(FLAGS.workdir, FLAGS.checkpoint, FLAGS.compare,
                           FLAGS.show_config)
  sys.stdout.write(report)
  return 0 if ok else 1


if __name__ == "__main__":
  define_flags()
  app.run(main)
