r"""CPU training-step study for the reference CNN (issue 9): images/s of each speed technique.

Builds fer.models.cnn.CNN() (1,733,127 parameters), an optax.adam(1e-3) softmax cross-entropy
step and random uint8 data held on the device, then times every variant interleaved in one
process (A, B, C, A, B, C, ...) because the machine is shared and absolute timings drift. It
prints a markdown table (median and best images/s, ratio of medians to the baseline, compile time).

  python3 experiments/cpu_step_study.py
  python3 experiments/cpu_step_study.py --variants=baseline,combo --rounds=7
  python3 experiments/cpu_step_study.py --variants=combo --flags_ab="" \
      --flags_ab="--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"

XLA flags are read once per process, so --flags_ab runs the given variants in child processes,
alternating the flag sets round by round.
"""

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (model kwargs, steps per dispatch, augment)
VARIANTS = {
    "baseline": (dict(conv_impl="xla", pool_impl="xla"), 1, False),
    "pool_reshape": (dict(conv_impl="xla", pool_impl="reshape"), 1, False),
    "conv_im2col": (dict(conv_impl="im2col", pool_impl="xla"), 1, False),
    "bf16": (dict(conv_impl="xla", pool_impl="xla", dtype="bfloat16"), 1, False),
    "scan8": (dict(conv_impl="xla", pool_impl="xla"), 8, False),
    "combo": (dict(conv_impl="xla", pool_impl="reshape"), 8, False),
    "combo_im2col": (dict(conv_impl="im2col", pool_impl="reshape"), 8, False),
    "combo_bf16": (dict(conv_impl="xla", pool_impl="reshape", dtype="bfloat16"), 8, False),
    "combo_aug": (dict(conv_impl="xla", pool_impl="reshape"), 8, True),
    "baseline_aug": (dict(conv_impl="xla", pool_impl="xla"), 1, True),
}


def machine() -> str:
  from experiments import study  # pylint: disable=import-outside-toplevel
  name = study.cpu_model()
  return f"{name}, nproc={os.cpu_count()}, {platform.machine()}"


def augment(rng, images):
  """A stand-in for fer/augment.py: random horizontal flip and a random 4-pixel shift."""
  import jax
  import jax.numpy as jnp
  n, h, w, _ = images.shape
  k1, k2 = jax.random.split(rng)
  flip = jax.random.bernoulli(k1, 0.5, (n, 1, 1, 1))
  images = jnp.where(flip, images[:, :, ::-1], images)
  padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="edge")
  offsets = jax.random.randint(k2, (n, 2), 0, 9)
  return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, 1)))(
      padded, offsets)


def build(variant, batch_size, num_batches, seed=0):
  """Returns (run(n_dispatch) -> images processed, compile seconds, first-step loss)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from fer.models.cnn import CNN

  kwargs, spd, aug = VARIANTS[variant]
  kwargs = dict(kwargs)
  kwargs["dtype"] = jnp.dtype(kwargs.get("dtype", "float32"))
  model = CNN(**kwargs)
  rs = np.random.RandomState(seed)
  images = jnp.asarray(rs.randint(0, 256, (num_batches, batch_size, 48, 48, 1), np.uint8))
  labels = jnp.asarray(rs.randint(0, 7, (num_batches, batch_size)), jnp.int32)
  params = model.init(jax.random.key(0), images[0, :1])["params"]
  tx = optax.adam(1e-3)
  state = (params, tx.init(params), jax.random.key(1))

  def train_step(state, batch):
    params, opt_state, rng = state
    x, y = batch
    rng, key = jax.random.split(rng)
    if aug:
      x = augment(key, x)

    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, rng), loss

  @jax.jit
  def train_chunk(state, images, labels, start):
    """spd steps on batches start .. start+spd-1 of the in-memory data (one dispatch).

    A Python loop (straight-line program), as fer/train.py: on jaxlib 0.10.2 XLA:CPU runs the
    convolutions inside a while loop (a rolled lax.scan) through a slow fallback instead of
    YNNPACK, 10-50x slower per step.
    """
    losses = []
    for i in range(spd):
      state, loss = train_step(state, (images[start + i], labels[start + i]))
      losses.append(loss)
    return state, jnp.stack(losses)

  train_chunk = jax.jit(train_chunk.__wrapped__, donate_argnums=0)
  t0 = time.perf_counter()
  state, losses = train_chunk(state, images, labels, 0)
  first_loss = float(losses[0])
  compile_s = time.perf_counter() - t0
  holder = [state]

  def run(n_dispatch):
    s = holder[0]
    for i in range(n_dispatch):
      start = (i * spd) % (num_batches - spd + 1)
      s, losses = train_chunk(s, images, labels, start)
    jax.block_until_ready(losses)
    holder[0] = s
    return n_dispatch * spd * batch_size

  run(1)  # warm-up
  return run, compile_s, first_loss


def run_in_process(args):
  import jax
  runs = {}
  for v in args.variants:
    runs[v] = build(v, args.batch_size, args.num_batches)
    print(f"# built {v}: compile {runs[v][1]:.1f}s", file=sys.stderr, flush=True)
  rates = {v: [] for v in args.variants}
  for _ in range(args.rounds):
    for v in args.variants:
      spd = VARIANTS[v][1]
      n = max(1, args.steps_per_round // spd)
      t0 = time.perf_counter()
      images = runs[v][0](n)
      rates[v].append(images / (time.perf_counter() - t0))
      print(f"# {v}: {rates[v][-1]:.0f} img/s", file=sys.stderr, flush=True)
  return {v: (rates[v], runs[v][1], runs[v][2]) for v in args.variants}, jax.__version__


def run_flags_ab(args):
  """Alternates child processes over flag sets; returns {(flags, variant): rates}."""
  rates, compiles = {}, {}
  for _ in range(args.rounds):
    for flags in args.flags_ab:
      env = dict(os.environ, XLA_FLAGS=flags, FER_NO_CPU_FLAGS="1")
      cmd = [sys.executable, os.path.abspath(__file__), "--rounds=1", "--machine_readable",
             f"--variants={','.join(args.variants)}", f"--batch_size={args.batch_size}",
             f"--steps_per_round={args.steps_per_round}", f"--num_batches={args.num_batches}"]
      out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
      for line in out.splitlines():
        if line.startswith("RESULT "):
          _, v, rate, comp = line.split()
          rates.setdefault((flags, v), []).append(float(rate))
          compiles[(flags, v)] = float(comp)
  return rates, compiles


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", default="baseline,pool_reshape,conv_im2col,bf16,scan8,combo,"
                 "combo_bf16,combo_aug,baseline_aug")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps_per_round", type=int, default=16, help="train steps per timing")
  p.add_argument("--num_batches", type=int, default=32, help="in-memory data, in batches")
  p.add_argument("--flags_ab", action="append", default=None,
                 help="XLA_FLAGS sets to compare in child processes (repeat the option)")
  p.add_argument("--machine_readable", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  args.variants = args.variants.split(",")
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown:
    p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")

  command = "python3 " + " ".join(shlex.quote(a) for a in sys.argv)
  if args.flags_ab is not None:
    rates, compiles = run_flags_ab(args)
    base = statistics.median(rates[(args.flags_ab[0], args.variants[0])])
    print(f"Machine: {machine()}\n\nCommand: `{command}`\n")
    print("| XLA_FLAGS | variant | median img/s | best img/s | ratio (median) | compile s |")
    print("|---|---|---:|---:|---:|---:|")
    for (flags, v), r in rates.items():
      m = statistics.median(r)
      print(f"| `{flags or '(none)'}` | {v} | {m:.0f} | {max(r):.0f} | {m / base:.2f} | "
            f"{compiles[(flags, v)]:.1f} |")
    return

  if not args.machine_readable:
    from fer import xla_flags
    xla_flags.configure_cpu_defaults()
  results, jax_version = run_in_process(args)
  if args.machine_readable:
    for v, (r, comp, _) in results.items():
      print(f"RESULT {v} {statistics.median(r):.2f} {comp:.3f}")
    return
  base = statistics.median(results[args.variants[0]][0])
  print(f"Machine: {machine()}; jax {jax_version}; XLA_FLAGS="
        f"`{os.environ.get('XLA_FLAGS', '')}`\n\nCommand: `{command}`\n")
  print(f"Batch {args.batch_size}; {args.rounds} interleaved rounds of {args.steps_per_round} "
        f"steps per variant. Ratio = median / median of {args.variants[0]}.\n")
  print("| variant | conv | pool | dtype | steps/dispatch | augment | median img/s | best img/s "
        "| ratio | compile s | first loss |")
  print("|---|---|---|---|---:|---|---:|---:|---:|---:|---:|")
  for v, (r, comp, loss) in results.items():
    kw, spd, aug = VARIANTS[v]
    m = statistics.median(r)
    print(f"| {v} | {kw['conv_impl']} | {kw['pool_impl']} | {kw.get('dtype', 'float32')} | "
          f"{spd} | {'flip+shift' if aug else 'no'} | {m:.0f} | {max(r):.0f} | {m / base:.2f} | "
          f"{comp:.1f} | {loss:.4f} |")


if __name__ == "__main__":
  main()
