"""fer.fileio: atomic writes of text, bytes, .npy arrays and figures keep the old file whole
when a write fails."""

import os

from matplotlib.figure import Figure
import numpy as np
import pytest

from fer import fileio
from fer import plots


def _leftovers(folder):
  return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_npy_round_trip(tmp_path):
  a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
  path = fileio.save_npy_atomic(tmp_path / "sub" / "probs.npy", a)
  b = np.load(path)
  assert b.dtype == np.float32 and np.array_equal(a, b)
  assert not _leftovers(path.parent)


@pytest.mark.parametrize("write", [
    lambda p: fileio.write_text_atomic(p, "new"),
    lambda p: fileio.write_bytes_atomic(p, b"new"),
    lambda p: fileio.save_npy_atomic(p, np.zeros(3)),
])
def test_a_failed_rename_keeps_the_old_file(tmp_path, monkeypatch, write):
  path = tmp_path / "f"
  path.write_bytes(b"old")

  def full_disk(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", full_disk)
  with pytest.raises(OSError, match="No space left"):
    write(path)
  assert path.read_bytes() == b"old" and not _leftovers(tmp_path)


def test_a_figure_that_fails_to_render_keeps_the_old_image(tmp_path, monkeypatch):
  fig = Figure()
  fig.subplots().plot([0, 1], [1, 0])
  path = plots._save(fig, tmp_path / "curve.png")  # pylint: disable=protected-access
  old = path.read_bytes()
  assert old.startswith(b"\x89PNG")

  def broken(self, fname, **kwargs):  # half an image, then a crash
    del self, kwargs
    if hasattr(fname, "write"):
      fname.write(b"\x89PNG half")
    else:
      with open(fname, "wb") as f:
        f.write(b"\x89PNG half")
    raise RuntimeError("renderer crashed")

  monkeypatch.setattr(Figure, "savefig", broken)
  with pytest.raises(RuntimeError, match="renderer crashed"):
    plots._save(fig, path)  # pylint: disable=protected-access
  assert path.read_bytes() == old and not _leftovers(tmp_path)
