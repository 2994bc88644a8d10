"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new one,
never half of one. The text goes to a temporary file beside the target, is flushed to disk, and
replaces the target with one rename."""

import json
import os
import pathlib


def write_text_atomic(path, text: str) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "w") as f:
      f.write(text)
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
