"""Files on disk from a `Pipeline`: what `scripts/sample_large_image.py` runs (SPEC 5).

For each batch of images: label maps (`--mask`, or the mask model), the image stage, the
tiled decode (whole for PNG/JPEG, band by band for TIFF), then the writers:
`sampleNNNN.<ext>` beside `sampleNNNN_mask.png` and `sampleNNNN.json` (provenance and
figures). Every file is written under a temporary name and renamed when complete
(`files/atomic.py`), so an interrupted run leaves nothing that looks whole. With
`checkpoint_every`, progress is saved under `<imgs_path>/checkpoint` (`resume.py`).

`prepare(cfg)` does every check that can fail (and loads the models) before any
compute; `run(plan)` generates. Image n of a run uses the keys the `Pipeline` gives
index n, so it does not depend on the batch it was sampled in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from tiled_ldm_jax.files import atomic
from tiled_ldm_jax import demo
from tiled_ldm_jax import encode as encode_lib
from tiled_ldm_jax import estimate
from tiled_ldm_jax.files import geojson_labels
from tiled_ldm_jax.output import geojson as geojson_out
from tiled_ldm_jax.files import image_files
from tiled_ldm_jax.files import reading
from tiled_ldm_jax.files import label_files
from tiled_ldm_jax.files import large_images
from tiled_ldm_jax.output import live_preview
from tiled_ldm_jax import masks as masks_lib
from tiled_ldm_jax.output import ome_zarr
from tiled_ldm_jax import pipeline as pipeline_lib
from tiled_ldm_jax import progress
from tiled_ldm_jax import resume
from tiled_ldm_jax.sampling import loop as loop_lib
from tiled_ldm_jax.output import shared_writer
from tiled_ldm_jax import sharding
from tiled_ldm_jax.output import writers
from tiled_ldm_jax.files import label_maps

FORMATS = ('png', 'jpg', 'tiff', 'zarr')
FORMAT_ALIASES = {'tif': 'tiff', 'jpeg': 'jpg', 'ome-zarr': 'zarr', 'ome_zarr': 'zarr'}
DEFAULT_IMAGE_SIZE = 1024     # without --image_size and --mask
_help = pipeline_lib._help  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """A run of the command: what and where, plus how to sample (`options`).

  Every field of this class but `options`, and every field of `Options`, is a flag of
  `scripts/sample_large_image.py`; `from_flat` builds one from those flag values and
  `flat()` gives them back (the JSON record's `config`, what a resume compares).
  """
  options: pipeline_lib.Options = dataclasses.field(
      default_factory=pipeline_lib.Options, metadata={'flag': False})
  unet_ckpt: str | None = _help('Converted image model folder (none of the three: the demo '
                                'models).')
  vae_ckpt: str | None = _help('Converted VAE folder.')
  mask_unet_ckpt: str | None = _help('Converted mask model folder (unless --mask).')
  mask: str | None = _help('Label map replacing the mask model: a PNG of label ids (its '
                           'size is the default image size, else resized nearest to '
                           '--image_size), a tiled TIFF of label ids or an OME-Zarr store '
                           'with a labels group (both read lazily, band by band), a '
                           'QuPath GeoJSON of annotations (with --mask_classes and '
                           '--image_size; rasterized band by band), or "demo" for the '
                           'bundled PNG. The format is read from the file\'s contents.')
  mask_classes: str | None = _help('GeoJSON --mask: class name to label id, '
                                   '"Tumor=1,Stroma=2,..." or a JSON object '
                                   '\'{"Tumor, grade 2": 1}\' (names with "," or "="; '
                                   'unannotated pixels are 0).')
  init_image: str | None = _help('Start from this image (PNG, JPEG, an RGB TIFF or an '
                                 'OME-Zarr image store, read by its contents; TIFF and '
                                 'OME-Zarr band by band; of the output size unless '
                                 '--init_offset; without --image_size and --mask its size '
                                 'is the output\'s): encoded tile by tile and noised to '
                                 'where the last --strength of the steps begin.')
  init_offset: str | None = _help('With --init_image: outpaint. "y,x" pixels (multiples '
                                  'of the VAE factor, 8) where the init image\'s top-left '
                                  'corner lies on the larger --image_size canvas; its '
                                  'pixels are kept (or those of --keep_mask inside it) and '
                                  'the canvas around them is generated from noise '
                                  '(--strength 1).')
  strength: float = _help('With --init_image: the share of the sampling steps run, in '
                          '(0, 1] (1: from noise, the image unused).', 1.0)
  keep_mask: str | None = _help('With --init_image: a map of the output size (PNG, tiled '
                                'TIFF or OME-Zarr labels group, as --mask; the last two '
                                'read lazily) whose non-zero pixels keep the init image '
                                '(they follow it at every level); the others are '
                                'generated for the label map.')
  imgs_path: str = _help('Output folder.', './results/large')
  n_images: int = _help('Images to generate.', 1)
  batch_size: int = _help('Images sampled together (n_images must be a multiple).', 1)
  label: int = _help('Class the mask model lays out (ignored with --mask).', 1)
  image_size: str | None = _help(f'Image size in pixels, N (square) or HxW (multiples of the '
                                 f'VAE factor, 8); default: the --mask file\'s size, else '
                                 f'{DEFAULT_IMAGE_SIZE}.')
  seed: int = _help('Root PRNG seed; image n uses fold_in(seed, n).', 0)
  output_format: str = _help(f'Image file format: {" | ".join(FORMATS)} (tiff: pyramidal '
                             'BigTIFF that OpenSlide reads; zarr: OME-Zarr store with a '
                             'labels group; both streamed band by band).', 'png')
  tiff_compression: str = _help('TIFF tiles: jpeg | zlib | none (label masks stay '
                                'lossless).', 'jpeg')
  jpeg_quality: int = _help('JPEG quality (jpg output and JPEG TIFF tiles), 1-100.', 90)
  mpp: float | None = _help('Microns per pixel written as the TIFF resolution and OME-Zarr '
                            'scale (none: no resolution written).')
  live_preview_minutes: float = _help('Every this many minutes of the image stage, and '
                                      'when it ends, replace sampleNNNN_live.png: the '
                                      'canvas as it stands (latents mapped linearly to '
                                      'RGB, no decoder run) beside each pixel\'s steps '
                                      'taken (black: none, white: all), at most 512 px '
                                      'wide each (0: off).', 0.0)
  checkpoint_every: int = _help('Save the sampler state every N iterations under '
                                'imgs_path/checkpoint (0: off).', 0)
  resume: bool = _help('Continue the run saved under imgs_path/checkpoint (same flags '
                       'required).', False)
  devices: int = _help('Devices to shard the batch/patches over (0: all).', 0)
  dry_run: bool = _help('Check the request and print its plan (per stage: latent shape, '
                        'iterations, windows, U-Net samples and TFLOP, decoder tiles; host '
                        'and device bytes; seconds from short timed U-Net and decoder calls '
                        'on this device) as one JSON line and a summary; sample and write '
                        'nothing.', False)
  preview: str | None = _help('With --dry_run: write the label map the run would use '
                              '(--mask, rasterized annotations included) in colour to this '
                              'PNG, at most 1024 px on its longer side.')


  @classmethod
  def from_flat(cls, **values) -> 'GenerationConfig':
    """From flag values: `Options` fields go into `options`, the rest are this class's."""
    names = {f.name for f in dataclasses.fields(pipeline_lib.Options)}
    options = pipeline_lib.Options(**{k: v for k, v in values.items() if k in names})
    return cls(options=options, **{k: v for k, v in values.items() if k not in names})

  @property
  def size(self) -> tuple[int, int]:
    """(H, W) pixels (`prepare` resolves a missing `image_size`)."""
    return pipeline_lib.image_hw(DEFAULT_IMAGE_SIZE if self.image_size is None
                                 else self.image_size)

  def flat(self) -> dict[str, Any]:
    """The flag values: the `Options` fields and this class's other fields, one level."""
    own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name != 'options'}
    return {**dataclasses.asdict(self.options), **own}


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `prepare` checked and loaded; `run` only computes and writes."""
  cfg: GenerationConfig             # with demo paths and patch sizes resolved
  pipe: pipeline_lib.Pipeline
  mask: label_maps.LabelMap | None   # [H, W] the given label map (resized lazily)
  hashes: dict[str, str]            # sha256 of each model folder used
  resume_meta: dict[str, Any] | None
  work: dict[str, Any]              # `estimate.plan` of the request (in every record)
  refused: tuple[str, ...] = ()     # dry run: why the run would be refused (memory, disk)
  init_image: Any = None                 # a row source (files/large_images.py)
  keep: np.ndarray | None = None         # [H/f, W/f] bool, latent pixels (--keep_mask)
  init_offset: tuple[int, int] = (0, 0)  # (y, x) pixels of the init on the canvas

  @property
  def options(self) -> pipeline_lib.Options:
    return self.cfg.options


def _hash_folder(path: str) -> str:
  """sha256 over the files of a converted model folder (names and bytes), or of a file's
  bytes."""
  h = hashlib.sha256()
  if os.path.isfile(path):
    with open(path, 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 20), b''):
        h.update(chunk)
    return h.hexdigest()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      h.update(os.path.relpath(full, path).encode())
      with open(full, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
          h.update(chunk)
  return h.hexdigest()


def _check_writable(path: str) -> None:
  """The folder exists and is writable, or could be created (nothing is created here)."""
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    if os.path.islink(probe):
      raise ValueError(f'output folder {path}: {probe} is a symlink that resolves to '
                       'nothing (a loop or a dangling link)')
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f'output folder {path} is not writable ({probe} is not a writable '
                     f'folder)')


def next_index(path: str) -> int:
  """First free sample number: one past the largest `sampleNNNN*` in the folder."""
  if not os.path.isdir(path):
    return 0
  numbers = [int(m[1]) for name in os.listdir(path) if (m := re.match(r'sample(\d+)', name))]
  return max(numbers, default=-1) + 1


def _load_pipeline(cfg: GenerationConfig) -> pipeline_lib.Pipeline:
  paths = (cfg.unet_ckpt, cfg.vae_ckpt, None if cfg.mask else cfg.mask_unet_ckpt)
  for flag, path in zip(('unet_ckpt', 'vae_ckpt', 'mask_unet_ckpt'), paths):
    if path and not os.path.isdir(path):
      raise ValueError(f'--{flag}: checkpoint folder not found: {path}')
  if any(paths[:2]) and not cfg.mask and not cfg.mask_unet_ckpt:
    raise ValueError('give --mask_unet_ckpt or --mask')
  try:
    return pipeline_lib.Pipeline.from_pretrained(*paths, devices=cfg.devices)
  except ValueError as e:
    if any((cfg.unet_ckpt, cfg.vae_ckpt, cfg.mask_unet_ckpt)):
      raise
    raise ValueError(f'{e} (no checkpoint flags given)') from None


def output_format(name: str) -> str:
  """--output_format's value in its one spelling (tif: tiff, jpeg: jpg, ...)."""
  fmt = str(name).lower()
  fmt = FORMAT_ALIASES.get(fmt, fmt)
  if fmt not in FORMATS:
    raise ValueError(f'output_format must be one of {FORMATS} (or {", ".join(FORMAT_ALIASES)}'
                     f'), got {name!r}')
  return fmt


def prepare(cfg: GenerationConfig) -> Plan:
  """Every check that can fail, before any compute: flags, models, mask file, output
  folder, resume. Raises ValueError (one line) or OSError."""
  cfg = dataclasses.replace(cfg, output_format=output_format(cfg.output_format))
  if cfg.n_images < 1 or cfg.batch_size < 1 or cfg.n_images % cfg.batch_size:
    raise ValueError(f'n_images ({cfg.n_images}) must be a positive multiple of batch_size '
                     f'({cfg.batch_size})')
  if cfg.tiff_compression not in writers.TIFF_COMPRESSIONS:
    raise ValueError(f'tiff_compression must be one of {writers.TIFF_COMPRESSIONS}, got '
                     f'{cfg.tiff_compression!r}')
  if not 1 <= cfg.jpeg_quality <= 100:
    raise ValueError(f'jpeg_quality must be in [1, 100], got {cfg.jpeg_quality}')
  if cfg.mpp is not None and not (math.isfinite(cfg.mpp) and cfg.mpp > 0):
    raise ValueError(f'mpp must be a positive finite number, got {cfg.mpp}')
  if not (math.isfinite(cfg.live_preview_minutes) and cfg.live_preview_minutes >= 0):
    raise ValueError(f'live_preview_minutes must be >= 0, got {cfg.live_preview_minutes}')
  if cfg.live_preview_minutes and jax.process_count() > 1:
    raise ValueError('--live_preview_minutes is for single-process runs (the preview reads '
                     'the whole latent, which one process of several does not hold)')
  if cfg.checkpoint_every < 0:
    raise ValueError(f'checkpoint_every must be >= 0, got {cfg.checkpoint_every}')
  if cfg.devices < 0:
    raise ValueError(f'devices must be >= 0, got {cfg.devices}')
  if cfg.devices > jax.device_count():
    raise ValueError(f'--devices: asked for {cfg.devices} devices, JAX sees '
                     f'{jax.device_count()}')
  if cfg.preview is not None:
    if not cfg.dry_run:
      raise ValueError('--preview is for --dry_run (a run writes sampleNNNN_overview.jpg)')
    if os.path.splitext(cfg.preview)[1].lower() != '.png' or os.path.isdir(cfg.preview):
      raise ValueError(f'--preview must be a .png file path, got {cfg.preview!r}')
    _check_writable(os.path.dirname(os.path.abspath(cfg.preview)))
  if cfg.mask == 'demo':
    cfg = dataclasses.replace(cfg, mask=demo.mask_path())
  pipe = _load_pipeline(cfg)
  o = pipe.resolve(cfg.options)
  cfg = dataclasses.replace(cfg, options=o, unet_ckpt=pipe.paths['unet'],
                            vae_ckpt=pipe.paths['vae'],
                            mask_unet_ckpt=pipe.paths.get('mask_unet'))
  for flag in ('mask', 'init_image', 'keep_mask'):   # FIFOs, devices: refused unopened
    path = getattr(cfg, flag)
    if path and not os.path.lexists(path):
      raise ValueError(f'--{flag} {path}: no such file or folder')
    if path:
      _file_errors(flag, path, lambda: reading.kind(path))   # pylint: disable=cell-var-from-loop
  # The reader is chosen by the contents: an OME-Zarr folder, a TIFF, JSON, else PNG.
  lazy = _file_errors('mask', cfg.mask, lambda: label_files.open_label_source(cfg.mask)) \
      if cfg.mask else None
  annotations = bool(cfg.mask) and lazy is None and _file_errors(
      'mask', cfg.mask, lambda: geojson_labels.looks_like_json(cfg.mask))
  if cfg.mask_classes and not annotations:
    raise ValueError(f'--mask_classes is only for a GeoJSON --mask; {cfg.mask} is not '
                     'JSON (it does not start with { or [)' if cfg.mask else
                     '--mask_classes is only for a GeoJSON --mask')
  if annotations:
    if not cfg.mask_classes:
      raise ValueError(f'--mask {cfg.mask} is GeoJSON: give --mask_classes=NAME=ID,...')
    if cfg.image_size is None:
      raise ValueError(f'--mask {cfg.mask} is GeoJSON, which has no size: give '
                       '--image_size=HxW (the annotations\' pixel grid)')
  given = (_file_errors('mask', cfg.mask, lambda: label_maps.read_label_png(cfg.mask))
           if cfg.mask and not annotations and lazy is None else None)
  if lazy is not None:
    given = lazy       # a row source: .shape, .ids; read by bands, never held
  if cfg.image_size is None and given is not None:
    cfg = dataclasses.replace(cfg, image_size='{}x{}'.format(*given.shape))
  init_image = _read_init_image(cfg)
  if init_image is not None:
    _file_errors('init_image', cfg.init_image, lambda: encode_lib.check_size(
        init_image.shape, pipe.geometry.factor))
  offset = _init_offset(cfg, init_image, pipe.geometry.factor)
  if cfg.image_size is None and init_image is not None:   # else its size is checked below
    if cfg.init_offset is not None:
      raise ValueError('--init_offset needs --image_size (or --mask): the canvas the init '
                       'image lies on')
    cfg = dataclasses.replace(cfg, image_size='{}x{}'.format(*init_image.shape[:2]))
  size = cfg.size
  cfg = dataclasses.replace(cfg, image_size=f'{size[0]}x{size[1]}')   # one spelling
  if init_image is not None:
    ih, iw = init_image.shape[:2]
    if cfg.init_offset is None and (ih, iw) != tuple(size):
      raise ValueError(f'--init_image {cfg.init_image} is {ih}x{iw}, the output is '
                       f'{size[0]}x{size[1]} (give --image_size, resize it, or place it '
                       f'with --init_offset)')
    if offset[0] + ih > size[0] or offset[1] + iw > size[1]:
      raise ValueError(f'--init_offset {offset[0]},{offset[1]}: the {ih}x{iw} init image '
                       f'does not fit on the {size[0]}x{size[1]} canvas')
  pipe.check_image_request(size, o)
  _keep_mask_flags(cfg, init_image, size)
  whole = int(cfg.output_format in ('png', 'jpg'))
  refused = []

  def resource_check(fn):   # a dry run reports these with the rest of the plan
    try:
      fn()
    except ValueError as e:
      if not cfg.dry_run:
        raise
      refused.append(str(e))
  # host pixels of the label source: the file's, none for annotations (rasterized by
  # bands), None: the mask model's map
  source_px = (0 if annotations or lazy is not None else
               given.size if given is not None else None)
  init_memory = {} if init_image is None else dict(
      init='keep' if cfg.keep_mask is not None or cfg.init_offset is not None
      else 'strength',
      init_whole=isinstance(init_image, large_images.ArrayImage))
  resource_check(lambda: pipe.check_memory(size, cfg.batch_size, o, whole_images=whole,
                                           label_source_pixels=source_px, **init_memory))
  # Held whole (a PNG / JPEG init image, the latent keep map): only once the memory
  # check passed (a dry run that it refused reports that instead).
  keep = None
  if not refused:
    if hasattr(init_image, 'load'):
      _file_errors('init_image', cfg.init_image, init_image.load)
    keep = _keep_mask(cfg, init_image, offset, size, pipe.geometry.factor)
  mask = None
  if annotations:
    classes = geojson_labels.parse_classes(cfg.mask_classes)
    mask = _file_errors('mask', cfg.mask, lambda: geojson_labels.read_geojson(
        cfg.mask, classes, size, pipe.unet.config.num_classes))
  elif lazy is not None:
    classes = pipe.unet.config.num_classes
    bad = [v for v in lazy.ids if not 0 <= v < classes]
    if bad:
      shown = ', '.join(str(v) for v in bad[:20]) + (', ...' if len(bad) > 20 else '')
      raise ValueError(f'--mask {cfg.mask}: label values out of range [0, {classes}): {shown}')
    mask = label_maps.LabelMap(lazy, size)
  elif given is not None:
    # Checked at the file's resolution and kept there: the map is resized (nearest) by
    # rows on demand, never held whole at the image's (label_maps.LabelMap).
    mask = _file_errors('mask', cfg.mask, lambda: label_maps.LabelMap(
        pipe.check_labels(given[None])[0], size))
  else:
    pipe.check_mask_request(size, cfg.label, o)
  _check_writable(cfg.imgs_path)
  used = {k: v for k, v in pipe.paths.items() if k != 'mask_unet' or mask is None}
  hashes = {name: _hash_folder(path) for name, path in used.items()}
  if cfg.checkpoint_every or cfg.resume:   # a resumed run must read the same inputs
    for flag in ('mask', 'init_image', 'keep_mask'):
      path = getattr(cfg, flag)
      if path is not None and os.path.exists(path):
        hashes[resume.INPUT_PREFIX + flag] = _hash_folder(path)
  _check_name_length(cfg)
  resource_check(lambda: _check_free_space(cfg))
  run_ckpt = resume.RunCheckpoint(cfg.imgs_path)
  meta = None
  if cfg.resume:
    if not run_ckpt.exists():
      raise ValueError(f'--resume: no saved run in {run_ckpt.path}')
    meta = run_ckpt.check(cfg, hashes)
    _check_resume_samples(cfg, meta)
  elif run_ckpt.exists():
    raise ValueError(f'{cfg.imgs_path} holds an unfinished run ({run_ckpt.path}); pass '
                     f'--resume with the same flags to continue it, or remove that folder')
  work = estimate.plan(pipe, size, o, n_batch=cfg.batch_size, n_images=cfg.n_images,
                       labels=mask, whole_images=whole, label_source_pixels=source_px,
                       strength=cfg.strength, keep=keep, **init_memory)
  return Plan(cfg, pipe, mask, hashes, meta, work, tuple(refused), init_image, keep, offset)


def _check_resume_samples(cfg: GenerationConfig, meta: dict) -> None:
  """The saved state and the samples on disk agree: the samples before the saved batch
  are there (their records), none of those the resume writes is (a resume never
  replaces a finished sample). Else one line naming the files."""
  first, b0 = meta['first_sample'], meta['batch_start']
  ahead = [n for n in range(first + b0, first + cfg.n_images)
           if any(os.path.lexists(p) for p in _sample_files(cfg, n)[1:])
           or os.path.lexists(_sample_files(cfg, n)[0] + '.json')]
  missing = [n for n in range(first, first + b0)
             if not os.path.lexists(_sample_files(cfg, n)[0] + '.json')]
  for found, what in ((ahead, 'already exist, but the saved run would write them again'),
                      (missing, 'are missing, but the saved run has finished them')):
    if found:
      names = ', '.join(f'sample{n:04d}' for n in found[:5]) + (', ...' if len(found) > 5
                                                                  else '')
      raise ValueError(f'cannot resume {os.path.join(cfg.imgs_path, resume.FOLDER)}: its '
                       f'state (batch at image {b0}, numbering from sample{first:04d}) '
                       f'does not match the samples in {cfg.imgs_path}: {names} {what}; '
                       'nothing was written')


def _init_offset(cfg: GenerationConfig, init_image, factor: int) -> tuple[int, int]:
  """--init_offset as (y, x) pixels ((0, 0) without it), checked."""
  if cfg.init_offset is None:
    return (0, 0)
  if init_image is None:
    raise ValueError('--init_offset needs --init_image: the image to place on the canvas')
  m = re.fullmatch(r'\s*(\d+)\s*,\s*(\d+)\s*', cfg.init_offset)
  if not m:
    raise ValueError(f'--init_offset must be "y,x" (pixels >= 0), got {cfg.init_offset!r}')
  y, x = int(m.group(1)), int(m.group(2))
  if y % factor or x % factor:
    raise ValueError(f'--init_offset {y},{x}: both must be multiples of the VAE factor '
                     f'{factor}')
  if cfg.strength != 1.0:
    raise ValueError('--init_offset needs --strength 1: the canvas around the init image '
                     'has nothing to start from')
  return (y, x)


def _keep_mask_flags(cfg: GenerationConfig, init_image, size) -> None:
  """--keep_mask's flags and a PNG's size from its header (nothing decoded)."""
  if cfg.keep_mask is None:
    return
  if init_image is None:
    raise ValueError('--keep_mask needs --init_image: the image the kept pixels follow')
  if reading.kind(cfg.keep_mask) == 'file' and not label_files.is_tiff(cfg.keep_mask):
    d = _file_errors('keep_mask', cfg.keep_mask, lambda: image_files.declared(
        cfg.keep_mask, image_files.LABEL_FORMATS, what='keep mask'))
    if (d.height, d.width) != tuple(size):
      raise ValueError(f'--keep_mask {cfg.keep_mask} is {d.height}x{d.width}, the output '
                       f'is {size[0]}x{size[1]}')


def _keep_mask(cfg: GenerationConfig, init_image, offset, size, factor: int):
  """[H/f, W/f] bool latent keep mask: --keep_mask's (a map of the output size, read at
  latent resolution), else the init image's area with --init_offset; None."""
  keep = None
  if cfg.keep_mask is not None:
    # A TIFF or an OME-Zarr labels group is read lazily at latent resolution, a PNG whole.
    source = _file_errors('keep_mask', cfg.keep_mask,
                          lambda: label_files.open_label_source(cfg.keep_mask))
    if source is None:
      source = _file_errors('keep_mask', cfg.keep_mask,
                            lambda: label_maps.read_label_png(cfg.keep_mask))
    if tuple(source.shape) != tuple(size):
      raise ValueError(f'--keep_mask {cfg.keep_mask} is {source.shape[0]}x'
                       f'{source.shape[1]}, the output is {size[0]}x{size[1]}')
    keep = _file_errors('keep_mask', cfg.keep_mask,
                        lambda: label_maps.LabelMap(source, size).latent(factor)) != 0
  if cfg.init_offset is None:
    return keep
  (y, x), (ih, iw) = offset, init_image.shape[:2]
  inside = np.zeros((size[0] // factor, size[1] // factor), bool)
  inside[y // factor:(y + ih) // factor, x // factor:(x + iw) // factor] = True
  if keep is None:
    return inside
  if (keep & ~inside).any():
    raise ValueError(f'--keep_mask {cfg.keep_mask} keeps pixels outside the init image '
                     f'placed at --init_offset {y},{x}: there is nothing to keep there')
  return keep


def encode_init(plan: Plan) -> np.ndarray:
  """The init image's diffusion latent on the canvas, [H/f, W/f, C] (zeros outside the
  init image with --init_offset: there every pixel is generated)."""
  f = plan.pipe.geometry.factor
  z = plan.pipe.encode(plan.init_image, options=plan.options)[0]
  getattr(plan.init_image, 'release', lambda: None)()   # its cached rows, not needed now
  if plan.cfg.init_offset is None:
    return z
  h, w = plan.cfg.size
  canvas = np.zeros((h // f, w // f, z.shape[-1]), np.float32)
  y, x = plan.init_offset[0] // f, plan.init_offset[1] // f
  canvas[y:y + z.shape[0], x:x + z.shape[1]] = z
  return canvas


def _read_init_image(cfg: GenerationConfig):
  """The --init_image as a row source (`large_images.open_rgb_source`, with --strength
  checked); None without one."""
  try:
    loop_lib.start_level(cfg.options.sampling_steps, cfg.strength)
  except ValueError as e:
    raise ValueError(f'--{e}') from None
  if cfg.init_image is None:
    if cfg.strength != 1.0:
      raise ValueError('--strength needs --init_image')
    return None
  return _file_errors('init_image', cfg.init_image,
                      lambda: large_images.open_rgb_source(cfg.init_image))


def dry_run(plan: Plan) -> dict:
  """The plan with seconds estimated from timed calls (`estimate.timed`); nothing is
  sampled or written. `refused`: why the run itself would be refused (memory, disk)."""
  out = estimate.timed(plan.pipe, plan.work, plan.options)
  out['refused'] = list(plan.refused)
  if plan.mask is not None:
    out['labels'], small = label_report(plan.mask)
    if plan.cfg.preview:
      writers.write_image(plan.cfg.preview, masks_lib.colour_labels(small))
      out['labels']['preview'] = plan.cfg.preview
  return out


REPORT_SIDE = 1024   # px: the label map is sampled on this grid for its report and preview


def label_report(labels) -> tuple[dict, np.ndarray]:
  """How a label map was read: the share of the image each id covers (from the map
  sampled every k-th pixel, k = longer side / REPORT_SIDE, rounded up) and, for GeoJSON
  annotations, each class's name, polygons and holes. Returns (report, sampled map)."""
  h, w = labels.shape
  k = max(1, -(-max(h, w) // REPORT_SIDE))
  if hasattr(labels, 'sample'):                     # annotations: only the grid's pixels
    small = labels.sample(np.arange(0, h, k) + 0.5, np.arange(0, w, k) + 0.5)
  else:
    small = np.concatenate([np.asarray(labels[r:r + 1])[:, ::k] for r in range(0, h, k)])
  ids, n = np.unique(small, return_counts=True)
  share = {int(i): round(float(c) / small.size, 4) for i, c in zip(ids, n)}
  report = {'sampled_every_px': k, 'share': share}
  source = getattr(labels, 'source', labels)
  counts = getattr(labels, 'counts', None) or getattr(source, 'counts', None)
  if counts:
    report['classes'] = {name: dict(c, share=share.get(c['id'], 0.0))
                         for name, c in counts.items()}
  return report, small


def label_summary(report: dict) -> str:
  """The lines of `label_report` for a person."""
  lines = [f"  label map (sampled every {report['sampled_every_px']} px):"]
  named = {c['id']: name for name, c in report.get('classes', {}).items()}
  for i, share in report['share'].items():
    name = named.get(i, 'unannotated' if i == 0 and named else '')
    c = report.get('classes', {}).get(name, {})
    extra = (f", {c['polygons']} polygon(s), {c['holes']} hole(s)" if c else '')
    lines.append(f"    id {i}{' ' + name if name else ''}: {100 * share:.1f}% of the image"
                 + extra)
  for name, c in report.get('classes', {}).items():
    if c['id'] not in report['share']:
      lines.append(f"    id {c['id']} {name}: not seen at this sampling ({c['polygons']} "
                   f"polygon(s), {c['holes']} hole(s))")
  if 'preview' in report:
    lines.append(f"    coloured map written to {report['preview']}")
  return '\n'.join(lines)


def _file_errors(flag: str, path: str, fn):
  """`fn()` (reads or checks the file `path` given to `--flag`), its errors as one
  `--flag` ValueError naming the file."""
  try:
    return fn()
  except (OSError, ValueError) as e:
    # the readers' messages usually start with the path already
    message = str(e) if path in str(e) else f'{path}: {e}'
    raise ValueError(f'--{flag} {message}') from None


def _sample_files(cfg, number: int) -> tuple[str, str, str]:
  """(base path, image file, mask file) of sample `number`."""
  base = os.path.join(cfg.imgs_path, f'sample{number:04d}')
  if cfg.output_format == 'zarr':   # labels go into the store's labels/ group
    return base, base + '.zarr', base + '.zarr/labels'
  image_path = base + f'.{cfg.output_format if cfg.output_format != "tiff" else "tif"}'
  return base, image_path, writers.mask_path(image_path)


def _check_name_length(cfg: GenerationConfig) -> None:
  """Refuses, before sampling, a run whose last sample's file names the file system
  cannot hold (a file in the folder may push the numbering that far)."""
  last = next_index(cfg.imgs_path) + cfg.n_images - 1
  base, image_path, mask_file = _sample_files(cfg, last)
  folder = cfg.imgs_path if os.path.isdir(cfg.imgs_path) else os.path.dirname(
      os.path.abspath(cfg.imgs_path)) or '.'
  try:
    limit = os.pathconf(folder, 'PC_NAME_MAX')
  except (OSError, ValueError):
    limit = 255
  longest = max(len(os.path.basename(p)) for p in (base + '.json', image_path, mask_file))
  if 2 * longest + 48 > limit:   # a writer may nest its temporary name in ours
    raise ValueError(f'the next sample would be sample{last:04d}, whose file names '
                     f'({longest} characters, plus temporary suffixes) exceed the file '
                     f'system limit of {limit}: write to another --imgs_path')


# Smallest bytes per pixel a sample's files take (image + mask + record), by format: a
# floor, not an estimate (JPEG of smooth tissue compresses ~20x; PNG/TIFF less).
_MIN_BYTES_PER_PIXEL = {'png': 0.5, 'jpg': 0.15, 'tiff': 0.15, 'zarr': 0.15}


def _check_free_space(cfg: GenerationConfig) -> None:
  """Refuses, before sampling, a run that cannot fit the output folder's free space even
  at the best compression its format reaches (a full disk fails before the work)."""
  probe = os.path.abspath(cfg.imgs_path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  try:
    stat = os.statvfs(probe)
  except OSError:
    return
  free = stat.f_bavail * stat.f_frsize
  need = int(cfg.n_images * math.prod(cfg.size) *
             _MIN_BYTES_PER_PIXEL.get(cfg.output_format, 0.15))
  if need > free:
    raise ValueError(f'{cfg.n_images} image(s) of {cfg.image_size} px need at least '
                     f'{need / 2 ** 20:.0f} MiB in {probe}, which has {free / 2 ** 20:.0f} MiB '
                     'free')


def shares_decode(cfg: GenerationConfig, batch: int) -> bool:
  """Whether all processes decode and write each image of a batch together
  (`output/shared_writer.py`): TIFF / OME-Zarr batches smaller than the process count."""
  return batch < jax.process_count() and cfg.output_format in ('tiff', 'zarr')


def _write_sample(plan: Plan, number: int, z, labels: label_maps.LabelMap, record: dict,
                  mine: bool = True, shared: bool = False) -> dict:
  """Decodes one latent (bands for TIFF/Zarr, whole otherwise), writes image, mask, JSON.

  Multi-process: image j of a batch is decoded and written by process j % P (`mine`); no
  collective runs then, so the processes stay in step whatever each one writes. With
  `shared` (`shares_decode`) every process decodes its share of the bands of this image
  and process 0 writes what is not per process (mask, JSON).
  """
  cfg = plan.cfg
  base, image_path, mask_file = _sample_files(cfg, number)
  record['files'] = {'image': os.path.basename(image_path),
                     'mask': os.path.relpath(mask_file, cfg.imgs_path)}
  # A slide is too large to glance at: a small JPEG of it beside its labels.
  overview = base + '_overview.jpg' if cfg.output_format in ('tiff', 'zarr') and not shared \
      else None
  if overview:
    record['files']['overview'] = os.path.basename(overview)
  if cfg.live_preview_minutes:
    record['files']['live_preview'] = os.path.basename(base + '_live.png')
  start = time.perf_counter()
  if shared:
    _write_shared(plan, z, labels, image_path)
    mine = sharding.is_writer()
  if not mine:
    return record
  annotations = _annotations_path(cfg, image_path, record, labels)
  if shared or cfg.output_format == 'zarr':
    if not shared:   # the store is renamed into place by its writer; mask inside it
      _write_image(plan, z, labels, image_path, overview)
    if cfg.output_format != 'zarr':
      writers.write_labels(mask_file, labels)
      _write_annotations(cfg, annotations, labels)
    record['seconds']['decode_and_write'] = time.perf_counter() - start
    with atomic.atomic_path(base + '.json') as tmp:   # last: marks a complete sample
      _dump_record(tmp, record)
    return record
  # Image, mask and JSON are all written under temporary names first and renamed only
  # once all three are whole (the JSON last): a failure (a full disk, a kill) leaves
  # none of a sample's files, never an image without its mask or record.
  with atomic.atomic_path(base + '.json') as tmp_json, \
      atomic.atomic_path(mask_file) as tmp_mask, atomic.atomic_path(image_path) as tmp_image, \
      (atomic.atomic_path(overview) if overview else contextlib.nullcontext()) as tmp_view, \
      (atomic.atomic_path(annotations) if annotations else contextlib.nullcontext()) as tmp_geo:
    _write_image(plan, z, labels, tmp_image, tmp_view)
    writers.write_labels(tmp_mask, labels)
    _write_annotations(cfg, tmp_geo, labels, atomic_write=False)
    record['seconds']['decode_and_write'] = time.perf_counter() - start
    _dump_record(tmp_json, record)
  return record


def _annotations_path(cfg: GenerationConfig, image_path: str, record: dict,
                      labels) -> str | None:
  """A TIFF slide's labels as QuPath GeoJSON beside it (`output/geojson.py`): the slide
  opens in QuPath with its annotations, and is training data (docs/training.md). A map
  too large to trace is skipped with a warning, not a failed sample."""
  if cfg.output_format != 'tiff':
    return None
  if not geojson_out.traceable(labels):
    logging.warning('%s: the label map is too large to write as GeoJSON; skipped',
                    os.path.basename(image_path))
    return None
  path = geojson_out.geojson_path(image_path)
  record['files']['annotations'] = os.path.basename(path)
  return path


def _write_annotations(cfg: GenerationConfig, path: str | None, labels, **kw) -> None:
  if path:
    classes = geojson_labels.parse_classes(cfg.mask_classes) if cfg.mask_classes else None
    geojson_out.write_geojson(path, labels, classes, **kw)


def _dump_record(path: str, record: dict) -> None:
  with open(path, 'w') as f:
    json.dump(record, f, indent=1, default=str)


OVERVIEW_SIDE = 1024   # px, the longer side of each half of `sampleNNNN_overview.jpg`


class _Overview:
  """Every k-th row and column of the image as its bands stream by (a slide is never
  held whole), written with the labels' colours beside it (`masks.preview`)."""

  def __init__(self, h: int, w: int):
    self.k = max(1, -(-max(h, w) // OVERVIEW_SIDE))
    self.parts = []

  def tap(self, bands):
    for row0, rows in bands:
      self.parts.append(np.array(rows[(-row0) % self.k::self.k, ::self.k]))
      yield row0, rows

  def write(self, path: str, labels) -> None:
    image = writers.as_uint8(np.concatenate(self.parts))
    lab = np.concatenate([np.asarray(labels[r:r + 1])[:, ::self.k]
                          for r in range(0, labels.shape[0], self.k)])
    writers.write_image(path, masks_lib.preview(image, lab, 2 * image.shape[1] + 8),
                        quality=85)


def _write_image(plan: Plan, z, labels: label_maps.LabelMap, image_path: str,
                 overview_path: str | None = None) -> None:
  """One process: this image in the run's format (bands for TIFF/Zarr, whole otherwise),
  and its overview JPEG (TIFF/Zarr) if `overview_path`."""
  cfg = plan.cfg
  h, w = labels.shape
  view = _Overview(h, w) if overview_path else None
  log = progress.Progress('decode and write', 'rows', total=h) if cfg.options.progress_every \
      else None
  if log:
    log.start(f'{h}x{w} px, {cfg.output_format}')
  def bands():
    out = plan.pipe.iter_decode(z, options=plan.options)
    out = log.rows(out, h) if log else out
    return view.tap(out) if view else out
  if cfg.output_format == 'zarr':
    ome_zarr.write_ome_zarr(image_path, bands(), (h, w, 3), labels=labels, mpp=cfg.mpp)
  elif cfg.output_format == 'tiff':
    writers.write_tiff(image_path, bands(), (h, w, 3), compression=cfg.tiff_compression,
                       jpeg_quality=cfg.jpeg_quality, mpp=cfg.mpp)
  else:    # decoded whole (PNG / JPEG hold the image anyway): start and end lines only
    writers.write_image(image_path, plan.pipe.decode(z[None], options=plan.options)[0],
                        quality=cfg.jpeg_quality)
  if view:
    view.write(overview_path, labels)
  if log:
    log.finish(h)


def _write_shared(plan: Plan, z, labels: label_maps.LabelMap, image_path: str) -> None:
  """All processes: this image's TIFF or OME-Zarr, each decoding its share of bands."""
  cfg, where = plan.cfg, dict(process_index=jax.process_index(),
                              process_count=jax.process_count())
  image = plan.pipe.band_source(z, options=plan.options)
  if cfg.output_format == 'zarr':
    shared_writer.write_zarr(image, labels, image_path, mpp=cfg.mpp,
                             barrier=sharding.barrier, **where)
  else:
    shared_writer.write_tiff(image, image_path, allgather=sharding.allgather,
                             compression=cfg.tiff_compression,
                             jpeg_quality=cfg.jpeg_quality, mpp=cfg.mpp, **where)


def _fresh(plan: Plan, stage: str, indices):
  """(sampler, initial state, sampler labels) of a stage (also the template to restore)."""
  cfg, pipe = plan.cfg, plan.pipe
  if stage == 'mask':
    return pipe.mask_stage(plan.options, cfg.size, cfg.label, indices, cfg.seed)
  zeros = [label_maps.LabelMap(np.zeros((1, 1), np.uint8), cfg.size)] * len(indices)
  return pipe.image_stage(plan.options, zeros, indices, cfg.seed)


def _record(plan: Plan, number: int, index: int, labels, stats: dict, seconds: dict,
            flags_used) -> dict:
  cfg = plan.cfg
  return {
      'sample': number, 'image_index': index, 'seed': cfg.seed,
      'config': cfg.flat(), 'flags': flags_used or {},
      'checkpoint_sha256': {k: v for k, v in plan.hashes.items()
                            if not k.startswith(resume.INPUT_PREFIX)},
      'image_size': list(cfg.size),
      'labels_present': labels.present(),
      'mask_stage': stats.get('mask'), 'image_stage': stats['image'],
      'batch': {'size': cfg.batch_size, 'stats_are_per_batch': True},
      'seconds': dict(seconds), 'device': str(jax.devices()[0].device_kind),
      'plan': plan.work,
      'tiled_ldm_jax_version': __import__('tiled_ldm_jax').__version__,
  }


def run(plan: Plan, *, flags_used: dict | None = None) -> list[dict]:
  """Generates `cfg.n_images` images into `cfg.imgs_path`; returns their JSON records."""
  cfg, meta = plan.cfg, plan.resume_meta
  f = plan.pipe.geometry.factor
  run_ckpt = resume.RunCheckpoint(cfg.imgs_path)
  os.makedirs(cfg.imgs_path, exist_ok=True)
  # every process numbers from process 0's view of the folder
  first = sharding.broadcast_int(meta['first_sample'] if meta else next_index(cfg.imgs_path))
  start_batch = meta['batch_start'] if meta else 0
  first_stage = 'image' if plan.mask is not None else 'mask'
  records, total_start = [], time.perf_counter()
  init_latent = None
  if plan.init_image is not None:   # once, before anything is written: a damaged file
    logging.info('encoding the init image')        # stops the run here
    init_latent = encode_init(plan)
  for b0 in range(start_batch, cfg.n_images, cfg.batch_size):
    indices = np.arange(b0, b0 + cfg.batch_size)
    save = functools.partial(run_ckpt.save, cfg=cfg, hashes=plan.hashes, batch_start=b0,
                             first_sample=first)
    stage, state, labels, extra = first_stage, None, None, {}
    if meta is not None and b0 == start_batch:
      stage = meta['stage']
      like = _fresh(plan, stage, indices)[1]
      labels_shape = ((len(indices),) + pipeline_lib.mask_source_hw(cfg.size, f)
                      if meta['has_labels'] else None)
      state, labels = run_ckpt.load(like, labels_shape)
      if stage == 'image' and meta['iterations'] == 0:
        state = None    # saved before the stage began: start it as a fresh run does
                        # (from the init image and its strength, if any)
      if labels is not None:
        labels = [label_maps.LabelMap(m, cfg.size) for m in labels]
      extra = meta.get('extra', {})
      logging.info('resuming batch at image %d, %s stage, iteration %d', b0, stage,
                   meta['iterations'])
    seconds = dict(extra.get('seconds', {}))
    stats = {'mask': extra.get('mask_stats')}
    if plan.mask is not None:
      labels = [plan.mask] * cfg.batch_size
    elif stage == 'mask':
      logging.info('images %d-%d: mask stage', b0, indices[-1])
      start = time.perf_counter()
      labels, stats['mask'] = plan.pipe.run_mask_stage(
          plan.options, cfg.size, cfg.label, indices, cfg.seed, state=state,
          chunk=cfg.checkpoint_every, on_chunk=lambda st: save(stage='mask', state=st),
          lazy=True)
      seconds['mask_stage'] = time.perf_counter() - start
      state = None
      if cfg.checkpoint_every:   # the image stage starts from here after an interruption
        save(stage='image', state=_fresh(plan, 'image', indices)[1], labels=labels,
             extra={'mask_stats': stats['mask'], 'seconds': seconds})
    logging.info('images %d-%d: image stage', b0, indices[-1])
    start = time.perf_counter()
    image_extra = {'mask_stats': stats['mask'], 'seconds': seconds}
    init = None
    if init_latent is not None and (state is None or plan.keep is not None):
      init = np.broadcast_to(init_latent, (len(indices),) + init_latent.shape)
    watch = None
    if cfg.live_preview_minutes:
      watch = live_preview.for_pipeline(plan.pipe, plan.options, [
          _sample_files(cfg, first + int(i))[0] + '_live.png' for i in indices],
          cfg.live_preview_minutes)
    z, stats['image'] = plan.pipe.run_image_stage(
        plan.options, labels, indices, cfg.seed, state=state, chunk=cfg.checkpoint_every,
        init=init, strength=cfg.strength, watch=watch,
        keep=None if plan.keep is None else np.broadcast_to(
            plan.keep, (len(indices),) + plan.keep.shape),
        on_chunk=lambda st: save(stage='image', state=st, extra=image_extra,
                                 # a given map is read again on resume, never saved
                                 labels=labels if plan.mask is None else None))
    z = sharding.to_host(z)
    seconds['image_stage'] = time.perf_counter() - start
    for j, index in enumerate(indices):
      number = first + int(index)
      record = _record(plan, number, int(index), labels[j], stats, seconds, flags_used)
      records.append(_write_sample(plan, number, z[j], labels[j], record,
                                   mine=sharding.owns(j),
                                   shared=shares_decode(cfg, len(indices))))
      logging.info('wrote sample%04d (%d/%d, %s so far)%s', number, len(records),
                   cfg.n_images, progress.duration(time.perf_counter() - total_start),
                   '; to look at it: ' + os.path.join(cfg.imgs_path, records[-1]['files'][
                       'overview']) if 'overview' in records[-1]['files'] else '')
    if cfg.checkpoint_every and b0 + cfg.batch_size < cfg.n_images:
      nxt = indices + cfg.batch_size    # the next batch starts from scratch
      run_ckpt.save(cfg=cfg, hashes=plan.hashes, batch_start=b0 + cfg.batch_size,
                    first_sample=first, stage=first_stage,
                    state=_fresh(plan, first_stage, nxt)[1])
  sharding.barrier('tiled_ldm_jax.generate.done')   # every process has written its files
  if sharding.is_writer():
    run_ckpt.remove()
  return records


def generate(cfg: GenerationConfig, *, flags_used: dict | None = None) -> list[dict]:
  """`run(prepare(cfg))`."""
  return run(prepare(cfg), flags_used=flags_used)
