"""fer.video: frames sampled by video time, faces classified as the model does, the real
detector on a made video, the outputs, damaged and odd files, and the CLI."""

import csv
import io
import json

import cv2
import numpy as np
import pytest

from fer import faces
from fer import train
from fer import video
from fer.datasets import synthetic
from fer.datasets.fer2013 import CLASSES
import trained_run

FACE_SIDE = 144


@pytest.fixture(scope="module")
def synthetic_faces():
  images, _ = synthetic.make_faces(4, seed=3)
  return images


def _frames(face, n=20, size=(240, 420), dx=6, background=70):
  """n BGR frames: `face` enlarged to FACE_SIDE, moving right by dx pixels a frame."""
  big = cv2.resize(face[..., 0], (FACE_SIDE, FACE_SIDE), interpolation=cv2.INTER_CUBIC)
  frames = []
  for i in range(n):
    grey = np.full(size, background, np.uint8)
    grey[40:40 + FACE_SIDE, 20 + dx * i:20 + dx * i + FACE_SIDE] = big
    frames.append(np.repeat(grey[..., None], 3, axis=2))
  return frames


def _write(path, frames, fps=10.0, fourcc="MJPG"):
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps,
                           (frames[0].shape[1], frames[0].shape[0]))
  assert writer.isOpened()
  for f in frames:
    writer.write(f)
  writer.release()
  return path


def _decoded(path):
  capture, frames = cv2.VideoCapture(str(path)), []
  while True:
    ok, frame = capture.read()
    if not ok:
      return frames
    frames.append(frame)


class FakeDetector:
  def __init__(self, boxes):
    self.boxes = boxes

  def detect(self, grey):
    del grey
    return list(self.boxes)


@pytest.fixture
def clip(tmp_path, synthetic_faces):
  return _write(tmp_path / "clip.avi", _frames(synthetic_faces[0]))


def test_frames_are_sampled_by_video_time(clip):
  def sampled(fps):
    frames = video.Frames(str(clip), fps)
    got = [(i, t) for i, t, _ in frames]
    assert frames.read == frames.announced == 20 and frames.fps == 10.0 and not frames.note()
    assert all(t == pytest.approx(i / 10) for i, t in got)
    return [i for i, _ in got]

  assert sampled(5) == list(range(0, 20, 2))
  assert sampled(3) == [0, 4, 7, 10, 14, 17]
  assert sampled(0) == sampled(100) == list(range(20))


def test_faces_of_sampled_frames_are_classified_as_the_model_does(clip, run):
  boxes = [faces.Box(20, 40, 144, 144), faces.Box(250, 30, 60, 60)]
  progress = io.StringIO()
  videos, problems = video.predict_videos(run, [clip], FakeDetector(boxes), fps=5,
                                          progress_stream=progress, progress_every_seconds=0)
  assert "[video 1/1] clip.avi: frame 1/20, 2 faces" in progress.getvalue()
  assert problems == [] and len(videos) == 1
  v = videos[0]
  assert [f.frame for f in v.faces] == [i for i in range(0, 20, 2) for _ in boxes]
  assert [f.face for f in v.faces] == [1, 2] * 10
  decoded = _decoded(clip)
  crops = np.stack([faces.crop_face(cv2.cvtColor(decoded[f.frame], cv2.COLOR_BGR2GRAY), f.box)
                    for f in v.faces])
  expected = np.asarray(train.make_predict(run.model, "none")(run.variables, crops))
  np.testing.assert_allclose(np.stack([f.probs for f in v.faces]), expected, atol=1e-5)
  main = v.main_faces()
  assert sorted(main) == list(range(0, 20, 2)) and all(f.face == 1 for f in main.values())
  assert [f.track for f in v.faces] == [1, 2] * 10  # the larger box is track 1, the main one
  s = v.summary()
  assert s["frames_sampled"] == s["frames_with_face"] == 10 and s["faces"] == 20
  assert s["duration_s"] == pytest.approx(2.0)
  assert sum(s["main_track_top_share"].values()) == pytest.approx(1.0)
  assert s["main_track"] == 1 and [t["frames"] for t in s["tracks"]] == [10, 10]
  top = np.bincount([int(np.argmax(main[i].probs)) for i in main], minlength=7) / 10
  assert [s["main_track_top_share"][c] for c in CLASSES] == pytest.approx(top)


def _face(frame, x, y, side=50):
  return video.Face(frame, frame * 0.2, 0, faces.Box(x, y, side, side), np.eye(7)[frame % 7])


def test_tracks_follow_faces_across_frames_and_gaps(tmp_path):
  found = []
  for i in range(10):  # A moves right above B, which moves left: their left-right order swaps
    here = [_face(i, 10 + 15 * i, 10), _face(i, 165 - 15 * i, 200)]
    if i <= 2 or i == 9:  # C: seen at 0-0.4 s, then again at 1.8 s
      here.append(_face(i, 500, 10))
    if i == 5:  # D: where A was 4 frames ago, too far from A's last box to continue it
      here.append(_face(i, 25, 10))
    here.sort(key=lambda f: f.box.x)
    for j, f in enumerate(here, 1):
      f.face = j
    found += here
  video.track_faces(found, max_gap_s=1.0)
  track = lambda x, y, i: next(f.track for f in found if f.frame == i and f.box[:2] == (x, y))
  assert {track(10 + 15 * i, 10, i) for i in range(10)} == {1}
  assert {track(165 - 15 * i, 200, i) for i in range(10)} == {2}
  assert track(500, 10, 0) == track(500, 10, 2) == 3 and track(500, 10, 9) == 5
  assert track(25, 10, 5) == 4
  assert [f.face for f in found if f.track == 1][:7] == [1, 1, 1, 1, 1, 2, 2]  # D, then B left
  for f in found:
    f.track = 0
  video.track_faces(found, max_gap_s=2.0)  # the gap of C is bridged
  assert track(500, 10, 9) == 3
  v = video.Video("v", 5.0, 10, 10, [(i, i * 0.2) for i in range(10)], found)
  assert v.main_track() == 1 and [t["frames"] for t in v.summary()["tracks"]] == [10, 10, 4, 1]
  # The timeline: the main track, then those seen in a tenth of the frames or more.
  assert video.timeline_tracks(v) == [1, 2, 3, 4]  # 4 panels at most: track 5 left out
  v.sampled = [(i, i * 0.02) for i in range(100)]  # of 100 frames, C's 3 and D's 1 are too few
  assert video.timeline_tracks(v) == [1, 2]
  video.timeline(v, tmp_path / "t.png")
  assert cv2.imread(str(tmp_path / "t.png")).shape[0] > 600  # two panels
  assert video.timeline_tracks(video.Video("w", 5.0, 3, 3, [(0, 0.0)], [])) == []


def test_the_real_detector_follows_the_moving_face(clip, run):
  videos, _ = video.predict_videos(run, [clip], fps=5, progress_stream=None)
  main = videos[0].main_faces()
  assert len(main) >= 8, main
  xs = [main[i].box.x for i in sorted(main)]
  assert xs == sorted(xs) and xs[-1] - xs[0] > 60  # the face moved 6 px a frame
  for i, f in main.items():
    overlap = min(f.box.x + f.box.w, 20 + 6 * i + FACE_SIDE) - max(f.box.x, 20 + 6 * i)
    assert overlap > FACE_SIDE / 2, (i, f.box)


def test_outputs_csv_timeline_summary_and_annotated_video(tmp_path, clip, run):
  (tmp_path / "other").mkdir()
  other = _write(tmp_path / "other" / "clip.avi", _frames(np.zeros((48, 48, 1), np.uint8), n=6))
  videos, problems = video.predict_videos(run, [clip, other],
                                          FakeDetector([faces.Box(20, 40, 144, 144)]), fps=5,
                                          progress_stream=None)
  summary = video.write_outputs(videos, problems, tmp_path / "out", 5, with_annotations=True)
  out = tmp_path / "out"
  assert [s["csv"] for s in summary["videos"]] == ["clip.csv", "clip_1.csv"]  # same stems
  rows = list(csv.DictReader(open(out / "clip.csv")))
  assert len(rows) == 10 and list(rows[0]) == list(video.CSV_COLUMNS)
  assert [int(r["frame"]) for r in rows] == list(range(0, 20, 2))
  assert [float(r["time_s"]) for r in rows] == pytest.approx([i / 10 for i in range(0, 20, 2)])
  assert rows[3]["emotion"] == CLASSES[int(np.argmax([float(rows[3][c]) for c in CLASSES]))]
  assert cv2.imread(str(out / "clip_timeline.png")).shape[1] > 500
  assert json.loads((out / "summary.json").read_text()) == summary
  annotated = _decoded(out / "clip_annotated.mp4")
  assert len(annotated) == 10 and annotated[0].shape == (240, 420, 3)
  capture = cv2.VideoCapture(str(out / "clip_annotated.mp4"))
  assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)
  # The label's band (yellow, (255, 220, 0) in RGB, with black text) sits on the box's top.
  b, g, r = annotated[0][25:38, 20:60].reshape(-1, 3).mean(0)
  assert r > 150 and g > 120 and b < 60, (b, g, r)
  b, g, r = annotated[0][200:230, 300:400].reshape(-1, 3).mean(0)  # background: grey 70
  assert abs(r - 70) < 10 and abs(g - 70) < 10 and abs(b - 70) < 10, (b, g, r)
  assert not list(out.glob(".*")), "temporary files left"
  table = video.to_table(summary)
  assert (f"{clip}: 2.0 s, 10 frames sampled of 20, a face in 10, 1 face track; the main one "
          "(in 10 frames): ") in table
  assert table.endswith("13 faces in 2 videos; 0 problems (TTA ?).\n"), table


def test_damaged_and_odd_files_are_reported_and_the_rest_runs(tmp_path, clip, run):
  (tmp_path / "notes.mp4").write_text("not a video")
  (tmp_path / "empty.mov").write_bytes(b"")
  cv2.imwrite(str(tmp_path / "photo.jpg"), _frames(np.zeros((48, 48, 1), np.uint8), n=1)[0])
  data = clip.read_bytes()
  (tmp_path / "cut.avi").write_bytes(data[:len(data) // 2])
  (tmp_path / "nothing").mkdir()
  (tmp_path / "nothing" / "readme.txt").write_text("x")
  videos, problems = video.predict_videos(
      run, [clip, tmp_path / "notes.mp4", tmp_path / "empty.mov", tmp_path / "photo.jpg",
            tmp_path / "cut.avi",
            tmp_path / "missing.mp4", tmp_path / "nothing"],
      FakeDetector([faces.Box(20, 40, 144, 144)]), fps=0, progress_stream=None)
  why = {p.file.rsplit("/", 1)[-1]: p.problem for p in problems}
  assert why["notes.mp4"].startswith("not a video OpenCV can read")
  assert why["empty.mov"] == "unreadable (empty file)"
  assert why["missing.mp4"] == "does not exist"
  assert why["photo.jpg"] == "an image, not a video: for photos, python -m fer.predict"
  assert why["nothing"].startswith("no video in this folder")
  assert [v.file.rsplit("/", 1)[-1] for v in videos] == ["clip.avi", "cut.avi"]
  cut = videos[1]
  assert 0 < cut.frames_read < 20 and cut.frames_announced == 20
  assert f"read {cut.frames_read} of the 20 frames" in cut.note
  assert len(cut.faces) == cut.frames_read  # every frame sampled, one face each


def test_cli(tmp_path, clip, run):
  workdir = run.checkpoint.path.parents[2]
  proc = trained_run.run_module("fer.video", f"--workdir={workdir}", "--fps=5", "--annotate",
                                f"--out={tmp_path / 'out'}", clip, tmp_path / "missing.mp4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["videos"][0]["frames_with_face"] >= 8
  assert summary["videos"][0]["main_track_frames"] >= 8  # one face, one track
  assert (tmp_path / "out" / "clip_annotated.mp4").is_file()
  assert "1 problem (" in proc.stdout and "missing.mp4: does not exist" in proc.stdout
  assert "Model: " in proc.stderr and "moov" not in proc.stderr
  flat = _write(tmp_path / "flat.avi", [np.full((120, 160, 3), 90, np.uint8)] * 4)
  none = trained_run.run_module("fer.video", f"--workdir={workdir}",
                                f"--out={tmp_path / 'out2'}", flat)
  assert none.returncode == 1 and "no face found in the videos" in none.stderr
  inside = trained_run.run_module("fer.video", f"--workdir={workdir}",
                                  f"--out={tmp_path / 'out3'}", tmp_path)
  assert inside.returncode == 1 and "lies inside the input folder" in inside.stderr
  bad = trained_run.run_module("fer.video", f"--workdir={tmp_path}", f"--out={tmp_path}", clip)
  assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
