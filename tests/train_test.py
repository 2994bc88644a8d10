"""Training core: learning on synthetic faces, exact resume, NaN guard, config checks, outputs."""

import json
import os
import pathlib
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import augment as augment_config
from configs import cnn as cnn_config
from configs import reference_net as reference_net_config
from configs import strong as strong_config
from fer import checkpointing
from fer import input_pipeline
from fer import metrics
from fer import optim
from fer import runs
from fer import train
from fer.datasets import synthetic
from fer.models import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
  c = cnn_config.get_config("runlocal")
  c.model.conv_features = (8, 16)
  c.model.dense_features = (32,)
  c.input.synthetic_train_size = 448
  c.train.num_epochs = 2
  c.train.steps_per_dispatch = 2
  for key, value in overrides.items():
    group, name = key.split(".")
    c[group][name] = value
  return c


def checkpoint_state(workdir, which="last"):
  """The newest checkpoint's state tree in workdir/checkpoints/<which>, read with orbax."""
  mgr = ocp.CheckpointManager(pathlib.Path(workdir, "checkpoints", which).absolute())
  step = mgr.latest_step()
  tree = ocp.StandardCheckpointer().restore(pathlib.Path(mgr.directory, str(step), "state"))
  mgr.close()
  return tree


def test_learns_synthetic_faces(tmp_path):
  """The default CNN separates the synthetic classes well above chance (1/7) in seconds."""
  c = cnn_config.get_config("runlocal")
  c.input.synthetic_train_size = 1400
  c.train.num_epochs = 5
  results = train.train_and_evaluate(c, str(tmp_path))
  assert results["val/accuracy"] > 0.85, results["val/accuracy"]
  assert results["test/accuracy"] > 0.85, results["test/accuracy"]
  history = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(history) == 5
  assert history[-1]["train/loss"] < history[0]["train/loss"] * 0.6


def test_early_stopping_stops_after_patience_epochs_without_a_better_val(tmp_path, capsys):
  # A learning rate of ~0 and no batch norm: val accuracy never beats epoch 1's.
  c = tiny_config(**{"train.num_epochs": 6, "train.early_stopping_epochs": 2,
                     "optim.learning_rate": 1e-12, "model.batch_norm": False})
  results = train.train_and_evaluate(c, str(tmp_path))
  assert results["stopped_early"] and results["epochs_trained"] == 3
  assert results["best_epoch"] == 1
  out = capsys.readouterr().out
  assert "Early stop: no better val accuracy for 2 epochs." in out
  # The final evaluation says which checkpoint it evaluates on which split, before it starts.
  assert "Evaluating the best checkpoint (epoch 1) on test: " in out
  history = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(history) == 3


def test_resume_is_exact_and_completed_run_only_reports(tmp_path, capsys):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  # A constant schedule, so that the 1-epoch run below is the first epoch of the 2-epoch run
  # (a cosine schedule depends on num_epochs; real kills are tested in reliability_test.py).
  same = {"augment.flip": True, "model.dropout": 0.2, "optim.schedule": "constant"}
  train.train_and_evaluate(tiny_config(**same), str(straight))
  # The same run, stopped after epoch 1 and started again with the same command.
  train.train_and_evaluate(tiny_config(**same, **{"train.num_epochs": 1}), str(resumed))
  (resumed / "results.json").unlink()  # a 1-epoch run "completed"; pretend it was killed
  r = train.train_and_evaluate(tiny_config(**same), str(resumed),
                               resume_may_change=("train.num_epochs",))
  assert "Resuming" in capsys.readouterr().out
  a, b = checkpoint_state(straight), checkpoint_state(resumed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert r == json.loads((straight / "results.json").read_text()) | {
      k: r[k] for k in ("train_seconds", "git_commit")}
  again = train.train_and_evaluate(tiny_config(**same), str(straight))
  assert "is complete" in capsys.readouterr().out
  assert again["test/accuracy"] == r["test/accuracy"]


def test_ema_steps_average_the_weights():
  c = tiny_config(**{"optim.ema_decay": 0.99})
  model = build_model(c.model)
  tx_fn = lambda params: optim.make_optimizer(c.optim, params, 10, 1)[0]
  state, _ = train.create_train_state(c, model, tx_fn, train.make_mesh(), (48, 48, 1))
  step = jax.jit(train.make_train_step(model, tx_fn(state.params), c))
  images, labels = synthetic.make_faces(32, seed=0)
  seen = [state.params]
  for _ in range(2):
    state, _ = step(state, images, labels)
    seen.append(state.params)
  d0, d1 = 1 / 10, min(0.99, 2 / 11)  # the decay's warm-up: (1 + t) / (10 + t)
  expected = jax.tree.map(lambda p0, p1, p2: d1 * (d0 * p0 + (1 - d0) * p1) + (1 - d1) * p2,
                          *seen)
  for x, y in zip(jax.tree.leaves(state.ema["params"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  assert set(state.ema) == {"params", "batch_stats"} and state.ema["batch_stats"]


def test_ema_is_the_model_that_is_evaluated_selected_and_kept(tmp_path):
  c = tiny_config(**{"optim.ema_decay": 0.9, "train.num_epochs": 3})
  results = train.train_and_evaluate(c, str(tmp_path))
  assert results["val/accuracy"] > 0.3, results["val/accuracy"]  # learning: chance is 1/7
  raw = runs.restore_state(runs.best_checkpoint_dir(tmp_path))
  run = runs.load(str(tmp_path))  # as fer.predict, evaluate, export, ensemble, init_from load it
  for x, y in zip(jax.tree.leaves(run.variables), jax.tree.leaves(
      {"params": raw["ema"]["params"], "batch_stats": raw["ema"]["batch_stats"]}), strict=True):
    np.testing.assert_array_equal(x, y)
  assert not all(np.allclose(x, y) for x, y in zip(jax.tree.leaves(raw["params"]),
                                                   jax.tree.leaves(raw["ema"]["params"])))
  # The final evaluation ran the average (its saved val probabilities are the average's), and it
  # is the accuracy that picked the best epoch (eval.tta none: both are the same evaluation).
  val = input_pipeline.load_splits(c.input)["val"]["image"]
  probs = train.predict_probs(train.make_predict(run.model, "none"), run.variables, val, 64,
                              train.make_mesh())
  np.testing.assert_allclose(probs, np.load(tmp_path / "val_probs.npy"), atol=1e-5)
  history = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert results["val/accuracy"] == history[results["best_epoch"] - 1]["val/accuracy"]


def test_checkpoints_without_a_moving_average_keep_their_layout(tmp_path):
  """A run without optim.ema_decay saves the fields that runs saved before TrainState had `ema`,
  and those older checkpoints restore into today's TrainState."""

  @flax.struct.dataclass
  class OldTrainState:  # fer.train.TrainState before optim.ema_decay
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: tuple
    rng: jax.Array

  fields = dict(step=jnp.array(3), params={"w": jnp.arange(4.0)}, batch_stats={},
                opt_state=(jnp.ones(2),), rng=jax.random.PRNGKey(1))
  abstract = jax.eval_shape(lambda: train.TrainState(**fields))
  for name, state in (("old", OldTrainState(**fields)), ("new", train.TrainState(**fields))):
    ckpts = checkpointing.Checkpoints(tmp_path / name)
    ckpts.save_last(1, state, {"epoch": 1})
    assert set(runs.state_metadata(tmp_path / name / "checkpoints" / "last" / "1")) == {
        "step", "params", "batch_stats", "opt_state", "rng"}
    epoch, restored, meta = checkpointing.Checkpoints.restore(ckpts.last, abstract)
    ckpts.close()
    assert isinstance(restored, train.TrainState) and restored.ema == {} and epoch == 1
    np.testing.assert_array_equal(restored.params["w"], np.arange(4.0))

def test_test_accuracy_with_and_without_a_train_copy_is_reported(tmp_path, capsys):
  """FER2013's test split carries 'train_copy' (input_pipeline.load_splits); the final evaluation
  splits test/accuracy by it, from the same probabilities it saves."""
  c = tiny_config(**{"train.num_epochs": 1})
  data = input_pipeline.load_splits(c.input)
  copy = np.arange(len(data["test"]["label"])) % 3 == 0
  data["test"] = {**data["test"], "train_copy": copy}
  results = train.train_and_evaluate(c, str(tmp_path), data=data)
  correct = np.load(tmp_path / "test_probs.npy").argmax(1) == data["test"]["label"]
  assert results["test/train_copies"] == copy.sum() == 38
  assert results["test/accuracy_train_copy"] == pytest.approx(correct[copy].mean())
  assert results["test/accuracy_no_train_copy"] == pytest.approx(correct[~copy].mean())
  assert (f"test faces without a near copy in train (38 have one): test/accuracy "
          f"{correct[~copy].mean():.4f}") in capsys.readouterr().out
  # A run trained without the copies says the faces had them.
  assert train.copy_words(results, dropped=True) == (
      " On the test faces without a near copy in train (38 had one, which "
      f"input.drop_train_copies took out of train): test/accuracy {correct[~copy].mean():.4f}.")
  assert train.copy_words({"test/accuracy": 0.5}) == ""  # synthetic data: nothing to say


def test_steps_per_dispatch_does_not_change_training(tmp_path):
  """Chunks of 1 step and of 5 steps (with a remainder chunk) train on the same batches."""
  params = []
  for k in (1, 5):
    train.train_and_evaluate(tiny_config(**{"train.num_epochs": 1,
                                            "train.steps_per_dispatch": k}), str(tmp_path / str(k)))
    params.append(checkpoint_state(tmp_path / str(k)))
  for x, y in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
  c = tiny_config(**{"train.num_epochs": 1})
  train.train_and_evaluate(c, str(tmp_path))
  (tmp_path / "results.json").unlink()
  c = tiny_config(**{"train.num_epochs": 3, "optim.learning_rate": 1e12})
  with pytest.raises(train.TrainingDivergedError, match=r"at step \d+.*epoch 1"):
    train.train_and_evaluate(c, str(tmp_path),
                             resume_may_change=("train.num_epochs", "optim.learning_rate"))
  assert ocp.CheckpointManager(tmp_path.absolute() / "checkpoints" / "last").all_steps() == [1]


def test_changed_optimizer_over_existing_run_is_explained(tmp_path):
  """Even where the config check is waived, a checkpoint that does not fit says so."""
  train.train_and_evaluate(tiny_config(**{"train.num_epochs": 1}), str(tmp_path))
  (tmp_path / "results.json").unlink()
  with pytest.raises(checkpointing.CheckpointError, match="new --workdir"):
    train.train_and_evaluate(tiny_config(**{"train.num_epochs": 1, "optim.name": "sgd"}),
                             str(tmp_path), resume_may_change=("optim.name",))


def test_resuming_with_another_config_is_refused_and_changes_nothing(tmp_path):
  one = {"train.num_epochs": 1}
  train.train_and_evaluate(tiny_config(**one), str(tmp_path))
  before = {f: (tmp_path / f).read_bytes() for f in ("config.json", "results.json")}
  # A finished run given other values is not reported as if it were their run.
  with pytest.raises(train.ConfigError, match=r"train.num_epochs 1 -> 2.*new --workdir"):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  (tmp_path / "results.json").unlink()  # killed after its checkpoint
  with pytest.raises(train.ConfigError,
                     match=r"model.conv_features \[8, 16\] -> \[8, 32\]; optim.learning_rate"):
    train.train_and_evaluate(tiny_config(**one, **{"model.conv_features": (8, 32),
                                                   "optim.learning_rate": 0.5}), str(tmp_path))
  assert (tmp_path / "config.json").read_bytes() == before["config.json"]
  # Where the data is, evaluation batching and checkpoint frequency may change on resume.
  r = train.train_and_evaluate(tiny_config(**one, **{"input.eval_batch_size": 7,
                                                     "checkpoint.every_epochs": 3}),
                               str(tmp_path))
  assert r["test/accuracy"] == json.loads(before["results.json"])["test/accuracy"]
  assert json.loads((tmp_path / "config.json").read_text())["input"]["eval_batch_size"] == 7


@pytest.mark.parametrize("key,value,message", [
    ("train.num_epochs", -1, "train.num_epochs"),
    ("input.protocol", "halves", "input.protocol"),
    ("optim.name", "lamb", "optim.name"),
    ("model.dropout", 1.5, "model.dropout"),
    ("optim.class_weights", "inverse", "optim.class_weights"),
    ("optim.ema_decay", 1.0, r"optim.ema_decay=1.0: expected 0 <= p < 1"),
])
def test_bad_config_fails_before_work(tmp_path, key, value, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(**{key: value}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("key,value,message", [
    ("model.conv_features", (8,) * 7, r"cannot be set up for \(48, 48, 1\) inputs"),
    ("optim.freeze", "^nomatch", r"optim.freeze='\^nomatch' matches no parameter"),
    ("init_from", "/nonexistent/run", r"config.init_from='/nonexistent/run'.*init_from=''"),
    ("augment.mixup_alpha", -0.5, r"augment.mixup_alpha=-0.5: expected >= 0"),
])
def test_configs_that_cannot_work_are_config_errors(tmp_path, key, value, message):
  """fer.main prints a ConfigError in one line (no traceback): these were tracebacks."""
  c = tiny_config(**{"train.num_epochs": 1})
  if "." in key:
    c[key.split(".")[0]][key.split(".")[1]] = value
  else:
    c[key] = value
  with pytest.raises(train.ConfigError, match=message):
    train.train_and_evaluate(c, str(tmp_path))


@pytest.mark.parametrize("name", sorted(
    p.stem for p in (REPO / "configs").glob("*.py") if "def get_config" in p.read_text()))
def test_every_config_takes_runlocal_and_refuses_other_arguments(name):
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  c = module.get_config("runlocal")
  assert c.input.source == "synthetic"
  if "pretrained" in c and name.startswith("vgg16"):
    assert c.pretrained.weights == "none"  # no weights file needed for a smoke test
  with pytest.raises(ValueError, match=f"configs/{name}.py:runlcoal"):
    module.get_config("runlcoal")


def test_unknown_model_is_named(tmp_path):
  with pytest.raises(ValueError, match="model.name='vit'"):
    train.train_and_evaluate(tiny_config(**{"model.name": "vit"}), str(tmp_path))


def test_workdir_in_use_is_refused(tmp_path):
  with checkpointing.WorkdirLock(tmp_path):
    with pytest.raises(checkpointing.WorkdirInUseError, match="in use by another run"):
      train.train_and_evaluate(tiny_config(), str(tmp_path))


def test_class_weights_give_every_class_the_same_total_weight():
  labels = np.array([0] * 6 + [1] * 2 + [3] * 4)  # class 2 absent
  w = metrics.class_weights(labels, 4, "balanced")
  np.testing.assert_allclose(w, [12 / 24, 12 / 8, 0.0, 12 / 16])
  totals = np.bincount(labels, minlength=4) * w
  np.testing.assert_allclose(totals[[0, 1, 3]], 3.0)
  np.testing.assert_allclose(metrics.class_weights(labels, 4, "sqrt"), np.sqrt(w))
  assert metrics.class_weights(labels, 4, "none") is None
  with pytest.raises(ValueError, match="optim.class_weights='inverse'"):
    metrics.class_weights(labels, 4, "inverse")


def test_weighted_cross_entropy_cancels_the_prior_pull_of_a_skewed_batch():
  """At equal logits the gradient on a shared bias is 1/K - (weighted class frequency): towards
  the batch's frequent classes unweighted, zero with balanced weights; mixed targets weigh as
  the mix of their classes' weights."""
  labels = np.array([0, 0, 0, 0, 0, 0, 1, 2])
  bias_grad = lambda w: jax.grad(lambda b: metrics.cross_entropy(
      jnp.zeros((8, 3)) + b, labels, class_weights=w))(jnp.zeros(3))
  np.testing.assert_allclose(bias_grad(None), [1 / 3 - 6 / 8, 1 / 3 - 1 / 8, 1 / 3 - 1 / 8],
                             atol=1e-6)
  np.testing.assert_allclose(bias_grad(metrics.class_weights(labels, 3, "balanced")), 0.0,
                             atol=1e-6)
  logits = jax.random.normal(jax.random.key(0), (2, 3))
  mixed = jnp.array([[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])
  w = np.array([1.0, 3.0, 2.0], np.float32)
  ce = -jnp.sum(mixed * jax.nn.log_softmax(logits), -1)
  np.testing.assert_allclose(metrics.cross_entropy(logits, mixed, class_weights=w),
                             (2.5 * ce[0] + 2.0 * ce[1]) / 4.5, rtol=1e-6)


def test_balanced_class_weights_move_predictions_toward_a_rare_class(tmp_path):
  """One class at 1/8 of the others' images: balanced weights raise the probability the trained
  network gives it on balanced val data (ideally 1/7) several times over plain cross-entropy."""
  x, y = synthetic.make_faces(1400, 1)
  keep = (y != 1) | (np.arange(len(y)) % 8 == 0)
  vx, vy = synthetic.make_faces(350, 10)
  data = {"train": {"image": x[keep], "label": y[keep]}, "val": {"image": vx, "label": vy},
          "test": {"image": vx, "label": vy}}
  rare = {}
  for mode in ("none", "balanced"):
    train.train_and_evaluate(tiny_config(**{"optim.class_weights": mode, "train.num_epochs": 3}),
                             str(tmp_path / mode), data)
    rare[mode] = np.load(tmp_path / mode / "val_probs.npy")[:, 1].mean()
  assert rare["balanced"] > 3 * rare["none"], rare
  with pytest.raises(ValueError, match="class_weights"):  # the weights must come with the mode
    train.make_train_step(None, None, tiny_config(**{"optim.class_weights": "sqrt"}))


@pytest.mark.parametrize("get_config,expected", [
    (cnn_config.get_config, 1_733_607),
    (augment_config.get_config, 1_733_607),
    (reference_net_config.get_config, 1_733_127),
    (strong_config.get_config, 10_462_535),
])
def test_param_counts(get_config, expected):
  """Golden numbers: change them only when a config's architecture is changed on purpose."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from fer.models import build_model  # pylint: disable=import-outside-toplevel
  model = build_model(get_config().model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 48, 48, 1)))["params"])
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == expected


def main_command(workdir, *extra):
  """`python -m fer.main` of a tiny synthetic-data run, seconds long."""
  return [sys.executable, "-m", "fer.main", "--config=configs/cnn.py:runlocal",
          f"--workdir={workdir}", "--config.model.conv_features=(8,16)",
          "--config.model.dense_features=(32,)", "--config.input.synthetic_train_size=448",
          "--config.train.steps_per_dispatch=2", *extra]


def _run_main(workdir, *extra, env=None):
  return subprocess.run(main_command(workdir, *extra), cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, **(env or {})})


def test_main_end_to_end_writes_every_output(tmp_path):
  proc = _run_main(tmp_path, "--config.eval.tta=flip")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("results.json", "config.json", "metrics.jsonl", "confusion_matrix.png",
               "learning_curves.png", "reliability.png"):
    assert (tmp_path / name).is_file(), name
  assert list((tmp_path / "tb").iterdir()), "no TensorBoard events"
  results = json.loads((tmp_path / "results.json").read_text())
  for key in ("val/accuracy", "test/accuracy", "num_params", "train_seconds",
              "test/per_class_accuracy", "test/macro_f1", "device_kind", "device_count",
              "git_commit", "test/ece", "temperature", "test/ece_calibrated"):
    assert key in results, key
  assert 0 <= results["test/accuracy"] <= 1
  # Calibration: the temperature is fit on the saved val probabilities and scored on test's.
  data = input_pipeline.load_splits(runs.load_config(tmp_path).input)
  probs = {s: np.load(tmp_path / f"{s}_probs.npy") for s in ("val", "test")}
  assert results["temperature"] == pytest.approx(
      metrics.fit_temperature(probs["val"], data["val"]["label"]))
  assert results["test/ece"] == pytest.approx(
      metrics.expected_calibration_error(probs["test"], data["test"]["label"]), abs=1e-6)
  assert json.loads((tmp_path / "config.json").read_text())["model"]["conv_features"] == [8, 16]
  assert "img/s" in proc.stdout and "ETA" in proc.stdout


def test_eight_devices_match_one(tmp_path):
  """Data-parallel over 8 fake CPU devices gives the 1-device losses within tolerance."""
  flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  runs = {}
  for name, env in (("one", {"XLA_FLAGS": ""}), ("eight", flags)):
    proc = _run_main(tmp_path / name, "--config.train.num_epochs=1", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[name] = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
  assert "8 x cpu" in proc.stdout
  for key in ("train/loss", "val/loss", "val/accuracy"):
    np.testing.assert_allclose(runs["eight"][0][key], runs["one"][0][key], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("override,message", [
    ("--config.train.num_epoch=3", "unknown key 'num_epoch'. Did you mean \"num_epochs\""),
    ("--config.input.protocol=halves", "ConfigError: Invalid config"),
])
def test_main_reports_config_errors_without_traceback(tmp_path, override, message):
  proc = _run_main(tmp_path / "w", override)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("config,override,message", [
    ("configs/cnn.py:runlcoal", "", "unknown config argument 'runlcoal'; expected "
     "configs/cnn.py:runlocal"),
    ("configs/nope.py", "", "cannot read the config file"),
    ("configs/search.py:runlocal", "--config.search.strategy=bayes",
     "ConfigError: Invalid search config: search.strategy='bayes'"),
    ("configs/search.py:runlocal", "--config.search.space=smal",
     "ConfigError: Invalid search config: search.space='smal'"),
])
def test_main_reports_bad_config_files_and_search_keys(tmp_path, config, override, message):
  proc = subprocess.run([sys.executable, "-m", "fer.main", f"--config={config}",
                         f"--workdir={tmp_path / 'w'}", *filter(None, [override])], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_sam_steps_with_the_gradient_at_the_perturbed_weights():
  """optim.sam_rho: the update is the plain step's at params + rho * g / |g| (g: the plain
  gradient), on the same batch, augmentation and dropout; the batch statistics are the first
  pass's. With SGD at learning rate 1 an update is minus the gradient it used. Then SAM steps
  fit the batch, and bad values are refused."""
  c = tiny_config(**{"optim.name": "sgd", "optim.momentum": 0.0, "optim.learning_rate": 1.0,
                     "optim.schedule": "constant", "optim.weight_decay": 0.0,
                     "model.batch_norm": True, "model.dropout": 0.3})
  model = build_model(c.model)
  tx_fn = lambda params: optim.make_optimizer(c.optim, params, 10, 1)[0]
  state, _ = train.create_train_state(c, model, tx_fn, train.make_mesh(), (48, 48, 1))
  tx = tx_fn(state.params)
  plain = jax.jit(train.make_train_step(model, tx, c))
  c.optim.sam_rho = 0.05
  sam = jax.jit(train.make_train_step(model, tx, c))
  images, labels = synthetic.make_faces(32, seed=0)
  used = lambda before, after: jax.tree.map(jnp.subtract, before.params, after.params)
  first, _ = plain(state, images, labels)
  g = used(state, first)
  norm = optax.tree.norm(g)
  moved = state.replace(params=jax.tree.map(lambda p, x: p + 0.05 * x / norm, state.params, g))
  expected = used(moved, plain(moved, images, labels)[0])
  stepped, (loss, _) = sam(state, images, labels)
  for x, y in zip(jax.tree.leaves(used(state, stepped)), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(g)[0], jax.tree.leaves(expected)[0])
  for x, y in zip(jax.tree.leaves(stepped.batch_stats), jax.tree.leaves(first.batch_stats)):
    np.testing.assert_array_equal(x, y)
  assert loss == plain(state, images, labels)[1][0]
  # And it learns: AdamW steps with SAM fit the batch (radius 0.01: at 0.05 this tiny CNN's
  # outputs collapse to uniform, a radius being a distance in weight space).
  c.optim.update(name="adamw", learning_rate=1e-3, sam_rho=0.01)
  tx_fn = lambda params: optim.make_optimizer(c.optim, params, 10, 1)[0]
  state, _ = train.create_train_state(c, model, tx_fn, train.make_mesh(), (48, 48, 1))
  sam = jax.jit(train.make_train_step(model, tx_fn(state.params), c))
  losses = []
  for _ in range(15):
    state, (loss, _) = sam(state, images, labels)
    losses.append(float(loss))
  assert losses[-1] < 0.6 * losses[0], losses
  with pytest.raises(train.ConfigError, match="optim.sam_rho=-0.1"):
    train.validate_config(tiny_config(**{"optim.sam_rho": -0.1}))
  with pytest.raises(train.ConfigError, match="SAM would move the frozen weights"):
    train.validate_config(tiny_config(**{"optim.sam_rho": 0.05, "optim.freeze": "^Conv_0"}))
