"""The in-memory library API: label maps -> latents -> images, as numpy / jax arrays.

    import tiled_ldm_jax
    pipe = tiled_ldm_jax.Pipeline.from_pretrained()          # the bundled demo models
    result = pipe(label=1, image_size=512, seed=0)           # mask model, image model, decode
    result.images      # [N, H, W, 3] uint8;  result.labels: [N, H, W] label ids

or stage by stage (the same bytes for the same request):

    labels = pipe.sample_labels(label=1, image_size=512, seed=0)   # [N, H, W]
    latents = pipe.sample_latents(labels, seed=0)                  # [N, H/f, W/f, C]
    images = pipe.decode(latents)                                  # [N, H, W, 3] uint8

Randomness (SPEC 5): image n of a request uses `fold_in(key(seed), n)` (`indices` picks
other n, so a batch can continue a run), the mask stage `fold_in(., 0)` of it and the
image stage `fold_in(., 1)`: an image does not depend on the batch it is sampled in.

Every request is checked before any compute (`ValueError` with one line). The command
`scripts/sample_large_image.py` and its file outputs (`generate.py`) are a layer over
this module; its defaults are `Options`'.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np

from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax import decode as decode_lib
from tiled_ldm_jax import demo
from tiled_ldm_jax import encode as encode_lib
from tiled_ldm_jax.sampling import guidance
from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax import geometry
from tiled_ldm_jax import masks as masks_lib
from tiled_ldm_jax import memory
from tiled_ldm_jax.sampling import loop as loop_lib
from tiled_ldm_jax.sampling import processes
from tiled_ldm_jax.sampling import windows as windows_lib
from tiled_ldm_jax import sharding
from tiled_ldm_jax.models import unet as unet_lib
from tiled_ldm_jax.models import vae as vae_lib
from tiled_ldm_jax.files import label_maps

DTYPES = ('float32', 'bfloat16')
GRID_BATCH_PIXELS = windows_lib.GRID_BATCH_PIXELS   # grid: default window batch cap
MASK_DOWNSCALE = 4       # the mask model works at a quarter of the image size
DEFAULT_PATCH_SIZE = 512  # image-model patch of the released DiffInfinite models (pixels)


def _help(text: str, default=None):
  return dataclasses.field(default=default, metadata={'help': text})


@dataclasses.dataclass(frozen=True)
class Options:
  """How to sample and decode; the single home of these defaults (CLI flags included)."""
  sampling_steps: int = _help('Sampling steps S for both stages (every latent pixel takes '
                              'S steps).', 20)
  cond_scale: float = _help('Image guidance w: null + (1+w)(cond - null).', 3.0)
  mask_cond_scale: float = _help('Mask model guidance (the original uses 0).', 0.0)
  patch_size: int | None = _help('Image model patch and decode tile, pixels (default 512; '
                                 '128 with the demo models).')
  mask_patch_size: int | None = _help('Mask model patch and decode tile, pixels (default '
                                      '128).')
  patches_per_step: int | None = _help(
      'K patches (windows) per image per sampler iteration (default: 1 for random; for '
      'grid all windows of a level, at most GRID_BATCH_PIXELS latent pixels per call).')
  schedule: str = _help("Patch placement: 'grid' (shifted non-overlapping windows, ~1 "
                        "evaluation per pixel and step; sampling/windows.py) or 'random' "
                        "(the original's distribution, with patches_per_step=1). The grid "
                        "is the default: as good on 5 seeds for ~40% fewer U-Net samples "
                        "(docs/generate.md).", 'grid')
  grid_margin: int | None = _help(
      'Grid: pixels of context on each side of a window that the model sees but that are '
      'not written (multiple of the latent factor; the window advances patch - 2 margin). '
      'Default, per stage: its patch / 8, or patch / 4 below 15 sampling steps '
      '(FEW_STEPS), rounded down to the latent factor, at least one latent pixel '
      '(docs/generate.md: the seams at 10, 20 and 50 steps). Random placement: a border '
      'of each window this '
      'wide is not written (but at the image edge); default 0, the original\'s.', None)
  grid_margin_first_levels: int | None = _help(
      'Grid: the margin also in the first this many levels (where few levels cannot mix '
      'away the tone of whole cells). Default: 1 below 15 sampling steps, else 0.',
      None)
  grid_margin_levels: int | None = _help(
      'Grid: the margin only in the last this many levels (earlier levels: margin 0, '
      'each pixel in one window; none: every level). 2: the seams at the untiled floor '
      'within the U-Net budget (docs/generate.md).', 2)
  dtype: str = _help('Compute dtype of the U-Nets and the VAE: float32 or bfloat16 '
                     '(params, norms, softmax, DDIM and the sampler state stay float32).',
                     'float32')
  eta: float | None = _help(
      "DDIM eta (0: deterministic given the initial noise). Default: 1.0 (the "
      "original's) for solver 'ddim'; 'dpmpp2m' is deterministic (eta unset or 0).", None)
  solver: str = _help(
      "Sampling steps: 'ddim' (the original's DDIM with eta) or 'dpmpp2m' "
      "(DPM-Solver++(2M): deterministic, second order, each latent pixel's previous x0 "
      "prediction kept; reaches with fewer steps what DDIM needs more for, see "
      "docs/generate.md).", 'dpmpp2m')
  tile_batch: int = _help('VAE tiles per decoder call.', 4)
  blend_mode: str = _help("Tiled decode blend: 'shared' (tiles of at least 512 px "
                          "overlapping by 1/8, cross-faded, every GroupNorm with "
                          "whole-image statistics: the fewest decoder passes per pixel on "
                          "large images, closest to a whole-image decode), 'original' (the "
                          "original's four shifted decodes, parity), 'partition' (the same "
                          "four decodes, weights that leave no residual seam) or 'overlap' "
                          "(tiles of the patch size, each with its own statistics) "
                          "(docs/generate.md).", 'shared')
  progress_every: int = _help('Sampler progress lines (0: off): the host checks at most '
                              'every N iterations (about every 2 s) and logs about every '
                              '10 s and 5%, with an ETA.', 0)
  resample: int = _help('With a keep mask: RePaint resampling passes per step of the '
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
    if self.tile_batch < 1:
      raise ValueError(f'tile_batch must be >= 1, got {self.tile_batch}')
    if self.grid_margin is not None and self.grid_margin < 0:
      raise ValueError(f'grid_margin must be >= 0, got {self.grid_margin}')
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype must be one of {DTYPES}, got {self.dtype!r}')
    diffusion.time_pairs(self.sampling_steps)          # 1 <= S <= T
    if self.blend_mode not in decode_lib.BLEND_MODES:
      raise ValueError(f'blend_mode must be one of {decode_lib.BLEND_MODES}, got '
                       f'{self.blend_mode!r}')


class Model(NamedTuple):
  """A loaded model: its typed config, params and, for U-Nets, what it predicts."""
  config: Any
  params: Any
  objective: str = 'eps'   # eps | v | flow (checkpoint.read_objective)


class Result(NamedTuple):
  images: np.ndarray     # [N, H, W, 3] uint8
  labels: np.ndarray     # [N, H, W] int32 label ids the images were sampled for
  stats: dict            # per stage: patch iterations, denoiser evaluations


def _load(path: str, kind: str, what: str) -> Model:
  try:
    _, config, params = checkpoint.load_model(path, expect=kind)
    objective = 'eps' if kind == 'vae' else checkpoint.read_objective(path)
    return Model(config, params, objective)
  except (OSError, ValueError) as e:
    raise ValueError(f'{what}: cannot load {path}: {e}') from None


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


def _stage_keys(seed: int, indices, stage: int) -> jax.Array:
  keys = loop_lib.image_keys(seed, indices)
  return _fold_in_all(keys, stage)


# Module-level compiled helpers: eager vmaps of fresh lambdas would trace on every call.
_fold_in_all = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))


def stage_stats(state) -> dict:
  """A finished stage's counters, as JSON-able ints."""
  return {'patch_iterations': int(state.iterations),
          'denoiser_evaluations': int(state.evaluations)}


class Pipeline:
  """Loaded models plus the compiled samplers and decoders they need (cached per shape).

  Build with `from_pretrained`. Immutable apart from its caches of compiled programs.
  """

  def __init__(self, unet: Model, vae: Model, mask_unet: Model | None = None, *,
               default_patch_size: int = DEFAULT_PATCH_SIZE, devices: int = 0,
               paths: dict[str, str] | None = None):
    if unet.config.kind != 'image' or (mask_unet and mask_unet.config.kind != 'mask'):
      raise ValueError('unet must be an image model and mask_unet a mask model')
    if unet.config.channels != vae.config.latent_channels:
      raise ValueError(f'the image model has {unet.config.channels} latent channels, the '
                       f'VAE {vae.config.latent_channels}')
    self.unet, self.vae, self.mask_unet = unet, vae, mask_unet
    self.geometry = geometry.LatentGeometry.of_vae(vae.config)
    self.default_patch_size = default_patch_size
    self.devices = devices
    self.paths = dict(paths or {})

  @classmethod
  def from_pretrained(cls, unet: str | None = None, vae: str | None = None,
                      mask_unet: str | None = None, *, devices: int = 0) -> 'Pipeline':
    """Loads converted model folders; with none given, the bundled demo models.

    `mask_unet` may be None when label maps are always given. `devices`: shard over at
    most this many devices (0: all JAX sees).
    """
    use_demo = not (unet or vae or mask_unet)
    if use_demo:
      if not demo.available():
        raise ValueError(f'no model folders given and the demo models are missing from '
                         f'{demo.DEMO_DIR}')
      unet, vae, mask_unet = (demo.model_path(k) for k in ('image_unet', 'vae', 'mask_unet'))
    elif not (unet and vae):
      raise ValueError('give unet and vae (and mask_unet, or label maps), or no model '
                       'folder at all to use the bundled demo models')
    paths = {'unet': unet, 'vae': vae}
    models = {'unet': _load(unet, 'image_unet', 'unet'), 'vae': _load(vae, 'vae', 'vae')}
    if mask_unet:
      paths['mask_unet'] = mask_unet
      models['mask_unet'] = _load(mask_unet, 'mask_unet', 'mask_unet')
    return cls(**models, devices=devices, paths=paths,
               default_patch_size=demo.PATCH_SIZE if use_demo else DEFAULT_PATCH_SIZE)

  # ------------------------------------------------------------------------- options

  def resolve(self, options: Options | None = None, **overrides) -> Options:
    """`options` with `overrides`, and the model-dependent patch sizes filled in."""
    o = dataclasses.replace(options or Options(), **overrides)
    o = dataclasses.replace(
        o, patch_size=o.patch_size or self.default_patch_size,
        mask_patch_size=o.mask_patch_size or demo.MASK_PATCH_SIZE,
        eta=default_eta(o.solver) if o.eta is None else o.eta)
    return o

  def check_image_request(self, image_hw, o: Options) -> None:
    """ValueError for an image size or patch the image model cannot take."""
    _check_patch(self.geometry, image_hw, o.patch_size, self.unet.config.downsample_factor,
                 'patch_size')
    _check_margin(self.geometry, stage_margin(o, o.patch_size, self.geometry.factor),
                  o.patch_size, 'patch_size')

  def memory_need(self, image_hw, n_batch: int, o: Options, whole_images: int,
                  label_source_pixels: int | None = None, init: str | None = None,
                  init_whole: bool = False) -> dict[str, int]:
    """{'host', 'device'} bytes one batch of this request needs (`memory.request_bytes`):
    `label_source_pixels` per image (None: the mask model's map; 0: rasterized by bands);
    `init` / `init_whole` as there."""
    size = {name: sum(v.nbytes for v in jax.tree_util.tree_leaves(m.params))
            for name, m in (('unet', self.unet), ('vae', self.vae),
                            ('mask_unet', self.mask_unet)) if m is not None}
    weights = sum(size.values())
    f = self.geometry.factor
    latent_hw = tuple(v // f for v in image_hw)
    k = window_fields(o, o.patch_size, f, latent_hw)['patches_per_step']
    tile = decode_lib.tile_px(self._decode_settings(o, o.patch_size))
    # A call also holds its model's weights once more: the params are host numpy arrays,
    # which a call on CPU copies into its argument buffers (full-size decode: the peak
    # was 0.3 GiB over the plan without it, docs/generate.md).
    unet_act = memory.unet_activation(
        unet_batch=diffusion.pack_chunk(n_batch * k), latent_patch=o.patch_size // f,
        unet_dim=self.unet.config.dim) + size['unet']
    vae_width = self.vae.config.block_out_channels[0]
    decoder_act = memory.decoder_activation(tile_batch=o.tile_batch, tile_px=tile,
                                            vae_width=vae_width) + size['vae']
    mhw = mask_hw(image_hw, f)
    m_patch = self._mask_patch(mhw, o)
    # (a margin the mask stage cannot take is refused by check_mask_request)
    if (self.mask_unet is not None and label_source_pixels is None
        and 2 * stage_margin(o, m_patch, f) < m_patch):
      mk = window_fields(o, m_patch, f, (mhw[0] // f, mhw[1] // f))['patches_per_step']
      unet_act = max(unet_act, memory.unet_activation(
          unet_batch=n_batch * mk * (2 if o.mask_cond_scale else 1),
          latent_patch=m_patch // f, unet_dim=self.mask_unet.config.dim)
                     + size['mask_unet'])
      decoder_act = max(decoder_act, memory.decoder_activation(
          tile_batch=o.tile_batch, tile_px=decode_lib.tile_px(self._decode_settings(o, m_patch)),
          vae_width=vae_width) + size['vae'])
    return memory.request_bytes(
        image_hw=image_hw, n_batch=n_batch, latent_channels=self.unet.config.channels,
        factor=f, whole_images=whole_images, tile_px=o.patch_size, weights_bytes=weights,
        label_source_pixels=label_source_pixels, unet_activation_bytes=unet_act,
        decoder_activation_bytes=decoder_act, init=init, init_whole=init_whole,
        solver_history=processes.solver_named(o.solver).history,
        band_px=decode_lib.band_layout((*latent_hw, self.vae.config.latent_channels),
                                       self._decode_settings(o, o.patch_size))[0])

  def check_memory(self, image_hw, n_batch: int, o: Options, whole_images: int,
                   label_source_pixels: int | None = None, **init) -> None:
    """ValueError if one batch of this request needs more host or device memory than
    is available (`memory_need`; `init`: its init / init_whole), before any work."""
    need = self.memory_need(image_hw, n_batch, o, whole_images, label_source_pixels, **init)
    h, w = image_hw
    memory.check(need, f'a {h}x{w} image (batch of {n_batch})',
                 host_is_device=jax.default_backend() == 'cpu')

  def check_mask_request(self, image_size, label: int, o: Options) -> None:
    if self.mask_unet is None:
      raise ValueError('this pipeline has no mask model: give label maps')
    classes = self.mask_unet.config.num_classes
    if not 0 <= label < classes:
      raise ValueError(f"label {label} is outside the mask model's classes [0, {classes})")
    mhw = mask_hw(image_size, self.geometry.factor)
    _check_patch(self.geometry, mhw, self._mask_patch(mhw, o),
                 self.mask_unet.config.downsample_factor, 'mask stage: mask_patch_size')
    m_patch = self._mask_patch(mhw, o)
    _check_margin(self.geometry, stage_margin(o, m_patch, self.geometry.factor), m_patch,
                  'mask stage: mask_patch_size')

  def check_labels(self, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
      raise ValueError(f'labels must be [N, H, W], got shape {labels.shape}')
    return masks_lib.validate_labels(labels, self.unet.config.num_classes).astype(
        np.int32, copy=False)

  @staticmethod
  def _mask_patch(mhw: tuple[int, int], o: Options) -> int:
    """The mask stage's window: mask_patch_size, or the mask image's shorter side."""
    return min(o.mask_patch_size, *mhw)

  # ------------------------------------------------------------------------- samplers

  def _sampler(self, which: str, o: Options, patch_px: int, latent_hw, n_images: int,
               keep: bool = False):
    """The compiled sampler of a stage, from the process-wide cache (`loop.compiled`:
    equal models and settings share it, across Pipelines)."""
    f = self.geometry.factor
    margin = stage_margin(o, patch_px, f)
    if margin:
      self.geometry.latent_size(margin, 'grid_margin')   # a multiple of f
    placement = window_fields(o, patch_px, f, latent_hw)
    model = self.unet if which == 'image' else self.mask_unet
    net, process = guidance.trained_unet(
        unet_lib.eps_fn(dataclasses.replace(model.config, dtype=o.dtype)), model.objective)
    process = process.with_solver(processes.solver_named(o.solver))
    denoise = (guidance.multilabel_guidance(net, model.config.num_classes, o.cond_scale)
               if which == 'image' else guidance.mask_denoiser(net, o.mask_cond_scale))
    settings = loop_lib.SamplerSettings(
        sampling_steps=o.sampling_steps, patch=patch_px // f, eta=o.eta,
        progress_every=o.progress_every, progress_label=f'{which} stage', keep=keep,
        resample=o.resample if keep else 0, **placement)
    mesh = sharding.make_mesh(n_images, settings.patches_per_step, self.devices)
    return loop_lib.compiled(denoise, settings, mesh, n_images, process)

  def mask_stage(self, o: Options, image_size, label: int, indices, seed: int):
    """(sampler, initial state, conditioning: the class map, spatial) of the mask stage."""
    f = self.geometry.factor
    mhw = mask_hw(image_size, f)
    latent_hw = (mhw[0] // f, mhw[1] // f)
    smp = self._sampler('mask', o, self._mask_patch(mhw, o), latent_hw, len(indices))
    classes = np.full((len(indices),) + latent_hw, label, np.int32)
    state = smp.init(_stage_keys(seed, indices, 0), classes.shape,
                     self.mask_unet.config.channels)
    return smp, state, loop_lib.spatial(classes)

  def image_stage(self, o: Options, labels, indices, seed: int, *, init=None,
                  strength: float = 1.0, keep=None):
    """(sampler, initial state, conditioning: the latent label map, spatial); `labels`
    [N, H, W] pixel maps, an array or `label_maps.LabelMap`s (read at latent resolution only);
    `init` [N, h, w, C] latents to start from at `strength` (`loop.Sampler.init`);
    `keep` [N, H, W] pixels (non-zero) that follow `init` (read at latent resolution), or
    [N, H/f, W/f] latent pixels."""
    loop_lib.check_start(o.sampling_steps, strength, init=init is not None,
                         keep=keep is not None)
    f = self.geometry.factor
    latent = masks_lib.latent_label_maps(labels, f)
    smp = self._sampler('image', o, o.patch_size, latent.shape[1:], len(indices),
                        keep=keep is not None)
    state = smp.init(_stage_keys(seed, indices, 1), latent.shape, self.unet.config.channels,
                     init=init, strength=strength)
    cond = loop_lib.spatial(latent)
    if keep is not None:
      keep = np.asarray(keep)
      pixels = latent.shape[:1] + (latent.shape[1] * f, latent.shape[2] * f)
      if keep.shape == pixels:
        keep = keep[:, ::f, ::f]
      elif keep.shape != latent.shape:
        raise ValueError(f'keep mask {list(keep.shape)} is not [N, H, W] = {list(pixels)} '
                         f'(pixels) or {list(latent.shape)} (latent pixels)')
      cond = (cond, loop_lib.known(init, keep))
    return smp, state, cond

  def labels_from_mask_latents(self, z, image_size, o: Options, *, lazy: bool = False):
    """Mask-model latents -> [N, H, W] label ids (decode, quantize, clean, upsample).

    The decode runs band by band and each band is quantized to 8-bit gray at once
    (per pixel), so the float mask image is never whole; the clean runs on the gray map
    at the mask's resolution. `lazy`: a list of `label_maps.LabelMap` (the cleaned map and
    its nearest upsampling, never held at pixel resolution) instead of an int32 array;
    both are the same ids as `masks.clean_mask` of the whole decoded image.
    """
    num_labels = self.unet.config.num_classes
    f = self.geometry.factor
    settings = self._decode_settings(o, self._mask_patch((z.shape[1] * f, z.shape[2] * f), o))
    hw = image_hw(image_size)
    out = []
    for zi in sharding.to_host(z):
      gray = np.empty((zi.shape[0] * f, zi.shape[1] * f), np.uint8)
      for r0, band in decode_lib.iter_decode_bands(self._decoder(o), self.vae.params, zi,
                                                   settings):
        gray[r0:r0 + band.shape[0]] = masks_lib.mask_gray(
            masks_lib.quantize_mask_image(band, num_labels))
      out.append(label_maps.LabelMap(masks_lib.clean_gray(gray, num_labels), hw))
    return out if lazy else np.stack([np.asarray(m, np.int32) for m in out])

  # ------------------------------------------------------------------------- stages

  def sample_labels(self, label: int = 1, image_size=1024, n_images: int = 1,
                    seed: int = 0, *, indices=None, options: Options | None = None,
                    **overrides) -> np.ndarray:
    """[N, H, W] int32 label maps from the mask model for class `label`; `image_size`:
    N (square) or (H, W).

    `overrides`: `Options` fields (sampling_steps, mask_patch_size, ...).
    """
    o = self.resolve(options, **overrides)
    return self.run_mask_stage(o, image_size, label, _indices(indices, n_images), seed)[0]

  def sample_latents(self, labels, seed: int = 0, *, indices=None, init_latents=None,
                     strength: float = 1.0, keep=None, options: Options | None = None,
                     **overrides) -> jax.Array:
    """[N, H/f, W/f, C] diffusion latents for pixel label maps `labels` [N, H, W];
    `init_latents` [N, H/f, W/f, C] (e.g. `encode(images)`) with `strength` in (0, 1]:
    start from them noised to the level where the last round(strength * S) steps begin;
    `keep` [N, H, W] (non-zero = keep): those pixels follow the init at every level
    (inpainting: the rest is generated to join them)."""
    o = self.resolve(options, **overrides)
    loop_lib.check_start(o.sampling_steps, strength, init=init_latents is not None,
                         keep=keep is not None)
    labels = self.check_labels(labels)
    return self.run_image_stage(o, labels, _indices(indices, len(labels)), seed,
                                init=init_latents, strength=strength, keep=keep)[0]

  def encode(self, images, *, options: Options | None = None, halo_px: int | None = None,
             **overrides) -> np.ndarray:
    """[N, H, W, 3] RGB images (uint8, or float in [0, 1]) -> [N, H/f, W/f, C] diffusion
    latents, tile by tile (`encode.py`; tiles of `patch_size`, a halo of patch/2: on
    the demo VAE, 256 x 384 px, 128 px tiles, the largest latent differs from the whole
    encode's by 3.8% of the latents' range with it, 7% with patch/4, 39% with none).
    `images` may also be one row source (`files/large_images.py`: a TIFF or OME-Zarr
    slide), read band by band: [1, H/f, W/f, C]."""
    o = self.resolve(options, **overrides)
    if hasattr(images, 'read_rows'):
      encode_lib.check_size(images.shape, self.geometry.factor)
      images = [images]
    else:
      images = encode_lib.check_images(images, self.geometry.factor)
    return self._encode_checked(images, o, halo_px)

  def _encode_checked(self, images, o: Options, halo_px: int | None = None) -> np.ndarray:
    """`encode` of images already checked (`encode.check_images`) or row sources."""
    fn = vae_lib.encode_fn(dataclasses.replace(self.vae.config, dtype=o.dtype))
    halo = o.patch_size // 2 if halo_px is None else halo_px
    return np.stack([encode_lib.encode_image(
        fn, self.vae.params, im, factor=self.geometry.factor, scale=self.geometry.scale,
        tile_px=o.patch_size, halo_px=halo, tile_batch=o.tile_batch) for im in images])

  # The one stage runner: the staged calls, `__call__` and `generate` (which saves a
  # resumable checkpoint after each chunk) all run a stage through it.

  def run_mask_stage(self, o: Options, image_size, label: int, indices, seed: int, *,
                     state=None, chunk: int = 0, on_chunk=None, lazy: bool = False):
    """(labels [N, H, W], counters) of the mask stage; `state`: continue a saved one;
    `lazy`: the labels as `label_maps.LabelMap`s (`labels_from_mask_latents`)."""
    self.check_mask_request(image_size, label, o)
    smp, fresh, classes = self.mask_stage(o, image_size, label, indices, seed)
    state = _run_stage(smp, self.mask_unet.params, fresh if state is None else smp.place(state),
                       classes, o.sampling_steps, chunk, on_chunk)
    return (self.labels_from_mask_latents(state.x, image_size, o, lazy=lazy),
            stage_stats(state))

  def run_image_stage(self, o: Options, labels, indices, seed: int, *,
                      state=None, chunk: int = 0, on_chunk=None, init=None,
                      strength: float = 1.0, keep=None, watch=None):
    """(latents [N, h, w, C], counters) of the image stage for pixel label maps [N, H, W]
    (an array or `label_maps.LabelMap`s); `watch`: `loop.Sampler.run`'s (a live preview)."""
    self.check_image_request(masks_lib.labels_shape(labels)[1:], o)
    if len(indices) != len(labels):
      raise ValueError(f'{len(labels)} label maps but {len(indices)} indices')
    smp, fresh, latent = self.image_stage(o, labels, indices, seed, init=init,
                                          strength=strength, keep=keep)
    state = _run_stage(smp, self.unet.params, fresh if state is None else smp.place(state),
                       latent, o.sampling_steps, chunk, on_chunk, watch)
    return state.x, stage_stats(state)

  # ------------------------------------------------------------------------- decode

  def _decoder(self, o: Options):
    return vae_lib.decode_fn(dataclasses.replace(self.vae.config, dtype=o.dtype))  # cached

  def _decode_settings(self, o: Options, patch_px: int) -> decode_lib.TiledDecodeSettings:
    return decode_lib.TiledDecodeSettings(
        patch_size=patch_px, factor=self.geometry.factor, tile_batch=o.tile_batch,
        latent_scale=self.geometry.scale, blend_mode=o.blend_mode)

  def iter_decode(self, latent, *, bands: tuple[int, int] | None = None,
                  options: Options | None = None, **overrides
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """One latent [h, w, C] -> `(row_start, uint8 rows [r, W, 3])` bands (bounded memory);
    `bands=(first, stop)`: only those (`band_layout`; same pixels as the whole decode)."""
    o = self.resolve(options, **overrides)
    return decode_lib.iter_decode_bands(self._decoder(o), self.vae.params, latent,
                                        self._decode_settings(o, o.patch_size), uint8=True,
                                        bands=bands)

  def band_layout(self, latent_shape, *, options: Options | None = None, **overrides
                  ) -> tuple[int, int]:
    """(pixel rows per band, number of bands) of `iter_decode` for a latent [.., h, w, C]."""
    o = self.resolve(options, **overrides)
    return decode_lib.band_layout(latent_shape, self._decode_settings(o, o.patch_size))

  def band_source(self, latent, *, options: Options | None = None, **overrides):
    """One latent [h, w, C] as a `output.shared_writer.BandSource`: its pixel size, band
    layout and a decode of any band range (what the shared writers take: they write,
    this decodes)."""
    from tiled_ldm_jax.output import shared_writer  # pylint: disable=g-import-not-at-top
    o = self.resolve(options, **overrides)
    band_rows, n_bands = self.band_layout(latent.shape, options=o)
    f = self.geometry.factor
    return shared_writer.BandSource(
        shape=(latent.shape[-3] * f, latent.shape[-2] * f), band_rows=band_rows,
        n_bands=n_bands, decode=lambda bands: self.iter_decode(latent, bands=bands, options=o))

  def decode(self, latents, *, options: Options | None = None, **overrides) -> np.ndarray:
    """[N, h, w, C] diffusion latents -> [N, H, W, 3] uint8 images (Hann-blended tiles)."""
    o = self.resolve(options, **overrides)
    latents = sharding.to_host(latents)
    if latents.ndim != 4:
      raise ValueError(f'latents must be [N, h, w, C], got shape {latents.shape}')
    settings = self._decode_settings(o, o.patch_size)
    return np.stack([decode_lib.decode_image(self._decoder(o), self.vae.params, z, settings,
                                             uint8=True) for z in latents])

  # ------------------------------------------------------------------------- all stages

  def __call__(self, label: int = 1, labels=None, image_size=1024,
               n_images: int = 1, seed: int = 0, *, indices=None, init_image=None,
               strength: float = 1.0, keep=None, options: Options | None = None,
               **overrides) -> Result:
    """Images for label maps `labels` [N, H, W], or for mask-model layouts of class `label`
    (`image_size`: N for square or (H, W); `n_images` of them). Same bytes as the staged
    calls. `init_image` [N, H, W, 3] (or [H, W, 3] for all) with `strength` in (0, 1]:
    regenerate those images (`encode`, then `sample_latents(init_latents=...)`); `keep`
    [H, W] or [N, H, W] (non-zero = keep, needs init_image): inpaint the rest."""
    o = self.resolve(options, **overrides)
    loop_lib.check_start(o.sampling_steps, strength, init=init_image is not None,
                         keep=keep is not None)
    stats = {}
    init = None
    if init_image is not None:
      init = encode_lib.check_images(init_image, self.geometry.factor)
      want = image_hw(image_size) if labels is None else tuple(np.shape(labels)[1:3])
      if init.shape[1:3] != tuple(want):
        raise ValueError(f'init_image is {init.shape[1]}x{init.shape[2]}, the images are '
                         f'{want[0]}x{want[1]}')
    init_memory = {} if init is None else dict(
        init='keep' if keep is not None else 'strength', init_whole=True)
    if labels is None:
      indices = _indices(indices, n_images)
      hw = image_hw(image_size)
      self.check_image_request(hw, o)   # before the mask stage runs
      self.check_memory(hw, n_images, o, whole_images=n_images, **init_memory)
      labels, stats['mask_stage'] = self.run_mask_stage(o, image_size, label, indices, seed)
      labels = self.check_labels(labels)
    else:   # given label maps are already in memory: checked first, then their request
      labels = self.check_labels(labels)
      self.check_image_request(labels.shape[1:3], o)
      self.check_memory(labels.shape[1:3], len(labels), o, whole_images=len(labels),
                        label_source_pixels=labels[0].size, **init_memory)
    if init is not None:   # one image for all is encoded once
      init = np.broadcast_to(self._encode_checked(init, o), (len(labels),) + (
          init.shape[1] // self.geometry.factor, init.shape[2] // self.geometry.factor,
          self.unet.config.channels))
    latents, stats['image_stage'] = self.run_image_stage(
        o, labels, _indices(indices, len(labels)), seed, init=init, strength=strength,
        keep=None if keep is None else np.broadcast_to(keep, labels.shape))
    return Result(self.decode(latents, options=o), labels, stats)


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


def window_fields(o: Options, patch_px: int, factor: int, latent_hw) -> dict:
  """The placement fields of `SamplerSettings` for a stage of `o` (resolved) with
  `patch_px` windows on a latent of `latent_hw`: schedule, K (as given; else 1 for
  random, or every window of a level up to GRID_BATCH_PIXELS latent pixels per call,
  split evenly over the calls a level then needs), margin in latent pixels, margin
  levels. The commands, the API and the benchmarks all place windows through it."""
  patch, margin = patch_px // factor, stage_margin(o, patch_px, factor) // factor
  return _PLACEMENTS[o.schedule][1](o, margin).settings(latent_hw, patch)


def _run_stage(smp, params, state, cond, sampling_steps: int, chunk: int, on_chunk,
               watch=None):
  """Runs a sampler to the end; with `chunk`, `chunk` iterations at a time with
  `on_chunk(state)` between chunks (not after the last). Chunked runs equal whole ones."""
  while int(state.level.min()) < sampling_steps:       # one host sync per chunk
    state = smp.run(params, state, cond, max_iterations=chunk or None, watch=watch)
    if on_chunk is not None and int(state.level.min()) < sampling_steps:
      on_chunk(state)
  return state


def _indices(indices, n: int) -> np.ndarray:
  if indices is None:
    if n < 1:
      raise ValueError(f'n_images must be >= 1, got {n}')
    return np.arange(n)
  return np.asarray(indices)


def _check_patch(geom: geometry.LatentGeometry, image_hw, patch_px: int, unet_multiple: int,
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
