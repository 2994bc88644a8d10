"""VGG16: the 13-layer conv base with the source weights' layer names, and a small dense head.

Used as a pure function: `model.apply(variables, images, train=False)`. Input is uint8 or float
images [N, H, W, 1] (grey, repeated to three channels) or [N, H, W, 3] (taken as RGB) in 0..255.
Inside the model they are resized to `input_size` and preprocessed the way the pretrained weights
expect (`preprocess`):

  keras: RGB -> BGR, ImageNet mean subtracted, 0..255 scale (keras.applications.vgg16, "caffe").
  torch: RGB in [0, 1], minus the ImageNet mean, divided by its std (torchvision).

Output: float32 logits [N, num_classes].

Parameter tree: `block1_conv1` ... `block5_conv3` (each `kernel` HWIO [3, 3, in, out] and `bias`),
exactly the layer names of the Keras weights file, then `head/...` (dense layers and `logits`).
Freezing the conv base is the regex `^block`; the head is initialised fresh (merge_params's
`reset_regex='^head'`).

For the cached-features experiment the base and head run separately:

  feats = model.apply(variables, images, method=VGG16.features)   # [N, h, w, 512]
  logits = head_of(model).apply({"params": params["head"]}, feats)

`features` returns the block5 max-pool output, the output of Keras's `VGG16(include_top=False)`:
[N, 1, 1, 512] at 48 pixels, [N, 3, 3, 512] at 96, [N, 7, 7, 512] at 224.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fer.datasets.fer2013 import NUM_CLASSES

# Output channels of the conv layers, one tuple per block; a 2x2 max-pool ends each block.
BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# `block{b}_conv{i}` in order, the layer names of the Keras weights file.
CONV_NAMES = tuple(f"block{b + 1}_conv{i + 1}"
                   for b, block in enumerate(BLOCKS) for i in range(len(block)))
# Parameters of the conv base: 14,714,688, the count of Keras `VGG16(include_top=False)`.
NUM_BASE_PARAMS = 14_714_688

# keras.applications.imagenet_utils.preprocess_input(mode="caffe"): per-channel mean of the
# ImageNet training images in BGR order, on the 0..255 scale.
KERAS_BGR_MEAN = (103.939, 116.779, 123.68)
# torchvision ImageNet normalisation, RGB order, on the [0, 1] scale.
TORCH_RGB_MEAN = (0.485, 0.456, 0.406)
TORCH_RGB_STD = (0.229, 0.224, 0.225)
PREPROCESS_MODES = ("keras", "torch")
MIN_INPUT_SIZE = 32  # five 2x2 max-pools


def conv_shapes() -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
  """{layer name: (kernel shape HWIO, bias shape)} of the conv base, in order."""
  shapes, cin = {}, 3
  names = iter(CONV_NAMES)
  for block in BLOCKS:
    for cout in block:
      shapes[next(names)] = ((3, 3, cin, cout), (cout,))
      cin = cout
  return shapes


def preprocess(images: jax.Array, mode: str, input_size: int) -> jax.Array:
  """[N, H, W, 1 or 3] in 0..255 -> float32 [N, input_size, input_size, 3] as the weights expect."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected images [N, H, W, 1 or 3], got shape {images.shape}")
  if input_size < MIN_INPUT_SIZE:
    raise ValueError(f"model.input_size={input_size}: VGG16 needs at least {MIN_INPUT_SIZE}")
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)  # grey -> RGB
  n, h, w, c = x.shape
  if (h, w) != (input_size, input_size):
    # Bilinear; jax antialiases when shrinking.
    x = jax.image.resize(x, (n, input_size, input_size, c), method="bilinear")
  if mode == "keras":
    x = x[..., ::-1] - jnp.asarray(KERAS_BGR_MEAN, jnp.float32)
  elif mode == "torch":
    x = (x / 255.0 - jnp.asarray(TORCH_RGB_MEAN, jnp.float32)) / jnp.asarray(TORCH_RGB_STD,
                                                                              jnp.float32)
  else:
    raise ValueError(f"model.preprocess={mode!r}: expected one of {PREPROCESS_MODES}")
  return x


class Head(nn.Module):
  """Pooling of the block5 features, dense layers with ReLU and dropout, then the logits."""
  features: Sequence[int] = (256,)
  dropout: float = 0.5
  pool: str = "flatten"  # flatten | avg | max (global pooling over the spatial axes)
  num_classes: int = NUM_CLASSES
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    if self.pool == "flatten":
      x = x.reshape((x.shape[0], -1))
    elif self.pool == "avg":
      x = x.mean(axis=(1, 2))
    elif self.pool == "max":
      x = x.max(axis=(1, 2))
    else:
      raise ValueError(f"model.head_pool={self.pool!r}: expected flatten, avg or max")
    for i, features in enumerate(self.features):
      x = nn.Dense(features, dtype=self.dtype, name=f"dense{i + 1}")(x)
      x = nn.relu(x)
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)
    return x.astype(jnp.float32)


class VGG16(nn.Module):
  """VGG16 conv base (Keras layer names) plus `Head`; see the module docstring."""
  head_features: Sequence[int] = (256,)
  head_dropout: float = 0.5
  head_pool: str = "flatten"  # flatten | avg | max
  input_size: int = 48  # images are resized to input_size x input_size first
  preprocess: str = "keras"  # keras | torch: must match the pretrained weights' source
  num_classes: int = NUM_CLASSES
  dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

  @nn.compact
  def __call__(self, x, train: bool = False, features_only: bool = False):
    x = preprocess(x, self.preprocess, self.input_size).astype(self.dtype)
    names = iter(CONV_NAMES)
    for block in BLOCKS:
      for features in block:
        x = nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype, name=next(names))(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    if features_only:
      return x
    return head_of(self, name="head")(x, train=train)

  def features(self, x):
    """The conv base only: block5 max-pool output [N, h, w, 512] in the compute dtype."""
    return self(x, features_only=True)


def head_of(model: VGG16, name: str | None = None) -> Head:
  """The model's head as its own module: `head_of(model).apply({"params": params["head"]}, feats)`
  runs the head on cached `VGG16.features` outputs."""
  return Head(model.head_features, model.head_dropout, model.head_pool, model.num_classes,
              model.dtype, name=name)
