"""Architecture search: grid expansion, seeded random sampling, halving, resume after a kill,
failed trials, and vmapped groups matching separately trained trials (tiny synthetic data)."""

import importlib.util
import json
import os
import pathlib
import signal

import jax
import numpy as np
import pytest

from configs import cnn as cnn_config
from configs import search as search_config
from configs import search_space
from fer import search
from fer import train
from fer.models import build_model
from train_test import checkpoint_state


def tiny_search(**overrides):
  """configs/search.py:runlocal on a one-conv base: seconds per trial on a loaded CPU."""
  c = search_config.get_config("runlocal")
  c.model.conv_features = (8,)
  c.model.dense_features = (16,)
  c.input.synthetic_train_size = 224
  c.train.steps_per_dispatch = 1  # one small program to compile
  c.search.space = "test"
  c.search.include_baseline = False
  c.search.halving.enabled = False
  c.search.epochs_per_trial = 1
  for key, value in overrides.items():
    *groups, name = key.split(".")
    node = c
    for group in groups:
      node = node[group]
    node[name] = value
  return c


def _rows(workdir):
  return search.read_records(pathlib.Path(workdir) / "trials.jsonl")


# ----------------------------------------------------------------------------- spaces


def test_grid_expansion_is_every_combination_and_holds_the_baseline():
  grid = search_space.grid_space("small")
  assert len(grid) == 2 * 2 * 3
  assert len({json.dumps(g, sort_keys=True) for g in grid}) == len(grid)
  assert search_space.product({"a": [1, 2], "b": ["x", "y", "z"]})[:2] == [
      {"a": 1, "b": "x"}, {"a": 1, "b": "y"}]
  trials = search.make_trials(search_config.get_config())
  assert len(trials) == 12  # configs/cnn.py is one of the grid's trials, not a 13th
  baseline = [t for t in trials if t.baseline]
  assert len(baseline) == 1 and baseline[0].overrides == {
      "model.batch_norm": True, "model.dense_features": (512, 256, 128),
      "optim.learning_rate": 1e-3}
  # Four structures of three learning rates: four vmapped groups.
  assert sorted(np.unique([t.structure for t in trials], return_counts=True)[1]) == [3] * 4
  with pytest.raises(ValueError, match="no grid"):
    search_space.grid_space("nope")


def test_random_sampling_is_seeded_and_valid():
  def trials(seed, num, per=1):
    c = search_config.get_config("random")
    c.search.seed, c.search.num_trials, c.search.trials_per_structure = seed, num, per
    c.search.include_baseline = False
    return search.make_trials(c)

  a, b = trials(0, 8), trials(0, 8)
  assert [t.overrides for t in a] == [t.overrides for t in b]
  assert [t.overrides for t in trials(1, 8)] != [t.overrides for t in a]
  assert [t.overrides for t in trials(0, 4)] == [t.overrides for t in a[:4]]  # prefix-stable
  assert len(a) == 8 and not any(t.baseline for t in a)
  for t in a[:5]:  # every sample is a valid config (known keys, a model that builds)
    assert set(t.overrides) <= set(train.flatten_config(t.config))
    desc = search.describe(t.config, (48, 48, 1))
    assert desc["num_params"] > 0 and desc["flops"] > 0
  paired = trials(0, 6, per=2)
  for first, second in zip(paired[0:6:2], paired[1:6:2]):
    assert first.structure == second.structure
    assert first.overrides["optim.learning_rate"] != second.overrides["optim.learning_rate"]


def test_rungs_and_promotion():
  c = search_config.get_config()
  assert search.rung_epochs(c.search) == [1, 3]
  c.search.epochs_per_trial, c.search.halving.eta = 9, 3
  assert search.rung_epochs(c.search) == [1, 3, 9]
  c.search.halving.enabled = False
  assert search.rung_epochs(c.search) == [9]
  trials = search.make_trials(search_config.get_config())
  accs = [0.30, 0.50, 0.10, 0.40, 0.20, 0.35, 0.45, 0.05, 0.25, 0.15, 0.33, 0.22]
  records = {(t.id, 1): {"status": "ok", "val/accuracy": a} for t, a in zip(trials, accs)}
  records[(trials[6].id, 1)] = {"status": "failed", "val/accuracy": None}
  kept = search.promote(trials, records, 1, eta=3)
  baseline = next(t for t in trials if t.baseline)
  assert [t.index for t in kept] == sorted({1, 3, 5, baseline.index})  # top 11 // 3 = 3, + base


def test_bad_key_and_bad_combination_are_named():
  with pytest.raises(KeyError, match="model.nope"):
    search.apply_overrides(cnn_config.get_config(), {"model.nope": 1})
  c = search.apply_overrides(cnn_config.get_config(), {"model.conv_features": (8,) * 7})
  with pytest.raises(ValueError, match="bad combination"):
    search.describe(c, (48, 48, 1))


# ----------------------------------------------------------------------------- searches


def test_search_with_failures_resumes_after_kill(tmp_path, monkeypatch):
  """A halving search (rungs of 1 and 2 epochs) holding a bad combination, a diverging member of
  a vmapped group and a plain trial; killed in the second rung, then run again: only what is
  missing trains, every (trial, budget) is one row, the failures are recorded."""
  monkeypatch.setitem(search_space.GRIDS, "test", lambda: [
      {"optim.learning_rate": 1e-3},  # the base config itself: the baseline, never halved away
      {"optim.learning_rate": 3e-3},  # the same structure: one vmapped group of three ...
      {"optim.learning_rate": 1e12},  # ... in which this one diverges
      {"model.conv_features": (4,) * 7},  # more pooling than pixels: a bad combination
      {"model.conv_features": (4,), "model.dense_features": ()},  # a plain (unvmapped) trial
  ])
  config = tiny_search(**{"search.halving.enabled": True, "search.epochs_per_trial": 2,
                          "search.halving.eta": 2, "search.include_baseline": True})
  real_group, real_train = search.train_group, train.train_and_evaluate
  calls = []

  def group(configs, workdir, *args, **kwargs):
    calls.append(("group", configs[0].train.num_epochs, len(configs)))
    if configs[0].train.num_epochs == 2:
      raise KeyboardInterrupt  # Ctrl-C / kill while the second rung trains
    return real_group(configs, workdir, *args, **kwargs)

  def plain(config, workdir, **kwargs):
    calls.append(("plain", config.train.num_epochs, 1))
    return real_train(config, workdir, **kwargs)

  monkeypatch.setattr(search, "train_group", group)
  monkeypatch.setattr(train, "train_and_evaluate", plain)
  with pytest.raises(KeyboardInterrupt):
    search.run(config, str(tmp_path))
  rows = {r["index"]: r for r in _rows(tmp_path)}
  assert calls[:2] == [("group", 1, 3), ("plain", 1, 1)] and calls[2][:2] == ("group", 2)
  assert sorted(rows) == [0, 1, 2, 3, 4] and all(r["epochs"] == 1 for r in rows.values())
  assert rows[0]["baseline"] and rows[0]["group_size"] == 3 and rows[4]["group"] is None
  assert [rows[i]["status"] for i in range(5)] == ["ok", "ok", "failed", "failed", "ok"]
  assert "diverged" in rows[2]["error"] and "bad combination" in rows[3]["error"]

  calls.clear()
  monkeypatch.setattr(search, "train_group", lambda *a, **k: calls.append(
      ("group", a[0][0].train.num_epochs, len(a[0]))) or real_group(*a, **k))
  summary = search.run(config, str(tmp_path))
  assert all(epochs == 2 for _, epochs, _ in calls), calls  # nothing of rung 0 trains again
  rows = _rows(tmp_path)
  assert len({(r["trial"], r["epochs"]) for r in rows}) == len(rows)  # one row each
  second = {r["index"]: r for r in rows if r["epochs"] == 2}
  firsts = {r["index"]: r["val/accuracy"] for r in rows if r["epochs"] == 1 and
            r["status"] == "ok"}
  assert set(second) == {0, max(firsts, key=firsts.get)}  # the best 3 // 2 and the baseline
  assert all(r["status"] == "ok" for r in second.values())
  # Continued trials go on from their rung-1 state: two epochs of history.
  for r in second.values():
    history = (tmp_path / r["workdir"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in history] == [1, 2]
  assert summary["best"]["epochs"] == 2 and summary["num_failed"] == 2
  for name in ("report.md", "search.png", "best_config.py", "summary.json"):
    assert (tmp_path / name).is_file(), name
  report = (tmp_path / "report.md").read_text()
  assert "Failed trials" in report and "bad combination" in report and "(baseline)" in report

  # best_config.py is a config file that fer.main takes as it is: the best trial's config.
  spec = importlib.util.spec_from_file_location("best_config", tmp_path / "best_config.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  best, trial = train.flatten_config(module.get_config()), next(
      t for t in search.make_trials(config) if t.name == summary["best"]["name"])
  for key, value in train.flatten_config(trial.config).items():
    if key not in ("input.archive", "input.data_dir", "train.num_epochs",
                   "train.early_stopping_epochs"):  # the search's budget and the machine's paths
      assert best[key] == value, key
  assert best["job"] == "train"
  assert best["train.num_epochs"] == cnn_config.get_config().train.num_epochs
  build_model(module.get_config("runlocal").model)

  calls.clear()
  search.run(config, str(tmp_path))  # everything done: nothing trains, nothing is added
  assert calls == [] and len(_rows(tmp_path)) == len(rows)


# ----------------------------------------------------------------------------- vmap


def test_vmapped_group_matches_separately_trained_trials(tmp_path):
  """A member of a vmapped group equals the fer.train run of its config (same seed and data
  order, no dropout), with its own learning rate and weight decay (the optimizer state's
  placeholders are 0), batch norm, random flips and a moving average of the weights (which
  both evaluate; the checkpoints compared below hold it)."""
  base = search.trial_base(tiny_search())
  base.model.conv_features = (4, 8)
  base.model.batch_norm = True
  # Exact fp32 convolutions: with gemm_bf16 (the CPU default) the vmapped matmuls' summation
  # order moves bf16 roundings downstream, so members agree to ~1e-4, not to float tolerance.
  base.model.conv_impl = "xla"
  base.augment.flip = True
  base.optim.ema_decay = 0.9
  base.train.num_epochs = 1
  configs = [search.apply_overrides(base, {"optim.learning_rate": 3e-3,
                                           "optim.weight_decay": 1e-3}),
             search.apply_overrides(base, {"optim.learning_rate": 1e-3})]
  data = search.load_search_data(base, tmp_path)
  group = search.train_group(configs, tmp_path / "group", data)
  alone = train.train_and_evaluate(configs[0], str(tmp_path / "alone"), data=data)
  np.testing.assert_allclose(group[0]["val/loss"], alone["val/loss"], rtol=1e-4)
  assert abs(group[0]["val/accuracy"] - alone["val/accuracy"]) <= 1 / len(data["val"]["label"])
  history = [json.loads(l) for l in (tmp_path / "alone" / "metrics.jsonl").read_text()
             .splitlines()]
  np.testing.assert_allclose(group[0]["history"][0]["train/loss"], history[0]["train/loss"],
                             rtol=1e-5)
  for field in ("params", "ema"):
    stacked = checkpoint_state(tmp_path / "group")[field]
    mine = checkpoint_state(tmp_path / "alone")[field]
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(stacked), strict=True):
      np.testing.assert_allclose(b[0], a, rtol=1e-4, atol=1e-5)
  assert group[1]["val/loss"] != group[0]["val/loss"]  # the other member trained otherwise
  assert group[1]["history"][0]["train/loss"] != group[0]["history"][0]["train/loss"]


def test_sigterm_stops_a_vmapped_group_after_its_epoch_and_the_rerun_ends_the_same(tmp_path,
                                                                                   monkeypatch):
  base = search.trial_base(tiny_search())
  base.train.num_epochs = 2
  configs = [search.apply_overrides(base, {"optim.learning_rate": lr}) for lr in (3e-3, 1e-3)]
  data = search.load_search_data(base, tmp_path)
  whole = search.train_group(configs, tmp_path / "whole", data)
  finite = search._finite_members  # called once an epoch, after training it

  def signalled(state):
    os.kill(os.getpid(), signal.SIGTERM)  # in epoch 1 of 2
    monkeypatch.setattr(search, "_finite_members", finite)
    return finite(state)

  monkeypatch.setattr(search, "_finite_members", signalled)
  with pytest.raises(train.Stopped, match="after epoch 1/2 of group"):
    search.train_group(configs, tmp_path / "stopped", data)
  again = search.train_group(configs, tmp_path / "stopped", data)
  timing = ("train_seconds", "train/images_per_second", "epoch_seconds")
  for a, b in zip(again, whole, strict=True):
    assert a["epochs_trained"] == 2
    assert ([{k: v for k, v in r.items() if k not in timing} for r in a["history"]] ==
            [{k: v for k, v in r.items() if k not in timing} for r in b["history"]])


def test_search_configs():
  c = search_config.get_config()
  assert c.job == "search" and c.search.strategy == "grid"
  assert search_config.get_config("random").search.strategy == "random"
  assert search_config.get_config("random,runlocal").input.source == "synthetic"
  with pytest.raises(ValueError, match="unknown"):
    search_config.get_config("fast")
  # vmapped groups: always with "on"; with "auto" only off a CPU (slower there).
  assert search.use_vmap("on") and not search.use_vmap("off")
  assert search.use_vmap("auto") == (jax.default_backend() != "cpu")
  with pytest.raises(ValueError, match="search.vmap"):
    search.use_vmap(True)
