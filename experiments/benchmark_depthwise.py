r"""fer.models.layers' DepthwiseConv and max_pool_same against the flax layers they replace.

  python experiments/benchmark_depthwise.py --out=experiments/results/benchmark_depthwise.md

At the sizes configs/mini_xception.py runs them at (batch 64, 48x48 faces): a 3x3 depthwise
convolution (nn.Conv with feature_group_count = channels, i.e. lax.conv_general_dilated, against
layers.DepthwiseConv's shifted multiply-adds) and a 3x3 stride-2 SAME max pool (nn.max_pool,
whose gradient XLA lowers to select-and-scatter, against layers.max_pool_same's maximum of
strided slices): milliseconds for forward + gradient (jitted, the median of --repeats calls after
one warm-up), after checking that both give the same values.
"""

import argparse
import pathlib
import platform
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fer import xla_flags  # pylint: disable=wrong-import-position

xla_flags.configure_cpu_defaults()

# pylint: disable=wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmark_conv
from experiments import study
from fer.models import layers

# (height = width, channels) of mini-Xception's depthwise convolutions and max pools at 48x48.
SHAPES = ((44, 8), (44, 16), (22, 32), (11, 64), (6, 128))


def _ms(f, *args, repeats):
  """Median milliseconds of the jitted gradient of sum(f(*args)**2) with respect to args."""
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=tuple(range(len(args)))))
  return benchmark_conv.median_ms(grad, *args, repeats=repeats)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--out", default="", help="write the markdown table here too")
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  rows = ["| input | depthwise 3x3: nn.Conv (grouped) | DepthwiseConv | speed-up | "
          "max pool 3x3/2 SAME: nn.max_pool | max_pool_same | speed-up |",
          "|---|---:|---:|---:|---:|---:|---:|"]
  for size, channels in SHAPES:
    x = jnp.asarray(rng.normal(size=(args.batch, size, size, channels)), jnp.float32)
    grouped = nn.Conv(channels, (3, 3), padding="SAME", feature_group_count=channels,
                      use_bias=False)
    shifted = layers.DepthwiseConv((3, 3))
    params = grouped.init(jax.random.key(0), x)
    np.testing.assert_allclose(shifted.apply(params, x), grouped.apply(params, x), rtol=1e-4,
                               atol=1e-4)
    pool = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding="SAME")  # pylint: disable=unnecessary-lambda-assignment
    np.testing.assert_array_equal(layers.max_pool_same(x), pool(x))
    conv_ms = [_ms(m.apply, params, x, repeats=args.repeats) for m in (grouped, shifted)]
    pool_ms = [_ms(f, x, repeats=args.repeats) for f in (pool, layers.max_pool_same)]
    rows.append(f"| {size}x{size}x{channels} | {conv_ms[0]:.1f} ms | {conv_ms[1]:.1f} ms | "
                f"{conv_ms[0] / conv_ms[1]:.1f}x | {pool_ms[0]:.1f} ms | {pool_ms[1]:.1f} ms | "
                f"{pool_ms[0] / pool_ms[1]:.1f}x |")
    print(rows[-1], flush=True)
  text = "\n".join([
      "# Depthwise convolution and SAME max pooling on the CPU", "",
      f"Machine: {study.machine()}; {platform.machine()}; jax {jax.__version__}, "
      f"{jax.devices()[0].platform}.", "",
      f"Command: `python experiments/benchmark_depthwise.py --batch={args.batch} "
      f"--repeats={args.repeats} --out=...`", "",
      f"Forward + gradient at batch {args.batch}, fp32, median of {args.repeats} jitted calls.",
      "", *rows, ""])
  if args.out:
    study._write_text(pathlib.Path(args.out), text)  # pylint: disable=protected-access
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
