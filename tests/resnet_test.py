"""fer/models/resnet.py and configs/strong_resnet.py: the layout, any input size, learning."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import strong_resnet
from fer import train
from fer.models import build_model


def _init(model, size=48):
  return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                    jnp.zeros((2, size, size, 1)), train=False)


def test_the_strong_resnet_is_resnet18_shaped_and_projects_only_where_the_width_changes():
  model = build_model(strong_resnet.get_config().model)
  params = jax.eval_shape(lambda: _init(model))["params"]
  convs = [k for block in params.values() for k in block if k.startswith("conv")]
  assert len(convs) == 16  # 4 stages x 2 blocks x 2, plus the stem and the head outside
  assert [b for b, p in params.items() if "proj" in p] == [
      "stage2_block1", "stage3_block1", "stage4_block1"]
  assert params["head"]["kernel"].shape == (512, 7)
  assert sum(x.size for x in jax.tree.leaves(params)) == 11_171_271


@pytest.mark.parametrize("size", [48, 44])  # a face, and a ten-crop view (global pooling)
def test_maps_images_of_any_size_to_seven_logits(size):
  c = strong_resnet.get_config("runlocal")
  model = build_model(c.model)
  variables = _init(model, size)
  images = np.random.default_rng(0).integers(0, 256, (3, size, size, 1), dtype=np.uint8)
  logits = model.apply(variables, images, train=False)
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_a_resnet_without_blocks_is_a_config_error_naming_the_key():
  c = strong_resnet.get_config("runlocal")
  c.model.blocks_per_stage = 0
  with pytest.raises(ValueError, match="model.blocks_per_stage=0"):
    train.validate_config(c)


def test_strong_resnet_learns_synthetic_faces(tmp_path):
  c = strong_resnet.get_config("runlocal")
  c.input.synthetic_train_size = 1400
  c.train.num_epochs = 4
  # The architecture is under test, not the augmentation: strong's rotation, shift, zoom and
  # erasing slow 4 epochs of synthetic faces down to ~45%; flips stay.
  c.augment.rotate_degrees = c.augment.shift_fraction = c.augment.zoom_fraction = 0.0
  c.augment.erase_prob = 0.0
  c.eval.tta = "flip"
  c.train.steps_per_dispatch = 1  # a smaller program to compile (first epoch 11 s against 24 s)
  results = train.train_and_evaluate(c, str(tmp_path))
  assert results["val/accuracy"] > 0.8, results["val/accuracy"]
  assert results["test/accuracy"] > 0.8, results["test/accuracy"]
  history = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert history[-1]["train/loss"] < history[0]["train/loss"] * 0.7
