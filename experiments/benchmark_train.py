r"""CPU/GPU training throughput over whole epochs on the real FER2013 training split.

  python experiments/benchmark_train.py --config=configs/reference_net.py
      trains --epochs whole epochs (after compiling) with the config as given and prints, as its
      last line, `train images/s: N` (augmentation as configured), after the process's peak
      memory.
  python experiments/benchmark_train.py --config=configs/reference_net.py --compare \
      --keras_python=/tmp/tfenv/bin/python --out=experiments/results/benchmark_train.md
      the side-by-side table, in one run on one machine: the plain JAX step (XLA convolutions and
      pooling, one step per dispatch), the project's fast path in stages (fp32 XLA convs; bf16
      matmul convs with XLA's patches; the default, with fer.native's C++ patches, fused first
      block and bilinear resampling), each without and with augmentation, and, where a Python
      with TensorFlow is given, the same network in Keras. --rounds=R times the default and
      Keras R times, alternating which goes first, and reports medians and every round's ratio
      (this kind of shared VM drifts by tens of percent over minutes).

  python experiments/benchmark_train.py --config=configs/augment.py --batch_sizes=64,256 \
      --max_images=8192 --out=experiments/results/benchmark_configs.md
      one timing per batch size; --out appends a row each (config, batch, images/s, command).

Any config key can be overridden as usual (--config.input.batch_size=256). Data: the config's
input keys, or $FER2013_ARCHIVE / $FER_DATA_DIR.
"""

import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fer import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

xla_flags.configure_cpu_defaults()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags
import numpy as np

from configs import common
from experiments import study
from fer import augment as augment_lib
from fer import input_pipeline
from fer import native
from fer import optim
from fer import train
from fer.models import build_model

config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_EPOCHS = flags.DEFINE_integer("epochs", 1, "Whole epochs to time (after compilation).")
_COMPARE = flags.DEFINE_bool("compare", False, "Run the before/after (and Keras) comparison.")
_KERAS = flags.DEFINE_string("keras_python", "", "A python with TensorFlow+Keras, for --compare.")
_OUT = flags.DEFINE_string("out", "", "Write the comparison table (markdown) here.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", [], "Without --compare: time each of these batch "
                                 "sizes (default: the config's); --out appends a row for each.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "--compare: time the default and Keras this many "
                               "times, alternately first, and report medians.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "Use only the first N training images "
                                   "(an 'epoch' is then N images); 0 = all 28,709.")

# The plain JAX step of the issue: XLA's own convolution and pooling, one step per dispatch.
BASELINE = {"model.conv_impl": "xla", "model.pool_impl": "xla", "train.steps_per_dispatch": 1}
# The default fast path with exact fp32 convolutions (model.conv_impl=auto -> winograd_bf16).
FP32_CONVS = {"model.conv_impl": "xla"}
# ... and with bf16 convolutions but no Winograd (fer.native's direct kernels).
NO_WINOGRAD = {"model.conv_impl": "gemm_bf16"}
AUGMENT = {f"augment.{k}": v for k, v in
           common.apply_study_augmentation(common.base()).augment.items()}
NO_AUGMENT = {"augment.flip": False, "augment.rotate_degrees": 0.0,
              "augment.shift_fraction": 0.0, "augment.zoom_fraction": 0.0}


def _with(config, overrides):
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    group, name = key.split(".")
    if name in c[group]:
      c[group][name] = value
  return c


def images_per_second(config, data, epochs) -> float:
  """Whole-epoch training throughput, compilation excluded."""
  x, y = data["image"], data["label"].astype(np.int32)
  batch = config.input.batch_size
  steps = len(x) // batch
  mesh = train.make_mesh()
  replicated = NamedSharding(mesh, P())
  model = build_model(config.model)
  tx_fn = lambda p: optim.make_optimizer(config.optim, p, steps, max(epochs, 1))[0]
  state, _ = train.create_train_state(config, model, tx_fn, mesh, x.shape[1:], x.dtype)
  run_epoch = train.make_epoch_runner(model, tx_fn(state.params), config, mesh, steps)
  images = jax.device_put(x, replicated)
  labels = jax.device_put(y, replicated)
  key = jax.random.PRNGKey(0)
  perms = [jax.device_put(np.asarray(jax.random.permutation(jax.random.fold_in(key, e), len(x))),
                          replicated) for e in range(epochs + 1)]
  # Compile every chunk size (the first epoch's chunks, on the same state: it keeps training).
  state, sums = run_epoch(state, images, labels, perms[0])
  jax.block_until_ready(sums)
  t0 = time.perf_counter()
  for e in range(epochs):
    state, sums = run_epoch(state, images, labels, perms[e + 1])
  jax.block_until_ready(sums)
  return epochs * steps * batch / (time.perf_counter() - t0)


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def machine() -> str:
  dev = jax.devices()[0]
  return f"{study.machine()}, {len(jax.devices())} x {dev.device_kind} ({dev.platform})"


def main(argv):
  del argv
  config = flags.FLAGS.config
  data = input_pipeline.load_splits(config.input)["train"]
  if _MAX_IMAGES.value:
    data = {k: v[:_MAX_IMAGES.value] for k, v in data.items()}
  print(f"{len(data['image'])} training images; {machine()}", flush=True)
  command = "python " + " ".join(sys.argv)
  if not _COMPARE.value:
    batch_sizes = [int(b) for b in _BATCH_SIZES.value] or [config.input.batch_size]
    rows = []
    for batch in batch_sizes:
      c = _with(config, {"input.batch_size": batch})
      rate = images_per_second(c, data, _EPOCHS.value)
      rows.append(f"| `{config_flags.get_config_filename(flags.FLAGS['config'])}` | {batch} | "
                  f"{'on' if augment_lib.is_enabled(c.augment) else 'off'} | {rate:,.0f} | `{command}` |")
      print(f"batch {batch}: train images/s: {rate:.0f}", flush=True)
    if _OUT.value:
      out = pathlib.Path(_OUT.value)
      head = "" if out.exists() else (
          f"Machine: {machine()}. Whole epochs of the first {len(data['image'])} training "
          f"images, {_EPOCHS.value} timed epoch(s) after one untimed (compiling) epoch.\n\n"
          "| config | batch | augmentation | train images/s | command |\n|---|---:|---|---:|---|\n")
      with open(out, "a") as f:
        f.write(head + "".join(r + "\n" for r in rows))
    print(f"peak memory of this process (max RSS): {peak_rss_gb():.1f} GB")
    print(f"train images/s: {rate:.0f}")
    return
  rows = []
  default_name = ("JAX, fer default fast path (+ fer.native: Winograd and direct bf16 "
                  "convolutions, fused first block, resampling)")
  for name, overrides, use_native in (
      ("JAX, plain step (XLA conv + pool, 1 step/dispatch)", BASELINE, False),
      ("JAX, fer fast path with exact fp32 XLA convs", FP32_CONVS, False),
      ("JAX, fer fast path, bf16-matmul convs with XLA's patches (FER_NO_NATIVE=1)", {}, False),
      ("JAX, fer fast path, direct bf16 convs, no Winograd (conv_impl=gemm_bf16)", NO_WINOGRAD,
       True)):
    for aug_name, aug in (("off", NO_AUGMENT), ("on", AUGMENT)):
      c = _with(config, {**overrides, **aug})
      with native.use(use_native):  # read when the step is traced
        rate = images_per_second(c, data, _EPOCHS.value)
      rows.append((name, aug_name, rate))
      print(f"{name}, augmentation {aug_name}: {rate:.0f} images/s", flush=True)
  # The default and Keras, in rounds that alternate which goes first: this VM's speed drifts by
  # tens of percent over minutes, so each round's pair is measured close together and the table
  # reports medians over rounds.
  rounds = []  # per round: {(implementation, augmentation): images/s}
  keras_version = None
  with tempfile.TemporaryDirectory() as tmp:
    npz = pathlib.Path(tmp) / "train.npz"
    if _KERAS.value:
      np.savez(npz, image=data["image"], label=data["label"])
    for r in range(_ROUNDS.value):
      got = {}
      order = ("jax", "keras") if r % 2 == 0 else ("keras", "jax")
      for side in order:
        if side == "jax":
          for aug_name, aug in (("off", NO_AUGMENT), ("on", AUGMENT)):
            with native.use(True):
              got[("jax", aug_name)] = images_per_second(_with(config, aug), data, _EPOCHS.value)
        elif _KERAS.value:
          k = _keras(npz, config.input.batch_size)
          keras_version = f"Keras {k['keras']} ({k['backend']}), in-memory model.fit"
          got[("keras", "off")], got[("keras", "on")] = k["plain"], k["augment"]
      rounds.append(got)
      print(f"round {r + 1}/{_ROUNDS.value}: " + ", ".join(
          f"{side} aug {a}: {v:.0f}" for (side, a), v in sorted(got.items())), flush=True)
  median = lambda key: float(np.median([g[key] for g in rounds]))
  for aug_name in ("off", "on"):
    rows.append((default_name, aug_name, median(("jax", aug_name))))
  if keras_version:
    for aug_name in ("off", "on"):
      rows.append((keras_version, aug_name, median(("keras", aug_name))))
  keras = {a: r for n, a, r in rows if n == keras_version}
  best_keras = max(keras.values(), default=None)
  medians = f"medians over {_ROUNDS.value} rounds" if _ROUNDS.value > 1 else "one round"
  lines = [f"Machine: {machine()}. Batch {config.input.batch_size}, whole epochs of "
           f"{(len(data['image']) // config.input.batch_size) * config.input.batch_size} "
           f"images, {_EPOCHS.value} timed epoch(s) after one untimed (compiling) epoch. "
           "fer.xla_flags' malloc tuning is process-wide, so it is on in every JAX row. "
           f"The default and Keras rows: {medians}, each round timing both, alternately first.",
           f"Command: `{command}`", "",
           "| implementation | augmentation | images/s | vs Keras, same augmentation "
           "| vs best Keras |", "|---|---|---:|---:|---:|"]
  for name, aug_name, rate in rows:
    same = f"{rate / keras[aug_name]:.2f}x" if aug_name in keras else "-"
    ratio = f"{rate / best_keras:.2f}x" if best_keras else "-"
    lines.append(f"| {name} | {aug_name} | {rate:,.0f} | {same} | {ratio} |")
  if keras_version:
    lines += ["", "Each round (images/s; the ratio is the default over Keras in the same round):",
              "", "| round | first | default, aug off | Keras, aug off | ratio | default, aug on "
              "| Keras, aug on | ratio |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r, g in enumerate(rounds):
      cells = []
      for a in ("off", "on"):
        cells += [f"{g[('jax', a)]:,.0f}", f"{g[('keras', a)]:,.0f}",
                  f"{g[('jax', a)] / g[('keras', a)]:.2f}x"]
      lines.append(f"| {r + 1} | {'fer' if r % 2 == 0 else 'Keras'} | " + " | ".join(cells) + " |")
    ratios = sorted(g[("jax", "on")] / g[("keras", "on")] for g in rounds)
    lines += ["", f"With augmentation, the default over Keras: median {np.median(ratios):.2f}x, "
              f"range {ratios[0]:.2f}x-{ratios[-1]:.2f}x over {len(ratios)} round(s)."]
  table = "\n".join(lines)
  print(table)
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(table + "\n")
  print(f"train images/s: {median(('jax', 'on')):.0f}")


def _keras(npz, batch_size) -> dict:
  """One run of keras_reference.py in the --keras_python environment: its JSON line."""
  proc = subprocess.run([_KERAS.value, str(pathlib.Path(__file__).parent / "keras_reference.py"),
                         f"--data={npz}", f"--epochs={_EPOCHS.value + 1}",
                         f"--batch_size={batch_size}"],
                        capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
