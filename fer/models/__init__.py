"""Models: the searchable CNN and VGG16. `build_model(config.model)` picks one by `model.name`:

  cnn         the searchable CNN (fer/models/cnn.py)
  vgg16       VGG16 conv base plus head on images (fer/models/vgg16.py); keys head_features,
              head_dropout, head_pool, input_size, preprocess (added by configs/vgg16_*.py)
  vgg16_head  the VGG16 head alone, on features cached by fer/features.py (same keys)
  resnet      a ResNet (fer/models/resnet.py): conv_features are the stage widths,
              blocks_per_stage residual blocks each, then dense_features and dropout
  package.module:ClassName
              your own flax.linen Module, imported and built with model.kwargs (and model.dtype
              where the class has a `dtype` field): see plugin_model and configs/mini_xception.py
"""

import dataclasses
import importlib

import flax.linen as nn
import jax.numpy as jnp

from fer.models import layers


def plugin_model(name: str, kwargs, dtype) -> nn.Module:
  """`name` = "package.module:ClassName", a flax.linen Module whose `__call__(x, train=False)`
  takes uint8 images [N, H, W, 1] (0..255; H = W = 48, or the crop size under ten-crop TTA) and
  returns logits [N, 7]. It may use nn.Dropout (rng "dropout", deterministic=not train) and
  BatchNorm (use_running_average=not train; collection "batch_stats"). Everything else (training,
  checkpoints, TTA, ensembles, distillation, fer.predict/explain/export) works as for the built-in
  models, wherever the module is importable (run from the folder above `package`, or put it on
  PYTHONPATH)."""
  module_name, _, attr = name.partition(":")
  where = f"model.name={name!r}"
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"{where}: cannot import {module_name!r} ({e}); run from the folder that "
                     f"holds it or add that folder to PYTHONPATH") from e
  cls = getattr(module, attr, None)
  if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
    raise ValueError(f"{where}: {module_name} has no flax.linen Module named {attr!r} (found "
                     f"{type(cls).__name__})")
  kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs or {})
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  if "dtype" in {f.name for f in dataclasses.fields(cls)} and "dtype" not in kwargs:
    kwargs["dtype"] = dtype
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ValueError(f"{where} with model.kwargs={kwargs}: {e}") from e


def build_model(model_cfg):
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(model_cfg.dtype)
  if dtype is None:
    raise ValueError(f"model.dtype={model_cfg.dtype!r}: expected float32 or bfloat16")
  if ":" in model_cfg.name:
    return plugin_model(model_cfg.name, model_cfg.get("kwargs"), dtype)
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
        conv_impl=layers.resolve_conv_impl(model_cfg.get("conv_impl", "auto")),
        pool_impl=model_cfg.get("pool_impl", "reshape"),
    )
  if model_cfg.name == "resnet":
    from fer.models import resnet  # pylint: disable=import-outside-toplevel
    blocks = model_cfg.get("blocks_per_stage", 2)
    if not isinstance(blocks, int) or blocks < 1 or not model_cfg.conv_features:
      raise ValueError(f"model.blocks_per_stage={blocks!r} and model.conv_features="
                       f"{tuple(model_cfg.conv_features)}: a resnet needs at least one block "
                       "per stage and one stage")
    return resnet.ResNet(
        stage_features=tuple(model_cfg.conv_features),
        blocks_per_stage=blocks,
        dense_features=tuple(model_cfg.dense_features),
        dropout=model_cfg.dropout,
        dtype=dtype,
        conv_impl=layers.resolve_conv_impl(model_cfg.get("conv_impl", "auto")),
        pool_impl=model_cfg.get("pool_impl", "reshape"),
    )
  if model_cfg.name in ("vgg16", "vgg16_head"):
    from fer.models import vgg16  # pylint: disable=import-outside-toplevel
    model = vgg16.VGG16(
        head_features=tuple(model_cfg.head_features),
        head_dropout=model_cfg.head_dropout,
        head_pool=model_cfg.head_pool,
        input_size=model_cfg.input_size,
        preprocess=model_cfg.preprocess,
        dtype=dtype,
    )
    return model if model_cfg.name == "vgg16" else vgg16.head_of(model)
  raise ValueError(f"model.name={model_cfg.name!r}: expected one of: cnn, resnet, vgg16, "
                   "vgg16_head, or package.module:ClassName (your own flax module)")
