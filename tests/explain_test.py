"""fer.explain: Grad-CAM points at the evidence of the class asked for, on each model, in
batches, and the command writes its figures: per class on a split, per face on photos."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from configs import cnn as cnn_config
from configs import strong_resnet
from fer import explain
from fer import faces
from fer.datasets import synthetic
from fer.datasets.fer2013 import CLASSES
from fer.models import build_model
import trained_run

_QUADRANTS = ((4, 4), (4, 34), (34, 4), (34, 34))  # corners of a 10x10 shape in each


def _draw(image, kind, corner, rng):
  dy, dx = rng.integers(-2, 3, 2)
  y, x = corner[0] + dy, corner[1] + dx
  if kind == 0:  # a filled square
    image[y:y + 10, x:x + 10] = 230
  else:  # a dark cross
    image[y + 4:y + 6, x:x + 10] = 0
    image[y:y + 10, x + 4:x + 6] = 0


def _shapes(n, seed, both=False):
  """Noise faces with a bright square (class 0) or a dark cross (class 1) in a random quadrant or
  neither (class 2, so that each shape is evidence for its class, not just against the other),
  or (`both`) a square and a cross in two different quadrants: what, not where, tells the
  classes apart. Returns (images, labels, corners [N, 2 (shape), 2 (y, x)]; -1: no such shape)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n).astype(np.int32)
  images = rng.uniform(60, 120, (n, 48, 48))
  corners = np.full((n, 2, 2), -1)
  for i, label in enumerate(labels):
    places = rng.permutation(4)
    for kind in ((0, 1) if both else (label,) if label < 2 else ()):
      corners[i, kind] = _QUADRANTS[places[kind]]
      _draw(images[i], kind, corners[i, kind], rng)
  return images.astype(np.uint8)[..., None], labels, corners


def _small_cnn():
  c = cnn_config.get_config("runlocal").model
  c.conv_features, c.dense_features, c.batch_norm = (8, 16), (32,), False
  return build_model(c)


@pytest.fixture(scope="module")
def shapes_model():
  """A small CNN trained to tell the square, the cross and neither apart (about 100% on held-out faces)."""
  model = _small_cnn()
  images, labels, _ = _shapes(1024, seed=0)
  params = model.init(jax.random.PRNGKey(0), images[:1], train=False)["params"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x, train=False), y).mean()
    grads = jax.grad(loss)(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt

  for i in range(150):
    b = slice(64 * (i % 16), 64 * (i % 16 + 1))
    params, opt = step(params, opt, images[b], labels[b])
  test_x, test_y, _ = _shapes(256, seed=1)
  accuracy = (model.apply({"params": params}, test_x).argmax(-1) == test_y).mean()
  assert accuracy > 0.95, accuracy
  return model, {"params": params}


def _peak_on(heat, corners):
  """Whether each heat map's hottest place [N] lies on the shape at `corners` [N, 2] (its 10x10
  square, moved by up to 2 pixels, and the 2 pixels around it)."""
  peaks = np.array([np.unravel_index(h.argmax(), h.shape) for h in heat])
  return np.all((peaks >= corners - 4) & (peaks < corners + 14), axis=1)


@pytest.mark.parametrize("method", explain.METHODS)
def test_heat_lies_on_the_evidence_of_the_predicted_class(shapes_model, method):
  model, variables = shapes_model
  images, labels, corners = _shapes(64, seed=2)
  heat, probs = explain.grad_cam(model, variables, images, method=method)  # predicted class
  assert heat.shape == (64, 48, 48) and probs.shape == (64, 7)
  shown = labels < 2
  assert np.mean(_peak_on(heat[shown], corners[shown, labels[shown]])) >= 0.9


def test_layercam_points_at_the_shape_of_the_class_asked_for(shapes_model):
  # A square and a cross in one face: each class's map points at its own shape. (Grad-CAM's
  # mean gradient per channel cannot always tell them apart behind this CNN's dense head: where
  # a feature sits matters to that head, and the mean gives that up.)
  model, variables = shapes_model
  both, _, corners = _shapes(32, seed=3, both=True)
  for cls in (0, 1):
    heat, _ = explain.grad_cam(model, variables, both, classes=np.full(32, cls),
                               method="layercam")
    own, other = np.mean(_peak_on(heat, corners[:, cls])), np.mean(_peak_on(heat, corners[:, 1 - cls]))
    assert own >= 0.75 and own - other >= 0.5, (cls, own, other)


@pytest.mark.parametrize("method", explain.METHODS)
def test_on_a_global_average_pooled_head_both_are_the_class_activation_map(method):
  # ResNet: logits = W^T mean_xy(A) + b, so d logit_c / dA_k(x, y) = W[k, c] / (h w) everywhere:
  # Grad-CAM is CAM (Zhou et al. 2016), relu(sum_k W[k, c] A_k), and LayerCAM uses relu(W[k, c]).
  model = build_model(strong_resnet.get_config("runlocal").model)
  images = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 1), dtype=np.uint8)
  variables = model.init(jax.random.PRNGKey(1), images, train=False)
  _, state = model.apply(variables, images, train=False, capture_intermediates=True,
                         mutable=["intermediates"])
  acts = np.asarray(state["intermediates"]["stage4_block1"]["__call__"][0], np.float32)
  kernel = np.asarray(variables["params"]["head"]["kernel"])
  classes = np.array([0, 3, 5, 6])
  weights = kernel[:, classes].T[:, None, None, :]  # [N, 1, 1, k]
  if method == "layercam":
    weights = np.maximum(weights, 0)
  cam = np.maximum((weights * acts).sum(-1), 0)
  cam = np.asarray(jax.image.resize(cam, (4, 48, 48), "bilinear"))
  cam = cam / cam.max((1, 2), keepdims=True)
  heat, _ = explain.grad_cam(model, variables, images, classes=classes, method=method)
  np.testing.assert_allclose(heat, cam, atol=2e-3)
  other, _ = explain.grad_cam(model, variables, images, classes=(classes + 1) % 7, method=method)
  assert np.abs(other - cam).max() > 0.1  # another class, another map


class _ConvDense(nn.Module):
  """logits = V . flatten(A) + b with A = conv(x): d logit_c / dA = V[..., c] exactly."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    a = nn.Conv(5, (3, 3), name="conv")(x.astype(jnp.float32) / 255.0)
    return nn.Dense(7, name="head")(a.reshape((a.shape[0], -1)))


@pytest.mark.parametrize("method", explain.METHODS)
def test_on_a_dense_head_the_weights_are_the_mean_or_the_positive_gradient(method):
  model = _ConvDense()
  images = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 1), dtype=np.uint8)
  variables = model.init(jax.random.PRNGKey(2), images)
  _, state = model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
  acts = np.asarray(state["intermediates"]["conv"]["__call__"][0])
  grads = np.asarray(variables["params"]["head"]["kernel"]).reshape(48, 48, 5, 7)
  classes = np.array([1, 4, 6])
  grads = np.moveaxis(grads[..., classes], -1, 0)  # [N, 48, 48, 5]
  weights = (grads.mean((1, 2), keepdims=True) if method == "gradcam" else
             np.maximum(grads, 0))
  cam = np.maximum((weights * acts).sum(-1), 0)
  cam = cam / cam.max((1, 2), keepdims=True)
  heat, _ = explain.grad_cam(model, variables, images, classes=classes, method=method)
  assert explain.feature_layer(model, variables, images) == ("conv",)
  np.testing.assert_allclose(heat, cam, atol=1e-4)


def test_maps_are_scaled_per_face_and_batches_do_not_change_them(shapes_model):
  model, variables = shapes_model
  images, _, _ = _shapes(10, seed=4)
  heat, probs = explain.grad_cam(model, variables, images, batch_size=4)  # 4 + 4 + 2 (padded)
  whole, whole_probs = explain.grad_cam(model, variables, images)
  np.testing.assert_allclose(heat, whole, atol=1e-5)
  np.testing.assert_allclose(probs, whole_probs, atol=1e-6)
  assert heat.min() >= 0 and np.allclose(heat.max((1, 2)), 1)
  np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
  with pytest.raises(ValueError, match=r"one per image \(10\)"):
    explain.grad_cam(model, variables, images, classes=[0, 1])


@pytest.mark.parametrize("which, layer", [("cnn", ("conv2",)), ("cnn_bn", ("conv2_bn",)),
                                          ("resnet", ("stage4_block1",))])
def test_feature_layer_is_the_last_feature_map(which, layer):
  if which == "resnet":
    cfg = strong_resnet.get_config("runlocal").model
  else:
    cfg = cnn_config.get_config("runlocal").model
    cfg.conv_features, cfg.dense_features = (8, 16), (32,)
    cfg.batch_norm = which == "cnn_bn"
  model = build_model(cfg)
  images = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 1), dtype=np.uint8)
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  assert explain.feature_layer(model, variables, images) == layer
  heat, probs = explain.grad_cam(model, variables, images)
  assert heat.shape == (3, 48, 48) and np.isfinite(heat).all() and probs.shape == (3, 7)


def test_summary_splits_the_heat_of_the_right_faces(monkeypatch):
  images = np.zeros((6, 48, 48, 1), np.uint8)
  labels = np.array([0, 0, 0, 3, 3, 1])
  heat = np.zeros((6, 48, 48), np.float32)
  heat[:3, :24] = 1  # angry: all in the upper half
  heat[3:, 40:] = 1  # happy: all in the lower half
  probs = np.eye(7, dtype=np.float32)[[0, 0, 6, 3, 3, 0]]  # one angry face called neutral
  monkeypatch.setattr(explain, "grad_cam", lambda *a, **k: (heat, probs))
  rows, summary = explain.explain_split(None, None, images, labels, per_class=2)
  by_name = {s.name: s for s in summary}
  assert (by_name["angry"].faces, by_name["angry"].right) == (3, 2)
  assert by_name["angry"].upper_share == 1.0 and by_name["happy"].upper_share == 0.0
  assert (by_name["disgust"].faces, by_name["disgust"].right) == (1, 0)
  assert by_name["fear"].faces == 0 and rows[2]["mean_face"] is None
  assert [f["right"] for f in rows[0]["faces"]] == [True, True]  # the first 2 of 3
  assert rows[1]["faces"][0]["pred"] == "angry" and not rows[1]["faces"][0]["right"]
  text = explain.format_summary(summary)
  assert "angry" in text and "100% / 0%" in text and "0% / 100%" in text


def test_the_photo_table_fits_its_longest_path():
  items = [{"file": f, "box": box, "pred": pred, "prob": prob, "upper": upper}
           for f, box, pred, prob, upper in [
               ("a.png", (0, 0, 48, 48), "happy", 0.93, 0.4),
               ("photos/2024/a holiday with a rather long name/IMG_0001.jpg",
                (1210, 388, 412, 412), "surprise", 0.071, 0.55)]]
  lines = explain.format_faces(items).splitlines()
  assert lines[0].split("  ")[0] == "file"
  # Every column starts at the same place on every line.
  for column in ("box (x, y, w, h)", "emotion", "upper half"):
    start = lines[0].index(column)
    assert all(l[start - 2:start] == "  " and l[start] != " " for l in lines), lines
  assert lines[1].endswith("93%  40%") and lines[2].endswith("  7%  55%")


def test_cli(tmp_path, tmp_path_factory):
  workdir = trained_run.tiny_run(tmp_path_factory)
  out = tmp_path / "figs" / "cam.png"
  proc = trained_run.run_module("fer.explain", f"--workdir={workdir}", "--per_class=2",
                                f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert out.stat().st_size > 10_000
  lines = proc.stdout.splitlines()
  assert [l.split()[0] for l in lines[1:]] == list(CLASSES), proc.stdout
  assert "Grad-CAM of conv2_bn on" in proc.stderr  # the tiny run's CNN has batch norm
  bad = trained_run.run_module("fer.explain", f"--workdir={tmp_path}", f"--out={out}")
  assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
  no_out = trained_run.run_module("fer.explain", f"--workdir={workdir}")
  assert no_out.returncode != 0 and "--out" in no_out.stderr


def test_cli_on_photos(tmp_path, tmp_path_factory):
  workdir = trained_run.tiny_run(tmp_path_factory)
  images, _ = synthetic.make_faces(3, seed=5)
  for i in range(3):
    Image.fromarray(images[i, ..., 0]).save(tmp_path / f"face{i}.png")
  (tmp_path / "notes.txt").write_text("x")
  out = tmp_path / "cam.png"
  proc = trained_run.run_module("fer.explain", f"--workdir={workdir}", "--no_detect",
                                "--method=layercam", f"--out={out}", tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = proc.stdout.splitlines()[1:]
  assert [pathlib.Path(r.split()[0]).name for r in rows] == [f"face{i}.png" for i in range(3)]
  assert all(r.split()[-3] in CLASSES and r.endswith("%") for r in rows), rows
  assert f"notes.txt: not a {faces.FORMAT_WORDS} image" in proc.stderr
  assert out.stat().st_size > 5_000
  empty = tmp_path / "empty"
  empty.mkdir()
  none = trained_run.run_module("fer.explain", f"--workdir={workdir}", f"--out={out}", empty)
  assert none.returncode == 1 and "no face found" in none.stderr
