"""A request, resolved once: sizes, each stage's windows and decode, and its memory.

    req = pipe.request(image_size=(2048, 4096), n_batch=1, label=1)   # or request.build
    req.image.windows      # the image stage's placement fields (`SamplerSettings`)
    req.mask.decode        # the mask stage's tiled-decode settings
    req.memory             # {'host', 'device'} bytes one batch needs
    req.check_memory()     # ValueError (one line) if that does not fit

`Options` (how to sample and decode; the one home of those defaults, the commands'
flags included) becomes a `Request` for one image size and batch: every size and patch
is checked (`ValueError`, one line) when it is built, nothing is compiled or run. The
`Pipeline` (pipeline.py), its stage runner (stages.py), the commands (generate/) and the
cost plan (estimate.py) read a request; none of them resolves options again.

This module knows the models only through their configs (`models`: anything with
`unet`, `vae`, `mask_unet` holding `.config` / `.params`, and `geometry`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from tiled_ldm_jax import decode as decode_lib
from tiled_ldm_jax import demo
from tiled_ldm_jax import geometry
from tiled_ldm_jax import masks as masks_lib
from tiled_ldm_jax import memory
from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax.sampling import loop as loop_lib
from tiled_ldm_jax.sampling import processes
from tiled_ldm_jax.sampling import windows as windows_lib

DTYPES = ('float32', 'bfloat16')
GRID_BATCH_PIXELS = windows_lib.GRID_BATCH_PIXELS   # grid: default window batch cap
MASK_DOWNSCALE = 4       # the mask model works at a quarter of the image size
DEFAULT_PATCH_SIZE = 512  # image-model patch of the released DiffInfinite models (pixels)


def field(text: str, default=None):
  """A dataclass field with its help text (the commands' flag help)."""
  return dataclasses.field(default=default, metadata={'help': text})


@dataclasses.dataclass(frozen=True)
class Options:
  """How to sample and decode; the single home of these defaults (CLI flags included)."""
  sampling_steps: int = field('Sampling steps S for both stages (every latent pixel takes '
                              'S steps).', 20)
  cond_scale: float = field('Image guidance w: null + (1+w)(cond - null).', 3.0)
  mask_cond_scale: float = field('Mask model guidance (the original uses 0).', 0.0)
  patch_size: int | None = field('Image model patch and decode tile, pixels (default 512; '
                                 '128 with the demo models).')
  mask_patch_size: int | None = field('Mask model patch and decode tile, pixels (default '
                                      '128).')
  patches_per_step: int | None = field(
      'K patches (windows) per image per sampler iteration (default: 1 for random; for '
      'grid all windows of a level, at most GRID_BATCH_PIXELS latent pixels per call).')
  schedule: str = field("Patch placement: 'grid' (shifted non-overlapping windows, ~1 "
                        "evaluation per pixel and step; sampling/windows.py) or 'random' "
                        "(the original's distribution, with patches_per_step=1). The grid "
                        "is the default: as good on 5 seeds for ~40% fewer U-Net samples "
                        "(docs/generate.md).", 'grid')
  grid_margin: int | None = field(
      'Grid: pixels of context on each side of a window that the model sees but that are '
      'not written (multiple of the latent factor; the window advances patch - 2 margin). '
      'Default, per stage: its patch / 8, or patch / 4 below 15 sampling steps '
      '(FEW_STEPS), rounded down to the latent factor, at least one latent pixel '
      '(docs/generate.md: the seams at 10, 20 and 50 steps). Random placement: a border '
      'of each window this '
      'wide is not written (but at the image edge); default 0, the original\'s.', None)
  grid_margin_first_levels: int | None = field(
      'Grid: the margin also in the first this many levels (where few levels cannot mix '
      'away the tone of whole cells). Default: 1 below 15 sampling steps, else 0.',
      None)
  grid_margin_levels: int | None = field(
      'Grid: the margin only in the last this many levels (earlier levels: margin 0, '
      'each pixel in one window; none: every level). 2: the seams at the untiled floor '
      'within the U-Net budget (docs/generate.md).', 2)
  dtype: str = field('Compute dtype of the U-Nets and the VAE: float32 or bfloat16 '
                     '(params, norms, softmax, DDIM and the sampler state stay float32).',
                     'float32')
  eta: float | None = field(
      "DDIM eta (0: deterministic given the initial noise). Default: 1.0 (the "
      "original's) for solver 'ddim'; 'dpmpp2m' is deterministic (eta unset or 0).", None)
  solver: str = field(
      "Sampling steps: 'ddim' (the original's DDIM with eta) or 'dpmpp2m' "
      "(DPM-Solver++(2M): deterministic, second order, each latent pixel's previous x0 "
      "prediction kept; reaches with fewer steps what DDIM needs more for, see "
      "docs/generate.md).", 'dpmpp2m')
  tile_batch: int = field('VAE tiles per decoder call.', 4)
  blend_mode: str = field("Tiled decode blend: 'shared' (tiles of at least 512 px "
                          "overlapping by 1/8, cross-faded, every GroupNorm with "
                          "whole-image statistics: the fewest decoder passes per pixel on "
                          "large images, closest to a whole-image decode), 'original' (the "
                          "original's four shifted decodes, parity), 'partition' (the same "
                          "four decodes, weights that leave no residual seam) or 'overlap' "
                          "(tiles of the patch size, each with its own statistics) "
                          "(docs/generate.md).", 'shared')
  progress_every: int = field('Sampler progress lines (0: off): the host checks at most '
                              'every N iterations (about every 2 s) and logs about every '
                              '10 s and 5%, with an ETA.', 0)
  resample: int = field('With a keep mask: RePaint resampling passes per step of the '
                        'windows that hold kept and free pixels (each pass takes the '
                        'step back with fresh noise and runs it again, so both sides '
                        'agree at the border; 0: none; its effect on the border seam: '
                        'README).', 2)

  def __post_init__(self):
    for name in ('cond_scale', 'mask_cond_scale', 'eta'):
      value = getattr(self, name)
      if name == 'eta' and value is None:
        continue
      if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f'{name} must be a finite number, got {value!r}')
    loop_lib.check_knobs(**{name: getattr(self, name) for name in (
        'schedule', 'patches_per_step', 'eta', 'grid_margin_levels', 'grid_margin_first_levels',
        'resample', 'progress_every')})
    processes.solver_named(self.solver)
    if self.eta and not isinstance(processes.solver_named(self.solver), processes.DDIM):
      raise ValueError(f"solver {self.solver!r} is deterministic: eta must be 0 or unset, "
                       f"got {self.eta}")
    # tile_batch and blend_mode: the decode's own check (one place for each)
    decode_lib.TiledDecodeSettings(tile_batch=self.tile_batch, blend_mode=self.blend_mode)
    if self.grid_margin is not None and self.grid_margin < 0:
      raise ValueError(f'grid_margin must be >= 0, got {self.grid_margin}')
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype must be one of {DTYPES}, got {self.dtype!r}')
    diffusion.time_pairs(self.sampling_steps)          # 1 <= S <= T


def default_eta(solver: str) -> float:
  """eta when not given: the original's 1.0 for DDIM, 0 for a deterministic solver."""
  return 1.0 if isinstance(processes.solver_named(solver), processes.DDIM) else 0.0


# Below this many sampling steps the grid's default margin is wider (patch / 4, not / 8)
# and also used in the first level: with few levels the window borders of the last levels
# and the tone of the first levels' cells are not mixed away (docs/generate.md).
FEW_STEPS = 15


def default_grid_margin(patch_px: int, factor: int, sampling_steps: int) -> int:
  """The grid's margin in px for a stage with `patch_px` windows: patch / 8 (patch / 4
  below FEW_STEPS steps) rounded down to the latent factor, at least one latent pixel."""
  share = 4 if sampling_steps < FEW_STEPS else 8
  return max(factor, patch_px // share // factor * factor)


# Each placement's defaults, resolved once per stage from the options (`window_fields`):
# (its default margin in px, its `sampling.windows` object from a latent margin).
_PLACEMENTS = {
    'random': (lambda o, patch_px, factor: 0,
               lambda o, margin: windows_lib.Random(o.patches_per_step or 1, margin)),
    'grid': (lambda o, patch_px, factor: default_grid_margin(patch_px, factor,
                                                             o.sampling_steps),
             lambda o, margin: windows_lib.Grid(margin, o.patches_per_step,
                                                o.grid_margin_levels,
                                                first_margin_levels(o))),
}


def stage_margin(o: Options, patch_px: int, factor: int) -> int:
  """A stage's margin in px: `o.grid_margin` if given, else the placement's default for
  this stage's patch (each stage its own): the grid's `default_grid_margin`, random 0."""
  if o.grid_margin is not None:
    return o.grid_margin
  return _PLACEMENTS[o.schedule][0](o, patch_px, factor)


def first_margin_levels(o: Options) -> int:
  """`o.grid_margin_first_levels`, or its default: 1 below FEW_STEPS steps, else 0."""
  if o.grid_margin_first_levels is not None:
    return o.grid_margin_first_levels
  return 1 if o.sampling_steps < FEW_STEPS else 0


def placement(o: Options, patch_px: int, factor: int):
  """The `sampling.windows` placement object (Random / Grid) of a stage of `o`
  (resolved) with `patch_px` windows, its margin resolved (`stage_margin`)."""
  return _PLACEMENTS[o.schedule][1](o, stage_margin(o, patch_px, factor) // factor)


def window_fields(o: Options, patch_px: int, factor: int, latent_hw) -> dict:
  """The placement fields of `SamplerSettings` for a stage of `o` (resolved) with
  `patch_px` windows on a latent of `latent_hw`: schedule, K (as given; else 1 for
  random, or every window of a level up to GRID_BATCH_PIXELS latent pixels per call,
  split evenly over the calls a level then needs), margin in latent pixels, margin
  levels. The commands, the API and the benchmarks all place windows through it."""
  return placement(o, patch_px, factor).settings(latent_hw, patch_px // factor)


def mask_size(image_size: int, factor: int) -> int:
  """Side of the mask model's image: a quarter of the image, rounded up to a latent pixel."""
  return max(-(-image_size // MASK_DOWNSCALE // factor), 1) * factor


def image_hw(image_size) -> tuple[int, int]:
  """`N` (square), `(H, W)` or `'HxW'` / `'N'` -> (H, W) pixels."""
  if isinstance(image_size, str):
    parts = image_size.lower().split('x')
    try:
      hw = [int(v) for v in parts]
    except ValueError:
      hw = []
    if len(hw) not in (1, 2):
      raise ValueError(f'image_size must be N or HxW, got {image_size!r}')
    image_size = hw[0] if len(hw) == 1 else tuple(hw)
  if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
    image_size = (int(image_size), int(image_size))
  h, w = (int(v) for v in image_size)
  if h <= 0 or w <= 0:
    raise ValueError(f'image_size must be positive, got {h}x{w}')
  return h, w


def mask_hw(image_size, factor: int) -> tuple[int, int]:
  """(H, W) of the mask model's image for an image of `image_size` (`image_hw`)."""
  h, w = image_hw(image_size)
  return mask_size(h, factor), mask_size(w, factor)


def mask_source_hw(image_size, factor: int) -> tuple[int, int]:
  """(h, w) of the mask stage's cleaned map before its upsampling (`masks.clean_gray`)."""
  h, w = mask_hw(image_size, factor)
  return h - masks_lib.MIN_FILTER_SIZE + 1, w - masks_lib.MIN_FILTER_SIZE + 1


def check_patch(geom: geometry.LatentGeometry, image_hw, patch_px: int, unet_multiple: int,
                 what: str) -> None:
  """Clear errors for sizes before anything is compiled or run."""
  h, w = image_hw
  geom.latent_size(h, 'image height')
  geom.latent_size(w, 'image width')
  p = geom.latent_size(patch_px, what)
  if patch_px > min(h, w):
    raise ValueError(f'{what} {patch_px} is larger than the image {h}x{w}')
  if p % unet_multiple:
    raise ValueError(f'{what} {patch_px} gives a latent patch of {p}, which the U-Net '
                     f'cannot take: use a multiple of {geom.factor * unet_multiple} pixels')


def _check_margin(geom: geometry.LatentGeometry, margin_px: int, patch_px: int, what: str):
  if margin_px:
    geom.latent_size(margin_px, 'grid_margin')
  if 2 * margin_px >= patch_px:
    raise ValueError(f'grid_margin {margin_px} must be less than half of {what} {patch_px}')


def resolve(options: Options | None, default_patch_size: int, **overrides) -> Options:
  """`options` with `overrides`, and the model-dependent defaults filled in (the patch
  sizes, eta for the solver)."""
  o = dataclasses.replace(options or Options(), **overrides)
  return dataclasses.replace(
      o, patch_size=o.patch_size or default_patch_size,
      mask_patch_size=o.mask_patch_size or demo.MASK_PATCH_SIZE,
      eta=default_eta(o.solver) if o.eta is None else o.eta)


def decode_settings(geom: geometry.LatentGeometry, o: Options,
                    patch_px: int) -> decode_lib.TiledDecodeSettings:
  """The tiled decode of a stage whose tiles are `patch_px` (its patch)."""
  return decode_lib.TiledDecodeSettings(
      patch_size=patch_px, factor=geom.factor, tile_batch=o.tile_batch,
      latent_scale=geom.scale, blend_mode=o.blend_mode)


def mask_patch(mhw: tuple[int, int], o: Options) -> int:
  """The mask stage's window: mask_patch_size, or the mask image's shorter side."""
  return min(o.mask_patch_size, *mhw)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One sampling stage of a request, resolved and checked."""
  patch_px: int                           # window side, pixels (a multiple of the factor)
  latent_hw: tuple[int, int]              # the stage's latent (h, w)
  margin_px: int                          # the placement's margin, pixels
  placement: Any                          # its `sampling.windows` object (Random / Grid)
  windows: dict                           # `SamplerSettings` placement fields (window_fields)
  decode: decode_lib.TiledDecodeSettings  # how its latent is decoded

  @property
  def patch(self) -> int:
    """Window side in latent pixels."""
    return self.patch_px // self.decode.factor


@dataclasses.dataclass(frozen=True)
class Request:
  """A request for one batch of `n_batch` images of `image_hw` pixels, resolved once."""
  options: Options               # resolved (`resolve`): patch sizes and eta filled in
  image_hw: tuple[int, int]      # (H, W) pixels
  n_batch: int                   # images sampled together
  image: Stage | None            # the image stage (None: a mask-stage-only request)
  mask: Stage | None             # the mask stage (None: label maps are given)
  memory: dict[str, int] | None  # {'host', 'device'} bytes one batch needs (memory.py);
                                 # None for a mask-stage-only request (not planned)

  def check_memory(self) -> None:
    """ValueError (one line, both numbers) if one batch does not fit the memory here."""
    if self.memory is None:
      raise ValueError('a mask-stage-only request has no memory plan')
    h, w = self.image_hw
    memory.check(self.memory, f'a {h}x{w} image (batch of {self.n_batch})',
                 host_is_device=jax.default_backend() == 'cpu')


def _image_stage(models, hw, o: Options) -> Stage:
  geom = models.geometry
  f = geom.factor
  check_patch(geom, hw, o.patch_size, models.unet.config.downsample_factor, 'patch_size')
  margin = stage_margin(o, o.patch_size, f)
  _check_margin(geom, margin, o.patch_size, 'patch_size')
  latent_hw = (hw[0] // f, hw[1] // f)
  return Stage(o.patch_size, latent_hw, margin, placement(o, o.patch_size, f),
               window_fields(o, o.patch_size, f, latent_hw),
               decode_settings(geom, o, o.patch_size))


def _mask_stage(models, hw, o: Options, label: int) -> Stage:
  if models.mask_unet is None:
    raise ValueError('this pipeline has no mask model: give label maps')
  classes = models.mask_unet.config.num_classes
  if not 0 <= label < classes:
    raise ValueError(f"label {label} is outside the mask model's classes [0, {classes})")
  geom = models.geometry
  f = geom.factor
  mhw = mask_hw(hw, f)
  m_patch = mask_patch(mhw, o)
  check_patch(geom, mhw, m_patch, models.mask_unet.config.downsample_factor,
               'mask stage: mask_patch_size')
  margin = stage_margin(o, m_patch, f)
  _check_margin(geom, margin, m_patch, 'mask stage: mask_patch_size')
  latent_hw = (mhw[0] // f, mhw[1] // f)
  return Stage(m_patch, latent_hw, margin, placement(o, m_patch, f),
               window_fields(o, m_patch, f, latent_hw), decode_settings(geom, o, m_patch))


def build(models, image_size, options: Options, *, n_batch: int = 1,
          label: int | None = None, image: bool = True, whole_images: int = 0,
          label_source_pixels: int = 0, init: str | None = None,
          init_whole: bool = False) -> Request:
  """The request for a batch of `n_batch` images of `image_size` (N, (H, W) or 'HxW'):
  `options` resolved (`resolve`); `label` not None: the mask model lays out that class
  (its stage is planned and checked), else label maps are given, `label_source_pixels`
  of them per image on the host (0: rasterized by bands); `image` False: the mask stage
  only. `whole_images`, `init`, `init_whole`: as `memory.request_bytes`. Raises
  ValueError (one line) for any size, patch, margin or label the models cannot take."""
  hw = image_hw(image_size)
  if n_batch < 1:
    raise ValueError(f'n_images must be >= 1, got {n_batch}')
  image_stage = _image_stage(models, hw, options) if image else None
  mask_stage = None if label is None else _mask_stage(models, hw, options, label)
  need = None if image_stage is None else _memory_need(
      models, hw, n_batch, options, image_stage, mask_stage, whole_images=whole_images,
      label_source_pixels=None if mask_stage else label_source_pixels, init=init,
      init_whole=init_whole)
  return Request(options, hw, n_batch, image_stage, mask_stage, need)


def _memory_need(models, hw, n_batch: int, o: Options, image_stage: Stage,
                 mask_stage: Stage | None, **kw) -> dict[str, int]:
  """{'host', 'device'} bytes of one batch (`memory.request_bytes`), both stages' calls."""
  size = {name: sum(v.nbytes for v in jax.tree_util.tree_leaves(m.params))
          for name, m in (('unet', models.unet), ('vae', models.vae),
                          ('mask_unet', models.mask_unet)) if m is not None}
  f = models.geometry.factor
  vae_width = models.vae.config.block_out_channels[0]
  # A call also holds its model's weights once more: the params are host numpy arrays,
  # which a call on CPU copies into its argument buffers (full-size decode: the peak
  # was 0.3 GiB over the plan without it, docs/generate.md).
  unet_act = memory.unet_activation(
      unet_batch=diffusion.pack_chunk(n_batch * image_stage.windows['patches_per_step']),
      latent_patch=image_stage.patch, unet_dim=models.unet.config.dim) + size['unet']
  decoder_act = memory.decoder_activation(
      tile_batch=o.tile_batch, tile_px=decode_lib.tile_px(image_stage.decode),
      vae_width=vae_width) + size['vae']
  if mask_stage is not None:
    unet_act = max(unet_act, memory.unet_activation(
        unet_batch=n_batch * mask_stage.windows['patches_per_step'] * (
            2 if o.mask_cond_scale else 1),
        latent_patch=mask_stage.patch, unet_dim=models.mask_unet.config.dim)
                   + size['mask_unet'])
    decoder_act = max(decoder_act, memory.decoder_activation(
        tile_batch=o.tile_batch, tile_px=decode_lib.tile_px(mask_stage.decode),
        vae_width=vae_width) + size['vae'])
  return memory.request_bytes(
      image_hw=hw, n_batch=n_batch, latent_channels=models.unet.config.channels,
      factor=f, tile_px=o.patch_size, weights_bytes=sum(size.values()),
      unet_activation_bytes=unet_act, decoder_activation_bytes=decoder_act,
      solver_history=processes.solver_named(o.solver).history,
      band_px=decode_lib.band_layout((*image_stage.latent_hw,
                                      models.vae.config.latent_channels),
                                     image_stage.decode)[0], **kw)
