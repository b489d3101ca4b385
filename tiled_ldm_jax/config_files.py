"""`configs/*.py` files: load a `get_config()` and turn it into a typed model config."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from tiled_ldm_jax.models import configs as configs_lib


def load_config_dict(path: str) -> dict[str, Any]:
  """Runs `get_config()` of the Python file at `path`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file not found: {path}')
  spec = importlib.util.spec_from_file_location('_tiled_ldm_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'{path} has no get_config()')
  return dict(module.get_config())


def model_config_from_dict(d: dict[str, Any]):
  """(model kind, typed config) from a `{'model': kind, **fields}` dict."""
  d = dict(d)
  model = d.pop('model', None)
  if model in ('image_unet', 'mask_unet'):
    return model, configs_lib.unet_config_from_dict({'kind': model.split('_')[0], **d})
  if model == 'vae':
    return model, configs_lib.vae_config_from_dict(d)
  raise configs_lib.ConfigError(f"config 'model' must be image_unet, mask_unet or vae, "
                                f'got {model!r}')


def load_model_config(path: str):
  """(model kind, typed config) of a `configs/*.py` model file."""
  return model_config_from_dict(load_config_dict(path))
