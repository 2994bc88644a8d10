r"""Emotions over time in videos, with a trained run.

  python -m fer.video --workdir=runs/strong_half --out=runs/clip clip.mp4
  python -m fer.video --workdir=runs/strong_half --fps=2 --annotate --out=runs/clips videos/

Each video (any container and codec OpenCV's FFmpeg reads: mp4, mov, avi, mkv, webm, ...;
folders are searched recursively for the suffixes in VIDEO_SUFFIXES) is sampled at `--fps`
frames per second of video time (0: every frame). The faces of each sampled frame are found,
cropped and classified as fer.predict does (fer/faces.py; the run's eval.tta unless `--tta`;
`--calibrate`), and followed from frame to frame: a face continues the track of the face it
overlaps most in the frames of the last `--track_gap_s` seconds (track_faces). The "main
track" is the one seen in the most sampled frames. `--out` gets, per video:

  <name>.csv             one row per face per sampled frame: frame, time_s, face, track, box,
                         emotion, probability and the 7 probabilities
  <name>_timeline.png    the main track's probabilities over time (gaps where it was not seen),
                         and those of the other tracks seen in a tenth of the frames or more
  <name>_annotated.mp4   with --annotate: the sampled frames with boxes and labels, at --fps

and summary.json: per video its frame rate, frames read and sampled, frames with a face, and
per track (the main one first in its own keys) the frames it was seen in, the share of them
each emotion was on top, and its mean probabilities.
A table of the same goes to stdout, progress to stderr. Files that are no readable video are
reported one by one and the rest still run; a damaged or truncated video is used as far as it
can be read, and says so. Exit status 1 when no face was classified, 2 when the run or
checkpoint cannot be used, else 0.
"""

import os

from fer import xla_flags

xla_flags.configure_cpu_defaults()  # before jax starts its backend; a no-op off CPU
# FFmpeg's own log lines ("moov atom not found") would repeat what the problems list says.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

# pylint: disable=g-import-not-at-top,wrong-import-position
import csv
import dataclasses
import functools
import io
import pathlib
import sys
import time
from typing import Iterator, Sequence, TextIO

from absl import app
from absl import flags
from absl import logging
import cv2
import numpy as np

from fer import faces as faces_lib
from fer import fileio
from fer import plots
from fer import predict
from fer import runs
from fer.datasets.fer2013 import CLASSES

FLAGS = flags.FLAGS

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv",
                  ".flv", ".3gp", ".ts")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def define_flags():
  """The flags, defined only when run as a command (the CLIs share flag names)."""
  predict.define_model_flags()
  flags.DEFINE_string("out", None, "Folder for the CSVs, timelines, annotated videos and "
                      "summary.json.")
  flags.DEFINE_float("fps", 5.0, "Frames sampled per second of video (0: every frame).")
  flags.DEFINE_bool("annotate", False, "Also write each video's sampled frames with boxes and "
                    "labels (<name>_annotated.mp4).")
  flags.DEFINE_float("track_gap_s", 1.0, "A face unseen for longer than this many seconds "
                     "starts a new track when it is seen again.")


class VideoError(ValueError):
  """A file OpenCV cannot read as a video; the message says why."""


@dataclasses.dataclass
class Face:
  frame: int  # 0-based index of the frame in the video
  time: float  # seconds from the start
  face: int  # 1-based, left to right within its frame
  box: faces_lib.Box
  probs: np.ndarray  # [7], in CLASSES order
  track: int = 0  # 1-based: the same person across frames (track_faces)

  @property
  def emotion(self) -> str:
    return CLASSES[int(np.argmax(self.probs))]


def _iou(a: faces_lib.Box, b: faces_lib.Box) -> float:
  w = min(a.x + a.w, b.x + b.w) - max(a.x, b.x)
  h = min(a.y + a.h, b.y + b.h) - max(a.y, b.y)
  inter = max(w, 0) * max(h, 0)
  return inter / (a.w * a.h + b.w * b.h - inter) if inter else 0.0


def track_faces(found: Sequence[Face], max_gap_s: float = 1.0, min_iou: float = 0.3):
  """Sets each face's `track`: frame by frame, each face continues the track whose last box it
  overlaps most (intersection over union >= min_iou; pairs taken greedily, best first) among
  the tracks seen in the last max_gap_s seconds; the others start new tracks."""
  by_frame: dict[int, list[Face]] = {}
  for f in found:
    by_frame.setdefault(f.frame, []).append(f)
  active: dict[int, Face] = {}  # track -> its latest face, for the tracks seen lately
  tracks = 0
  for frame in sorted(by_frame):
    here = by_frame[frame]
    t = here[0].time
    active = {k: g for k, g in active.items() if t - g.time <= max_gap_s + 1e-9}
    pairs = sorted(((_iou(f.box, g.box), i, k) for i, f in enumerate(here)
                    for k, g in active.items()), reverse=True)
    taken_faces, taken_tracks = set(), set()
    for iou, i, k in pairs:
      if iou >= min_iou and i not in taken_faces and k not in taken_tracks:
        here[i].track = k
        taken_faces.add(i)
        taken_tracks.add(k)
    for i, f in enumerate(here):
      if i not in taken_faces:
        tracks += 1
        f.track = tracks
      active[f.track] = f


@dataclasses.dataclass
class Video:
  file: str
  fps: float  # the video's own frame rate (0: its container does not say)
  frames_read: int
  frames_announced: int  # the frame count its container announces (0: none)
  sampled: list[tuple[int, float]]  # (frame, time) of each sampled frame
  faces: list[Face]  # tracked (track_faces)
  note: str = ""  # why fewer frames were read than announced

  @functools.cached_property
  def tracks(self) -> dict[int, list[Face]]:
    """The faces of each track, by track (computed once: faces are tracked when given)."""
    out: dict[int, list[Face]] = {}
    for f in self.faces:
      out.setdefault(f.track, []).append(f)
    return dict(sorted(out.items()))

  def main_track(self) -> int:
    """The track seen in the most sampled frames (ties: the larger faces); 0: no face."""
    tracks = self.tracks
    return max(tracks, key=lambda k: (len(tracks[k]), np.mean([f.box.w * f.box.h
                                                                 for f in tracks[k]])),
               default=0)

  def main_faces(self) -> dict[int, Face]:
    """The main track's face in each sampled frame it is seen in, by frame."""
    return {f.frame: f for f in self.tracks.get(self.main_track(), [])}

  def summary(self) -> dict:
    def stats(faces):
      probs = np.array([f.probs for f in faces]).reshape(-1, len(CLASSES))
      top = np.bincount(probs.argmax(-1), minlength=len(CLASSES)) / max(len(faces), 1)
      return {"top_share": {c: float(t) for c, t in zip(CLASSES, top)},
              "mean_probabilities": {c: float(p) for c, p in zip(
                  CLASSES, probs.mean(0) if len(faces) else np.zeros(len(CLASSES)))}}

    main_track = self.main_track()
    main = self.tracks.get(main_track, [])
    return {
        "file": self.file, "fps": self.fps, "frames_read": self.frames_read,
        "frames_announced": self.frames_announced, "frames_sampled": len(self.sampled),
        "frames_with_face": len({f.frame for f in self.faces}), "faces": len(self.faces),
        "duration_s": self.frames_read / self.fps if self.fps else
                      (self.sampled[-1][1] if self.sampled else 0.0),
        "main_track": main_track, "main_track_frames": len(main),
        **{f"main_track_{k}": v for k, v in stats(main).items()},
        "tracks": [{"track": k, "frames": len(fs), "first_s": fs[0].time, "last_s": fs[-1].time,
                    **stats(fs)} for k, fs in self.tracks.items()],
        "note": self.note,
    }


def find_videos(paths: Sequence[str]) -> tuple[list[str], list[predict.Problem]]:
  """Each given file (whatever its name: OpenCV decides), and every file with a
  VIDEO_SUFFIXES suffix under each given folder (recursively, sorted, hidden ones skipped)."""
  return predict.find_files(
      paths, lambda name: pathlib.Path(name).suffix.lower() in VIDEO_SUFFIXES,
      f"no video in this folder or its subfolders (looked for {', '.join(VIDEO_SUFFIXES)})")


class Frames:
  """The frames of a video sampled at `fps` per second of video time (0: all): iterate for
  (frame index, time in s, BGR uint8 [H, W, 3]); afterwards `read` says how many frames were
  decoded. Raises VideoError when the file does not open as a video."""

  def __init__(self, path: str, fps: float):
    if os.path.isdir(path):
      raise VideoError("a folder, not a video")
    if pathlib.Path(path).suffix.lower() in IMAGE_SUFFIXES:  # FFmpeg would take it as 1 frame
      raise VideoError("an image, not a video: for photos, python -m fer.predict")
    self.capture = cv2.VideoCapture(str(path))
    if not self.capture.isOpened():
      raise VideoError(_unreadable(path))
    self.path, self.sample_fps = path, fps
    self.fps = float(self.capture.get(cv2.CAP_PROP_FPS) or 0.0)
    self.fps = self.fps if np.isfinite(self.fps) and 0 < self.fps < 10_000 else 0.0
    self.announced = max(0, int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
    self.read = 0

  def __iter__(self) -> Iterator[tuple[int, float, np.ndarray]]:
    next_time, step = 0.0, 1.0 / self.sample_fps if self.sample_fps > 0 else 0.0
    try:
      while True:
        ok, frame = self.capture.read()
        if not ok or frame is None:
          return
        index = self.read
        self.read += 1
        t = (index / self.fps if self.fps else
             self.capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
        if not step:
          yield index, t, frame
        elif t + 1e-9 >= next_time:
          while next_time <= t + 1e-9:
            next_time += step
          yield index, t, frame
    finally:
      self.capture.release()

  def note(self) -> str:
    if self.announced and self.read < self.announced:
      return (f"read {self.read} of the {self.announced} frames its header announces (damaged "
              f"or truncated?): the {self.read} read are used")
    return ""


def _unreadable(path) -> str:
  size = os.path.getsize(path) if os.path.isfile(path) else -1
  if size == 0:
    return "unreadable (empty file)"
  return ("not a video OpenCV can read (an unknown or damaged container or codec; OpenCV "
          f"{cv2.__version__} reads what its FFmpeg build decodes)")


def grey_frame(bgr: np.ndarray) -> np.ndarray:
  """uint8 [H, W]: ITU-R 601 luma, the weights of PIL's "L" the training data was made with."""
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) if bgr.ndim == 3 else bgr


class Progress:
  """'video k/n, frame i/N, faces, frames/s, ETA' lines on `stream`, every `every_seconds`."""

  def __init__(self, total_videos: int, stream: TextIO | None = sys.stderr,
               every_seconds: float = 2.0):
    self.total, self.stream, self.every = total_videos, stream, every_seconds
    self.last = time.perf_counter()

  def update(self, k: int, frames: Frames, faces: int, started: float):
    now = time.perf_counter()
    if self.stream is None or now - self.last < self.every:
      return
    self.last = now
    rate = frames.read / max(now - started, 1e-9)
    total = f"/{frames.announced}" if frames.announced else ""
    left = frames.announced - frames.read
    eta = f", ETA {int(left / max(rate, 1e-9))} s" if left > 0 else ""
    print(f"  [video {k}/{self.total}] {os.path.basename(frames.path)}: frame "
          f"{frames.read}{total}, {faces} faces, {rate:.0f} frames/s{eta}", file=self.stream,
          flush=True)


def predict_videos(run: runs.Run, paths: Sequence[str], detector=None, fps: float = 5.0,
                   margin: float = 0.1, tta: str | None = None, batch_size: int = 256,
                   temperature: float | None = None,
                   progress_stream: TextIO | None = sys.stderr,
                   progress_every_seconds: float = 2.0,
                   track_gap_s: float = 1.0) -> tuple[list[Video], list[predict.Problem]]:
  """Every face in the sampled frames of the videos in `paths` (files and folders), classified
  with `run`'s model and tracked (track_faces, with max_gap_s=track_gap_s). `detector`
  (detect(grey) -> [Box], left to right) finds the faces; None: fer.faces.FaceDetector()."""
  detector = detector or faces_lib.FaceDetector()
  tta = tta or run.config.eval.get("tta", "none")
  classify = predict.make_classifier(run, tta, batch_size)
  files, problems = find_videos(paths)
  progress = Progress(len(files), progress_stream, progress_every_seconds)
  videos = []
  for k, file in enumerate(files, 1):
    try:
      frames = Frames(file, fps)
    except VideoError as e:
      problems.append(predict.Problem(file, str(e)))
      continue
    crops, where, sampled, started = [], [], [], time.perf_counter()
    for index, t, frame in frames:
      grey = grey_frame(frame)
      sampled.append((index, t))
      for j, box in enumerate(detector.detect(grey), 1):
        crops.append(faces_lib.crop_face(grey, box, margin))
        where.append((index, t, j, box))
      progress.update(k, frames, len(crops), started)
    if not frames.read:
      problems.append(predict.Problem(file, "no frame could be decoded (a damaged video, or a "
                                      "codec this OpenCV build lacks)"))
      continue
    probs = classify(np.stack(crops)) if crops else np.zeros((0, len(CLASSES)))
    if temperature and len(probs):
      from fer import metrics  # pylint: disable=import-outside-toplevel
      probs = metrics.apply_temperature(probs, temperature)
    found = [Face(i, t, j, box, np.asarray(p, np.float64))
             for (i, t, j, box), p in zip(where, probs)]
    track_faces(found, track_gap_s)
    videos.append(Video(file, frames.fps, frames.read, frames.announced, sampled, found,
                        frames.note()))
  return videos, problems


# ----------------------------------------------------------------------------- outputs

CSV_COLUMNS = ("frame", "time_s", "face", "track", "x", "y", "width", "height", "emotion", "probability",
               *CLASSES)


def to_csv(video: Video) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(CSV_COLUMNS)
  for f in video.faces:
    writer.writerow([f.frame, f"{f.time:.3f}", f.face, f.track, *f.box, f.emotion,
                     f"{float(np.max(f.probs)):.6f}", *(f"{p:.6f}" for p in f.probs)])
  return out.getvalue()


TIMELINE_TRACKS = 4  # at most this many tracks get a panel
TIMELINE_MIN_SHARE = 0.1  # besides the main one, those seen in at least this share of frames


def timeline_tracks(video: Video) -> list[int]:
  """The tracks a timeline shows: the main one, then the others seen in TIMELINE_MIN_SHARE of
  the sampled frames or more, the most seen first; at most TIMELINE_TRACKS."""
  main = video.main_track()
  others = sorted(((-len(faces), k) for k, faces in video.tracks.items() if k != main and
                   len(faces) >= TIMELINE_MIN_SHARE * len(video.sampled)))
  return ([main] if main else []) + [k for _, k in others][:TIMELINE_TRACKS - 1]


def timeline(video: Video, path) -> pathlib.Path:
  """The probabilities of timeline_tracks(video) over the sampled frames' times (NaN where a
  track is not seen), a panel each."""
  times = np.array([t for _, t in video.sampled])
  shown, tracks = timeline_tracks(video), video.tracks
  panels = {}
  for k in shown:
    seen = {f.frame: f.probs for f in tracks[k]}
    probs = np.array([seen.get(i, np.full(len(CLASSES), np.nan)) for i, _ in video.sampled])
    panels[f"face track {k}{' (main)' if k == shown[0] and len(shown) > 1 else ''}: seen in "
           f"{len(seen)} of {len(times)} sampled frames"] = probs
  if not panels:
    panels["no face found in the sampled frames"] = np.full((len(times), len(CLASSES)), np.nan)
  return plots.emotion_timeline(times, panels, CLASSES, path,
                                title=os.path.basename(video.file))


def annotate(video: Video, path, fps: float) -> pathlib.Path:
  """The video's sampled frames (read again) with boxes and labels, as mp4 at `fps` (the
  video's own rate when every frame was sampled), written atomically."""
  by_frame: dict[int, list[Face]] = {}
  for f in video.faces:
    by_frame.setdefault(f.frame, []).append(f)
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
  rate = fps if fps > 0 else (video.fps or 25.0)
  writer, wanted = None, {i for i, _ in video.sampled}
  try:
    for index, _, frame in Frames(video.file, 0):
      if index not in wanted:
        continue
      if writer is None:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), rate,
                                 (frame.shape[1], frame.shape[0]))
        if not writer.isOpened():
          raise OSError(f"cannot write {path}: OpenCV's mp4v writer did not open")
      rgb = np.ascontiguousarray(frame[..., ::-1])
      predict.draw_faces(rgb, [(f.box, f"{f.track}: {f.emotion} {float(np.max(f.probs)):.2f}")
                               for f in by_frame.get(index, [])])
      writer.write(np.ascontiguousarray(rgb[..., ::-1]))
    if writer is None:
      raise OSError(f"cannot write {path}: no frame of {video.file} could be read again")
    writer.release()
    writer = None
    os.replace(tmp, path)
  finally:
    if writer is not None:
      writer.release()
    if tmp.exists():
      tmp.unlink()
  return path


def output_names(files: Sequence[str]) -> dict[str, str]:
  """A distinct output name per video: its stem, with _1, _2, ... where stems repeat."""
  names, used = {}, set()
  for file in files:
    stem, k = pathlib.Path(file).stem, 1
    name = stem
    while name.lower() in used:
      name, k = f"{stem}_{k}", k + 1
    used.add(name.lower())
    names[file] = name
  return names


def write_outputs(videos: Sequence[Video], problems: Sequence[predict.Problem], out_dir,
                  fps: float, with_annotations: bool = False, extra: dict | None = None):
  """Per video <name>.csv, <name>_timeline.png (and <name>_annotated.mp4), and summary.json,
  into out_dir. Returns summary.json's content."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  names = output_names([v.file for v in videos])
  summaries, problems = [], list(problems)
  for v in videos:
    name = names[v.file]
    fileio.write_text_atomic(out / f"{name}.csv", to_csv(v))
    timeline(v, out / f"{name}_timeline.png")
    s = v.summary() | {"csv": f"{name}.csv", "timeline": f"{name}_timeline.png"}
    if with_annotations:
      try:
        annotate(v, out / f"{name}_annotated.mp4", fps)
        s["annotated"] = f"{name}_annotated.mp4"
      except OSError as e:
        problems.append(predict.Problem(v.file, f"no annotated video: {e}"))
    summaries.append(s)
  summary = (extra or {}) | {
      "classes": list(CLASSES), "sample_fps": fps, "videos": summaries,
      "problems": [dataclasses.asdict(p) for p in problems]}
  fileio.write_json_atomic(out / "summary.json", summary)
  return summary


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def to_table(summary: dict) -> str:
  lines = []
  for s in summary["videos"]:
    shares = sorted(s["main_track_top_share"].items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{c} {v:.0%}" for c, v in shares if v > 0) or "-"
    lines.append(f"{s['file']}: {s['duration_s']:.1f} s, {s['frames_sampled']} frames sampled "
                 f"of {s['frames_read']}, a face in {s['frames_with_face']}, "
                 f"{_count(len(s['tracks']), 'face track')}; the main one (in "
                 f"{s['main_track_frames']} frames): {top}")
    if s["note"]:
      lines.append(f"  note: {s['note']}")
  for p in summary["problems"]:
    lines.append(f"{p['file']}: {p['problem']}")
  faces = sum(s["faces"] for s in summary["videos"])
  lines.append(f"{_count(faces, 'face')} in {_count(len(summary['videos']), 'video')}; "
               f"{_count(len(summary['problems']), 'problem')} (TTA {summary.get('tta', '?')}).")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI


def main(argv):
  logging.set_verbosity(logging.ERROR)
  paths = argv[1:]
  if not paths:
    raise app.UsageError("Name one or more video files or folders.")
  if not FLAGS.out:
    raise app.UsageError("--out: the folder for the CSVs, timelines and summary.json.")
  out = pathlib.Path(FLAGS.out).resolve()
  for p in paths:
    if pathlib.Path(p).is_dir() and out.is_relative_to(pathlib.Path(p).resolve()):
      raise app.UsageError(f"--out={FLAGS.out} lies inside the input folder {p}: its annotated "
                           "videos would be read as input next time; choose a folder outside it")
  if FLAGS.fps < 0:
    raise app.UsageError(f"--fps={FLAGS.fps}: frames per second to sample, > 0 (0: every frame)")
  try:
    run, detector, tta, temperature = predict.load_model_flags()
  except (runs.RunError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  videos, problems = predict_videos(run, paths, detector, FLAGS.fps, FLAGS.margin, tta,
                                    FLAGS.batch_size, temperature,
                                    track_gap_s=FLAGS.track_gap_s)
  summary = write_outputs(videos, problems, FLAGS.out, FLAGS.fps, FLAGS.annotate, {
      "checkpoint": str(run.checkpoint.path), "tta": tta, "temperature": temperature})
  sys.stdout.write(to_table(summary))
  print(f"Wrote {FLAGS.out}", file=sys.stderr)
  if not any(v.faces for v in videos):
    print("error: no face found in the videos given", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
