"""fer.export: the serialized function agrees with the in-process model for any batch size, and
loads from the README's lines in a Python that cannot import this codebase."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from fer import export
from fer import train
from fer.datasets import synthetic
from fer.datasets.fer2013 import CLASSES
import trained_run


@pytest.fixture(scope="module")
def exported_dir(run, tmp_path_factory):
  return export.write_export(run, tmp_path_factory.mktemp("export") / "model", tta="flip",
                             platforms=("cpu", "cuda"))


def test_exported_and_in_process_predictions_agree(run, exported_dir):
  assert sorted(p.name for p in exported_dir.iterdir()) == sorted(
      [export.MODEL_FILE, export.PARAMS_FILE, export.INFO_FILE, export.README_FILE])
  assert not [p for p in exported_dir.parent.iterdir() if p.name.startswith(".")]  # no temp
  exported = jax.export.deserialize((exported_dir / export.MODEL_FILE).read_bytes())
  params = dict(np.load(exported_dir / export.PARAMS_FILE))
  # The export uses exact fp32 convolutions (conv_impl=xla) whatever the run trained with.
  predict = train.make_predict(run.model.clone(conv_impl="xla"), "flip")
  predict_as_trained = train.make_predict(run.model, "flip")  # gemm_bf16 on a CPU
  faces, _ = synthetic.make_faces(7, seed=5)
  for n in (5, 2):  # one export, any batch size
    got = np.asarray(exported.call(params, faces[:n]))
    assert got.shape == (n, len(CLASSES))
    np.testing.assert_allclose(got, np.asarray(predict(run.variables, faces[:n])), atol=1e-6)
    np.testing.assert_allclose(got, np.asarray(predict_as_trained(run.variables, faces[:n])),
                               atol=2e-3)
  info = json.loads((exported_dir / export.INFO_FILE).read_text())
  assert info["classes"] == list(CLASSES) and info["tta"] == "flip"
  assert info["platforms"] == ["cpu", "cuda"] and info["input"]["dtype"] == "uint8"
  assert info["num_params"] == train.count_params(run.variables["params"])
  assert "batch_stats/conv1_bn/mean" in params


def test_readme_snippet_runs_without_this_codebase(exported_dir):
  readme = (exported_dir / export.README_FILE).read_text()
  # The accuracy it names is for the TTA built in (the tiny run's own: none).
  assert "val/accuracy" in readme and "without TTA" in readme
  snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
  guard = "import importlib.util\nassert importlib.util.find_spec('fer') is None\n"
  # -I: no PYTHONPATH, no user site, not even the current folder on sys.path.
  proc = subprocess.run([sys.executable, "-I", "-c", guard + snippet], cwd=exported_dir,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = eval(proc.stdout.strip().splitlines()[-1])  # pylint: disable=eval-used
  assert len(names) == 2 and set(names) <= set(CLASSES)


def test_existing_output_is_kept_unless_overwrite(run, tmp_path):
  out = tmp_path / "model"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="--overwrite"):
    export.write_export(run, out, platforms=("cpu",))
  assert [p.name for p in out.iterdir()] == ["keep.txt"]
  export.write_export(run, out, platforms=("cpu",), overwrite=True)
  assert (out / export.MODEL_FILE).is_file() and not (out / "keep.txt").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_unknown_platforms_are_refused_with_the_choices(run, tmp_path):
  """jax.export lowers for any name ("gpuu") and the export fails only when called."""
  assert export.check_platforms(["cpu", "cuda", "rocm", "tpu"]) == ("cpu", "cuda", "rocm", "tpu")
  for platforms, bad in [(["cpu", "gpuu"], "gpuu"), (["gpu"], "gpu"), (["CPU"], "CPU")]:
    with pytest.raises(ValueError, match=rf"^--platforms: '{bad}' is not a platform jax.export "
                       r"lowers for; choose from cpu, cuda, rocm, tpu$"):
      export.check_platforms(platforms)
  with pytest.raises(ValueError, match="'gpuu'"):
    export.write_export(run, tmp_path / "model", platforms=("gpuu",))
  assert not list(tmp_path.iterdir())


def test_cli(run, tmp_path):
  workdir = run.checkpoint.path.parents[2]
  proc = trained_run.run_module("fer.export", f"--workdir={workdir}",
                                f"--output={tmp_path / 'out'}", "--platforms=cpu")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Exported" in proc.stdout and (tmp_path / "out" / export.PARAMS_FILE).is_file()
  proc = trained_run.run_module("fer.export", f"--workdir={tmp_path}", f"--output={tmp_path}/x")
  assert proc.returncode == 1 and "error:" in proc.stderr and "Traceback" not in proc.stderr
  proc = trained_run.run_module("fer.export", f"--workdir={workdir}", f"--output={tmp_path}/y",
                                "--platforms=cpu,gpuu")
  assert proc.returncode == 1 and not (tmp_path / "y").exists()
  assert proc.stderr == ("error: --platforms: 'gpuu' is not a platform jax.export lowers for; "
                         "choose from cpu, cuda, rocm, tpu\n")
