"""CPU settings that speed up training (issue 9), applied before JAX starts its backend.

Two things, both only when the default backend will be the CPU:
  * XLA:CPU flags (CPU_FLAGS, appended to $XLA_FLAGS).
  * glibc malloc tuning (MALLOC_OPTIONS, through mallopt): XLA:CPU's worker threads allocate each
    step's large temporaries (activations, patches: ~100 MB a step for the reference CNN at batch
    64) from per-thread arenas and mmap, and give them back to the kernel when the step ends, so
    every step page-faults all of that memory in again (~23,000 minor faults a step, ~20% of the
    step time). One arena, no mmap and no trimming keep freed memory in the process for the next
    step (then ~100 faults a step). The cost: the process keeps its peak memory until it exits.
    "No trimming" is M_TRIM_THRESHOLD=-1 (never), not its largest int (2 GiB): configs/strong.py
    at batch 128 frees over 2 GiB at the top of the heap each step, which a 2 GiB threshold gave
    back, to fault ~1.2 GB in again every step (~300,000 faults; 1.6-2.6 s a step instead of 1.3).

Call `configure_cpu_defaults()` at the top of an entry point, before the first JAX computation
(XLA reads XLA_FLAGS once, when the backend initialises; later calls change nothing). On a GPU/TPU
host it does nothing at all.

Overrides: the user's own XLA_FLAGS win (a flag already named there is never appended again),
and FER_NO_CPU_FLAGS=1 turns the whole function off.

The flag list comes from experiments/cpu_step_study.py (see experiments/results/cpu_step_study.md):
on jaxlib 0.10.2 none of the XLA:CPU flags tried beat the defaults for the reference CNN, so
CPU_FLAGS is empty; the speed-up comes from the malloc tuning, fer.models.layers (the reshape max
pool, the bf16-matmul convolution) and several steps per dispatch instead.
The hook is kept so a flag that wins on a later jaxlib is added in one place.
"""

import ctypes
import os
import sys
from typing import Sequence

# Each entry is "--name=value". Empty: nothing beat the jaxlib 0.10.2 defaults (see module doc).
CPU_FLAGS: Sequence[str] = ()

# glibc mallopt parameters (malloc.h): one arena for all threads, never mmap, never trim, grow
# the heap 256 MiB at a time. See the module doc for why; experiments/results/cpu_step_study.md.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
MALLOC_OPTIONS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1),
                  (M_TOP_PAD, 256 << 20))


def _will_use_cpu() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", ""))
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  try:  # Without initialising JAX: is an accelerator plugin installed?
    import importlib.util
    for plugin in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin", "libtpu"):
      if importlib.util.find_spec(plugin) is not None:
        return False
  except (ImportError, ValueError):
    pass
  return True


def keep_freed_memory() -> bool:
  """Applies MALLOC_OPTIONS through glibc's mallopt; False where there is no glibc (macOS...)."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and other libcs have no mallopt
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in MALLOC_OPTIONS)


def configure_cpu_defaults(flags: Sequence[str] = CPU_FLAGS) -> list[str]:
  """Appends `flags` missing from $XLA_FLAGS and tunes malloc when the default backend is CPU.

  Returns the flags it added. Does nothing when FER_NO_CPU_FLAGS=1, when JAX_PLATFORMS names a
  non-CPU platform first, or when an accelerator plugin is installed and JAX_PLATFORMS is unset.
  """
  if os.environ.get("FER_NO_CPU_FLAGS", "") not in ("", "0") or not _will_use_cpu():
    return []
  keep_freed_memory()
  current = os.environ.get("XLA_FLAGS", "")
  present = {f.split("=", 1)[0] for f in current.split()}
  added = [f for f in flags if f.split("=", 1)[0] not in present]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
