"""Native CPU kernels (native.cc beside this file): patch extraction, bilinear resampling, and the
1-channel first convolution layer (alone, or with its 2x2 max pool and ReLU).

`patches` and `patches_t` are drop-ins for fer.models.layers' XLA patch builders, bit for bit,
2-4x faster (experiments/results/benchmark_conv.md); they make the default CPU training step
~1.3x faster. `bilinear` is the drop-in for fer.augment's four-gather resampling. `conv_c1` and
`conv_c1_grads` are the fp32 forward pass (with the bias) and the weight and bias gradients of a
SAME convolution of a 1-channel image (the first layer of every fer CNN), equal to XLA's to float
rounding. `conv_c1_pool` / `conv_c1_pool_grads` fuse conv_c1, layers.max_pool_2x2 and the ReLU
(the first block of a CNN without batch norm), so that the full-size activation and its gradient
are never written: the same bits as conv_c1, the pool and conv_c1_grads one after the other.
`conv_bf16` and `conv_bf16_wgrad` are layers.conv_gemm_bf16's three passes (forward, input
gradient, weight gradient) as direct convolutions (AVX-512 BF16 dot products, no patches) where
the CPU has those instructions (`bf16_conv_available()`; FER_NO_DIRECT_CONV=1 turns them off):
the same bf16 inputs and fp32 sums as the patch matmul, in another order. `conv_wino_bf16` and
`conv_wino_bf16_wgrad` are the same passes of 3x3 layers as Winograd F(2x2, 3x3) / F(3x3, 2x2)
(conv_impl winograd_bf16, the CPU default): 0.45x the multiplications, ~1.8x the rounding error.
They are XLA FFI calls into a small C++ library that this module compiles on first use with the
system's C++ compiler (g++ -O3, ~10 s) against the FFI headers that jaxlib ships, and caches at
  $FER_NATIVE_CACHE, else ~/.cache/fer/native (a per-user temp dir if that isn't writable)
under a name made of the source's sha256, the jaxlib version and the CPU architecture, so an
edit or an upgrade rebuilds it. The build targets the architecture's baseline (no
-march=native; the vector loops are compiled for AVX-512, AVX2 and the baseline and picked at
load time, the bf16 kernels only run where the CPU reports AVX-512 BF16), so a shared home
directory serves every machine of that architecture. It
writes a temporary file and renames it: a killed build leaves nothing half-written behind.

`available()` is False, and the callers keep their XLA versions, where there is no compiler, the
build fails (one warning names the command and its error), the default backend isn't the CPU,
JAX has more than one device (XLA would run a custom call unsharded), or FER_NO_NATIVE=1.
Results don't depend on which is used beyond float rounding: the patches are bit-identical; the
resampling is the same fp32 formula (< 2e-3 apart on the 0..255 pixel scale); the first layer's
convolution sums in another order than XLA's (~1e-7 relative), the direct bf16 convolutions in
another order than the patch matmul's (~1e-6); the Winograd kernels round their transforms to
bf16 (~4e-3 relative against exact fp32, the direct ones 2.4e-3). 3 epochs of configs/cnn.py,
same seed: val 57.12% / test 58.26% with the direct kernels, 56.84% / 58.21% without fer.native,
56.65% / 59.10% with Winograd (README, CPU training speed).
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = Path(__file__).with_name("native.cc")
TARGETS = {"fer_patches": "FerPatches", "fer_patches_t": "FerPatchesT",
           "fer_bilinear": "FerBilinear", "fer_conv_c1": "FerConvC1",
           "fer_conv_c1_wgrad": "FerConvC1Wgrad", "fer_conv_c1_pool": "FerConvC1Pool",
           "fer_conv_c1_pool_wgrad": "FerConvC1PoolWgrad", "fer_conv_bf16": "FerConvBf16",
           "fer_conv_bf16_wgrad": "FerConvBf16Wgrad", "fer_conv_wino_bf16": "FerConvWinoBf16",
           "fer_conv_wino_bf16_wgrad": "FerConvWinoBf16Wgrad"}


def cache_dir() -> Path:
  """$FER_NATIVE_CACHE; else ~/.cache/fer/native, or a per-user temp dir where that can't be
  written (a read-only home)."""
  if os.environ.get("FER_NATIVE_CACHE"):
    return Path(os.environ["FER_NATIVE_CACHE"])
  home = Path.home() / ".cache" / "fer" / "native"
  try:
    home.mkdir(parents=True, exist_ok=True)
    if os.access(home, os.W_OK):
      return home
  except OSError:
    pass
  return Path(tempfile.gettempdir()) / f"fer-native-{os.getuid()}"


# -ffp-contract=off: no fused multiply-adds (the kernels' sums round like XLA's).
# -fno-trapping-math: FP exception flags are never read, so selects between float compares
# vectorise (the max pool); the values computed are the same.
FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-w")


def library_path() -> Path:
  digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
  return cache_dir() / f"libfer_native-{digest}-jaxlib{jaxlib.__version__}-{platform.machine()}.so"


def compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(path: Path) -> Path:
  """Compiles native.cc into `path` (atomically). Raises RuntimeError naming the failure."""
  cxx = compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set $CXX or install g++, e.g. "
                       "`apt-get install g++`)")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
      raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp, path)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise RuntimeError(f"`{' '.join(cmd)}` failed: {e}") from e
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


_registered: set[str] = set()
_library: list = []  # the loaded ctypes library, once _load succeeded


@functools.cache
def _load() -> bool:
  path = library_path()
  try:
    if not path.exists():
      build(path)
    try:
      lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError:  # a damaged cached copy (not one of ours: builds are atomic): build anew
      build(path)
      lib = ctypes.cdll.LoadLibrary(str(path))
  except (RuntimeError, OSError) as e:
    warnings.warn(f"fer: native CPU kernels unavailable, using XLA's (slower): {e}")
    return False
  _library[:] = [lib]
  for name, symbol in TARGETS.items():
    if name not in _registered:  # once per process, even if _load's cache is cleared
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
      _registered.add(name)
  return True


@contextlib.contextmanager
def use(enabled: bool, direct_conv: bool = True):
  """Within the block, code traced afresh uses the native kernels (enabled) or XLA's, and the
  direct bf16 convolutions where direct_conv (else the patch matmul): sets FER_NO_NATIVE and
  FER_NO_DIRECT_CONV and restores them after (benchmarks compare in one process)."""
  values = {"FER_NO_NATIVE": "0" if enabled else "1",
            "FER_NO_DIRECT_CONV": "0" if direct_conv else "1"}
  saved = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k)
      else:
        os.environ[k] = v


def available() -> bool:
  """True when the native kernels can be used here (see the module doc)."""
  if os.environ.get("FER_NO_NATIVE", "") not in ("", "0"):
    return False
  return jax.default_backend() == "cpu" and jax.device_count() == 1 and _load()


def bf16_conv_available() -> bool:
  """available(), the CPU runs AVX-512 BF16 dot products (conv_bf16's instructions), and
  FER_NO_DIRECT_CONV isn't 1 (then conv_gemm_bf16 keeps its patch matmul)."""
  if os.environ.get("FER_NO_DIRECT_CONV", "") not in ("", "0"):
    return False
  return available() and bool(_library[0].FerBf16ConvSupported())


def _pad_attrs(kernel_size, padding) -> dict:
  """The kernels' padding attributes (top, left) for padding [(top, bottom), (left, right)],
  which must keep the image size."""
  (kh, kw), ((pt, pb), (pl, pr)) = kernel_size, padding
  if pt + pb != kh - 1 or pl + pr != kw - 1:
    raise ValueError(f"padding {padding} doesn't keep the size for kernel {kernel_size}")
  return dict(pt=np.int64(pt), pl=np.int64(pl))


def _call(target, out_shape, x, kernel_size, padding):
  kh, kw = kernel_size
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, x.dtype),
                          vmap_method="broadcast_all")(
      x, kh=np.int64(kh), kw=np.int64(kw), **_pad_attrs(kernel_size, padding))


def patches(x: jax.Array, kernel_size, padding) -> jax.Array:
  """16-bit [N, H, W, C] -> [N*H*W, kh*kw*C]; padding [(top, bottom), (left, right)]."""
  n, h, w, c = x.shape
  kh, kw = kernel_size
  return _call("fer_patches", (n * h * w, kh * kw * c), x, kernel_size, padding)


def patches_t(x: jax.Array, kernel_size, padding) -> jax.Array:
  """16-bit [N, H, W, C] -> the transposed patches [kh*kw*C, N*H*W]."""
  n, h, w, c = x.shape
  kh, kw = kernel_size
  return _call("fer_patches_t", (kh * kw * c, n * h * w), x, kernel_size, padding)


def bilinear(images: jax.Array, src_y: jax.Array, src_x: jax.Array) -> jax.Array:
  """f32 images [N, H, W, C] sampled at (src_y, src_x) [N, H, W] (clamped), bilinearly."""
  return jax.ffi.ffi_call("fer_bilinear", jax.ShapeDtypeStruct(images.shape, jnp.float32),
                          vmap_method="broadcast_all")(
      images.astype(jnp.float32), src_y.astype(jnp.float32), src_x.astype(jnp.float32))


def conv_c1(x: jax.Array, kernel: jax.Array, bias: jax.Array, padding) -> jax.Array:
  """Stride-1, size-keeping fp32 convolution of 1-channel images x [N, H, W, 1] with kernel
  [kh, kw, 1, O], plus bias [O] -> [N, H, W, O]; padding [(top, bottom), (left, right)]."""
  return jax.ffi.ffi_call("fer_conv_c1",
                          jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[-1:], jnp.float32),
                          vmap_method="broadcast_all")(
      x.astype(jnp.float32), kernel.astype(jnp.float32), bias.astype(jnp.float32),
      **_pad_attrs(kernel.shape[:2], padding))


def conv_c1_grads(x: jax.Array, g: jax.Array, kernel_shape, padding) -> tuple[jax.Array, jax.Array]:
  """The kernel and bias gradients of conv_c1 for the output gradient g [N, H, W, O]:
  ([kh, kw, 1, O], [O])."""
  out = (jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32),
         jax.ShapeDtypeStruct(tuple(kernel_shape[-1:]), jnp.float32))
  return jax.ffi.ffi_call("fer_conv_c1_wgrad", out, vmap_method="broadcast_all")(
      x.astype(jnp.float32), g.astype(jnp.float32), **_pad_attrs(kernel_shape[:2], padding))


def conv_c1_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array, padding,
                 relu: bool = True) -> tuple[jax.Array, jax.Array]:
  """relu(max_pool_2x2(conv_c1(x, kernel, bias, padding))) (no relu where relu=False) in one pass:
  (y, pos) [N, H/2, W/2, O], pos the int8 window position (row-major 0..3) each output's gradient
  goes to, 4 for none (a NaN maximum; under relu, a maximum <= 0)."""
  n, h, w, _ = x.shape[-4:]
  shape = (*x.shape[:-4], n, h // 2, w // 2, kernel.shape[-1])
  return jax.ffi.ffi_call("fer_conv_c1_pool", (jax.ShapeDtypeStruct(shape, jnp.float32),
                                               jax.ShapeDtypeStruct(shape, jnp.int8)),
                          vmap_method="broadcast_all")(
      x.astype(jnp.float32), kernel.astype(jnp.float32), bias.astype(jnp.float32),
      **_pad_attrs(kernel.shape[:2], padding), relu=bool(relu))


def conv_c1_pool_grads(x: jax.Array, pos: jax.Array, g: jax.Array, kernel_shape,
                       padding) -> tuple[jax.Array, jax.Array]:
  """The kernel and bias gradients of conv_c1_pool for the output gradient g [N, H/2, W/2, O]:
  conv_c1_grads of the pool's routed gradient, without writing it, bit for bit."""
  out = (jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32),
         jax.ShapeDtypeStruct(tuple(kernel_shape[-1:]), jnp.float32))
  return jax.ffi.ffi_call("fer_conv_c1_pool_wgrad", out, vmap_method="broadcast_all")(
      x.astype(jnp.float32), pos, g.astype(jnp.float32),
      **_pad_attrs(kernel_shape[:2], padding))



def conv_bf16(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
  """Stride-1, size-keeping convolution of bf16 x [N, H, W, C] (C even) with a bf16 HWIO kernel
  [kh, kw, C, O] (O a multiple of 16), fp32 sums -> f32 [N, H, W, O]; no patches. Needs
  bf16_conv_available()."""
  return jax.ffi.ffi_call("fer_conv_bf16",
                          jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[-1:], jnp.float32),
                          vmap_method="broadcast_all")(
      x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), **_pad_attrs(kernel.shape[:2], padding))


def conv_bf16_wgrad(x: jax.Array, g: jax.Array, kernel_shape, padding) -> jax.Array:
  """The kernel gradient [kh, kw, C, O] (f32) of conv_bf16(x, kernel, padding) for the output
  gradient g [N, H, W, O]; x and g bf16, C and O multiples of 16."""
  return jax.ffi.ffi_call("fer_conv_bf16_wgrad",
                          jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32),
                          vmap_method="broadcast_all")(
      x.astype(jnp.bfloat16), g.astype(jnp.bfloat16), **_pad_attrs(kernel_shape[:2], padding))


def conv_wino_bf16(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """conv_bf16 of a 3x3 kernel with SAME padding as Winograd F(2x2, 3x3): x [N, H, W, C] bf16
  (H and W even, C a multiple of 16), kernel [3, 3, C, O] (O a multiple of 16) -> f32
  [N, H, W, O]; ~0.45x the work, ~1.8x the rounding error (native.cc). Needs
  bf16_conv_available()."""
  return jax.ffi.ffi_call("fer_conv_wino_bf16",
                          jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[-1:], jnp.float32),
                          vmap_method="broadcast_all")(
      x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), pt=np.int64(1), pl=np.int64(1))


def conv_wino_bf16_wgrad(x: jax.Array, g: jax.Array) -> jax.Array:
  """The kernel gradient [3, 3, C, O] (f32) of conv_wino_bf16(x, kernel) for the output gradient
  g [N, H, W, O], as Winograd F(3x3, 2x2); x and g bf16, C and O multiples of 16, H, W even."""
  return jax.ffi.ffi_call("fer_conv_wino_bf16_wgrad",
                          jax.ShapeDtypeStruct((3, 3, x.shape[-1], g.shape[-1]), jnp.float32),
                          vmap_method="broadcast_all")(
      x.astype(jnp.bfloat16), g.astype(jnp.bfloat16), pt=np.int64(1), pl=np.int64(1))
