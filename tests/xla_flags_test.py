"""fer.xla_flags: CPU flags are appended once and only for the CPU; malloc keeps freed memory."""

import os
import subprocess
import sys
import textwrap

import pytest

from fer import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def env(monkeypatch):
  for name in ("XLA_FLAGS", "FER_NO_CPU_FLAGS", "JAX_PLATFORM_NAME"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # Records the malloc tuning instead of applying it to the pytest process (tested below in a
  # subprocess of its own).
  monkeypatch.tuned = []
  monkeypatch.setattr(xla_flags, "keep_freed_memory", lambda: monkeypatch.tuned.append(1))
  return monkeypatch


def test_flags_appended_once_and_user_flags_win(env):
  env.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  added = xla_flags.configure_cpu_defaults(["--xla_cpu_enable_fast_math=true", "--xla_foo=1"])
  assert added == ["--xla_foo=1"]
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_foo=1"
  assert xla_flags.configure_cpu_defaults(["--xla_foo=2"]) == []
  assert env.tuned == [1, 1]


def test_nothing_off_cpu_or_when_disabled(env):
  env.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert xla_flags.configure_cpu_defaults(["--xla_foo=1"]) == []
  env.setenv("JAX_PLATFORMS", "cpu")
  env.setenv("FER_NO_CPU_FLAGS", "1")
  assert xla_flags.configure_cpu_defaults(["--xla_foo=1"]) == []
  assert "XLA_FLAGS" not in os.environ
  assert env.tuned == []


# Allocates and frees `size` bytes twice; prints the page faults of the second round. glibc's
# default serves such a block by mmap and unmaps it on free, so the second round faults it all in
# again; so does a heap trimmed on free (any block above the trim threshold).
_FAULTS = textwrap.dedent("""
    import ctypes, resource, sys
    sys.path.insert(0, {root!r})
    from fer import xla_flags
    if sys.argv[1] == "tuned":
      assert xla_flags.keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = int(sys.argv[2])
    def touch():
      p = libc.malloc(size)
      assert p, "malloc failed"
      ctypes.memset(p, 1, size)
      libc.free(p)
    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_page_faults_on_reuse():
  script = _FAULTS.format(root=ROOT)
  faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode, str(64 << 20)],
                                     check=True, capture_output=True, text=True).stdout)
            for mode in ("default", "tuned")}
  assert faults["default"] > 8000  # 64 MiB / 4 KiB pages = 16384 faults
  assert faults["tuned"] < 1000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_keeps_blocks_over_2gib():
  """A block above 2 GiB (the largest int trim threshold) stays in the process too: the strong
  config frees that much at the top of the heap every step."""
  out = subprocess.run([sys.executable, "-c", _FAULTS.format(root=ROOT), "tuned",
                        str((2 << 30) + (256 << 20))], check=True, capture_output=True, text=True)
  assert int(out.stdout) < 1000  # a trimmed heap would fault ~590,000 pages in again
