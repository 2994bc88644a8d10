"""fer.evaluate: a run on a folder of class folders, against the model's own probabilities."""

import csv
import dataclasses
import json
import re

import jax
import numpy as np
from PIL import Image
import pytest

from fer import evaluate
from fer import train
from fer.datasets import synthetic
from fer.datasets.fer2013 import CLASSES

import trained_run


# Folder names as other data sets spell them; "contempt" names no class of ours.
FOLDERS = {"Anger": 0, "happiness": 3, "SAD": 4, "neutral": 6, "contempt": None}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
  """{folder: uint8 faces [n, 48, 48, 1]} written as PNG files under <root>/<folder>/."""
  root = tmp_path_factory.mktemp("labelled")
  images, _ = synthetic.make_faces(5 * len(FOLDERS), seed=11)
  faces = {}
  for k, folder in enumerate(FOLDERS):
    faces[folder] = images[5 * k:5 * k + 5]
    (root / folder / "sub").mkdir(parents=True)
    for i, face in enumerate(faces[folder]):
      where = root / folder / ("sub" if i == 0 else "") / f"{i}.png"  # nested files count
      Image.fromarray(face[..., 0]).save(where)
  return root, faces


def test_accuracy_and_predictions_are_the_models_on_the_mapped_folders(run, labelled, tmp_path):
  root, faces = labelled
  results = evaluate.evaluate(run, root, tmp_path / "out", tta="none", progress_stream=None)
  kept = [f for f, c in FOLDERS.items() if c is not None]
  x = np.concatenate([faces[f] for f in kept])
  y = np.concatenate([[FOLDERS[f]] * 5 for f in kept])
  probs = np.asarray(train.make_predict(run.model, "none")(run.variables, x))
  assert results["faces"] == results["images"] == 20
  assert results["eval/accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()))
  assert results["per_class_count"] == [5, 0, 0, 5, 5, 0, 5]
  assert results["eval/per_class_accuracy"][1] is None  # no disgust folder
  among = np.where(np.isin(np.arange(7), [0, 3, 4, 6]), probs, -1).argmax(1)
  assert results["eval/accuracy_present_classes"] == pytest.approx(float((among == y).mean()))
  assert results["skipped_folders"] == {"contempt": 5} and results["problems"] == []
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))
  rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
  assert len(rows) == 20 and {r["label"] for r in rows} == {"angry", "happy", "sad", "neutral"}
  by_file = {r["file"]: r for r in rows}
  row = by_file[str(root / "happiness" / "sub" / "0.png")]
  np.testing.assert_allclose([float(row[c]) for c in CLASSES], probs[5], atol=1e-5)
  assert [row[k] for k in "xywh"] == ["0", "0", "48", "48"]
  assert (tmp_path / "out" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
  text = evaluate.summary(results)
  assert "20 faces from" in text and "contempt (5 images)" in text


def test_class_map_names_other_folders_and_a_detector_keeps_the_largest_face(run, labelled,
                                                                            tmp_path):
  root, _ = labelled
  class_map = evaluate.parse_class_map("contempt:disgust, Anger:fear")
  assert class_map == {"contempt": "disgust", "anger": "fear"}
  results = evaluate.evaluate(run, root, tmp_path / "out", class_map, tta="none",
                              progress_stream=None)
  assert results["per_class_count"] == [0, 5, 5, 5, 5, 0, 5] and not results["skipped_folders"]

  class TwoFaces:  # a big box and a small one; the big one is the whole 48x48 image
    def detect(self, grey):
      return [evaluate.faces_lib.Box(10, 10, 8, 8), evaluate.faces_lib.Box(0, 0, 48, 48)]
  detected = evaluate.evaluate(run, root, tmp_path / "det", class_map, TwoFaces(), tta="none",
                               progress_stream=None)
  assert detected["detect"] and detected["faces"] == 25
  # Each face is the crop of the big box (with fer.predict's margin), not of the small one.
  rows = list(csv.DictReader((tmp_path / "det" / "predictions.csv").open()))
  assert {tuple(r[k] for k in "xywh") for r in rows} == {("0", "0", "48", "48")}
  grey = np.asarray(Image.open(rows[0]["file"]))
  crop = evaluate.faces_lib.crop_face(grey, evaluate.faces_lib.Box(0, 0, 48, 48), 0.1)
  expected = np.asarray(train.make_predict(run.model, "none")(run.variables, crop[None]))[0]
  np.testing.assert_allclose([float(rows[0][c]) for c in CLASSES], expected, atol=1e-5)

  class NoFace:
    def detect(self, grey):
      return []
  with pytest.raises(evaluate.DataError, match=r"if it is a cropped face already, drop --detect"):
    evaluate.evaluate(run, root, tmp_path / "none", class_map, NoFace(), progress_stream=None)


def test_several_runs_are_an_ensemble_of_their_probabilities(run, labelled, tmp_path):
  root, faces = labelled
  other = dataclasses.replace(run, variables=jax.tree.map(lambda v: v * 0.5, run.variables))
  results = evaluate.evaluate([run, other], root, tmp_path / "out", tta="none",
                              progress_stream=None)
  x = faces["happiness"]
  expected = np.mean([np.asarray(train.make_predict(m.model, "none")(m.variables, x))
                      for m in (run, other)], axis=0)
  rows = [r for r in csv.DictReader((tmp_path / "out" / "predictions.csv").open())
          if "/happiness/" in r["file"]]
  rows.sort(key=lambda r: r["file"].replace("/sub/", "/"))  # 0.png (in sub/) first
  np.testing.assert_allclose([[float(r[c]) for c in CLASSES] for r in rows], expected, atol=1e-5)
  assert results["ensemble_size"] == 2 and results["checkpoint"].count("/") >= 1
  assert "ensemble of 2" in evaluate.summary(results)


def test_unusable_data_and_class_maps_are_named(run, labelled, tmp_path, tmp_path_factory):
  root, _ = labelled
  with pytest.raises(evaluate.DataError, match="not a folder"):
    evaluate.evaluate(run, tmp_path / "missing", tmp_path / "out")
  (tmp_path / "plain" / "1").mkdir(parents=True)
  Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "plain" / "1" / "a.png")
  with pytest.raises(evaluate.DataError, match=r"found: 1\). Expected folders named"):
    evaluate.evaluate(run, tmp_path / "plain", tmp_path / "out")
  for bad in ("1", "1:contempt", ":happy"):
    with pytest.raises(evaluate.DataError, match="expected folder:class"):
      evaluate.parse_class_map(bad)
  with pytest.raises(evaluate.DataError, match=r"does not hold: 8 \(its folders: 1\)"):
    evaluate.evaluate(run, tmp_path / "plain", tmp_path / "out", {"1": "sad", "8": "happy"})
  # The folder above the split folders: the error says which one to pass.
  (tmp_path / "raf" / "test" / "happy").mkdir(parents=True)
  with pytest.raises(evaluate.DataError, match=f"pass --data={tmp_path / 'raf' / 'test'}"):
    evaluate.evaluate(run, tmp_path / "raf", tmp_path / "out")
  # --out may not be a run (its results.json) nor lie inside the data.
  with pytest.raises(evaluate.DataError, match="holds a training run"):
    evaluate.evaluate(run, root, trained_run.tiny_run(tmp_path_factory))
  with pytest.raises(evaluate.DataError, match="is inside --data"):
    evaluate.evaluate(run, root, root / "happiness" / "eval")
  assert not (root / "happiness" / "eval").exists()
  # A file that is no image is listed as a problem; the rest is evaluated.
  (tmp_path / "mixed" / "happy").mkdir(parents=True)
  Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "mixed" / "happy" / "a.png")
  (tmp_path / "mixed" / "happy" / "notes.txt").write_text("not a face")
  (tmp_path / "mixed" / "README").write_text("beside the class folders: no class")
  results = evaluate.evaluate(run, tmp_path / "mixed", tmp_path / "out", progress_stream=None)
  assert results["faces"] == 1 and results["images"] == 2
  assert results["problems"][0]["file"].endswith("notes.txt")
  assert results["skipped_folders"] == {evaluate.TOP_LEVEL: 1}


def test_cli(labelled, tmp_path, tmp_path_factory):
  root, _ = labelled
  workdir = trained_run.tiny_run(tmp_path_factory)
  proc = trained_run.run_module("fer.evaluate", f"--workdir={workdir}", f"--data={root}",
                                f"--out={tmp_path / 'out'}", "--class_map=contempt:disgust")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "25 faces from" in proc.stdout and re.search(r"disgust +5 faces", proc.stdout)
  assert json.loads((tmp_path / "out" / "results.json").read_text())["faces"] == 25
  ens = trained_run.run_module("fer.evaluate", f"--workdir={workdir},{workdir}",
                               f"--data={root}", f"--out={tmp_path / 'ens'}",
                               "--class_map=contempt:disgust")
  assert ens.returncode == 0 and "ensemble of 2" in ens.stdout, ens.stderr[-3000:]
  assert ens.stdout.splitlines()[0].split(" (")[0] == proc.stdout.splitlines()[0].split(" (")[0]
  proc = trained_run.run_module("fer.evaluate", f"--workdir={workdir}", f"--data={tmp_path}/no",
                                f"--out={tmp_path / 'out2'}")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --data=")
  assert not (tmp_path / "out2").exists()
  (tmp_path / "file").write_text("where --out's folder would go")
  proc = trained_run.run_module("fer.evaluate", f"--workdir={workdir}", f"--data={root}",
                                f"--out={tmp_path / 'file' / 'out'}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --out={tmp_path / 'file'}")


def test_folder_names_of_other_data_sets_name_our_classes():
  assert [evaluate.class_of(n) for n in ("Suprise", "surprised", "FEARFUL", "joy", "contempt")] \
      == ["surprise", "surprise", "fear", "happy", None]
  assert evaluate.class_of("1", {"1": "surprise"}) == "surprise"
