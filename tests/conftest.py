"""Shared pytest fixtures."""

import pytest

import fer2013_fakes


@pytest.fixture
def fer2013_zip(tmp_path):
  """A tiny Kaggle-layout archive.zip: 7 classes x 3 split prefixes x 2 JPEGs (42 images)."""
  return fer2013_fakes.write_zip(tmp_path / "archive.zip", fer2013_fakes.kaggle_members())
