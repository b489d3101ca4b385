"""`configs/*.py` files: the one loader from a config file to a ConfigDict or typed config.

A config file defines `get_config()` returning an `ml_collections.ConfigDict` (as in the
flax examples and big_vision). Model files (`configs/demo_vae.py`, ...) hold
`model` (image_unet | mask_unet | vae) and the fields they change of that model's config
dataclass; `models.configs.model_config` turns them into the typed config. Training files
are read by `tiled_ldm_jax.training.load_config` the same way.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from tiled_ldm_jax.models import configs as configs_lib


def load(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of the Python file at `path`, as a ConfigDict."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file not found: {path}')
  spec = importlib.util.spec_from_file_location('_tiled_ldm_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise configs_lib.ConfigError(f'{path} has no get_config()')
  return ml_collections.ConfigDict(module.get_config())


def model_config(config):
  """(model kind, typed config) of a model ConfigDict (or dict): `{'model': kind, ...}`."""
  d = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
  kind = d.pop('model', None)
  return kind, configs_lib.model_config(kind, d)


def load_model_config(path: str):
  """(model kind, typed config) of a `configs/*.py` model file."""
  return model_config(load(path))
