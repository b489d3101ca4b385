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
from tiled_ldm_jax import demo
from tiled_ldm_jax import masks as masks_lib
from tiled_ldm_jax import resume
from tiled_ldm_jax import sharding
from tiled_ldm_jax import sampler as sampler_lib
from tiled_ldm_jax import writers
from tiled_ldm_jax.models import vae as vae_lib

FORMATS = ('png', 'jpg', 'tiff')
MASK_DOWNSCALE = 4  # the mask model works at a quarter of the image size


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """What to generate; mirrors the command's flags."""
  unet_ckpt: str | None = None          # converted image model folder (None: demo models)
  vae_ckpt: str | None = None           # converted VAE folder
  mask_unet_ckpt: str | None = None     # converted mask model folder (unless `mask`)
  mask: str | None = None               # PNG of label ids (any size, resized nearest), or "demo"
  imgs_path: str = './results/large'    # output folder
  n_images: int = 1                     # images to generate
  batch_size: int = 1                   # images sampled together (one compiled program)
  label: int = 1                        # class the mask model generates a layout for
  image_size: int = 1024                # image side in pixels (multiple of 8)
  cond_scale: float = 3.0               # image model guidance w: null + (1+w)(cond-null)
  mask_cond_scale: float = 0.0          # mask model guidance (the original uses 0)
  sampling_steps: int = 50              # DDIM steps S for both stages
  patch_size: int | None = None         # image model patch and decode tile, pixels
                                        # (None: 512, or 128 for the demo models)
  mask_patch_size: int | None = None    # mask model patch and decode tile (None: 128)
  patches_per_step: int = 1             # K non-overlapping patches per iteration
  eta: float = 1.0                      # DDIM eta
  seed: int = 0                         # root PRNG seed
  output_format: str = 'png'            # png | jpg | tiff (pyramidal BigTIFF)
  tile_batch: int = 4                   # VAE tiles per decoder call
  blend_mode: str = 'original'          # decode blend: 'original' (SPEC 4, parity) or
                                        # 'partition' (no residual seam; decode.py)
  latent_scale: float = 50.0            # DiffInfinite latents are SD2 latents / 50
  progress_every: int = 50              # sampler progress log period (iterations; 0: off)
  checkpoint_every: int = 0             # save the sampler state every N iterations (0: off)
  resume: bool = False                  # continue the run saved in <imgs_path>/checkpoint
  devices: int = 0                      # devices to shard over (0: all JAX sees)


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


@dataclasses.dataclass
class Prepared:
  """What `validate` found: the resolved config, loaded models, the given mask, model
  hashes, resume meta."""
  cfg: GenerationConfig
  models: _Models
  mask: np.ndarray | None
  hashes: dict[str, str]
  resume_meta: dict[str, Any] | None


def resolve_defaults(cfg: GenerationConfig) -> GenerationConfig:
  """Fills the demo models when no checkpoint is given, and the patch sizes."""
  given = [n for n in ('unet_ckpt', 'vae_ckpt', 'mask_unet_ckpt') if getattr(cfg, n)]
  use_demo = not given
  if use_demo:
    if not demo.available():
      _fail(f'no checkpoint flags given and the demo models are missing from {demo.DEMO_DIR}')
    cfg = dataclasses.replace(cfg, unet_ckpt=demo.model_path('image_unet'),
                              vae_ckpt=demo.model_path('vae'),
                              mask_unet_ckpt=demo.model_path('mask_unet'))
  elif not (cfg.unet_ckpt and cfg.vae_ckpt):
    _fail('give --unet_ckpt and --vae_ckpt (and --mask_unet_ckpt or --mask), or no '
          'checkpoint flag at all to use the bundled demo models')
  if cfg.mask == 'demo':
    cfg = dataclasses.replace(cfg, mask=demo.mask_path())
  if cfg.patch_size is None:
    cfg = dataclasses.replace(cfg, patch_size=demo.PATCH_SIZE if use_demo else 512)
  if cfg.mask_patch_size is None:
    cfg = dataclasses.replace(cfg, mask_patch_size=demo.MASK_PATCH_SIZE)
  return cfg


def validate(cfg: GenerationConfig) -> Prepared:
  """Every check that can fail, before any compute (on `resolve_defaults(cfg)`)."""
  cfg = resolve_defaults(cfg)
  if cfg.output_format not in FORMATS:
    _fail(f'output_format must be one of {FORMATS}, got {cfg.output_format!r}')
  if cfg.blend_mode not in decode_lib.BLEND_MODES:
    _fail(f'blend_mode must be one of {decode_lib.BLEND_MODES}, got {cfg.blend_mode!r}')
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
  try:
    _mesh(cfg)
  except ValueError as e:
    _fail(f'--devices: {e}')
  if cfg.checkpoint_every < 0:
    _fail(f'checkpoint_every must be >= 0, got {cfg.checkpoint_every}')
  _check_output_dir(cfg.imgs_path)
  hashes = {name: _hash_folder(path) for name, path in
            (('unet', cfg.unet_ckpt), ('vae', cfg.vae_ckpt), ('mask_unet', cfg.mask_unet_ckpt))
            if path and (name != 'mask_unet' or mask is None)}
  run_ckpt = resume.RunCheckpoint(cfg.imgs_path)
  meta = None
  if cfg.resume:
    if not run_ckpt.exists():
      _fail(f'--resume: no saved run in {run_ckpt.path}')
    meta = run_ckpt.check(cfg, hashes)
  elif run_ckpt.exists():
    _fail(f'{cfg.imgs_path} holds an unfinished run ({run_ckpt.path}); pass --resume with '
          f'the same flags to continue it, or remove that folder')
  return Prepared(cfg, _Models(unet, vae, mask_unet), mask, hashes, meta)


def _mask_size(image_size: int) -> int:
  """Side of the mask model's image: a quarter of the image, rounded up to 8 pixels."""
  return -(-image_size // MASK_DOWNSCALE // 8) * 8 if image_size >= 32 else 8


def _stage_keys(cfg: GenerationConfig, indices, stage: int) -> jax.Array:
  keys = sampler_lib.image_keys(cfg.seed, indices)
  return jax.vmap(lambda k: jax.random.fold_in(k, stage))(keys)


def _run_stage(cfg: GenerationConfig, smp, params, state, latent_labels, save):
  """Runs a sampler to the end in chunks of `checkpoint_every`, saving after each."""
  every = cfg.checkpoint_every or None
  while int(state.times.min()) < cfg.sampling_steps:       # one host sync per chunk
    state = smp.run(params, state, latent_labels, max_iterations=every)
    if every and int(state.times.min()) < cfg.sampling_steps:
      save(state)
  return state


def _stats(state) -> dict:
  return {'patch_iterations': int(state.iterations),
          'denoiser_evaluations': int(state.evaluations)}


def _mask_sampler(cfg: GenerationConfig, m_cfg):
  msize = _mask_size(cfg.image_size)
  patch = min(cfg.mask_patch_size, msize)
  if patch != cfg.mask_patch_size:
    logging.info('mask stage: mask image %d px is smaller than mask_patch_size %d; using %d',
                 msize, cfg.mask_patch_size, patch)
  settings = sampler_lib.SamplerSettings(
      steps=cfg.sampling_steps, patch=patch // 8, patches_per_step=cfg.patches_per_step,
      eta=cfg.eta, progress_every=cfg.progress_every, progress_label='mask stage')
  return (sampler_lib.mask_sampler(m_cfg, cfg.mask_cond_scale, settings, _mesh(cfg)), msize,
          patch)


def sample_masks(cfg: GenerationConfig, models: _Models, indices, state=None,
                 save=None) -> tuple[np.ndarray, dict]:
  """[B, N, N] label maps from the mask model (sample, tiled decode, quantize, clean).

  `state`: a restored mask-stage `SamplerState` to continue; `save(state)`: checkpoint.
  """
  m_cfg, m_params = models.mask_unet
  v_cfg, v_params = models.vae
  num_labels = models.unet[0].num_classes
  smp, msize, patch = _mask_sampler(cfg, m_cfg)
  classes = np.full((len(indices), msize // 8, msize // 8), cfg.label, np.int32)
  if state is None:
    state = smp.init(_stage_keys(cfg, indices, 0), classes.shape, m_cfg.channels)
  state = _run_stage(cfg, smp, m_params, state, classes, save)
  dec = decode_lib.TiledDecodeSettings(patch_size=patch, tile_batch=cfg.tile_batch,
                                       latent_scale=cfg.latent_scale,
                                       blend_mode=cfg.blend_mode)
  out = []
  for zi in sharding.to_host(state.x):
    img = decode_lib.decode_image(_vae_decode(v_cfg), v_params, zi, dec)
    q = masks_lib.quantize_mask_image(img, num_labels)
    out.append(masks_lib.clean_mask(q, num_labels, (cfg.image_size, cfg.image_size)))
  return np.stack(out), _stats(state)


def _image_sampler(cfg: GenerationConfig, u_cfg):
  settings = sampler_lib.SamplerSettings(
      steps=cfg.sampling_steps, patch=cfg.patch_size // 8,
      patches_per_step=cfg.patches_per_step, eta=cfg.eta,
      progress_every=cfg.progress_every, progress_label='image stage')
  return sampler_lib.image_sampler(u_cfg, cfg.cond_scale, settings, _mesh(cfg))


def _mesh(cfg: GenerationConfig):
  return sharding.make_mesh(cfg.batch_size, cfg.patches_per_step, cfg.devices)


def sample_latents(cfg: GenerationConfig, models: _Models, labels: np.ndarray, indices,
                   state=None, save=None):
  """[B, H/8, W/8, C] image latents for pixel label maps [B, H, W] (see sample_masks)."""
  u_cfg, u_params = models.unet
  smp = _image_sampler(cfg, u_cfg)
  latent = masks_lib.latent_labels(np.asarray(labels, np.int32), sampler_lib.LATENT_FACTOR)
  if state is None:
    state = smp.init(_stage_keys(cfg, indices, 1), latent.shape, u_cfg.channels)
  state = _run_stage(cfg, smp, u_params, state, latent, save)
  return sharding.to_host(state.x), _stats(state)


def _write_sample(cfg: GenerationConfig, models: _Models, number: int, z: np.ndarray,
                  labels: np.ndarray, record: dict) -> dict:
  v_cfg, v_params = models.vae
  dec = decode_lib.TiledDecodeSettings(patch_size=cfg.patch_size, tile_batch=cfg.tile_batch,
                                       latent_scale=cfg.latent_scale,
                                       blend_mode=cfg.blend_mode)
  if not sharding.is_writer():   # multi-host: process 0 writes
    return record
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


def _fresh_state(cfg: GenerationConfig, models: _Models, stage: str, indices):
  """The initial state of a stage (also the shape template for restoring one)."""
  if stage == 'mask':
    smp, msize, _ = _mask_sampler(cfg, models.mask_unet[0])
    shape, channels = (len(indices), msize // 8, msize // 8), models.mask_unet[0].channels
  else:
    smp = _image_sampler(cfg, models.unet[0])
    shape = (len(indices), cfg.image_size // 8, cfg.image_size // 8)
    channels = models.unet[0].channels
  return smp, smp.init(_stage_keys(cfg, indices, 0 if stage == 'mask' else 1), shape, channels)


def _restore(cfg, models, run_ckpt: resume.RunCheckpoint, meta, indices):
  """(stage, state, labels) of the saved batch."""
  stage = meta['stage']
  smp, like = _fresh_state(cfg, models, stage, indices)
  labels_shape = (len(indices), cfg.image_size, cfg.image_size) if meta['has_labels'] else None
  state, labels = run_ckpt.load(like, labels_shape)
  logging.info('resuming batch at image %d, %s stage, iteration %d', meta['batch_start'],
               stage, meta['iterations'])
  return stage, smp.place(state), labels


def generate(cfg: GenerationConfig, *, flags_used: dict | None = None,
             prepared: Prepared | None = None) -> list[dict]:
  """Generates `cfg.n_images` images into `cfg.imgs_path`; returns their JSON records.

  `prepared`: what `validate(cfg)` returned, if the caller already ran it. With
  `checkpoint_every`, progress is saved under `<imgs_path>/checkpoint` (see resume.py);
  `resume` continues such a run.
  """
  prep = prepared or validate(cfg)
  cfg = prep.cfg
  models, given_mask, hashes, meta = prep.models, prep.mask, prep.hashes, prep.resume_meta
  run_ckpt = resume.RunCheckpoint(cfg.imgs_path)
  first = meta['first_sample'] if meta else next_index(cfg.imgs_path)
  start_batch = meta['batch_start'] if meta else 0
  records = []
  total_start = time.perf_counter()
  for b0 in range(start_batch, cfg.n_images, cfg.batch_size):
    indices = np.arange(b0, b0 + cfg.batch_size)
    save = functools.partial(run_ckpt.save, cfg=cfg, hashes=hashes, batch_start=b0,
                             first_sample=first)
    stage, state, labels, extra = 'mask', None, None, {}
    if meta is not None and b0 == start_batch:
      stage, state, labels = _restore(cfg, models, run_ckpt, meta, indices)
      extra = meta.get('extra', {})
    seconds = dict(extra.get('seconds', {}))
    mask_stats = extra.get('mask_stats')
    if given_mask is not None:
      labels = np.broadcast_to(given_mask, (cfg.batch_size,) + given_mask.shape)
      stage = 'image'
    elif stage == 'mask':
      logging.info('images %d-%d: mask stage', b0, b0 + cfg.batch_size - 1)
      start = time.perf_counter()
      labels, mask_stats = sample_masks(
          cfg, models, indices, state, lambda st: save(stage='mask', state=st))
      seconds['mask_stage'] = time.perf_counter() - start
      state = None
      if cfg.checkpoint_every:   # the image stage starts from here after an interruption
        _, fresh = _fresh_state(cfg, models, 'image', indices)
        save(stage='image', state=fresh, labels=labels,
             extra={'mask_stats': mask_stats, 'seconds': seconds})
    logging.info('images %d-%d: image stage', b0, b0 + cfg.batch_size - 1)
    start = time.perf_counter()
    image_extra = {'mask_stats': mask_stats, 'seconds': seconds}
    z, image_stats = sample_latents(
        cfg, models, labels, indices, state,
        lambda st: save(stage='image', state=st, labels=labels, extra=image_extra))
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
    if cfg.checkpoint_every and b0 + cfg.batch_size < cfg.n_images:
      nxt = indices + cfg.batch_size    # the next batch starts from scratch
      _, fresh = _fresh_state(cfg, models, 'image' if given_mask is not None else 'mask', nxt)
      run_ckpt.save(cfg=cfg, hashes=hashes, batch_start=b0 + cfg.batch_size,
                    first_sample=first, stage='image' if given_mask is not None else 'mask',
                    state=fresh)
  run_ckpt.remove()
  return records
