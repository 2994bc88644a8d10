"""The three VGG16 experiments (configs/vgg16_{cached,frozen,finetune}.py) with a random base.

Every run uses `pretrained.weights=none` (a seeded init, no weights file) and tiny synthetic
data: a VGG16 forward pass costs ~0.3 GFLOP per 48x48 image, so the runs see a few hundred
images at most and the end-to-end ones train a single epoch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vgg16_cached
from configs import vgg16_finetune
from configs import vgg16_frozen
from fer import features
from fer import input_pipeline
from fer import train
from fer.datasets import synthetic
from fer.models import build_model
from fer.models import vgg16
from train_test import checkpoint_state


def _config(module, **overrides):
  c = module.get_config("runlocal")
  c.pretrained.weights = "none"
  for key, value in overrides.items():
    *group, name = key.split(".")
    (c[group[0]] if group else c)[name] = value
  return c


def _size(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _blocks(params):
  return {k: v for k, v in params.items() if k.startswith("block")}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _stat(path):
  st = path.stat()
  return st.st_ino, st.st_mtime_ns


# Tiny end-to-end runs: 64 train images (2 steps of 32), 16 val, 16 test.
E2E = {"input.synthetic_train_size": 64, "input.eval_batch_size": 16}


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("vgg16_frozen")
  config = _config(vgg16_frozen, **E2E)
  return config, workdir, train.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
  """The runlocal config: features of 224/56/56 synthetic faces, then 12 epochs of the head."""
  workdir = tmp_path_factory.mktemp("vgg16_cached")
  stale = workdir / "features" / ".0123.tmp-999999999-dead"  # left by a killed process
  stale.mkdir(parents=True)
  config = _config(vgg16_cached)
  results = train.train_and_evaluate(config, str(workdir))
  assert not stale.exists()
  return config, workdir, results


def test_cached_head_learns(cached_run):
  config, workdir, results = cached_run
  (directory,) = (workdir / "features").iterdir()
  key, fields = features.cache_key(config, input_pipeline.load_splits(config.input))
  assert directory.name == key and fields["weights"] == "random-init-seed-0"
  assert results["num_params"] == 133_127  # the head only
  # Chance is 1/7; a head on random-base features reaches ~0.35 here (ridge regression ~0.6).
  assert results["test/accuracy"] > 0.25, results["test/accuracy"]


def test_features_are_reused_then_rebuilt_on_key_change(cached_run, capsys):
  config, workdir, _ = cached_run
  (directory,) = (workdir / "features").iterdir()
  files = {s: directory / f"{s}.npy" for s in features.SPLITS}
  before = {s: _stat(p) for s, p in files.items()}
  data = features.load_or_compute(config, workdir)
  assert "features: reusing" in capsys.readouterr().out
  assert {s: _stat(p) for s, p in files.items()} == before  # not written again
  for split, n in (("train", 224), ("val", 56), ("test", 56)):
    x, y = data[split]["image"], data[split]["label"]
    assert isinstance(x, np.memmap) and x.dtype == np.float16 and x.shape == (n, 1, 1, 512)
    assert y.dtype == np.int32
  np.testing.assert_array_equal(data["val"]["label"], synthetic.make_faces(56, 1)[1])
  # The features are the block5 output of the seeded base that a vgg16 run starts from.
  images = synthetic.make_faces(224, 0)[0][:4]
  want = jax.jit(lambda p, x: vgg16.VGG16().apply({"params": p}, x, method=vgg16.VGG16.features))(
      features.base_params(config), images)
  np.testing.assert_allclose(np.asarray(data["train"]["image"][:4], np.float32), want,
                             rtol=2e-3, atol=2e-3)

  config = _config(vgg16_cached, **{"input.synthetic_train_size": 28})  # other data: a new key
  small = features.load_or_compute(config, workdir)
  assert "features: computing" in capsys.readouterr().out
  assert len(list((workdir / "features").iterdir())) == 2
  assert {s: _stat(p) for s, p in files.items()} == before
  assert small["train"]["image"].shape == (28, 1, 1, 512)


@pytest.mark.parametrize("key,value", [
    ("model.preprocess", "torch"), ("model.input_size", 64), ("model.dtype", "bfloat16"),
    ("seed", 1), ("input.split_seed", 1),
])
def test_cache_key_changes_with_what_changes_the_features(key, value):
  def key_of(**overrides):
    config = _config(vgg16_cached, **{"input.synthetic_train_size": 14, **overrides})
    return features.cache_key(config, input_pipeline.load_splits(config.input))[0]
  assert key_of() == key_of(**{"model.head_features": (64,), "optim.learning_rate": 0.1})
  assert key_of(**{key: value}) != key_of()


def test_frozen_base_is_bit_identical_and_has_no_optimizer_state(frozen_run):
  config, workdir, results = frozen_run
  best = checkpoint_state(workdir, "best")
  assert results["epochs_trained"] == 1 and int(best["step"]) == 2
  # The seeded init of fer.features.base_params is the one the run started from.
  _assert_trees_equal(_blocks(best["params"]), features.base_params(config))
  head = best["params"]["head"]
  n_head = _size(head)
  assert n_head == 133_127
  # adam's mu and nu for the head, a step count; nothing for the 14.7M frozen parameters.
  assert 2 * n_head <= _size(best["opt_state"]) <= 2 * n_head + 16
  mu = [x for x in jax.tree.leaves(best["opt_state"]) if np.shape(x) == (512, 256)]
  assert mu and np.abs(mu[0]).sum() > 0  # the head got gradients


def test_finetune_starts_from_frozen_run_and_changes_only_block5_and_head(frozen_run, tmp_path):
  _, frozen_dir, _ = frozen_run
  frozen = checkpoint_state(frozen_dir, "best")["params"]
  # seed 1: a fresh init would differ from the frozen run's base (seed 0) everywhere.
  config = _config(vgg16_finetune, **E2E)
  config.seed = 1
  config.init_from = str(frozen_dir)
  train.train_and_evaluate(config, str(tmp_path))
  best = checkpoint_state(tmp_path, "best")
  params = best["params"]
  for name in vgg16.CONV_NAMES:
    if name.startswith("block5"):
      assert not np.array_equal(params[name]["kernel"], frozen[name]["kernel"]), name
    else:
      _assert_trees_equal(params[name], frozen[name])
  for layer in ("dense1", "logits"):
    assert not np.array_equal(params["head"][layer]["kernel"], frozen["head"][layer]["kernel"])
    # Started from the frozen run's head: a few small steps away from it.
    assert np.abs(params["head"][layer]["kernel"] - frozen["head"][layer]["kernel"]).max() < 0.01
  trainable = _size(params["head"]) + _size({k: v for k, v in params.items()
                                             if k.startswith("block5")})
  assert 2 * trainable <= _size(best["opt_state"]) <= 2 * trainable + 16


@pytest.mark.parametrize("module,name,expected", [
    (vgg16_cached, "vgg16_head", 133_127),
    (vgg16_frozen, "vgg16", 14_847_815),
    (vgg16_finetune, "vgg16", 14_847_815),
])
def test_configs_and_param_counts(module, name, expected):
  """Golden numbers: change them only when a config's architecture is changed on purpose."""
  c = module.get_config()
  assert c.model.name == name and c.pretrained.weights == "keras"
  model = build_model(c.model)
  sample = jnp.zeros((1, 1, 1, 512) if name == "vgg16_head" else (1, 48, 48, 1))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), sample)["params"])
  assert _size(shapes) == expected
