"""Data sets: the FER2013 TFDS builder and a synthetic, learnable stand-in for tests."""
