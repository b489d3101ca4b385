"""End to end (SPEC section 5): mask stage, image stage, tiled decode, files on disk.

For each batch of images: a label map per image (from `--mask`, or sampled by the mask
model, decoded, quantized and cleaned), then the image model samples the latent with the
random-patch sampler, the VAE decodes it with the Hann-blended tiled decode, and the
writer streams it to `sampleNNNN.<ext>` beside `sampleNNNN_mask.png` and
`sampleNNNN.json` (provenance and figures). Every file is written under a temporary
name and renamed when complete, so an interrupted run leaves nothing that looks whole.

Image n of a run uses key `fold_in(key(seed), n)` (mask stage: `fold_in(., 0)`, image
stage: `fold_in(., 1)`), so it does not depend on the batch it was sampled in.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from tiled_ldm_jax import checkpoint
from tiled_ldm_jax import decode as decode_lib
from tiled_ldm_jax import masks as masks_lib
from tiled_ldm_jax import sampler as sampler_lib
from tiled_ldm_jax import writers
from tiled_ldm_jax.models import vae as vae_lib

FORMATS = ('png', 'jpg', 'tiff')
MASK_DOWNSCALE = 4  # the mask model works at a quarter of the image size


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """What to generate; mirrors the command's flags."""
  unet_ckpt: str                        # converted image model folder
  vae_ckpt: str                         # converted VAE folder
  mask_unet_ckpt: str | None = None     # converted mask model folder (unless `mask`)
  mask: str | None = None               # PNG of label ids (any size, resized nearest)
  imgs_path: str = './results/large'    # output folder
  n_images: int = 1                     # images to generate
  batch_size: int = 1                   # images sampled together (one compiled program)
  label: int = 1                        # class the mask model generates a layout for
  image_size: int = 1024                # image side in pixels (multiple of 8)
  cond_scale: float = 3.0               # image model guidance w: null + (1+w)(cond-null)
  mask_cond_scale: float = 0.0          # mask model guidance (the original uses 0)
  sampling_steps: int = 50              # DDIM steps S for both stages
  patch_size: int = 512                 # image model patch (pixels; also the decode tile)
  mask_patch_size: int = 128            # mask model patch (pixels; also its decode tile)
  patches_per_step: int = 1             # K non-overlapping patches per iteration
  eta: float = 1.0                      # DDIM eta
  seed: int = 0                         # root PRNG seed
  output_format: str = 'png'            # png | jpg | tiff (pyramidal BigTIFF)
  tile_batch: int = 4                   # VAE tiles per decoder call
  latent_scale: float = 50.0            # DiffInfinite latents are SD2 latents / 50
  progress_every: int = 50              # sampler progress log period (iterations; 0: off)


@functools.lru_cache(maxsize=4)
def _vae_decode(config):
  """One decode function per VAE config, so its compiled tiled decode is reused."""
  return vae_lib.decode_fn(config)


def _fail(msg: str):
  raise ValueError(msg)


def _hash_folder(path: str) -> str:
  """sha256 over the files of a converted model folder (names and bytes)."""
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      h.update(os.path.relpath(full, path).encode())
      with open(full, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
          h.update(chunk)
  return h.hexdigest()


def _load(path: str | None, expect: str, flag: str):
  if not path:
    _fail(f'--{flag} is required')
  if not os.path.isdir(path):
    _fail(f'--{flag}: checkpoint folder not found: {path}')
  try:
    return checkpoint.load_model(path, expect=expect)[1:]
  except (OSError, ValueError) as e:
    _fail(f'--{flag}: cannot load {path}: {e}')


def _check_output_dir(path: str) -> None:
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f'.write-test-{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    _fail(f'output folder {path} is not writable: {e}')


def next_index(path: str) -> int:
  """First free sample number: one past the largest `sampleNNNN*` in the folder."""
  numbers = [int(m[1]) for name in os.listdir(path)
             if (m := re.match(r'sample(\d+)', name))]
  return max(numbers, default=-1) + 1


@dataclasses.dataclass
class _Models:
  unet: tuple[Any, Any]
  vae: tuple[Any, Any]
  mask_unet: tuple[Any, Any] | None


def validate(cfg: GenerationConfig) -> tuple[_Models, np.ndarray | None]:
  """Every check that can fail, before any compute. Returns the models and given mask."""
  if cfg.output_format not in FORMATS:
    _fail(f'output_format must be one of {FORMATS}, got {cfg.output_format!r}')
  if cfg.n_images < 1 or cfg.batch_size < 1 or cfg.n_images % cfg.batch_size:
    _fail(f'n_images ({cfg.n_images}) must be a positive multiple of batch_size '
          f'({cfg.batch_size})')
  unet = _load(cfg.unet_ckpt, 'image_unet', 'unet_ckpt')
  vae = _load(cfg.vae_ckpt, 'vae', 'vae_ckpt')
  size = (cfg.image_size, cfg.image_size)
  try:
    sampler_lib.validate_request(size, cfg.patch_size, cfg.sampling_steps,
                                 unet[0].downsample_factor)
  except ValueError as e:
    _fail(str(e))
  mask, mask_unet = None, None
  if cfg.mask:
    try:
      mask = masks_lib.resize_labels(masks_lib.read_label_png(cfg.mask), size)
      masks_lib.validate_labels(mask, unet[0].num_classes)
    except (OSError, ValueError) as e:
      _fail(f'--mask {cfg.mask}: {e}')
  else:
    mask_unet = _load(cfg.mask_unet_ckpt, 'mask_unet', 'mask_unet_ckpt (or give --mask)')
    if not 0 <= cfg.label < mask_unet[0].num_classes:
      _fail(f'label {cfg.label} is outside the mask model\'s classes '
            f'[0, {mask_unet[0].num_classes})')
    msize = _mask_size(cfg.image_size)
    try:
      sampler_lib.validate_request((msize, msize), min(cfg.mask_patch_size, msize),
                                   cfg.sampling_steps, mask_unet[0].downsample_factor)
    except ValueError as e:
      _fail(f'mask stage: {e}')
  _check_output_dir(cfg.imgs_path)
  return _Models(unet, vae, mask_unet), mask


def _mask_size(image_size: int) -> int:
  """Side of the mask model's image: a quarter of the image, rounded up to 8 pixels."""
  return -(-image_size // MASK_DOWNSCALE // 8) * 8 if image_size >= 32 else 8


def _stage_keys(cfg: GenerationConfig, indices, stage: int) -> jax.Array:
  keys = sampler_lib.image_keys(cfg.seed, indices)
  return jax.vmap(lambda k: jax.random.fold_in(k, stage))(keys)


def sample_masks(cfg: GenerationConfig, models: _Models, indices) -> tuple[np.ndarray, dict]:
  """[B, N, N] label maps from the mask model (sample, tiled decode, quantize, clean)."""
  m_cfg, m_params = models.mask_unet
  v_cfg, v_params = models.vae
  num_labels = models.unet[0].num_classes
  msize = _mask_size(cfg.image_size)
  patch = min(cfg.mask_patch_size, msize)
  if patch != cfg.mask_patch_size:
    logging.info('mask stage: mask image %d px is smaller than mask_patch_size %d; using %d',
                 msize, cfg.mask_patch_size, patch)
  settings = sampler_lib.SamplerSettings(
      steps=cfg.sampling_steps, patch=patch // 8, patches_per_step=cfg.patches_per_step,
      eta=cfg.eta, progress_every=cfg.progress_every, progress_label='mask stage')
  smp = sampler_lib.mask_sampler(m_cfg, cfg.mask_cond_scale, settings)
  classes = np.full((len(indices), msize // 8, msize // 8), cfg.label, np.int32)
  state = smp.sample(m_params, _stage_keys(cfg, indices, 0), classes, m_cfg.channels)
  z = np.asarray(state.x)
  out = []
  dec = decode_lib.TiledDecodeSettings(patch_size=patch, tile_batch=cfg.tile_batch,
                                       latent_scale=cfg.latent_scale)
  for zi in z:
    img = decode_lib.decode_image(_vae_decode(v_cfg), v_params, zi, dec)
    q = masks_lib.quantize_mask_image(img, num_labels)
    out.append(masks_lib.clean_mask(q, num_labels, (cfg.image_size, cfg.image_size)))
  stats = {'patch_iterations': int(state.iterations),
           'denoiser_evaluations': int(state.evaluations)}
  return np.stack(out), stats


def sample_latents(cfg: GenerationConfig, models: _Models, labels: np.ndarray, indices):
  u_cfg, u_params = models.unet
  state = sampler_lib.sample_image_latents(
      u_cfg, u_params, labels, _stage_keys(cfg, indices, 1), patch_size=cfg.patch_size,
      steps=cfg.sampling_steps, cond_scale=cfg.cond_scale,
      patches_per_step=cfg.patches_per_step, eta=cfg.eta, progress_every=cfg.progress_every)
  stats = {'patch_iterations': int(state.iterations),
           'denoiser_evaluations': int(state.evaluations)}
  return np.asarray(state.x), stats


def _write_sample(cfg: GenerationConfig, models: _Models, number: int, z: np.ndarray,
                  labels: np.ndarray, record: dict) -> dict:
  v_cfg, v_params = models.vae
  dec = decode_lib.TiledDecodeSettings(patch_size=cfg.patch_size, tile_batch=cfg.tile_batch,
                                       latent_scale=cfg.latent_scale)
  base = os.path.join(cfg.imgs_path, f'sample{number:04d}')
  start = time.perf_counter()
  image_path = base + ('.tif' if cfg.output_format == 'tiff' else f'.{cfg.output_format}')
  written = writers.write_decoded(image_path, _vae_decode(v_cfg), v_params, z, dec,
                                  labels=labels)
  record['seconds']['decode_and_write'] = time.perf_counter() - start
  record['files'] = {'image': os.path.basename(written[0]),
                     'mask': os.path.basename(written[1])}
  with writers.atomic_path(base + '.json') as tmp:   # last: its presence marks a complete sample
    with open(tmp, 'w') as f:
      json.dump(record, f, indent=1, default=str)
  return record


def generate(cfg: GenerationConfig, *, flags_used: dict | None = None,
             prepared=None) -> list[dict]:
  """Generates `cfg.n_images` images into `cfg.imgs_path`; returns their JSON records.

  `prepared`: what `validate(cfg)` returned, if the caller already ran it.
  """
  models, given_mask = prepared or validate(cfg)
  hashes = {name: _hash_folder(path) for name, path in
            (('unet', cfg.unet_ckpt), ('vae', cfg.vae_ckpt), ('mask_unet', cfg.mask_unet_ckpt))
            if path and (name != 'mask_unet' or given_mask is None)}
  first = next_index(cfg.imgs_path)
  records = []
  total_start = time.perf_counter()
  for b0 in range(0, cfg.n_images, cfg.batch_size):
    indices = np.arange(b0, b0 + cfg.batch_size)
    seconds = {}
    start = time.perf_counter()
    if given_mask is None:
      logging.info('images %d-%d: mask stage', b0, b0 + cfg.batch_size - 1)
      labels, mask_stats = sample_masks(cfg, models, indices)
      seconds['mask_stage'] = time.perf_counter() - start
    else:
      labels, mask_stats = np.broadcast_to(given_mask, (cfg.batch_size,) + given_mask.shape), None
    logging.info('images %d-%d: image stage', b0, b0 + cfg.batch_size - 1)
    start = time.perf_counter()
    z, image_stats = sample_latents(cfg, models, labels, indices)
    seconds['image_stage'] = time.perf_counter() - start
    for j, index in enumerate(indices):
      record = {
          'sample': first + int(index), 'image_index': int(index), 'seed': cfg.seed,
          'config': dataclasses.asdict(cfg), 'flags': flags_used or {},
          'checkpoint_sha256': hashes, 'image_size': [cfg.image_size, cfg.image_size],
          'labels_present': sorted(int(v) for v in np.unique(labels[j])),
          'mask_stage': mask_stats, 'image_stage': image_stats,
          'batch': {'size': cfg.batch_size, 'stats_are_per_batch': True},
          'seconds': dict(seconds), 'device': str(jax.devices()[0].device_kind),
          'tiled_ldm_jax_version': __import__('tiled_ldm_jax').__version__,
      }
      records.append(_write_sample(cfg, models, first + int(index), z[j], labels[j], record))
      logging.info('wrote sample%04d (%d/%d, %.0f s so far)', first + int(index),
                   len(records), cfg.n_images, time.perf_counter() - total_start)
  return records
