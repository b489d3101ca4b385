"""What every tiled decode shares: its settings, the blend strategy interface, and the
helpers of both tilings (latent padding, the decoder's tile shape, uint8 output).

The blend strategies live in `decode.py` (the original's four shifted tilings,
'original' and 'partition') and `decode_overlap.py` (overlapping tiles, 'overlap' and
'shared'); both import this module and neither imports the other, and `decode.py`
picks one by `TiledDecodeSettings.blend_mode` (`decode.blend_of`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from tiled_ldm_jax import geometry

Array = jax.Array
DecodeFn = Callable[[Any, Array], Array]   # (params, z [B, h, w, C]) -> image [B, fh, fw, 3]

BLEND_MODES = ('original', 'partition', 'overlap', 'shared')


@dataclasses.dataclass(frozen=True)
class TiledDecodeSettings:
  """How to decode. Defaults: DiffInfinite's (latent x 50, clip to [0, 1]), 512 px tiles."""
  patch_size: int = 512               # p: pixel tile side; a multiple of 2 * factor
  factor: int = geometry.SD_VAE_FACTOR  # f: decoder upsampling (pixels per latent pixel)
  tile_batch: int = 8                 # tiles per decoder call (device memory knob)
  band_tiles: int | None = None       # tile rows per band; None: the fewest that fill a batch
  latent_scale: float = geometry.DIFFINFINITE_LATENT_SCALE  # decoder input = z * scale * std
                                      # + mean (pipelines pass the VAE's LatentGeometry)
  latent_mean: tuple[float, ...] | None = None   # per-channel, default 0
  latent_std: tuple[float, ...] | None = None    # per-channel, default 1
  out_scale: float = 1.0              # tile = clip(decoder(...) * out_scale + out_offset)
  out_offset: float = 0.0
  clip: tuple[float, float] | None = (0.0, 1.0)
  blend: bool = True                  # False: the unshifted tiled decode alone (A)
  blend_mode: str = 'original'        # 'original': SPEC 4 exactly; 'partition': the four
                                      # decodes weighted (1-v)(1-h), v(1-h), (1-v)h, vh
                                      # (no residual seam; decode.py); 'overlap': tiles
                                      # overlapping by `overlap`, cross-faded, ~1.3
                                      # decodes per pixel, not four; 'shared': the same
                                      # with every GroupNorm given whole-image statistics
                                      # (decode_overlap.py, decode_norm.py)
  overlap: int | None = None          # 'overlap'/'shared': latent pixels neighbouring
                                      # tiles share, 1 .. P/2 (default P/8)
  norm_tiles: int = 4                 # 'shared': tiles of the statistics pass
                                      # (rounded up to whole tile batches)
  min_tile: int | None = None         # 'shared'/'overlap': decode tiles of at least this
                                      # many pixels; None: the mode's (512 for 'shared',
                                      # none for 'overlap'; decode_overlap.Overlap)
  edge_margin: int | None = None      # 'overlap'/'shared': latent pixels reflected around
                                      # the latent so the image border decodes as
                                      # interior (no frame); None: the mode's (2 for
                                      # 'shared', 0 for 'overlap'; decode_overlap.Overlap)
  pad_mode: str = 'reflect'           # numpy.pad mode for the latent's bottom/right padding

  def __post_init__(self):
    if self.factor < 1 or self.patch_size < 2 * self.factor or \
        self.patch_size % (2 * self.factor):
      raise ValueError(f'patch_size must be a positive multiple of 2 * factor '
                       f'({2 * self.factor}), got {self.patch_size}')
    if self.tile_batch < 1:
      raise ValueError(f'tile_batch must be >= 1, got {self.tile_batch}')
    if self.band_tiles is not None and self.band_tiles < 1:
      raise ValueError(f'band_tiles must be >= 1 or None, got {self.band_tiles}')
    if self.blend_mode not in BLEND_MODES:
      raise ValueError(f'blend_mode must be one of {BLEND_MODES}, got {self.blend_mode!r}')
    if self.edge_margin is not None and not 0 <= self.edge_margin <= self.latent_patch // 2:
      raise ValueError(f'edge_margin must be 0 .. {self.latent_patch // 2} latent pixels, '
                       f'got {self.edge_margin}')
    if self.min_tile is not None and self.min_tile < 0:
      raise ValueError(f'min_tile must be >= 0 or None, got {self.min_tile}')
    if self.norm_tiles < 1:
      raise ValueError(f'norm_tiles must be >= 1, got {self.norm_tiles}')
    if self.overlap is not None and not 1 <= self.overlap <= self.latent_patch // 2:
      raise ValueError(f'overlap must be 1 .. {self.latent_patch // 2} latent pixels (half '
                       f'a tile), got {self.overlap}')
    if self.clip is not None and not self.clip[0] <= self.clip[1]:
      raise ValueError(f'clip must be (low, high) with low <= high, got {self.clip}')
    for name in ('latent_mean', 'latent_std'):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

  @property
  def latent_patch(self) -> int:
    """P: latent tile side."""
    return self.patch_size // self.factor

  def decoder_input(self, z: np.ndarray) -> np.ndarray:
    """z [..., C] -> z * latent_scale * std + mean, float32."""
    z = np.asarray(z, np.float32)
    c = z.shape[-1]
    for name in ('latent_mean', 'latent_std'):
      v = getattr(self, name)
      if v is not None and len(v) != c:
        raise ValueError(f'{name} has {len(v)} entries, the latent has {c} channels')
    std = np.asarray(self.latent_std if self.latent_std is not None else np.ones(c), np.float32)
    mean = np.asarray(self.latent_mean if self.latent_mean is not None else np.zeros(c),
                      np.float32)
    return (z * np.float32(self.latent_scale) * std + mean).astype(np.float32)


class Blend(Protocol):
  """A tiled decode strategy: how tiles are laid out, decoded and combined."""

  def passes_per_pixel(self, s: TiledDecodeSettings, h: int, w: int) -> float:
    """Decoder evaluations per output pixel for a latent h x w (tiles x P^2 / (h w))."""

  def band_layout(self, s: TiledDecodeSettings, h: int, w: int) -> tuple[int, int]:
    """(pixel rows per band, number of bands)."""

  def iter_bands(self, decode: DecodeFn, params, z: np.ndarray, s: TiledDecodeSettings, *,
                 uint8: bool, bands: tuple[int, int] | None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """`decode.iter_decode_bands` for this strategy; z [h, w, C] is the decoder input."""

  def seam_lines(self, s: TiledDecodeSettings) -> tuple[tuple[int, int], ...]:
    """(period, offset) pairs of pixel lines where its tiles meet (for seam measures)."""

  def tile_px(self, s: TiledDecodeSettings) -> int:
    """Side in pixels of the tiles it decodes (the decoder call's shape)."""


def pad_latent(z: np.ndarray, rows: int, cols: int, mode: str) -> np.ndarray:
  """[h, w, C] -> [rows, cols, C], padding bottom/right with `mode` ('edge' for length 1)."""
  h, w, _ = z.shape
  for axis, (size, target) in enumerate(((h, rows), (w, cols))):
    if target > size:
      pad = [(0, 0)] * 3
      pad[axis] = (0, target - size)
      z = np.pad(z, pad, mode='edge' if size == 1 and mode in ('reflect', 'symmetric')
                 else mode)
  return z


_TILE_SHAPES: dict = {}


def tile_output_shape(decode: DecodeFn, params, tile_shape) -> jax.ShapeDtypeStruct:
  """What `decode` makes of a tile batch, traced once per (decoder, tile shape): the
  decoder is a pure function of one config, so the params' shapes are those of its
  first call."""
  key = (decode, tuple(tile_shape))
  if key not in _TILE_SHAPES:
    _TILE_SHAPES[key] = jax.eval_shape(decode, params,
                                       jax.ShapeDtypeStruct(tile_shape, jnp.float32))
  return _TILE_SHAPES[key]


def check_tile_output(decode: DecodeFn, params, tile_shape, factor: int) -> int:
  """Output channels of `decode` on [B, P, P, C] tiles; ValueError unless it maps them
  to P f x P f pixels."""
  P = tile_shape[1]
  out = tile_output_shape(decode, params, tile_shape)
  if tuple(out.shape[1:3]) != (P * factor, P * factor):
    raise ValueError(f'decoder maps a {P}x{P} latent tile to {out.shape[1:3]} pixels, '
                     f'expected {P * factor}x{P * factor} (factor={factor})')
  return out.shape[-1]


def band_range(bands: tuple[int, int] | None, n_bands: int) -> tuple[int, int]:
  """(first, stop) of the bands to decode; ValueError outside 0 .. n_bands."""
  first, stop = (0, n_bands) if bands is None else (int(bands[0]), int(bands[1]))
  if not 0 <= first <= stop <= n_bands:
    raise ValueError(f'bands {bands} outside the {n_bands} bands of this latent')
  return first, stop


def to_uint8(x: Array | np.ndarray):
  """float in [0, 1] -> uint8 `trunc(clip(x, 0, 1) * 255)` (the original's PNG saving)."""
  mod = jnp if isinstance(x, jax.Array) else np
  return (mod.clip(x, 0.0, 1.0) * 255).astype(mod.uint8)
