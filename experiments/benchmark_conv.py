r"""Per-layer convolution timings and the malloc effect behind the CPU fast path (issue 9).

  python experiments/benchmark_conv.py --out=experiments/results/benchmark_conv.md

The in-process parts run with fer.xla_flags' malloc tuning on, as fer.main does.
1. Each 3x3 convolution of the reference CNN (configs/reference_net.py) at batch 64: forward,
   and forward + both gradients, for `xla` (lax.conv, fp32; XLA:CPU runs it through YNNPACK)
   and `gemm_bf16` (fer/models/layers.py: bf16 im2col + one bf16 matmul per pass, with XLA's
   patches or fer.native's; by default fer.native's direct bf16 kernels where the CPU has
   AVX-512 BF16), with the relative error of gemm_bf16 against fp32; for the 1-channel first
   layer, gemm_bf16 is fer.native's fp32 kernels (forward + weight gradient). Then the first
   block (conv, pool, ReLU): XLA, native conv + XLA pool, and fer.native's fused kernels.
2. One matmul with fp32 and with bf16 inputs.
3. The copy that builds the patches: XLA's, as bfloat16 and as the same bits in uint32, and
   fer.native's C++ kernel; then the augmentation's bilinear resampling, XLA vs fer.native.
4. One jitted training step of the reference CNN (adam, batch 64, one step per dispatch) in a
   fresh process with and without the malloc tuning, fer.native (with and without the direct
   bf16 convolutions) and the study's augmentation (with the resampling by XLA or by
   fer.native): milliseconds
   and minor page faults per step (the best of 3 blocks of 20 steps); then a profile of the
   default step by kind of op.
"""

import argparse
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fer import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

xla_flags.configure_cpu_defaults()  # the malloc tuning, as in every fer entry point

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
from jax import lax
import numpy as np

from experiments import study
from fer import augment
from fer import native
from fer.models import layers

LAYERS = ((48, 1, 32), (24, 32, 64), (12, 64, 128), (6, 128, 256))  # (size, in, out)


def median_ms(fn, *args, repeats=20) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def conv_rows(batch: int):
  rng = np.random.default_rng(0)
  rows = []
  for size, cin, cout in LAYERS:
    x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.1, jnp.float32)
    g = jnp.asarray(rng.standard_normal((batch, size, size, cout)), jnp.float32)
    impls = {"xla": (layers.conv_xla, (False, False))}
    if cin % 2 == 0:  # odd channel counts keep xla (see fer/models/layers.py)
      impls["gemm_bf16, XLA patches"] = (layers.conv_gemm_bf16, (False, False))
      if native.available():
        impls["gemm_bf16, native patches"] = (layers.conv_gemm_bf16, (True, False))
        impls["gemm_bf16"] = (layers.conv_gemm_bf16, (True, True))
        impls["winograd_bf16"] = (lambda x, k: layers.conv_gemm_bf16(x, k, True), (True, True))
    elif cin == 1 and native.available():  # the first layer: fer.native's fp32 kernels
      zero_bias = jnp.zeros((cout,), jnp.float32)
      impls["gemm_bf16"] = (lambda x, k: layers.conv_c1_native(x, k, zero_bias), (True, True))
      impls["winograd_bf16"] = impls["gemm_bf16"]
    # The first layer's input is data: training needs only its weight gradient.
    wrt = (1,) if cin == 1 else (0, 1)
    timing, outputs = {}, {}
    for name, (conv, use_native) in impls.items():
      loss = lambda x, k, conv=conv: jnp.vdot(conv(x, k), g)
      with native.use(*use_native):  # read when traced: fresh jits
        timing[name] = (median_ms(jax.jit(lambda x, k, conv=conv: conv(x, k)), x, k),
                        median_ms(jax.jit(jax.value_and_grad(loss, wrt)), x, k))
        outputs[name] = jax.jit(lambda x, k, loss=loss, conv=conv: (
            conv(x, k), *jax.grad(loss, wrt)(x, k)))(x, k)
    errors = {}  # the largest of the output's and gradients' relative errors (over the max)
    for name in ("gemm_bf16", "winograd_bf16"):
      if name in outputs:
        err = max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
                  for a, b in zip(outputs[name], outputs["xla"]))
        errors[name] = f"{err:.1e}"
    flops = 2 * batch * size * size * 9 * cin * cout
    row = f"| {size}x{size}, {cin} -> {cout} | {flops / 1e9:.2f} |"
    for name in ("xla", "gemm_bf16, XLA patches", "gemm_bf16, native patches", "gemm_bf16",
                 "winograd_bf16"):
      fwd, both = timing.get(name, (None, None))
      row += " - | - |" if fwd is None else f" {fwd:.2f} | {both:.2f} |"
    best = "winograd_bf16" if "winograd_bf16" in timing else "gemm_bf16"
    if best in timing:
      row += (f" {timing['xla'][1] / timing[best][1]:.2f}x | {errors.get('gemm_bf16', '-')} | "
              f"{errors.get('winograd_bf16', '-')} |")
    else:
      row += " - | - | - |"
    rows.append(row)
    print(row, flush=True)
  return rows


def first_block_rows(batch: int):
  """The first block (1 -> 32 conv, 2x2 max pool, ReLU): forward, and forward + the weight
  and bias gradients (its input is data)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0, 1, (batch, 48, 48, 1)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 1, 32)) * 0.3, jnp.float32)
  b = jnp.zeros((32,), jnp.float32)
  g = jnp.asarray(rng.standard_normal((batch, 24, 24, 32)), jnp.float32)
  pool = lambda y: layers.max_pool(y, "reshape", relu=True)
  blocks = [("XLA conv, reshape pool + ReLU", lambda x, k, b: pool(layers.conv_xla(x, k) + b),
             False)]
  if native.available():
    blocks += [("fer.native conv_c1, XLA reshape pool + ReLU",
                lambda x, k, b: pool(layers.conv_c1_native(x, k, b)), True),
               ("fer.native fused conv + pool + ReLU (default)",
                lambda x, k, b: layers.conv_c1_pool_native(x, k, b, True), True)]
  rows = []
  for name, fn, use_native in blocks:
    loss = lambda k, b, fn=fn: jnp.vdot(fn(x, k, b), g)
    with native.use(use_native):
      fwd = median_ms(jax.jit(fn), x, k, b)
      both = median_ms(jax.jit(jax.value_and_grad(loss, (0, 1))), k, b)
    rows.append(f"| {name} | {fwd:.2f} | {both:.2f} |")
    print(rows[-1], flush=True)
  return rows


def matmul_rows():
  rng = np.random.default_rng(0)
  rows = []
  m, k, n = 2304, 1152, 256  # the 6x6x128 -> 256 layer's im2col matmul at batch 64
  for dtype in (jnp.float32, jnp.bfloat16):
    a = jnp.asarray(rng.standard_normal((m, k)), dtype)
    b = jnp.asarray(rng.standard_normal((k, n)), dtype)
    ms = median_ms(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)), a, b)
    rows.append(f"| {m}x{k} @ {k}x{n} | {jnp.dtype(dtype).name} | {ms:.2f} | "
                f"{2 * m * k * n / ms / 1e6:.0f} |")
    print(rows[-1], flush=True)
  return rows


def patch_rows(batch: int):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, 24, 24, 32)), jnp.bfloat16)
  words = lax.bitcast_convert_type(x.reshape(batch, 24, 24, 16, 2), jnp.uint32)
  concat = lambda a: layers.extract_patches(a, (3, 3))
  mbytes = 9 * x.size * 2 / 1e6
  rows = []
  builders = [("XLA, bfloat16", concat, x), ("XLA, uint32 (bf16 pairs)", concat, words)]
  if native.available():
    builders.append(("fer.native (C++ FFI)", lambda a: native.patches(a, (3, 3), [(1, 1)] * 2), x))
  for name, fn, a in builders:
    ms = median_ms(jax.jit(fn), a)
    rows.append(f"| {name} | {mbytes:.1f} | {ms:.2f} | {mbytes / ms:.1f} |")
    print(rows[-1], flush=True)
  return rows


def bilinear_rows(batch: int):
  """The affine augmentation's resampling: XLA's four gathers vs fer.native's loop."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (batch, 48, 48, 1)), jnp.float32)
  src = [jnp.asarray(rng.uniform(-2, 50, (batch, 48, 48)), jnp.float32) for _ in range(2)]
  rows = []
  for name, use_native in (("XLA (4 gathers)", False), ("fer.native (C++ FFI)", True)):
    if use_native and not native.available():
      continue
    with native.use(use_native):
      ms = median_ms(jax.jit(lambda *a: augment._bilinear(*a)), images, *src)
    rows.append(f"| {name} | {ms:.2f} |")
    print(rows[-1], flush=True)
  return rows


_STEP = """
import resource, sys, time
sys.path.insert(0, {root!r})
from fer import xla_flags
xla_flags.configure_cpu_defaults()
import jax, jax.numpy as jnp, numpy as np, optax, types
from configs import common
from fer import augment
from fer.models import cnn
if {xla_bilinear!r}:  # fer.native for the patches and the first conv layer only
  augment.native = types.SimpleNamespace(available=lambda: False)
aug_cfg = common.apply_study_augmentation(common.base()).augment
model = cnn.CNN(conv_impl={impl!r})
x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 48, 48, 1)), jnp.uint8)
y = jnp.arange(64) % 7
params = model.init(jax.random.key(0), x)
tx = optax.adam(1e-3)
opt = tx.init(params)
@jax.jit
def step(params, opt, x, y):
  if {augment!r}:
    x = augment.augment(jax.random.fold_in(jax.random.key(0), opt[0].count), x, aug_cfg)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
  grads = jax.grad(loss)(params)
  updates, opt = tx.update(grads, opt, params)
  return optax.apply_updates(params, updates), opt
for _ in range(5):
  params, opt = step(params, opt, x, y)
jax.block_until_ready(params)
blocks = []  # the best of 3 blocks of 20 steps: this shared machine has bursts of noise
for _ in range(3):
  faults, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
  for _ in range(20):
    params, opt = step(params, opt, x, y)
  jax.block_until_ready(params)
  blocks.append(((time.perf_counter() - t) / 20 * 1e3,
                 (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 20))
print(*min(blocks))
if {profile!r}:
  import collections, glob, gzip, json, re, tempfile
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(10):
        params, opt = step(params, opt, x, y)
      jax.block_until_ready(params)
    events = json.load(gzip.open(glob.glob(d + "/**/*.json.gz", recursive=True)[0]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  kinds = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name.startswith("$") or "Thunk" in name or "Slinky" in name:
      continue
    kind = ("matmuls and convolutions (YNNPACK: dense layers, XLA's convs)"
            if name.startswith("ynn_fusion") else
            "fer.native kernels (FFI calls: direct bf16 convs or patches, fused first block, "
            "resampling)" if name.startswith("ffi_call") else
            "patch copies, bitcasts, pads, transposes" if re.search(
                "concatenate|stack|bitcast|pad|copy|transpose|slice", name) else
            "everything else (pooling, ReLU, bias, loss, adam)")
    kinds[kind] += e["dur"] / 10 / 1e3
  for kind, ms in kinds.most_common():
    print("PROFILE", round(ms, 1), kind)
"""


def _run_step(impl: str, tuned: bool, use_native: bool, profile: bool = False,
              augment: bool = False, xla_bilinear: bool = False, direct_conv: bool = True):
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env = {**os.environ, "FER_NO_CPU_FLAGS": "0" if tuned else "1", "JAX_PLATFORMS": "cpu",
         "FER_NO_NATIVE": "0" if use_native else "1",
         "FER_NO_DIRECT_CONV": "0" if direct_conv else "1"}
  if profile:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
  return subprocess.run([sys.executable, "-c", _STEP.format(
      root=root, impl=impl, profile=profile, augment=augment, xla_bilinear=xla_bilinear)],
                        env=env, check=True, capture_output=True, text=True).stdout.splitlines()


def step_rows():
  rows = []
  on_off = lambda b: "on" if b else "off"
  # (conv_impl, malloc tuning, fer.native, augmentation, resampling by XLA, direct bf16 convs)
  for impl, tuned, use_native, aug, xla_bilinear, direct in (
      ("xla", False, False, False, False, False), ("xla", True, False, False, False, False),
      ("gemm_bf16", False, False, False, False, False),
      ("gemm_bf16", True, False, False, False, False),
      ("gemm_bf16", True, True, False, False, False),
      ("gemm_bf16", True, True, False, False, True),
      ("gemm_bf16", True, False, True, False, False),
      ("gemm_bf16", True, True, True, True, True), ("gemm_bf16", True, True, True, False, True),
      ("winograd_bf16", True, True, False, False, True),
      ("winograd_bf16", True, True, True, False, True)):
    if use_native and not native.available():
      continue
    ms, faults = map(float, _run_step(impl, tuned, use_native, augment=aug,
                                      xla_bilinear=xla_bilinear, direct_conv=direct)[-1].split())
    natives = "off" if not use_native else ", ".join(
        [("Winograd + direct bf16 convs" if impl == "winograd_bf16" else "direct bf16 convs")
         if direct and native.bf16_conv_available() else "patches",
         "fused first block"] + (["resampling"] if aug and not xla_bilinear else []))
    rows.append(f"| {impl} | {on_off(tuned)} | {natives} | {on_off(aug)} | "
                f"{ms:.1f} | {64 / ms * 1e3:.0f} | {faults:,.0f} |")
    print(rows[-1], flush=True)
  return rows


def profile_rows():
  lines = _run_step("winograd_bf16", tuned=True, use_native=native.available(), profile=True)
  rows = [f"| {l.split(' ', 2)[2]} | {float(l.split()[1]):.1f} |" for l in lines
          if l.startswith("PROFILE")]
  print("\n".join(rows), flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--out", default="", help="write the markdown tables here")
  args = parser.parse_args()
  lines = ["# Convolution lowerings and malloc on the CPU (issue 9)", "",
           f"Machine: {study.machine()}; jax {jax.__version__}. Command: "
           f"`python {' '.join(sys.argv)}`", "",
           f"## Per layer, batch {args.batch}, median ms", "",
           "winograd_bf16 is the default: gemm_bf16 with fer.native's Winograd kernels for these "
           "3x3 layers; gemm_bf16 is fer.native's direct bf16 convolution kernels where the CPU "
           "has AVX-512 BF16 (else the native-patches column); the columns before it are bf16 "
           "patches + one matmul per pass, the patches built by XLA (FER_NO_NATIVE=1) or by "
           "fer.native (FER_NO_DIRECT_CONV=1). The 1-channel first layer keeps fp32: gemm_bf16 "
           "is fer.native's fp32 convolution kernels there, and its grads are the weight "
           "gradient only (its input is data).", "",
           "| layer | GFLOP fwd | xla fwd | xla fwd+grads | gemm_bf16, XLA patches fwd "
           "| gemm_bf16, XLA patches fwd+grads | gemm_bf16, native patches fwd "
           "| gemm_bf16, native patches fwd+grads | gemm_bf16 fwd | gemm_bf16 fwd+grads "
           "| winograd_bf16 fwd | winograd_bf16 fwd+grads | speed-up vs xla (fwd+grads, default) "
           "| max rel. error vs fp32, gemm_bf16 | the same, winograd_bf16 |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  lines += conv_rows(args.batch)
  lines += ["", f"## The first block (1 -> 32 conv, 2x2 max pool, ReLU), batch {args.batch}, "
            "median ms (grads: weight and bias)", "",
            "| implementation | fwd | fwd+grads |", "|---|---:|---:|"]
  lines += first_block_rows(args.batch)
  lines += ["", "## One matmul, fp32 and bf16 inputs (fp32 accumulation)", "",
            "| shape | inputs | ms | GFLOP/s |", "|---|---|---:|---:|"]
  lines += matmul_rows()
  lines += ["", "## Building the 3x3 patches of a 24x24x32 bf16 activation", "",
            "| built by | MB written | ms | GB/s |", "|---|---:|---:|---:|"]
  lines += patch_rows(args.batch)
  lines += ["", f"## Bilinear resampling of {args.batch} 48x48 faces (the affine augmentation)",
            "", "| by | ms |", "|---|---:|"]
  lines += bilinear_rows(args.batch)
  lines += ["", "## One training step of the reference CNN (adam, batch 64, fresh process)", "",
            "| conv_impl | malloc tuning | fer.native | augmentation | ms/step | images/s "
            "| minor page faults/step |", "|---|---|---|---|---:|---:|---:|"]
  lines += step_rows()
  lines += ["", "## Where the default step's time goes (winograd_bf16, fer.native, malloc tuning on; "
            "XLA:CPU thunk times from jax.profiler with --xla_cpu_enable_xprof_traceme=true, ms per step; "
            "the two worker threads overlap, so the sum exceeds the step time)", "",
            "| kind of op | ms per step |", "|---|---:|"]
  lines += profile_rows()
  text = "\n".join(lines) + "\n"
  if args.out:
    pathlib.Path(args.out).write_text(text)
  print(text)


if __name__ == "__main__":
  main()
