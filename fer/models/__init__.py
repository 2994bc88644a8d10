"""Models: the searchable CNN and VGG16. `build_model(config.model)` picks one."""

import jax.numpy as jnp


def build_model(model_cfg):
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(model_cfg.dtype)
  if dtype is None:
    raise ValueError(f"model.dtype={model_cfg.dtype!r}: expected float32 or bfloat16")
  if model_cfg.name == "cnn":
    from fer.models import cnn  # pylint: disable=import-outside-toplevel
    return cnn.CNN(
        conv_features=tuple(model_cfg.conv_features),
        convs_per_block=model_cfg.convs_per_block,
        kernel_size=model_cfg.kernel_size,
        pool=model_cfg.pool,
        batch_norm=model_cfg.batch_norm,
        conv_dropout=model_cfg.conv_dropout,
        dense_features=tuple(model_cfg.dense_features),
        dropout=model_cfg.dropout,
        dtype=dtype,
    )
  raise ValueError(f"model.name={model_cfg.name!r}: expected one of: cnn")
