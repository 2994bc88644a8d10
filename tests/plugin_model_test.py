"""Your own flax module as the model (model.name = "package.module:ClassName", model.kwargs):
configs/mini_xception.py, and the errors a wrong name or argument gets."""

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from configs import mini_xception
from fer import runs
from fer import train
from fer.models import build_model


def _model_config(name, **kwargs):
  c = common.base().model
  c.name = name
  c.kwargs = ml_collections.ConfigDict(kwargs)
  return c


def test_mini_xception_has_the_papers_parameter_count():
  model = build_model(mini_xception.get_config().model)
  assert isinstance(model, mini_xception.MiniXception) and model.widths == (16, 32, 64, 128)
  faces = jax.ShapeDtypeStruct((1, 48, 48, 1), jnp.uint8)
  variables = jax.eval_shape(model.init, jax.random.key(0), faces)  # shapes only
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # pylint: disable=unnecessary-lambda-assignment
  # Arriaga et al. report 58,423: Keras counts batch norm's two running statistics too.
  assert count(variables["params"]) + count(variables["batch_stats"]) == 58_423
  crops = jax.ShapeDtypeStruct((3, 40, 40, 1), jnp.uint8)  # ten-crop TTA's views
  assert jax.eval_shape(model.apply, variables, crops).shape == (3, 7)


def test_kwargs_and_dtype_reach_the_module():
  c = _model_config("configs.mini_xception:MiniXception", widths=[8, 16], base_width=4)
  c.dtype = "bfloat16"
  model = build_model(c)
  assert model.widths == (8, 16) and model.base_width == 4 and model.dtype == jnp.bfloat16


@pytest.mark.parametrize("name, kwargs, expected", [
    ("no_such_package.models:Net", {}, "cannot import 'no_such_package.models'"),
    ("configs.mini_xception:Nope", {}, "has no flax.linen Module named 'Nope' (found NoneType)"),
    ("configs.mini_xception:get_config", {}, "named 'get_config' (found function)"),
    ("configs.mini_xception:MiniXception", {"widht": 3}, "unexpected keyword argument 'widht'"),
])
def test_a_wrong_name_or_argument_is_a_config_error_naming_it(name, kwargs, expected):
  config = mini_xception.get_config("runlocal")
  config.model.name = name
  config.model.kwargs = ml_collections.ConfigDict(kwargs)
  with pytest.raises(train.ConfigError, match="Invalid config") as e:
    train.validate_config(config)
  assert f"model.name={name!r}" in str(e.value) and expected in str(e.value), str(e.value)
  assert "no_such_package" not in sys.modules


def test_mini_xception_learns_synthetic_faces_and_loads_as_a_run(tmp_path):
  c = mini_xception.get_config("runlocal")
  c.input.synthetic_train_size = 1400
  c.train.num_epochs = 4
  c.train.steps_per_dispatch = 1  # a smaller program to compile
  c.optim.learning_rate = 3e-3
  c.augment.rotate_degrees = c.augment.shift_fraction = c.augment.zoom_fraction = 0.0
  results = train.train_and_evaluate(c, str(tmp_path))
  assert results["val/accuracy"] > 0.35, results["val/accuracy"]  # 7 classes: chance is 0.14
  run = runs.load(str(tmp_path))  # what fer.predict, fer.explain, fer.ensemble, ... build on
  assert isinstance(run.model, mini_xception.MiniXception) and run.model.widths == (8, 16)
  assert run.checkpoint.epoch == results["best_epoch"]
  val = np.load(tmp_path / "val_probs.npy")
  assert val.shape[1] == 7 and np.allclose(val.sum(1), 1, atol=1e-5)
