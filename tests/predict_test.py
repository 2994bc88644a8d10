"""fer.predict and fer.faces: crops on known boxes, the detector on a made photo, the whole
pipeline against the model, outputs, annotation, and per-file problems."""

import asyncio
import csv
import gc
import io
import json
import logging
import pathlib
import shutil
import sys
import types
import warnings

import cv2
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from fer import faces
from fer import metrics
from fer import predict
from fer import runs
from fer import train
from fer.datasets import synthetic
from fer.datasets.fer2013 import CLASSES
import trained_run


@pytest.fixture(scope="module")
def synthetic_faces():
  images, _ = synthetic.make_faces(8, seed=3)
  return images


def _model_probs(run, images, tta="none"):
  return np.asarray(train.make_predict(run.model, tta)(run.variables, images))


def _photo(faces_uint8, scale, origins, size=(300, 520), background=70):
  """An RGB photo with each face enlarged `scale` times (nearest) at its (x, y) origin."""
  photo = np.full(size + (3,), background, np.uint8)
  for face, (x, y) in zip(faces_uint8, origins):
    big = np.repeat(np.repeat(face[..., 0], scale, 0), scale, 1)
    photo[y:y + big.shape[0], x:x + big.shape[1]] = big[..., None]
  return photo


class FakeDetector:
  """Returns fixed boxes and records what it was called with."""

  def __init__(self, boxes):
    self.boxes, self.calls = boxes, []

  def detect(self, grey):
    self.calls.append(grey)
    return list(self.boxes)


# ----------------------------------------------------------------------------- crops


def test_crop_on_known_box_recovers_the_face(synthetic_faces):
  face = synthetic_faces[0]
  photo = _photo([face], 1, [(100, 40)])[..., 0]
  np.testing.assert_array_equal(faces.crop_face(photo, faces.Box(100, 40, 48, 48), 0.0), face)
  # Enlarged 3x: area averaging of 3x3 equal pixels gives the face back exactly.
  photo = _photo([face], 3, [(10, 20)])[..., 0]
  np.testing.assert_array_equal(faces.crop_face(photo, faces.Box(10, 20, 144, 144), 0.0), face)


def test_crop_margin_and_edges():
  grey = np.arange(100 * 200, dtype=np.uint32).reshape(100, 200).astype(np.uint8)
  out = faces.crop_face(grey, faces.Box(0, 0, 30, 20), margin=0.5)  # square, leaves the image
  assert out.shape == (48, 48, 1) and out.dtype == np.uint8
  # A non-square box becomes the square around its centre: with margin 0, side 40.
  ramp = np.tile(np.arange(200, dtype=np.uint8), (100, 1))
  crop = faces.crop_face(ramp, faces.Box(50, 30, 40, 10), margin=0.0, size=40)
  np.testing.assert_array_equal(crop[0, :, 0], np.arange(50, 90))
  with pytest.raises(ValueError, match="outside"):
    faces.crop_face(grey, faces.Box(500, 500, 10, 10))


def test_grey_conversion_matches_training():
  rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
  img = Image.fromarray(rgb)
  np.testing.assert_array_equal(faces.to_grey(img), np.asarray(img.convert("L")))
  sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
  assert faces.to_grey(sixteen).max() == 255
  transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
  assert faces.to_grey(transparent).min() == 255  # composited on white


# ----------------------------------------------------------------------------- detection


def test_detector_is_called_on_the_photo_and_its_boxes_are_classified(tmp_path, run,
                                                                      synthetic_faces):
  origins = [(20, 30), (300, 60)]
  Image.fromarray(_photo(synthetic_faces[:2], 2, origins)).save(tmp_path / "group.png")
  detector = FakeDetector([faces.Box(x, y, 96, 96) for x, y in origins])
  results = predict.predict_files(run, [tmp_path / "group.png"], detector, margin=0.0)
  (grey,) = detector.calls
  assert grey.shape == (300, 520) and grey.dtype == np.uint8
  assert [r.box for r in results.faces] == detector.boxes
  assert [r.face for r in results.faces] == [1, 2]
  np.testing.assert_allclose(np.stack([r.probs for r in results.faces]),
                             _model_probs(run, synthetic_faces[:2]), atol=1e-5)


def test_opencv_cascade_finds_faces_pasted_into_a_photo(synthetic_faces):
  """The real bundled detector on a photo made here: two enlarged synthetic faces."""
  origins = [(40, 50), (300, 80)]
  photo = np.full((320, 520), 70, np.uint8)
  for face, (x, y) in zip(synthetic_faces[:2], origins):
    photo[y:y + 144, x:x + 144] = cv2.resize(face[..., 0], (144, 144),
                                             interpolation=cv2.INTER_CUBIC)
  detector = faces.FaceDetector()
  boxes = detector.detect(photo)
  assert len(boxes) == 2, boxes
  for box, (x, y) in zip(boxes, origins):
    overlap_w = min(box.x + box.w, x + 144) - max(box.x, x)
    overlap_h = min(box.y + box.h, y + 144) - max(box.y, y)
    iou = overlap_w * overlap_h / (box.w * box.h + 144 * 144 - overlap_w * overlap_h)
    assert iou > 0.5, (box, x, y)
  assert detector.detect(np.full((200, 200), 128, np.uint8)) == []
  # A large photo is searched downscaled; boxes come back in its own pixels.
  big = cv2.resize(photo, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
  big_boxes = faces.FaceDetector(max_side=600).detect(big)
  assert len(big_boxes) == 2 and all(abs(b.x - 4 * a.x) < 40 for a, b in zip(boxes, big_boxes))


# ----------------------------------------------------------------------------- the pipeline


def test_no_detect_pipeline_matches_the_model(tmp_path, run, synthetic_faces):
  (tmp_path / "sub").mkdir()
  paths = []
  for i, face in enumerate(synthetic_faces[:5]):
    path = tmp_path / ("sub" if i % 2 else "") / f"face{i}.png"
    Image.fromarray(face[..., 0]).save(path)
    paths.append(path)
  results = predict.predict_files(run, [tmp_path], detector=None, tta="flip")
  assert not results.problems and results.tta == "flip"
  by_file = {r.file: r for r in results.faces}
  assert sorted(by_file) == sorted(map(str, paths))
  probs = np.stack([by_file[str(p)].probs for p in paths])
  np.testing.assert_allclose(probs, _model_probs(run, synthetic_faces[:5], "flip"), atol=1e-5)
  r = by_file[str(paths[0])]
  assert r.box == (0, 0, 48, 48) and r.emotion == CLASSES[int(np.argmax(r.probs))]


def test_webp_bmp_and_tiff_faces_read_as_their_png(tmp_path, run, synthetic_faces):
  """Lossless WebP, BMP, TIFF (8 and 16 bit) of a face give the PNG's pixels and probabilities."""
  face = synthetic_faces[0, ..., 0]
  grey = Image.fromarray(face)
  grey.save(tmp_path / "a.png")
  grey.save(tmp_path / "b.webp", lossless=True)
  grey.convert("RGB").save(tmp_path / "c.bmp")
  grey.save(tmp_path / "d.tif")
  Image.fromarray(face.astype(np.uint16) * 257).save(tmp_path / "e.tiff")  # 16-bit grey
  for name in ("b.webp", "c.bmp", "d.tif", "e.tiff"):
    np.testing.assert_array_equal(faces.to_grey(faces.read_image(tmp_path / name)), face, name)
  results = predict.predict_files(run, [tmp_path], detector=None, tta="none",
                                  progress_stream=None)
  assert not results.problems and len(results.faces) == 5
  for r in results.faces:
    np.testing.assert_allclose(r.probs, results.faces[0].probs, atol=1e-6, err_msg=r.file)
  # The annotated copy of the 16-bit TIFF shows the face (scaled to 8 bits, not clipped white).
  (annotated,) = predict.annotate(results, tmp_path / "ann", [str(tmp_path / "e.tiff")])
  centre = np.asarray(Image.open(annotated).convert("L"))[12:30, 12:36]
  np.testing.assert_array_equal(centre, face[12:30, 12:36])
  (tmp_path / "f.webp").write_bytes((tmp_path / "b.webp").read_bytes()[:20])
  with pytest.raises(faces.ImageError, match="^unreadable"):
    faces.read_image(tmp_path / "f.webp")
  (tmp_path / "g.webp").write_bytes(b"RIFF\0\0\0\0WEBP" + b"\0" * 50)
  with pytest.raises(faces.ImageError, match="damaged or truncated WebP"):
    faces.read_image(tmp_path / "g.webp")
  (tmp_path / "h.wav").write_bytes(b"RIFF\0\0\0\0WAVE" + b"\0" * 50)  # RIFF, but no WebP
  with pytest.raises(faces.ImageError, match=f"not a {faces.FORMAT_WORDS} image"):
    faces.read_image(tmp_path / "h.wav")
  (tmp_path / "i.txt").write_text("BMW, BMX: text that starts like a BMP")
  with pytest.raises(faces.ImageError, match="^unreadable") as e:  # PIL's BMP reader fails
    faces.read_image(tmp_path / "i.txt")
  assert "BMP" not in str(e.value)  # not called a damaged BMP for its first two letters
  (tmp_path / "j.bmp").write_bytes((tmp_path / "c.bmp").read_bytes()[:40])
  with pytest.raises(faces.ImageError, match="^unreadable"):
    faces.read_image(tmp_path / "j.bmp")


def test_problems_are_reported_per_file_and_the_rest_runs(tmp_path, run, synthetic_faces):
  Image.fromarray(synthetic_faces[0, ..., 0]).save(tmp_path / "good.png")
  Image.fromarray(synthetic_faces[1, ..., 0]).convert("RGB").save(tmp_path / "colour.jpg")
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "empty.png").write_bytes(b"")
  full = (tmp_path / "colour.jpg").read_bytes()
  (tmp_path / "truncated.jpg").write_bytes(full[:len(full) // 3])
  (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
  Image.new("RGB", (200, 150), (128, 128, 128)).save(tmp_path / "blank.jpg")
  class FlatIsNoFace:  # the real cascade's view of tiny 48x48 photos varies; mock it
    def detect(self, grey):
      return [faces.whole_image_box(grey)] if grey.std() > 1 else []

  results = predict.predict_files(run, [tmp_path, tmp_path / "missing.png"], FlatIsNoFace(),
                                  progress_stream=None)
  problems = {p.file.rsplit("/", 1)[-1]: p.problem for p in results.problems}
  assert problems["notes.txt"] == f"not a {faces.FORMAT_WORDS} image"
  assert problems["missing.png"] == "does not exist"
  assert problems["blank.jpg"] == "no face found"
  assert problems["truncated.jpg"].startswith("unreadable")
  assert problems["fake.png"] == "unreadable (a damaged or truncated PNG)"
  assert problems["empty.png"] == "unreadable (empty file)"
  assert len(problems) == 6 and len(results.faces) == 2
  # With --no_detect the two real images are classified; the broken ones still reported.
  results = predict.predict_files(run, [tmp_path], None, progress_stream=None)
  assert sorted(r.file.rsplit("/", 1)[-1] for r in results.faces) == ["blank.jpg", "colour.jpg",
                                                                       "good.png"]
  assert len(results.problems) == 4


def test_progress_is_shown_for_many_files(tmp_path, run, synthetic_faces):
  for i in range(25):
    Image.fromarray(synthetic_faces[i % 8, ..., 0]).save(tmp_path / f"{i:02d}.png")
  stream = io.StringIO()
  results = predict.predict_files(run, [tmp_path], None, progress_stream=stream,
                                  progress_every_seconds=0)
  assert len(results.faces) == 25
  lines = stream.getvalue().splitlines()
  assert lines[-1].startswith("  [25/25] files read, 25 faces") and "ETA" in lines[-1]


def test_a_folder_without_files_is_named_with_what_is_looked_for(tmp_path, run):
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  (tmp_path / "empty" / ".DS_Store").write_text("hidden: skipped")
  results = predict.predict_files(run, [tmp_path / "empty"], None, progress_stream=None)
  assert not results.faces
  (problem,) = results.problems
  assert problem.file == str(tmp_path / "empty")
  assert problem.problem.startswith("no image in this folder or its subfolders")
  assert f"looked for {faces.FORMAT_WORDS} files" in problem.problem
  assert f"{tmp_path / 'empty'}: no image in this folder" in predict.to_table(results)


def test_no_face_in_a_small_image_suggests_no_detect(tmp_path, run, synthetic_faces):
  Image.fromarray(synthetic_faces[0, ..., 0]).save(tmp_path / "fer_face.png")  # 48x48
  Image.fromarray(_photo(synthetic_faces[:1], 1, [(0, 0)])).save(tmp_path / "photo.png")
  results = predict.predict_files(run, [tmp_path], FakeDetector([]), progress_stream=None)
  problems = {pathlib.Path(p.file).name: p.problem for p in results.problems}
  assert problems == {
      "fer_face.png": "no face found (a 48x48 image: if it is a cropped face already, pass "
                      "--no_detect)",
      "photo.png": "no face found"}


def test_large_photos_are_read_without_pil_warning_and_larger_ones_refused(tmp_path,
                                                                          monkeypatch):
  """PIL warns (DecompressionBombWarning, no file name) above Image.MAX_IMAGE_PIXELS (89 MP:
  a 108 MP phone photo) and refuses above twice that; here with a limit of 1,000 pixels."""
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  Image.new("L", (40, 30), 90).save(tmp_path / "big.png")  # 1,200 pixels: warned about
  Image.new("L", (50, 50), 90).save(tmp_path / "huge.png")  # 2,500: over 2,000, refused
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert faces.read_image(tmp_path / "big.png").size == (40, 30)
  assert not caught, [str(w.message) for w in caught]
  with pytest.raises(faces.ImageError, match=r"^too large: over 0 megapixels, which PIL "
                     r"refuses to decode \(a guard against decompression bombs\); "
                     r"downscale it$"):
    faces.read_image(tmp_path / "huge.png")


def test_the_val_accuracy_printed_is_the_one_of_the_tta_used(tmp_path):
  """results.json holds the best checkpoint's val accuracy with the run's eval.tta; the
  checkpoint's own is its epoch's evaluation, without TTA (strong_seed_s0: 0.6601 and 0.6532)."""
  step_dir = tmp_path / "checkpoints" / "best" / "86"
  run = runs.Run(None, None, {}, runs.CheckpointInfo("best", step_dir, 86, 11200, 0.6532))
  assert runs.val_accuracy_line(run, "tencrop") == (
      "val/accuracy 0.6532 without TTA; predicting with tencrop TTA")  # no results.json
  (tmp_path / "results.json").write_text(json.dumps(
      {"val/accuracy": 0.6601, "tta": "tencrop", "best_epoch": 86}))
  assert runs.val_accuracy_line(run, "tencrop") == "val/accuracy 0.6601 with tencrop TTA"
  assert runs.val_accuracy_line(run, "none") == "val/accuracy 0.6532 without TTA"
  assert runs.val_accuracy_line(run, "flip") == (
      "val/accuracy 0.6532 without TTA; predicting with flip TTA")
  run.checkpoint = runs.CheckpointInfo("path", tmp_path / "checkpoints" / "last" / "99", 99,
                                       11088, 0.6487)
  assert runs.val_accuracy_line(run, "tencrop") == (
      "val/accuracy 0.6487 without TTA; predicting with tencrop TTA")  # not the best epoch


# ----------------------------------------------------------------------------- damaged runs


@pytest.fixture
def damaged(run, tmp_path):
  """A copy of the tiny run whose best checkpoint's largest array file is cut in half: its
  metadata reads, its arrays cannot."""
  copy = tmp_path / "damaged"
  shutil.copytree(run.checkpoint.path.parents[2], copy, ignore=shutil.ignore_patterns(".lock"))
  state = runs.best_checkpoint_dir(copy) / "state"
  biggest = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 2])
  return copy


# Leftovers that come after the test are pytest's warnings, not failures.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_orbax_leftovers_of_a_failed_restore_are_dropped_and_nothing_else(monkeypatch, damaged):
  """A failed restore leaves orbax read coroutines that raise when collected and TensorStore
  callbacks into orbax's closed event loop: 'Exception ignored' tracebacks, at random, after
  the CLI's clean error. The filter drops those two, and only those."""
  reported = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_value))
  runs.quiet_orbax_read_noise()
  runs.quiet_orbax_read_noise()  # once is enough: not stacked
  for _ in range(3):  # orbax leaves some noise in most of 3 tries, none in a few
    with pytest.raises(runs.RunError, match="the checkpoint is damaged"):
      runs.load_for_cli(damaged, None)
  gc.collect()
  assert not reported, reported
  # Deterministically: the two kinds, as Python hands them to the hook, and one of ours.
  namespace = {}  # a coroutine of code in orbax's package, as its read coroutines are
  exec(compile("async def read():\n  pass\n",  # pylint: disable=exec-used
               str(pathlib.Path(ocp.__file__).parent / "read.py"), "exec"), namespace)
  coroutine = namespace["read"]()
  for exc, obj in [(RuntimeError("Event loop is closed"), None),
                   (Exception("Encountered error while reading array index"), coroutine),
                   (ValueError("a bug of ours"), None)]:
    sys.unraisablehook(types.SimpleNamespace(exc_value=exc, object=obj))
  coroutine.close()
  assert [str(e) for e in reported] == ["a bug of ours"]


def test_asyncio_log_of_failed_reads_is_dropped_and_nothing_else(caplog):
  """The failed reads' futures, collected with their exceptions never retrieved, make asyncio
  log 'Future exception was never retrieved' after the CLI's clean error (rarely: 1 of 164 runs
  on a damaged checkpoint on the 2-core CPU, and once in a full suite): dropped for checkpoint
  read errors only, as asyncio hands them to its logger."""
  runs.quiet_orbax_read_noise()
  runs.quiet_orbax_read_noise()  # once is enough: not stacked
  assert sum(isinstance(f, runs._OrbaxLeftoverFilter)  # pylint: disable=protected-access
             for f in logging.getLogger("asyncio").filters) == 1

  async def leave(exc):
    future = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    del future  # never retrieved: asyncio logs it when the future is collected

  for exc in [ValueError('OUT_OF_RANGE: Error reading "params.conv2.kernel/0.0.0.0" in OCDBT '
                         'database at local file "/run/checkpoints/best/1/state/"'),
              ValueError("a bug of ours")]:
    asyncio.run(leave(exc))
  gc.collect()
  logged = [r for r in caplog.records if r.name == "asyncio"]
  assert [str(r.exc_info[1]) for r in logged] == ["a bug of ours"]
  assert logged[0].getMessage().startswith("Future exception was never retrieved")


def test_cli_on_a_damaged_checkpoint_prints_one_line(damaged, tmp_path):
  proc = trained_run.run_module("fer.predict", f"--workdir={damaged}", tmp_path)
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
  assert "the arrays cannot be read" in proc.stderr and "the checkpoint is damaged" in proc.stderr


# ----------------------------------------------------------------------------- outputs


def _results():
  probs = np.array([[0.1, 0.0, 0.0, 0.7, 0.1, 0.05, 0.05], [0.0] * 5 + [0.9, 0.1]])
  return predict.Results(
      faces=[predict.FaceResult("a.jpg", 1, faces.Box(1, 2, 30, 30), probs[0]),
             predict.FaceResult("a.jpg", 2, faces.Box(50, 2, 32, 32), probs[1])],
      problems=[predict.Problem("b.txt", f"not a {faces.FORMAT_WORDS} image")],
      checkpoint="ck",
      tta="none")


def test_json_csv_and_table():
  data = json.loads(predict.to_json(_results()))
  assert data["classes"] == list(CLASSES)
  assert [f["emotion"] for f in data["faces"]] == ["happy", "surprise"]
  assert data["faces"][0]["box"] == [1, 2, 30, 30]
  assert data["faces"][1]["probabilities"]["surprise"] == pytest.approx(0.9)
  assert data["problems"] == [{"file": "b.txt",
                               "problem": f"not a {faces.FORMAT_WORDS} image"}]
  rows = list(csv.DictReader(io.StringIO(predict.to_csv(_results()))))
  assert len(rows) == 3 and rows[0]["emotion"] == "happy" and rows[0]["width"] == "30"
  assert float(rows[0]["happy"]) == pytest.approx(0.7) and rows[2]["problem"]
  table = predict.to_table(_results())
  assert "happy" in table and f"b.txt: not a {faces.FORMAT_WORDS} image" in table
  assert "2 faces in 1 files; 1 files with problems" in table


def test_annotate_draws_boxes_and_never_overwrites_inputs(tmp_path):
  Image.new("RGB", (120, 60), (90, 90, 90)).save(tmp_path / "a.jpg")
  Image.new("L", (40, 40), 90).save(tmp_path / "b.png")
  results = _results()
  results.faces = [predict.FaceResult(str(tmp_path / "a.jpg"), 1, faces.Box(10, 20, 30, 30),
                                      results.faces[0].probs)]
  files = [str(tmp_path / "a.jpg"), str(tmp_path / "b.png"), str(tmp_path / "none.png")]
  written = predict.annotate(results, tmp_path, files)  # into the input folder itself
  assert [p.name for p in written] == ["a_1.jpg", "b_1.png"]
  original = np.asarray(Image.open(tmp_path / "a.jpg"))
  drawn = np.asarray(Image.open(tmp_path / "a_1.jpg")).astype(int)
  assert np.abs(drawn - original).max() > 100  # a box was drawn
  assert drawn.shape == original.shape


def test_calibrate_scales_with_the_runs_temperature(tmp_path, run, synthetic_faces):
  for i in range(3):
    Image.fromarray(synthetic_faces[i, ..., 0]).save(tmp_path / f"face{i}.png")
  temperature = runs.final_results(run)["temperature"]  # fit on val by the tiny run's end
  raw = predict.predict_files(run, [tmp_path], None, progress_stream=None)
  scaled = predict.predict_files(run, [tmp_path], None, progress_stream=None,
                                 temperature=temperature)
  for a, b in zip(raw.faces, scaled.faces):
    np.testing.assert_allclose(b.probs, metrics.apply_temperature(a.probs[None], temperature)[0])
    assert a.emotion == b.emotion
  proc = trained_run.run_module("fer.predict", f"--workdir={run.checkpoint.path.parents[2]}",
                                "--no_detect", "--calibrate", "--format=json", tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout)["temperature"] == pytest.approx(temperature)
  assert f"calibrated with temperature {temperature:.3f}" in proc.stderr
  # A checkpoint copied out of its run (with its config) has no results.json: no temperature.
  shutil.copytree(run.checkpoint.path, tmp_path / "alone" / "ckpt")
  shutil.copy(run.checkpoint.path.parents[2] / "config.json", tmp_path / "alone")
  alone = trained_run.run_module("fer.predict", f"--checkpoint={tmp_path / 'alone' / 'ckpt'}",
                                 "--no_detect", "--calibrate", tmp_path)
  assert alone.returncode == 2 and "no fitted temperature" in alone.stderr, alone.stderr[-2000:]


def test_cli(tmp_path, run, synthetic_faces):
  workdir = run.checkpoint.path.parents[2]
  for i in range(3):
    Image.fromarray(synthetic_faces[i, ..., 0]).save(tmp_path / f"face{i}.png")
  (tmp_path / "readme.txt").write_text("x")
  proc = trained_run.run_module("fer.predict", f"--workdir={workdir}", "--no_detect",
                                "--format=csv", f"--output={tmp_path / 'out' / 'e.csv'}",
                                f"--annotate={tmp_path / 'ann'}", tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = list(csv.DictReader(open(tmp_path / "out" / "e.csv")))
  assert [r["problem"] for r in rows] == ["", "", "", f"not a {faces.FORMAT_WORDS} image"]
  assert "face0.png" in proc.stdout and "3 faces in 3 files" in proc.stdout
  assert sorted(p.name for p in (tmp_path / "ann").iterdir()) == [f"face{i}.png" for i in
                                                                   range(3)]
  assert "Model: " in proc.stderr and "val/accuracy" in proc.stderr
  assert "without TTA" in proc.stderr  # the tiny run's eval.tta is none
  bad = trained_run.run_module("fer.predict", f"--workdir={tmp_path}", tmp_path)
  assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
  assert "has no checkpoints/best" in bad.stderr
  (tmp_path / "empty").mkdir()
  empty = trained_run.run_module("fer.predict", f"--workdir={workdir}", tmp_path / "empty")
  assert empty.returncode == 1, empty.stderr[-3000:]
  assert f"{tmp_path / 'empty'}: no image in this folder" in empty.stdout
  assert "error: no face found in the images given" in empty.stderr


def test_a_head_on_cached_vgg16_features_comes_back_with_its_base(tmp_path, monkeypatch):
  """A vgg16_head run (configs/vgg16_cached.py) predicts faces through the base it was trained
  on. Traced only: the base is a stand-in (no weights file, no 15M-parameter init)."""
  import jax  # pylint: disable=import-outside-toplevel
  from configs import vgg16_cached  # pylint: disable=import-outside-toplevel
  from fer import checkpointing  # pylint: disable=import-outside-toplevel
  from fer import features  # pylint: disable=import-outside-toplevel
  from fer.models import vgg16  # pylint: disable=import-outside-toplevel

  config = vgg16_cached.get_config("runlocal")
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  full = features.base_model(config.model)
  shapes = jax.eval_shape(lambda: full.init(jax.random.key(0), np.zeros((1, 48, 48, 1),
                                                                       np.uint8)))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.01, s.shape).astype(s.dtype), shapes)
  head = params.pop("head")
  monkeypatch.setattr(features, "base_params", lambda config, *args: params)
  state = {"step": np.int32(3), "params": head, "batch_stats": {}, "rng": np.zeros(2, np.uint32)}
  ckpts = checkpointing.Checkpoints(tmp_path)
  ckpts.save_best(1, state, {"epoch": 1, "history": [{"epoch": 1, "step": 3,
                                                      "val/accuracy": 0.25}]}, 0.25)
  ckpts.close()
  run = runs.load(tmp_path)
  assert isinstance(run.model, vgg16.VGG16)
  assert run.variables["params"]["block1_conv1"]["kernel"] is params["block1_conv1"]["kernel"]
  np.testing.assert_array_equal(run.variables["params"]["head"]["logits"]["kernel"],
                                head["logits"]["kernel"])
  assert run.checkpoint.val_accuracy == 0.25

  def no_weights(*args):
    raise OSError("vgg16_weights.h5: no such file")

  monkeypatch.setattr(features, "base_params", no_weights)
  with pytest.raises(runs.RunError, match=r"holds the head only.*no such file"):
    runs.load(tmp_path)
