r"""Times G trials trained together with jax.vmap (fer/search.py) against G separate runs.

  python3 experiments/benchmark_vmap_search.py                       # G=8 learning rates
  python3 experiments/benchmark_vmap_search.py --group_size=8 --chunks=3 --model=cnn,small

For each model, G configs that differ only in the learning rate train for the same steps on the
same synthetic 48x48 batches (batch 64, `steps_per_dispatch` steps per jitted chunk):
  separate  G times what fer.train does: its optimizer, state and chunk (compiled per run, as a
            run's learning rate is a constant of its program), a warm-up chunk, then --chunks
  vmapped   fer.search's group: one stacked state, one program, a warm-up chunk, then --chunks
Reports the steady-state time (after the warm-up chunk) and the total with compilation.
Writes experiments/results/benchmark_vmap_search.{json,md}. The machine may be shared: the load
average before each measurement is recorded beside it.
"""

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from configs import cnn as cnn_config  # pylint: disable=wrong-import-position
from experiments.benchmark_data import git_commit, machine  # pylint: disable=wrong-import-position
from fer import optim  # pylint: disable=wrong-import-position
from fer import search  # pylint: disable=wrong-import-position
from fer import train  # pylint: disable=wrong-import-position
from fer.datasets import synthetic  # pylint: disable=wrong-import-position
from fer.models import build_model  # pylint: disable=wrong-import-position

MODELS = {  # name: model overrides of configs/cnn.py
    "cnn": {},  # configs/cnn.py: conv 32-64-128-256, dense 512-256-128 (1.7 M parameters)
    "small": {"model.conv_features": (16, 32), "model.dense_features": (64,)},
}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _block(tree):
  jax.block_until_ready(tree)
  return tree


def _time_chunks(fn, state, images, labels, perm, num_chunks, k):
  """(state, warm-up seconds, steady seconds): one chunk (compiles), then num_chunks more."""
  t0 = time.perf_counter()
  state, m = fn(state, images, labels, perm, 0)
  _block(m)
  warm = time.perf_counter() - t0
  t0 = time.perf_counter()
  for c in range(1, num_chunks + 1):
    state, m = fn(state, images, labels, perm, c * k)
  _block(m)
  return state, warm, time.perf_counter() - t0


def bench(model_name, group_size, num_chunks, k, batch_size):
  base = search.apply_overrides(cnn_config.get_config(), MODELS[model_name])
  base.input.batch_size = batch_size
  base.train.steps_per_dispatch = k
  lrs = [float(x) for x in np.geomspace(1e-4, 3e-3, group_size)]
  configs = [search.apply_overrides(base, {"optim.learning_rate": lr}) for lr in lrs]
  num_images = (num_chunks + 1) * k * batch_size
  images, labels = synthetic.make_faces(num_images, 0)
  mesh = train.make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  images = jax.device_put(images, replicated)
  labels = jax.device_put(labels.astype(np.int32), replicated)
  perm = jax.device_put(jnp.arange(num_images), replicated)
  model = build_model(base.model)
  steps_per_epoch = num_images // batch_size

  out = {"model": model_name, "group_size": group_size, "steps": (num_chunks + 1) * k,
         "timed_steps": num_chunks * k, "batch_size": batch_size, "learning_rates": lrs}
  out["load_before_separate"] = os.getloadavg()[0]
  t_all = time.perf_counter()
  warm, steady = 0.0, 0.0
  for config in configs:
    tx_fn = lambda p, c=config: optim.make_optimizer(c.optim, p, steps_per_epoch, 1)[0]
    state, _ = train.create_train_state(config, model, tx_fn, mesh, (48, 48, 1))
    fn = train.make_train_chunk(model, tx_fn(state.params), config, mesh, k)
    state, w, s = _time_chunks(fn, state, images, labels, perm, num_chunks, k)
    warm, steady = warm + w, steady + s
    assert fn._cache_size() == 1, "the timed chunks recompiled"  # pylint: disable=protected-access
  out["separate"] = {"steady_seconds": steady, "warmup_seconds": warm,
                     "total_seconds": time.perf_counter() - t_all}
  jax.clear_caches()

  out["load_before_vmapped"] = os.getloadavg()[0]
  t_all = time.perf_counter()
  tx = search.group_optimizer(base.optim, steps_per_epoch, 1, decay=False)
  init = jax.jit(search.make_group_init(model, tx, (48, 48, 1), jnp.uint8),
                 out_shardings=replicated, compiler_options=train.init_compiler_options())
  state = init(jnp.stack([jax.random.PRNGKey(c.seed) for c in configs]),
               jnp.asarray(lrs, jnp.float32), jnp.zeros(group_size, jnp.float32))
  fn = search.make_group_chunk(model, tx, base, mesh, k)
  state, w, s = _time_chunks(fn, state, images, labels, perm, num_chunks, k)
  assert fn._cache_size() == 1, "the timed chunks recompiled"  # pylint: disable=protected-access
  out["vmapped"] = {"steady_seconds": s, "warmup_seconds": w,
                    "total_seconds": time.perf_counter() - t_all}
  out["speedup_steady"] = out["separate"]["steady_seconds"] / out["vmapped"]["steady_seconds"]
  out["speedup_total"] = out["separate"]["total_seconds"] / out["vmapped"]["total_seconds"]
  jax.clear_caches()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--group_size", type=int, default=8)
  parser.add_argument("--chunks", type=int, default=3, help="timed chunks after the warm-up")
  parser.add_argument("--steps_per_dispatch", type=int, default=4)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--model", default="small,cnn")
  parser.add_argument("--out", default=str(RESULTS / "benchmark_vmap_search"))
  args = parser.parse_args()
  runs = []
  for name in args.model.split(","):
    r = bench(name, args.group_size, args.chunks, args.steps_per_dispatch, args.batch_size)
    print(json.dumps(r), flush=True)
    runs.append(r)
  report = {"command": "python3 " + " ".join(sys.argv), "date":
            datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
            "machine": machine(), "device": jax.devices()[0].device_kind, "runs": runs}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
  m = report["machine"]
  lines = [
      "# vmapped search trials against separate runs", "",
      f"Command: `{report['command']}`  ",
      f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, {report['device']} (shared with other "
      f"jobs: see the load average); jax {m['jax']}  ",
      f"Date: {report['date']}, commit {report['commit']}", "",
      f"G trials that differ only in the learning rate, the same batches (batch "
      f"{args.batch_size}, {args.steps_per_dispatch} steps per jitted chunk). Steady: the "
      f"{args.chunks} chunks after a warm-up chunk; total: with init and compilation.", "",
      "| model | G | steps each | separate steady s | vmapped steady s | speed-up steady | "
      "separate total s | vmapped total s | speed-up total | load avg |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in runs:
    lines.append(
        f"| {r['model']} | {r['group_size']} | {r['steps']} | "
        f"{r['separate']['steady_seconds']:.1f} | {r['vmapped']['steady_seconds']:.1f} | "
        f"{r['speedup_steady']:.2f}x | {r['separate']['total_seconds']:.1f} | "
        f"{r['vmapped']['total_seconds']:.1f} | {r['speedup_total']:.2f}x | "
        f"{r['load_before_separate']:.1f} / {r['load_before_vmapped']:.1f} |")
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
