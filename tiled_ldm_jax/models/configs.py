"""Typed configs, and the one path to them from a dict: `from_dict`.

`from_dict` serves `configs/*.py` files (ConfigDicts), checkpoint `model.json` files and
the training config alike; the PyTorch/diffusers readers below translate foreign
`config.json` files.

Construction is strict: an option this port does not implement (or implements only at
its default value) is rejected with its name, so a checkpoint can never be converted
into a model that silently computes something else.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Mapping

import jax.numpy as jnp

from tiled_ldm_jax import geometry


class ConfigError(ValueError):
  """A config holds an option, or a value, that this port does not implement."""


def _dtype(name: str):
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ConfigError(f'unknown dtype {name!r}') from e


def _is(value, kind) -> bool:
  """`value` is a `kind` as a config field holds it (no bools for ints, finite floats)."""
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
  return isinstance(value, kind)


class _Dtypes:
  """`dtype` / `param_dtype` strings as numpy dtypes; field types checked at construction
  (a config read from a file holds exactly the types its fields declare)."""

  def _check_types(self) -> None:
    hints = _hints(type(self))
    for f in dataclasses.fields(self):
      value, hint = getattr(self, f.name), hints[f.name]
      item = _tuple_item_type(hint)
      if item is not None:
        if value is None and type(None) in typing.get_args(hint):
          continue
        if not (isinstance(value, tuple) and all(_is(v, item) for v in value)):
          raise ConfigError(f'{type(self).__name__}.{f.name} must be a list of '
                            f'{item.__name__}, got {_short(value)}')
      elif hint in (int, float, str, bool) and not _is(value, hint):
        raise ConfigError(f'{type(self).__name__}.{f.name} must be a '
                          f'{"finite " if hint is float else ""}{hint.__name__}, got '
                          f'{_short(value)}')

  @property
  def compute_dtype(self):
    return _dtype(self.dtype)

  @property
  def params_dtype(self):
    return _dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class UNetConfig(_Dtypes):
  """The DiffInfinite U-Net skeleton shared by the image and the mask model.

  `kind` selects the conditioning: "image" (mask cross-attention at every level, class =
  max label of the mask) or "mask" (class-conditioned, linear attention per level, full
  attention in the middle, learned null class embedding).
  """
  kind: str                      # "image" or "mask"
  dim: int                       # base width; time/class embeddings are 4*dim wide
  num_classes: int               # rows of the class embedding table
  dim_mults: tuple[int, ...]     # width multiplier per resolution level
  channels: int = 4              # latent channels in and out
  resnet_block_groups: int = 8   # GroupNorm groups in every ResnetBlock
  block_per_layer: int = 2       # ResnetBlocks per level (down and up)
  heads: int = 4                 # attention heads (fixed in the original)
  dim_head: int = 32             # width per attention head (fixed in the original)
  dense_cross_attention: bool = False  # image model: O(N^2) softmax instead of the exact O(N) form
  dtype: str = 'float32'         # compute dtype of convs/matmuls (norms/softmax stay float32)
  param_dtype: str = 'float32'   # dtype parameters are stored and initialised in

  def __post_init__(self):
    self._check_types()
    if self.kind not in ('image', 'mask'):
      raise ConfigError(f'UNetConfig.kind must be "image" or "mask", got {self.kind!r}')
    for name in ('dim', 'num_classes', 'channels', 'resnet_block_groups', 'block_per_layer',
                 'heads', 'dim_head'):
      if int(getattr(self, name)) < 1:
        raise ConfigError(f'UNetConfig.{name} must be >= 1, got {getattr(self, name)}')
    if not self.dim_mults:
      raise ConfigError('UNetConfig.dim_mults must not be empty')
    for width in self.dims:
      if width % self.resnet_block_groups:
        raise ConfigError(f'width {width} is not divisible by resnet_block_groups='
                          f'{self.resnet_block_groups}')
    _dtype(self.dtype), _dtype(self.param_dtype)

  @property
  def dims(self) -> list[int]:
    return [self.dim] + [self.dim * m for m in self.dim_mults]

  @property
  def in_out(self) -> list[tuple[int, int]]:
    d = self.dims
    return list(zip(d[:-1], d[1:]))

  @property
  def downsample_factor(self) -> int:
    """Latent side must be a multiple of this (one stride-2 conv per level but the last)."""
    return 2 ** (len(self.dim_mults) - 1)



# Constructor arguments of DiffInfinite's `Unet` that we accept only at these values
# (anything else changes the network and is rejected). `cond_drop_prob` is a training
# knob with no effect at inference, so any value is accepted.
_UNET_FIXED = {
    'init_dim': None, 'out_dim': None, 'learned_variance': False,
    'learned_sinusoidal_cond': False, 'random_fourier_features': False,
}
_UNET_IGNORED = {'cond_drop_prob', 'learned_sinusoidal_dim'}
_UNET_FIELDS = {'dim', 'num_classes', 'dim_mults', 'channels', 'resnet_block_groups',
                'block_per_layer'}
# `dm` (GaussianDiffusion) settings: what we implement.
_DM_FIXED = {'objective': 'pred_noise', 'beta_schedule': 'cosine', 'timesteps': 1000}
_DM_IGNORED = {'sampling_timesteps', 'image_size', 'loss_type', 'p2_loss_weight_gamma',
               'p2_loss_weight_k', 'ddim_sampling_eta'}


def unet_config_from_torch(kind: str, cfg: Mapping[str, Any], **overrides) -> UNetConfig:
  """UNetConfig from a DiffInfinite `config.json` dict (`{"unet": {...}, "dm": {...}}`)."""
  return _foreign(_unet_config_from_torch, 'DiffInfinite config.json', kind, cfg, **overrides)


def _foreign(fn, what: str, *args, **kw):
  """`fn(*args)`, with a value of the wrong type anywhere in a foreign config as one
  ConfigError line instead of whatever a conversion raises."""
  if not isinstance(args[-1], Mapping):
    raise ConfigError(f'{what}: expected a JSON object, got {type(args[-1]).__name__}')
  try:
    return fn(*args, **kw)
  except ConfigError:
    raise
  except (TypeError, ValueError, OverflowError, AttributeError, RecursionError) as e:
    raise ConfigError(f'{what}: a value has the wrong type ({type(e).__name__}: {e})') from None


def _unet_config_from_torch(kind: str, cfg: Mapping[str, Any], **overrides) -> UNetConfig:
  for section in ('unet', 'dm'):
    if not isinstance(cfg.get(section, {}), Mapping):
      raise ConfigError(f'config section {section!r} must be an object')
  unknown = set(cfg) - {'unet', 'dm'}
  if unknown:
    raise ConfigError(f'unknown top-level config sections: {sorted(unknown)}')
  unet = dict(cfg.get('unet', {}))
  bad = []
  for key, value in unet.items():
    if key in _UNET_FIELDS or key in _UNET_IGNORED:
      continue
    if key in _UNET_FIXED:
      fixed = _UNET_FIXED[key]
      ok = value == fixed or (key == 'init_dim' and value == unet.get('dim')) or (
          key == 'out_dim' and value == unet.get('channels', 4))
      if not ok:
        bad.append(f'unet.{key}={value!r} (only {fixed!r} is implemented)')
    else:
      bad.append(f'unet.{key} (unknown option)')
  for key, value in dict(cfg.get('dm', {})).items():
    if key in _DM_FIXED and value != _DM_FIXED[key]:
      bad.append(f'dm.{key}={value!r} (only {_DM_FIXED[key]!r} is implemented)')
    elif key not in _DM_FIXED and key not in _DM_IGNORED:
      bad.append(f'dm.{key} (unknown option)')
  if bad:
    raise ConfigError('unsupported config options: ' + '; '.join(bad))
  missing = {'dim', 'num_classes'} - set(unet)
  if missing:
    raise ConfigError(f'config lacks required unet options: {sorted(missing)}')
  args = {k: unet[k] for k in _UNET_FIELDS if k in unet}
  args['dim_mults'] = tuple(int(m) for m in args.get('dim_mults', (1, 2, 4, 8)))
  # The original's defaults where config.json is silent.
  args.setdefault('channels', 3)
  args.setdefault('resnet_block_groups', 8)
  args.setdefault('block_per_layer', 2)
  args.update(overrides)
  return UNetConfig(kind=kind, **args)


# ----------------------------------------------------------------------------- VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig(_Dtypes):
  """A diffusers `AutoencoderKL` (the Stable Diffusion VAE) with its default block types.

  Encoder: DownEncoderBlock2D per entry of `block_out_channels` (stride-2 conv on all but
  the last), mid block (resnet, single-head attention, resnet), GroupNorm/SiLU/conv to
  2*latent_channels, then `quant_conv`. Decoder mirrors it with UpDecoderBlock2D
  (layers_per_block + 1 resnets, nearest x2 + conv on all but the last), after
  `post_quant_conv`. The full-size SD2 VAE is the default.
  """
  in_channels: int = 3                # image channels the encoder reads
  out_channels: int = 3               # image channels the decoder writes
  latent_channels: int = 4            # channels of z (the encoder emits twice that: mean, logvar)
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per resolution level
  layers_per_block: int = 2           # resnets per encoder level (decoder: one more)
  norm_num_groups: int = 32           # GroupNorm groups everywhere (eps 1e-6)
  scaling_factor: float = 0.18215     # diffusers' SD convention (kept from config.json)
  latent_scale: float = geometry.DIFFINFINITE_LATENT_SCALE  # VAE latent = diffusion latent
                                      # * latent_scale (geometry.LatentGeometry; DiffInfinite 50)
  latents_mean: tuple[float, ...] | None = None  # optional per-channel latent stats, kept
  latents_std: tuple[float, ...] | None = None   # for callers; the model does not use them
  dtype: str = 'float32'              # compute dtype of convs/matmuls (norms/softmax stay float32)
  param_dtype: str = 'float32'        # dtype parameters are stored and initialised in

  def __post_init__(self):
    self._check_types()
    if self.scaling_factor <= 0:
      raise ConfigError(f'VAEConfig.scaling_factor must be > 0, got {self.scaling_factor}')
    for name in ('in_channels', 'out_channels', 'latent_channels', 'layers_per_block',
                 'norm_num_groups'):
      if int(getattr(self, name)) < 1:
        raise ConfigError(f'VAEConfig.{name} must be >= 1, got {getattr(self, name)}')
    if not self.block_out_channels:
      raise ConfigError('VAEConfig.block_out_channels must not be empty')
    for width in self.block_out_channels:
      if int(width) < 1 or width % self.norm_num_groups:
        raise ConfigError(f'VAEConfig.block_out_channels entry {width} is not a positive '
                          f'multiple of norm_num_groups={self.norm_num_groups}')
    for name in ('latents_mean', 'latents_std'):
      value = getattr(self, name)
      if value is not None and len(value) != self.latent_channels:
        raise ConfigError(f'VAEConfig.{name} has {len(value)} entries, expected '
                          f'latent_channels={self.latent_channels}')
    _dtype(self.dtype), _dtype(self.param_dtype)
    geometry.LatentGeometry(self.downsample_factor, self.latent_scale)  # validates the scale

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent along each side (one stride-2 conv per level but the last)."""
    return 2 ** (len(self.block_out_channels) - 1)



_VAE_FIELDS = {'in_channels', 'out_channels', 'latent_channels', 'block_out_channels',
               'layers_per_block', 'norm_num_groups', 'scaling_factor'}
# diffusers `AutoencoderKL` options we implement only at this value (per-block lists are
# checked entry by entry below).
_VAE_FIXED = {'act_fn': 'silu', 'use_quant_conv': True, 'use_post_quant_conv': True,
              'mid_block_add_attention': True, 'shift_factor': None}
_VAE_BLOCK_TYPES = {'down_block_types': 'DownEncoderBlock2D',
                    'up_block_types': 'UpDecoderBlock2D'}
# Bookkeeping / pipeline-only keys with no effect on the network.
_VAE_IGNORED = {'_class_name', '_diffusers_version', '_name_or_path', '_use_default_values',
                'sample_size', 'force_upcast'}


def _optional_floats(value):
  return None if value is None else tuple(float(v) for v in value)


def vae_config_from_diffusers(d: Mapping[str, Any], **overrides) -> VAEConfig:
  """VAEConfig from a diffusers `AutoencoderKL` `config.json` dict.

  Raises ConfigError naming every key that is unknown or set to a value this port does
  not implement, or a value of the wrong type. `overrides` set VAEConfig fields directly
  (e.g. dtype='bfloat16').
  """
  return _foreign(_vae_config_from_diffusers, 'AutoencoderKL config.json', d, **overrides)


def _vae_config_from_diffusers(d: Mapping[str, Any], **overrides) -> VAEConfig:
  bad = []
  for key, value in d.items():
    if key in _VAE_FIELDS or key in _VAE_IGNORED or key in ('latents_mean', 'latents_std'):
      continue
    if key in _VAE_FIXED:
      if value != _VAE_FIXED[key] or type(value) is not type(_VAE_FIXED[key]):
        bad.append(f'{key}={value!r} (only {_VAE_FIXED[key]!r} is implemented)')
    elif key in _VAE_BLOCK_TYPES:
      allowed = _VAE_BLOCK_TYPES[key]
      others = sorted({str(t) for t in value} - {allowed})
      if others:
        bad.append(f'{key} contains {others} (only {allowed!r} is implemented)')
    else:
      bad.append(f'{key} (unknown option)')
  if bad:
    raise ConfigError('unsupported AutoencoderKL config options: ' + '; '.join(bad))
  args = {k: d[k] for k in _VAE_FIELDS if k in d}
  # diffusers' defaults where the config is silent.
  args['block_out_channels'] = tuple(int(c) for c in args.get('block_out_channels', (64,)))
  for key in _VAE_BLOCK_TYPES:
    if key in d and len(d[key]) != len(args['block_out_channels']):
      raise ConfigError(f'{key} has {len(d[key])} entries but block_out_channels has '
                        f'{len(args["block_out_channels"])}')
  args.setdefault('layers_per_block', 1)
  args.setdefault('norm_num_groups', 32)
  args['scaling_factor'] = float(args.get('scaling_factor', 0.18215))
  args['latents_mean'] = _optional_floats(d.get('latents_mean'))
  args['latents_std'] = _optional_floats(d.get('latents_std'))
  args.update(overrides)
  return VAEConfig(**args)


# ----------------------------------------------------------------------------- dicts


def config_to_dict(config) -> dict[str, Any]:
  """A config dataclass as a JSON-ready dict (tuples as lists); `from_dict` inverts it."""
  d = dataclasses.asdict(config)
  return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + '...'


@functools.cache
def _hints(cls):
  return typing.get_type_hints(cls)


def _tuple_item_type(hint):
  """The item type of `tuple[X, ...]` or `tuple[X, ...] | None`, else None."""
  for h in typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,):
    if typing.get_origin(h) is tuple:
      args = typing.get_args(h)
      return args[0] if args else object
  return None


def _coerce(cls, name: str, hint, value):
  """`value` as field `name` of `cls` holds it: sequences of tuple fields as tuples of
  their item type, ints of float fields as floats; a plainly wrong scalar type is an error."""
  item = _tuple_item_type(hint)
  if item is not None and isinstance(value, (list, tuple)):
    if item in (int, float) and not all(_is(v, item) or (item is float and _is(v, int))
                                        for v in value):
      raise ConfigError(f'{cls.__name__}.{name} must be a list of {item.__name__}, got '
                        f'{_short(value)}')
    return tuple(float(v) if item is float else v for v in value)
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint in (int, float, str, bool) and not (
      isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
    raise ConfigError(f'{cls.__name__}.{name} must be {hint.__name__}, got {value!r}')
  return value


def from_dict(cls, d: Mapping[str, Any]):
  """`cls(**d)` for a config dataclass, strictly: unknown keys and missing required fields
  are errors naming them; see `_coerce` for the value conversions. `d` may be any mapping
  (a dict, a `model.json` section, an `ml_collections.ConfigDict`)."""
  if hasattr(d, 'to_dict'):
    d = d.to_dict()
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ConfigError(f'unknown {cls.__name__} fields: {unknown} (known: {sorted(fields)})')
  missing = sorted(n for n, f in fields.items() if d.get(n) is None and f.default is
                   dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
  if missing:
    raise ConfigError(f'{cls.__name__} lacks required fields: {missing}')
  return cls(**{k: _coerce(cls, k, hints[k], v) for k, v in d.items()})


# Model kinds of `model.json` and `configs/*.py` files -> (config class, fixed fields).
MODEL_KINDS = {'image_unet': (UNetConfig, {'kind': 'image'}),
               'mask_unet': (UNetConfig, {'kind': 'mask'}),
               'vae': (VAEConfig, {})}


def model_config(model: str, d: Mapping[str, Any]):
  """The typed config of a `model` kind (image_unet | mask_unet | vae) from its fields;
  the U-Nets' `kind` follows from `model` (and must agree if `d` holds it)."""
  if model not in MODEL_KINDS:
    raise ConfigError(f'model must be one of {sorted(MODEL_KINDS)}, got {model!r}')
  cls, fixed = MODEL_KINDS[model]
  d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
  for key, value in fixed.items():
    if d.setdefault(key, value) != value:
      raise ConfigError(f'a {model} config has {key}={d[key]!r}, expected {value!r}')
  return from_dict(cls, d)
