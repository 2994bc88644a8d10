r"""The reference network in Keras/TensorFlow (oneDNN), for the side-by-side CPU speed table.

Runs in a separate environment that has TensorFlow (never a dependency of fer), e.g.
  python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 keras==3.15.1
  /tmp/tfenv/bin/python experiments/keras_reference.py --data=/tmp/train.npz --epochs=2
experiments/benchmark_train.py calls it with --keras_python and the same training images.

Prints one JSON line: images/s over whole epochs (the first epoch, which compiles, excluded)
for in-memory model.fit, without and with augmentation layers (flip, rotation, shift, zoom,
like the original study's ImageDataGenerator).
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # pylint: disable=g-import-not-at-top
from keras import layers
import numpy as np


def build(augment: bool):
  inputs = keras.Input((48, 48, 1))
  x = layers.Rescaling(1 / 255.0)(inputs)
  if augment:
    x = layers.RandomFlip("horizontal")(x)
    x = layers.RandomRotation(10 / 360, fill_mode="nearest")(x)
    x = layers.RandomTranslation(0.1, 0.1, fill_mode="nearest")(x)
    x = layers.RandomZoom(0.1, fill_mode="nearest")(x)
  for f in (32, 64, 128, 256):
    x = layers.Conv2D(f, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
  x = layers.Flatten()(x)
  for u in (512, 256, 128):
    x = layers.Dense(u, activation="relu")(x)
  outputs = layers.Dense(7, activation="softmax")(x)
  model = keras.Model(inputs, outputs)
  model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                metrics=["accuracy"])
  return model


class EpochTimer(keras.callbacks.Callback):

  def on_train_begin(self, logs=None):
    self.times = []

  def on_epoch_begin(self, epoch, logs=None):
    self._t = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.times.append(time.perf_counter() - self._t)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data", required=True, help="npz with image uint8 [N,48,48,1], label [N]")
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--batch_size", type=int, default=64)
  args = p.parse_args()
  d = np.load(args.data)
  x, y = d["image"].astype(np.float32), d["label"].astype(np.int32)
  out = {"keras": keras.__version__, "backend": keras.backend.backend()}
  for augment in (False, True):
    model = build(augment)
    timer = EpochTimer()
    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=0,
              callbacks=[timer])
    steady = timer.times[1:] or timer.times
    n = (len(x) // args.batch_size) * args.batch_size
    out["augment" if augment else "plain"] = n / (sum(steady) / len(steady))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
