"""Converted model folders: an orbax checkpoint of the params plus `model.json`.

The only module that imports orbax. Layout of a folder:
  model.json   {"format": 1, "model": "image_unet"|"mask_unet"|"vae", "config": {...}}
  params/      orbax PyTree checkpoint of the Flax params
Restores run against the abstract tree built from `model.json`, so a folder whose
params do not fit its config is an error, not a silently different model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tiled_ldm_jax.models import configs as configs_lib

MODEL_KINDS = ('image_unet', 'mask_unet', 'vae')
_FORMAT = 1


def _abstract(model: str, config):
  if model == 'vae':
    from tiled_ldm_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
    return vae_lib.abstract_params(config)
  from tiled_ldm_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  return unet_lib.abstract_params(config)


def config_from_dict(model: str, d: dict[str, Any]):
  if model == 'vae':
    return configs_lib.vae_config_from_dict(d)
  return configs_lib.unet_config_from_dict(d)


def save_model(directory: str, model: str, config, params) -> None:
  """Writes `directory` atomically (a temporary sibling renamed at the end)."""
  if model not in MODEL_KINDS:
    raise ValueError(f'model must be one of {MODEL_KINDS}, got {model!r}')
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f'output folder exists and is not empty: {directory}')
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tmp-' + os.path.basename(directory) + '-', dir=parent)
  try:
    params = jax.tree_util.tree_map(np.asarray, params)
    with ocp.PyTreeCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, 'params'), params)
    meta = {'format': _FORMAT, 'model': model, 'config': configs_lib.config_to_dict(config)}
    with open(os.path.join(tmp, 'model.json'), 'w') as f:
      json.dump(meta, f, indent=1)
    if os.path.exists(directory):
      os.rmdir(directory)
    os.replace(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def read_model_json(directory: str) -> tuple[str, Any]:
  path = os.path.join(directory, 'model.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'not a converted model folder (no model.json): {directory}')
  with open(path) as f:
    meta = json.load(f)
  if meta.get('format') != _FORMAT or meta.get('model') not in MODEL_KINDS:
    raise ValueError(f'{path}: unsupported format {meta.get("format")!r} / model '
                     f'{meta.get("model")!r}')
  return meta['model'], config_from_dict(meta['model'], meta['config'])


def load_model(directory: str, expect: str | None = None):
  """(model kind, config, params) from a folder written by `save_model`."""
  directory = os.path.abspath(directory)
  model, config = read_model_json(directory)
  if expect is not None and model != expect:
    raise ValueError(f'{directory} holds a {model} model, expected {expect}')
  abstract = _abstract(model, config)
  with ocp.PyTreeCheckpointer() as ckptr:
    restore_args = jax.tree_util.tree_map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray),
                                          abstract)
    try:
      params = ckptr.restore(os.path.join(directory, 'params'), item=abstract,
                             restore_args=restore_args)
    except (ValueError, KeyError) as e:
      raise ValueError(f'{directory}: params do not fit model.json ({e})') from e
  bad = [f'{jax.tree_util.keystr(p)}: {np.shape(v)} != {s.shape}'
         for (p, v), s in zip(jax.tree_util.tree_leaves_with_path(params),
                              jax.tree_util.tree_leaves(abstract))
         if tuple(np.shape(v)) != tuple(s.shape)]
  if bad:
    raise ValueError(f'{directory}: params do not fit model.json:\n  ' + '\n  '.join(bad))
  params = jax.tree_util.tree_map(lambda v, s: np.asarray(v, s.dtype), params, abstract)
  return model, config, params
