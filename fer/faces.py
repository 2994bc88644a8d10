"""Faces in photos: read an image, find frontal faces, crop each into a FER2013-like face.

Preprocessing is the training data's: FER2013 faces are 8-bit grey, 48x48, converted from other
modes with PIL's "L" (ITU-R 601 luma) when the data set is built (fer/datasets/fer2013.py), and
scaled to [0, 1] inside the model. A photo is converted the same way; each face becomes the
square around the detector's box (its side max(w, h) plus `margin` of it on each side, centred
on the box, edge-padded where it leaves the photo), resized to 48x48 (area averaging when
shrinking, bilinear when enlarging), uint8 [48, 48, 1].

Faces are found with OpenCV's bundled frontal-face Haar cascade, loaded from the opencv-python
package (cv2.data.haarcascades). Photos larger than `max_side` are searched at that size and the
boxes scaled back. Boxes are (x, y, w, h) in pixels of the upright image (EXIF orientation
applied).
"""

import os
from typing import NamedTuple
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps

# PIL plugins a photo may be read with; never others (EPS would run ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
FORMAT_WORDS = "JPEG, PNG, WebP, BMP or TIFF"  # IMAGE_FORMATS, for messages
FACE_SIZE = 48
CASCADE_FILE = "haarcascade_frontalface_default.xml"
SMALL_IMAGE_SIDE = 96  # no face found in an image this small: it may be a cropped face already


class ImageError(ValueError):
  """A file that is not a readable image of IMAGE_FORMATS; the message says why."""


class Box(NamedTuple):
  x: int
  y: int
  w: int
  h: int


def read_image(path: str | os.PathLike) -> Image.Image:
  """The decoded image, upright (EXIF orientation applied). Raises ImageError.

  Photos up to twice PIL's Image.MAX_IMAGE_PIXELS (179 megapixels by default: 108 MP phone
  photos included) are read without PIL's DecompressionBombWarning; larger ones are refused, as
  PIL does, with a message that says so.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(path, formats=IMAGE_FORMATS) as img:
        img.load()
        return ImageOps.exif_transpose(img)
  except Image.UnidentifiedImageError:
    raise ImageError(_unidentified(path)) from None
  except Image.DecompressionBombError:
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    raise ImageError(f"too large: over {limit / 1e6:.0f} megapixels, which PIL refuses to decode "
                     "(a guard against decompression bombs); downscale it") from None
  except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data, a folder, ...
    raise ImageError(f"unreadable ({type(e).__name__}: {e})") from None


_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"II*\x00": "TIFF",
               b"MM\x00*": "TIFF"}  # WebP: _unidentified looks further in; BMP: PIL says


def _unidentified(path) -> str:
  """Why PIL could not open `path`: empty, a damaged image of IMAGE_FORMATS, or another kind
  of file."""
  try:
    with open(path, "rb") as f:
      head = f.read(12)
  except OSError as e:
    return f"unreadable ({type(e).__name__}: {e})"
  if not head:
    return "unreadable (empty file)"
  if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
    return "unreadable (a damaged or truncated WebP)"
  for signature, name in _SIGNATURES.items():
    if head.startswith(signature):
      return f"unreadable (a damaged or truncated {name})"
  return f"not a {FORMAT_WORDS} image"


WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # PIL modes of more than 8 bits per pixel


def to_grey(img: Image.Image) -> np.ndarray:
  """uint8 [H, W]: PIL's "L" conversion (ITU-R 601 luma), as the training data's build does.

  16-bit and float images (PNG "I;16", "I", "F") are scaled to 8 bits first (PIL's "L" would
  clip them).
  """
  if img.mode in WIDE_MODES:
    a = np.asarray(img, np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
    return np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and
                                                        "transparency" in img.info):
    img = img.convert("RGBA")
    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(background, img)  # transparent parts as white, not black
  return np.asarray(img.convert("L"), np.uint8)


def crop_face(grey: np.ndarray, box: Box, margin: float = 0.1,
              size: int = FACE_SIZE) -> np.ndarray:
  """uint8 [size, size, 1]: the square around `box` (side max(w, h) * (1 + 2 margin)), edge-
  padded outside the image, resized to `size`."""
  import cv2  # pylint: disable=import-outside-toplevel
  height, width = grey.shape
  x, y, w, h = box
  side = max(1, int(round(max(w, h) * (1 + 2 * margin))))
  x0 = int(round(x + w / 2 - side / 2))
  y0 = int(round(y + h / 2 - side / 2))
  x1, y1 = x0 + side, y0 + side
  crop = grey[max(y0, 0):max(min(y1, height), 0), max(x0, 0):max(min(x1, width), 0)]
  if crop.size == 0:
    raise ValueError(f"box {tuple(box)} lies outside the {width}x{height} image")
  pads = ((max(0, -y0), max(0, y1 - height)), (max(0, -x0), max(0, x1 - width)))
  if any(p for pair in pads for p in pair):
    crop = np.pad(crop, pads, mode="edge")
  if side != size:
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    crop = cv2.resize(crop, (size, size), interpolation=interpolation)
  return np.ascontiguousarray(crop, np.uint8)[..., None]


def no_face_problem(grey: np.ndarray, skip_detection: str = "pass --no_detect") -> str:
  """What to report when the detector finds no face in `grey`: in a small image, the hint that
  it may be a cropped face already (FER2013's are 48x48), for which detection is to be skipped
  (how, in the words of the command: `skip_detection`)."""
  height, width = grey.shape[:2]
  if max(height, width) <= SMALL_IMAGE_SIDE:
    return (f"no face found (a {width}x{height} image: if it is a cropped face already, "
            f"{skip_detection})")
  return "no face found"


def whole_image_box(grey: np.ndarray) -> Box:
  """The box of an image that is already a cropped face."""
  return Box(0, 0, grey.shape[1], grey.shape[0])


class FaceDetector:
  """OpenCV's frontal-face Haar cascade: detect(grey uint8 [H, W]) -> [Box], left to right."""

  def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24,
               max_side: int = 1280):
    import cv2  # pylint: disable=import-outside-toplevel
    self._cv2 = cv2
    folder = getattr(getattr(cv2, "data", None), "haarcascades", "")
    path = os.path.join(folder, CASCADE_FILE)
    if not hasattr(cv2, "CascadeClassifier") or not os.path.isfile(path):
      raise RuntimeError(
          f"OpenCV {cv2.__version__} ships no {CASCADE_FILE} (looked in cv2.data.haarcascades: "
          f"{folder or 'missing'}). OpenCV 5 wheels dropped the Haar cascades: install the "
          "version in requirements.txt (pip install -r requirements.txt), or pass --no_detect "
          "for images that are already cropped faces.")
    self._cascade = cv2.CascadeClassifier(path)
    if self._cascade.empty():
      raise RuntimeError(f"OpenCV could not load the face detector {path}")
    self.scale_factor = scale_factor
    self.min_neighbors = min_neighbors
    self.min_size = min_size
    self.max_side = max_side

  def detect(self, grey: np.ndarray) -> list[Box]:
    cv2 = self._cv2
    scale = min(1.0, self.max_side / max(grey.shape))
    small = grey if scale == 1.0 else cv2.resize(
        grey, (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale))),
        interpolation=cv2.INTER_AREA)
    found = self._cascade.detectMultiScale(
        small, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
        minSize=(self.min_size, self.min_size))
    boxes = [Box(*(int(round(v / scale)) for v in b)) for b in found]
    return sorted(boxes)
