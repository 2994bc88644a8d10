"""Procedurally drawn 48x48 grey faces whose brows and mouth depend on the class.

A small, learnable stand-in for FER2013 used by the tests and by `runlocal` smoke runs:
a CNN separates the seven classes within seconds on a CPU, so a training test can check
that the model really learns. Nothing here is FER2013 data.
"""

import numpy as np

from fer.datasets.fer2013 import CLASSES

IMAGE_SIZE = 48

# Per class (in CLASSES order): brow tilt (+ = inner ends down, angry), brow height offset,
# mouth curvature (+ = smile), mouth openness (0 = a line).
_FACE_PARAMS = {
    "angry": (0.35, 0.0, 0.0, 0.0),
    "disgust": (0.35, 0.0, -0.5, 0.0),
    "fear": (-0.3, -3.0, 0.0, 2.0),
    "happy": (0.0, 0.0, 1.0, 0.0),
    "sad": (-0.35, 0.0, -1.0, 0.0),
    "surprise": (0.0, -4.0, 0.0, 4.5),
    "neutral": (0.0, 0.0, 0.0, 0.0),
}


def make_faces(num_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 48, 48, 1], labels int32 [N]), balanced over the classes."""
  rng = np.random.default_rng(seed)
  labels = (np.arange(num_images) % len(CLASSES)).astype(np.int32)
  rng.shuffle(labels)
  params = np.array([_FACE_PARAMS[c] for c in CLASSES], np.float32)[labels]
  tilt, brow_dy, curve, opening = params.T
  n = num_images
  cx = 24 + rng.uniform(-2.5, 2.5, n)
  cy = 25 + rng.uniform(-2.5, 2.5, n)
  scale = rng.uniform(0.9, 1.1, n)
  yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
  # Coordinates relative to each face centre, in units of the nominal face.
  x = (xx[None] - cx[:, None, None]) / scale[:, None, None]
  y = (yy[None] - cy[:, None, None]) / scale[:, None, None]
  col = lambda v: v[:, None, None]

  skin = rng.uniform(130, 190, n)
  background = rng.uniform(20, 90, n)
  img = np.broadcast_to(col(background), (n, IMAGE_SIZE, IMAGE_SIZE)).copy()
  face = (x / 17) ** 2 + (y / 21) ** 2 <= 1
  img = np.where(face, col(skin), img)
  dark = col(skin * 0.25)

  for side in (-1, 1):
    eye = ((x - side * 7) / 2.6) ** 2 + ((y + 4) / 2.0) ** 2 <= 1
    img = np.where(eye, dark, img)
    # Brow: a thick segment above the eye; tilt lowers the inner end (towards x = 0).
    u = x - side * 7  # along the brow, -4..4
    brow_y = -9.5 + col(brow_dy) + col(tilt) * (-side * u)
    brow = (np.abs(u) <= 4.5) & (np.abs(y - brow_y) <= 1.0)
    img = np.where(brow, dark, img)

  # Mouth: a parabola y = 9 - curve * (x/6)^2 * 3 with optional opening (an ellipse).
  mouth_y = 10 - col(curve) * 3 * ((x / 6) ** 2 - 0.5)
  line = (np.abs(x) <= 6.5) & (np.abs(y - mouth_y) <= 1.0)
  open_mouth = (x / 4.0) ** 2 + ((y - 10) / np.maximum(col(opening), 1e-3)) ** 2 <= 1
  mouth = np.where(col(opening) > 0, open_mouth, line)
  img = np.where(mouth, dark, img)

  img = img * rng.uniform(0.8, 1.2, n)[:, None, None] + rng.normal(0, 8, img.shape)
  flip = rng.random(n) < 0.5
  img[flip] = img[flip, :, ::-1]
  images = np.clip(np.round(img), 0, 255).astype(np.uint8)[..., None]
  return images, labels
