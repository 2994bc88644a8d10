"""Augmentation: shapes, dtype, range, determinism per key, identity when off, mixing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from fer import augment
from fer.datasets.synthetic import make_faces


def cfg(**kw):
  c = common.base().augment
  for k, v in kw.items():
    c[k] = v
  return c


IMAGES = jnp.asarray(make_faces(16, 0)[0], jnp.float32)
ALL_ON = dict(flip=True, rotate_degrees=15.0, shift_fraction=0.1, zoom_fraction=0.1,
              crop_padding=4, erase_prob=0.5)


def test_off_is_identity():
  out = augment.augment(jax.random.key(0), IMAGES, cfg())
  np.testing.assert_array_equal(out, IMAGES)
  targets = jax.nn.one_hot(jnp.arange(16) % 7, 7)
  x, t = augment.mix(jax.random.key(0), IMAGES, targets, cfg())
  np.testing.assert_array_equal(x, IMAGES)
  np.testing.assert_array_equal(t, targets)


@pytest.mark.parametrize("option", [dict(flip=True), dict(rotate_degrees=20.0),
                                    dict(shift_fraction=0.2), dict(zoom_fraction=0.2),
                                    dict(crop_padding=4), dict(erase_prob=1.0), ALL_ON])
def test_shape_dtype_range_determinism(option):
  c = cfg(**option)
  a = augment.augment(jax.random.key(1), IMAGES, c)
  b = augment.augment(jax.random.key(1), IMAGES, c)
  other = augment.augment(jax.random.key(2), IMAGES, c)
  assert a.shape == IMAGES.shape and a.dtype == jnp.float32
  assert float(a.min()) >= 0 and float(a.max()) <= 255
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, other)
  assert not np.array_equal(a, IMAGES)


def test_flip_is_exact_mirror_or_identity():
  out = np.asarray(augment.augment(jax.random.key(3), IMAGES, cfg(flip=True)))
  flipped = IMAGES[:, :, ::-1]
  for o, x, f in zip(out, np.asarray(IMAGES), np.asarray(flipped)):
    assert np.array_equal(o, x) or np.array_equal(o, f)


def test_zero_affine_is_identity_and_small_shift_moves():
  c = cfg(shift_fraction=1e-9)
  np.testing.assert_allclose(augment.augment(jax.random.key(0), IMAGES, c), IMAGES, atol=1e-3)


def test_crop_keeps_content_shifted():
  out = np.asarray(augment.augment(jax.random.key(4), IMAGES, cfg(crop_padding=2)))
  x = np.asarray(IMAGES)
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  for o, p in zip(out, padded):
    assert any(np.array_equal(o, p[dy:dy + 48, dx:dx + 48]) for dy in range(5) for dx in range(5))


@pytest.mark.parametrize("option", [dict(mixup_alpha=0.4), dict(cutmix_alpha=1.0),
                                    dict(mixup_alpha=0.4, cutmix_alpha=1.0)])
def test_mixing_targets_are_distributions(option):
  targets = jax.nn.one_hot(jnp.arange(16) % 7, 7)
  x, t = augment.mix(jax.random.key(5), IMAGES, targets, cfg(**option))
  assert x.shape == IMAGES.shape
  np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-6)
  assert float(x.min()) >= 0 and float(x.max()) <= 255
  assert not np.array_equal(t, targets)


def test_jittable():
  c = cfg(**ALL_ON)
  f = jax.jit(lambda k, x: augment.augment(k, x, c))
  np.testing.assert_allclose(f(jax.random.key(1), IMAGES), augment.augment(jax.random.key(1), IMAGES, c),
                             atol=1e-2)


@pytest.mark.parametrize("a,b", [(0.2, 0.2), (1.0, 1.0), (0.5, 2.0)])
def test_beta_has_the_beta_distribution(a, b):
  """augment.beta (fixed work, no while loop) draws from the same law as jax.random.beta: the
  CDFs of 50k samples each differ by no more than two independent jax.random.beta draws do."""
  keys = jax.random.split(jax.random.key(3), 50_000)
  other = jax.random.split(jax.random.key(4), 50_000)
  ours = np.asarray(jax.vmap(lambda k: augment.beta(k, a, b))(keys))
  ref = np.asarray(jax.vmap(lambda k: jax.random.beta(k, a, b))(other))
  assert np.isfinite(ours).all() and ours.min() >= 0 and ours.max() <= 1
  grid = np.linspace(0, 1, 101)
  cdf = lambda x: np.searchsorted(np.sort(x), grid) / len(x)
  assert np.abs(cdf(ours) - cdf(ref)).max() < 0.015  # KS 1% critical value ~0.0103
  np.testing.assert_allclose(ours.mean(), a / (a + b), atol=0.01)
  np.testing.assert_allclose(ours.var(), a * b / ((a + b) ** 2 * (a + b + 1)), rtol=0.05)


@pytest.mark.parametrize("option", [dict(mixup_alpha=0.2), dict(cutmix_alpha=1.0)])
def test_mixing_compiles_to_straight_line_code(option):
  """No data-dependent while loop (jax.random.beta's rejection sampler) in the mixing program:
  on a GPU each of its iterations waits for the host. Loops of known trip count (threefry's) are
  fine."""
  targets = jax.nn.one_hot(jnp.arange(16) % 7, 7)
  c = cfg(**option)
  hlo = jax.jit(lambda k, x, t: augment.mix(k, x, t, c)).lower(
      jax.random.key(0), IMAGES, targets).compile().as_text()
  loops = [l for l in hlo.splitlines() if re.search(r"\bwhile\(", l)]
  assert all("known_trip_count" in l for l in loops), loops
  # and the check can fail: jax.random.beta's own loop has no known trip count
  hlo = jax.jit(lambda k: jax.random.beta(k, 0.2, 0.2)).lower(jax.random.key(0)).compile().as_text()
  assert any("known_trip_count" not in l for l in hlo.splitlines() if re.search(r"\bwhile\(", l))
