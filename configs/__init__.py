"""Experiment configs: one get_config(arg) per file, taken by `python -m fer.main --config=...`."""
