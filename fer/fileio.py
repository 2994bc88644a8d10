"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new one,
never half of one. The bytes go to a temporary file beside the target, are flushed to disk, and
replace the target with one rename."""

import io
import json
import os
import pathlib

import numpy as np


def write_text_atomic(path, text: str) -> pathlib.Path:
  return write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path, data: bytes) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)  # only left when the write or the rename failed
  return path


def write_json_atomic(path, obj, jsonl: bool = False, indent: int | None = 2) -> pathlib.Path:
  """`obj` as JSON (or, with `jsonl`, each item of `obj` on a line of its own)."""
  if jsonl:
    text = "".join(json.dumps(row) + "\n" for row in obj)
  else:
    text = json.dumps(obj, indent=indent) + "\n"
  return write_text_atomic(path, text)


def save_npy_atomic(path, array) -> pathlib.Path:
  """`array` as a .npy file (np.save's format)."""
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array), allow_pickle=False)
  return write_bytes_atomic(path, buffer.getvalue())


def save_npz_atomic(path, **arrays) -> pathlib.Path:
  """`arrays` as an uncompressed .npz file (np.savez's format)."""
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
  return write_bytes_atomic(path, buffer.getvalue())
