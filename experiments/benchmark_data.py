r"""Times the full FER2013 build (archive -> TFDS array_record) and the full load (-> arrays).

  python3 experiments/benchmark_data.py --archive=/path/to/archive.zip

Each repeat builds into a fresh temporary data dir, then loads all three splits (35,887
images) into uint8 arrays. Also timed alone: reading and decoding the archive (the part of the
build before TFDS writes). Writes experiments/results/benchmark_data.{json,md} with the command,
the machine and the library versions. The machine may be shared: the load average at the
start of each repeat is recorded beside its timings.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import study  # pylint: disable=wrong-import-position
from fer import input_pipeline  # pylint: disable=wrong-import-position
from fer.datasets import fer2013  # pylint: disable=wrong-import-position


def machine() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy  # pylint: disable=import-outside-toplevel
  import PIL  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return {
      "cpu_model": study.cpu_model(),
      "cpu_cores": len(os.sched_getaffinity(0)),
      "python": platform.python_version(),
      "tensorflow_datasets": tfds.__version__,
      "pillow": PIL.__version__,
      "numpy": numpy.__version__,
      "jax": jax.__version__,
  }


def git_commit() -> str:
  out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       check=False, cwd=pathlib.Path(__file__).parent)
  return out.stdout.strip()


def run_once(archive: str) -> dict:
  load_avg = os.getloadavg()[0]
  start = time.perf_counter()
  n = sum(1 for _ in fer2013.read_archive(archive))
  decode_s = time.perf_counter() - start
  data_dir = tempfile.mkdtemp(prefix="fer_bench_")
  try:
    start = time.perf_counter()
    input_pipeline.prepare(archive, data_dir, verbose=False)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    data = input_pipeline.load_fer2013("", data_dir, verbose=False)
    load_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in pathlib.Path(data_dir).rglob("*") if p.is_file())
  finally:
    shutil.rmtree(data_dir)
  counts = {s: int(len(d["label"])) for s, d in data.items()}
  assert sum(counts.values()) == n, (counts, n)
  return {"decode_s": decode_s, "build_s": build_s, "load_s": load_s, "images": n,
          "counts": counts, "prepared_bytes": size, "load_average_1min": load_avg}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--archive", default=os.environ.get(fer2013.ARCHIVE_ENV, ""),
                      help=f"archive.zip, extracted folder or fer2013.csv (default ${fer2013.ARCHIVE_ENV})")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"
                                           / "benchmark_data"),
                      help="output path without suffix: writes .json and .md")
  args = parser.parse_args()
  archive = str(fer2013.find_archive(args.archive))
  command = "python3 " + " ".join(shlex.quote(a) for a in
                                  [os.path.relpath(sys.argv[0])] + sys.argv[1:])
  runs = []
  for i in range(args.repeats):
    runs.append(run_once(archive))
    r = runs[-1]
    print(f"repeat {i + 1}/{args.repeats}: decode {r['decode_s']:.2f}s, build "
          f"{r['build_s']:.2f}s, load {r['load_s']:.2f}s (load average "
          f"{r['load_average_1min']:.1f})", flush=True)
  summary = {k: {"median": statistics.median(r[k] for r in runs),
                 "min": min(r[k] for r in runs)} for k in ("decode_s", "build_s", "load_s")}
  result = {
      "command": command,
      "archive": archive,
      "archive_bytes": pathlib.Path(archive).stat().st_size if os.path.isfile(archive) else None,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "git_commit": git_commit(),
      "machine": machine(),
      "summary": summary,
      "runs": runs,
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
  m = result["machine"]
  lines = [
      "# FER2013 data benchmark", "",
      f"Command: `{command}`  ", f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores "
      f"(shared with other jobs: see the load average per repeat); python {m['python']}, "
      f"tensorflow-datasets {m['tensorflow_datasets']}, pillow {m['pillow']}, "
      f"numpy {m['numpy']}  ", f"Date: {result['date']}, commit {result['git_commit']}", "",
      f"{runs[0]['images']:,} images {runs[0]['counts']}; prepared dataset "
      f"{runs[0]['prepared_bytes'] / 2**20:.1f} MiB (array_record, raw uint8).", "",
      "| step | median s | min s |", "|---|---:|---:|",
      f"| full build (archive -> TFDS array_record) | {summary['build_s']['median']:.2f} | "
      f"{summary['build_s']['min']:.2f} |",
      f"| of which reading + decoding the JPEGs alone | {summary['decode_s']['median']:.2f} | "
      f"{summary['decode_s']['min']:.2f} |",
      f"| full load (all splits -> uint8 arrays) | {summary['load_s']['median']:.2f} | "
      f"{summary['load_s']['min']:.2f} |", "",
      "| repeat | decode s | build s | load s | load average (1 min) |",
      "|---:|---:|---:|---:|---:|",
  ] + [f"| {i + 1} | {r['decode_s']:.2f} | {r['build_s']:.2f} | {r['load_s']:.2f} | "
       f"{r['load_average_1min']:.1f} |" for i, r in enumerate(runs)] + [""]
  out.with_suffix(".md").write_text("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
