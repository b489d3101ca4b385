"""PyTorch state dicts -> Flax params: a declarative key map and a strict merge.

Flax parameter paths mirror the checkpoint keys they come from: the module path joined
with '.', where a list index written `name_3` in Flax is `name.3` in PyTorch, and the
leaf is renamed by `_LEAF` (`kernel` -> `weight`, ...). The layout change is decided by
the leaf and its rank only: conv kernels OIHW -> HWIO, linear weights transposed, the
U-Net's channel LayerNorm gain (1, C, 1, 1) -> (C,).

Conversion is strict: every Flax parameter must be filled, every source key used, every
shape must match; otherwise `ConversionError` lists all offending keys at once.
Checkpoints are read without torch: `.pt`/`.bin` pickles by `tiled_ldm_jax.convert.torch_zip`,
which runs nothing from the file, safetensors with numpy. Tensors are read from the file
one at a time as they are converted, so conversion holds little beyond the output.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from tiled_ldm_jax import geometry
from tiled_ldm_jax.files import json_files
from tiled_ldm_jax.convert import safetensors_file
from tiled_ldm_jax.convert import torch_zip
from tiled_ldm_jax.models import configs as configs_lib


class ConversionError(ValueError):
  """A checkpoint's keys or shapes do not match the model it is converted into."""


def _kernel(w: np.ndarray) -> np.ndarray:
  if w.ndim == 4:    # conv: OIHW -> HWIO
    return np.transpose(w, (2, 3, 1, 0))
  if w.ndim == 2:    # linear: [out, in] -> [in, out]
    return np.transpose(w)
  raise ConversionError(f'kernel of rank {w.ndim} has no layout rule')


# Flax leaf name -> (PyTorch leaf name, layout transform).
_LEAF: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    'kernel': ('weight', _kernel),
    'bias': ('bias', lambda w: w),
    'scale': ('weight', lambda w: w),        # GroupNorm affine gain
    'embedding': ('weight', lambda w: w),    # nn.Embedding table
    'g': ('g', lambda w: w.reshape(-1)),     # channel LayerNorm gain [1, C, 1, 1]
    'null_classes_emb': ('null_classes_emb', lambda w: w),
}
_INDEX = re.compile(r'_(\d+)(?=_|$)')


def torch_key(path: tuple[str, ...]) -> str:
  """The PyTorch key a Flax param path comes from, e.g. ('downs_0_2', 'to_q', 'kernel')."""
  *modules, leaf = path
  if leaf not in _LEAF:
    raise ConversionError(f'Flax param {"/".join(path)} has no conversion rule')
  parts = [_INDEX.sub(r'.\1', m) for m in modules] + [_LEAF[leaf][0]]
  return '.'.join(parts)


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(p, 'key', getattr(p, 'name', str(p))) for p in path)


def _source_shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
  """A value's shape without reading it (a `torch_zip.StateDict` knows it from the pickle)."""
  if isinstance(state_dict, torch_zip.StateDict):
    return tuple(state_dict.tensor(key).shape)
  if isinstance(state_dict, safetensors_file.SafetensorsFile):
    return state_dict.shape(key)
  return tuple(np.shape(state_dict[key]))


def converted_leaves(state_dict: Mapping[str, np.ndarray], abstract_params: Any, *,
                     prefix: str = '', what: str = 'checkpoint') -> Iterator[np.ndarray]:
  """The leaves of `abstract_params` (in `tree_leaves` order) filled from `state_dict`.

  Every key and shape is checked first, from shapes alone, so a mismatch raises
  `ConversionError` (listing all offending keys) before any tensor is read; the returned
  iterator then reads, converts and yields one leaf at a time, so a consumer that writes
  and drops each leaf holds one tensor, not the model.
  """
  # Keys only: a lazy mapping (torch_zip.StateDict) reads a tensor when it is looked up.
  source = {k[len(prefix):]: k for k in state_dict.keys() if k.startswith(prefix)}
  plan, missing, mismatched = [], [], []
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
    names = _path_names(path)
    key = torch_key(names)
    if key not in source:
      missing.append(prefix + key)
      continue
    transform = _LEAF[names[-1]][1]
    shape = _source_shape(state_dict, source[key])
    # The layout rule applied to a zero-stride array of that shape: the shape it gives.
    got = tuple(transform(np.broadcast_to(np.zeros((), np.float32), shape)).shape)
    if got != tuple(leaf.shape):
      mismatched.append(f'{prefix + key}: checkpoint {shape} -> {got}, model expects '
                        f'{tuple(leaf.shape)}')
    plan.append((source[key], transform, leaf.dtype))
  used = {k for k, _, _ in plan}
  unused = sorted(k for k in source.values() if k not in used)
  if missing or unused or mismatched:
    lines = [f'{what} does not match the model:']
    for title, keys in (('missing keys', missing), ('unused keys', unused),
                        ('shape mismatches', mismatched)):
      if keys:
        lines.append(f'  {title} ({len(keys)}):')
        lines.extend(f'    {k}' for k in sorted(keys))
    raise ConversionError('\n'.join(lines))

  def leaves():
    for key, transform, dtype in plan:
      raw = np.asarray(state_dict[key], dtype=np.float32)
      if not np.isfinite(raw).all():   # NaN/inf weights give black images, not errors
        raise ConversionError(f'{what}: tensor {key!r} holds NaN or inf values')
      # A C-contiguous copy of the target dtype; `raw` (and any transposed view) is freed.
      yield np.ascontiguousarray(transform(raw), dtype=dtype)
  return leaves()


def convert_state_dict(state_dict: Mapping[str, np.ndarray], abstract_params: Any, *,
                       prefix: str = '', what: str = 'checkpoint') -> Any:
  """Fills a Flax param tree (`jax.ShapeDtypeStruct` leaves) from `state_dict`.

  Args:
    state_dict: PyTorch key -> array. Keys outside `prefix` are ignored (a training
      checkpoint holds optimizer state and the online model beside the EMA weights).
    abstract_params: the target tree, e.g. `jax.eval_shape(model.init, ...)['params']`.
    prefix: the part of every key before the module path, e.g. 'ema_model.model.'.
    what: named in error messages.
  Returns:
    The same tree with numpy arrays of the target dtype.
  Raises:
    ConversionError listing every missing key, unused key and shape mismatch.
  """
  leaves = list(converted_leaves(state_dict, abstract_params, prefix=prefix, what=what))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_params), leaves)


# ----------------------------------------------------------------------------- readers


def _require_file(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} not found: {path}')


def read_diffinfinite_checkpoint(path: str) -> torch_zip.StateDict:
  """EMA weights of a DiffInfinite `model-N.pt`, keys `ema_model.model.*` kept whole.

  A mapping whose values are read from the file when looked up: floating tensors as
  float32 (numpy has no bfloat16 arithmetic), others in their stored dtype.
  """
  _require_file(path, 'DiffInfinite checkpoint')
  ckpt = torch_zip.load(path)
  if not isinstance(ckpt, dict) or 'ema' not in ckpt:
    keys = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ConversionError(f'{path} is not a DiffInfinite Trainer checkpoint (no "ema"; '
                          f'has {keys})')
  return torch_zip.StateDict(torch_zip.tensors_of(ckpt['ema'], f'{path} ["ema"]'))


def read_diffusers_folder(folder: str) -> tuple[dict[str, Any], Mapping[str, np.ndarray]]:
  """(config dict, state dict) of a diffusers model folder (safetensors or .bin)."""
  config_path = os.path.join(folder, 'config.json')
  config = read_json(config_path, 'diffusers config')
  st = os.path.join(folder, 'diffusion_pytorch_model.safetensors')
  binf = os.path.join(folder, 'diffusion_pytorch_model.bin')
  if os.path.isfile(st):
    return config, safetensors_file.load(st)
  if os.path.isfile(binf):
    return config, torch_zip.StateDict(torch_zip.tensors_of(torch_zip.load(binf), binf))
  raise FileNotFoundError(f'no diffusion_pytorch_model.safetensors or .bin in {folder}')


def read_json(path: str, what: str = 'config JSON') -> dict[str, Any]:
  """A JSON object from a small file (`json_files.read_object`: one-line errors)."""
  return json_files.read_object(path, what)


DIFFINFINITE_PREFIX = 'ema_model.model.'


def convert_unet(kind: str, state_dict: Mapping[str, np.ndarray], torch_config: Mapping[str, Any],
                 *, prefix: str = DIFFINFINITE_PREFIX):
  """(UNetConfig, params) from a DiffInfinite state dict and its `config.json` dict."""
  config, abstract, leaves = _unet_leaves(kind, state_dict, torch_config, prefix=prefix)
  return config, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def _unet_leaves(kind, state_dict, torch_config, *, prefix=DIFFINFINITE_PREFIX):
  """(UNetConfig, abstract params, checked lazy leaf iterator)."""
  from tiled_ldm_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  config = configs_lib.unet_config_from_torch(kind, torch_config)
  abstract = unet_lib.abstract_params(config)
  return config, abstract, converted_leaves(state_dict, abstract, prefix=prefix,
                                            what=f'{kind} U-Net checkpoint')


def convert_vae(diffusers_config: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                latent_scale: float = geometry.DIFFINFINITE_LATENT_SCALE):
  """(VAEConfig, params) from a diffusers `AutoencoderKL` config dict and state dict.

  `latent_scale` (VAE latent = diffusion latent * latent_scale) is not part of a diffusers
  config; it is stored with the converted VAE so the sampler and decoder agree on it.
  """
  from tiled_ldm_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  config = configs_lib.vae_config_from_diffusers(diffusers_config,
                                                 latent_scale=float(latent_scale))
  abstract = vae_lib.abstract_params(config)
  params = convert_state_dict(state_dict, abstract, what='AutoencoderKL checkpoint')
  return config, params


def convert_checkpoint(kind: str, torch_checkpoint: str, output_dir: str,
                       config_json: str | None = None, latent_scale: float | None = None,
                       return_params: bool = True):
  """Converts a PyTorch checkpoint into a model folder (see `tiled_ldm_jax.models.checkpoint`).

  Args:
    kind: 'image_unet', 'mask_unet' or 'vae'.
    torch_checkpoint: a DiffInfinite `model-N.pt` (U-Nets; its EMA weights are taken) or a
      diffusers `AutoencoderKL` folder (vae).
    output_dir: the folder to write; must not exist or be empty.
    config_json: U-Nets only: the constructor arguments (`{"unet": {...}, "dm": {...}}`);
      default `config.json` beside the checkpoint.
    latent_scale: VAE only: stored in its config (default DiffInfinite's 50).
    return_params: False: params are not returned (None), so the model is never held
      whole: leaves are converted and written one ~16 MiB part at a time.
  Returns:
    (config, params as written, read back from `output_dir`) or (config, None).
  """
  from tiled_ldm_jax.models import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  if kind not in checkpoint_lib.MODEL_KINDS:
    raise ValueError(f'kind must be one of {checkpoint_lib.MODEL_KINDS}, got {kind!r}')
  if os.path.exists(output_dir) and os.listdir(output_dir):
    raise FileExistsError(f'output folder exists and is not empty: {output_dir}')
  if kind == 'vae':
    if config_json is not None:
      raise ValueError('--config_json is for the U-Nets; a VAE folder has its config.json')
    if not os.path.isdir(torch_checkpoint):
      raise FileNotFoundError(f'diffusers VAE folder not found: {torch_checkpoint}')
    scale = geometry.DIFFINFINITE_LATENT_SCALE if latent_scale is None else latent_scale
    config, params = convert_vae(*read_diffusers_folder(torch_checkpoint), latent_scale=scale)
    leaves = jax.tree_util.tree_leaves(params)
    del params
  else:
    if latent_scale is not None:
      raise ValueError('--latent_scale is stored with the VAE; not for the U-Nets')
    # Checked before the default config.json beside it, so the error names the checkpoint.
    _require_file(torch_checkpoint, 'DiffInfinite checkpoint')
    if config_json is None:
      config_json = os.path.join(os.path.dirname(os.path.abspath(torch_checkpoint)),
                                 'config.json')
    torch_config = read_json(config_json)
    config, _, leaves = _unet_leaves(kind.split('_')[0],
                                     read_diffinfinite_checkpoint(torch_checkpoint), torch_config)
  checkpoint_lib.save_model_leaves(output_dir, kind, config, leaves)
  if not return_params:
    return config, None
  return config, checkpoint_lib.load_model(output_dir, expect=kind)[2]
