"""XLA:CPU flags that speed up training on a CPU (issue 9), applied before JAX starts its backend.

Call `configure_cpu_defaults()` at the top of an entry point, before the first JAX computation
(XLA reads XLA_FLAGS once, when the backend initialises; later calls change nothing). It only
touches os.environ, so on a GPU/TPU host it costs nothing.

Overrides: the user's own XLA_FLAGS win (a flag already named there is never appended again),
and FER_NO_CPU_FLAGS=1 turns the whole function off.

The flag list comes from experiments/cpu_step_study.py (see experiments/results/cpu_step_study.md):
on jaxlib 0.10.2 none of the XLA:CPU flags tried beat the defaults for the reference CNN, so
CPU_FLAGS is empty; the speed-up comes from fer.models.layers and lax.scan over steps instead.
The hook is kept so a flag that wins on a later jaxlib is added in one place.
"""

import os
from typing import Sequence

# Each entry is "--name=value". Empty: nothing beat the jaxlib 0.10.2 defaults (see module doc).
CPU_FLAGS: Sequence[str] = ()


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


def configure_cpu_defaults(flags: Sequence[str] = CPU_FLAGS) -> list[str]:
  """Appends `flags` missing from $XLA_FLAGS when the default backend will be CPU.

  Returns the flags it added. Does nothing when FER_NO_CPU_FLAGS=1, when JAX_PLATFORMS names a
  non-CPU platform first, or when an accelerator plugin is installed and JAX_PLATFORMS is unset.
  """
  if os.environ.get("FER_NO_CPU_FLAGS", "") not in ("", "0") or not _will_use_cpu():
    return []
  current = os.environ.get("XLA_FLAGS", "")
  present = {f.split("=", 1)[0] for f in current.split()}
  added = [f for f in flags if f.split("=", 1)[0] not in present]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
