"""A prepared run (`inputs.Plan`) generated: batch by batch, the mask stage (or the given
map), the image stage, then each sample's files (`write.py`); with `checkpoint_every`
the sampler state is saved between chunks and a resumed run continues it (`resume.py`)."""

from __future__ import annotations

import functools
import os
import time

from absl import logging
import jax
import numpy as np

from tiled_ldm_jax import progress
from tiled_ldm_jax import request as request_lib
from tiled_ldm_jax import resume
from tiled_ldm_jax import sharding
from tiled_ldm_jax.files import label_maps
from tiled_ldm_jax.generate import config as config_lib
from tiled_ldm_jax.generate import inputs as inputs_lib
from tiled_ldm_jax.generate import write as write_lib
from tiled_ldm_jax.generate.config import GenerationConfig
from tiled_ldm_jax.generate.inputs import Plan
from tiled_ldm_jax.output import live_preview


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
  stages = plan.pipe.stages
  run_ckpt = resume.RunCheckpoint(cfg.imgs_path)
  os.makedirs(cfg.imgs_path, exist_ok=True)
  # every process numbers from process 0's view of the folder
  first = sharding.broadcast_int(meta['first_sample'] if meta
                                 else config_lib.next_index(cfg.imgs_path))
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
      stage, state, labels, extra = _resumed(plan, run_ckpt, indices)
    seconds = dict(extra.get('seconds', {}))
    stats = {'mask': extra.get('mask_stats')}
    if plan.mask is not None:
      labels = [plan.mask] * cfg.batch_size
    elif stage == 'mask':
      logging.info('images %d-%d: mask stage', b0, indices[-1])
      start = time.perf_counter()
      labels, stats['mask'] = stages.run_mask(
          plan.request, cfg.label, indices, cfg.seed, state=state,
          chunk=cfg.checkpoint_every, on_chunk=lambda st: save(stage='mask', state=st),
          lazy=True)
      seconds['mask_stage'] = time.perf_counter() - start
      state = None
      if cfg.checkpoint_every:   # the image stage starts from here after an interruption
        save(stage='image', state=stages.initial_state(plan.request, 'image', indices,
                                                       cfg.seed), labels=labels,
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
          config_lib.sample_files(cfg, first + int(i))[0] + '_live.png' for i in indices],
          cfg.live_preview_minutes)
    z, stats['image'] = stages.run_image(
        plan.request, labels, indices, cfg.seed, state=state, chunk=cfg.checkpoint_every,
        init=init, strength=cfg.strength, watch=watch,
        keep=None if plan.keep is None else np.broadcast_to(
            plan.keep, (len(indices),) + plan.keep.shape),
        on_chunk=lambda st: save(stage='image', state=st, extra=image_extra,
                                 # a given map is read again on resume, never saved
                                 labels=labels if plan.mask is None else None))
    z = sharding.to_host(z)
    seconds['image_stage'] = time.perf_counter() - start
    for j, index in enumerate(indices):
      records.append(_write(plan, first + int(index), int(index), z[j], labels[j], stats,
                            seconds, flags_used, j, len(indices)))
      logging.info('wrote sample%04d (%d/%d, %s so far)%s', first + int(index),
                   len(records), cfg.n_images,
                   progress.duration(time.perf_counter() - total_start),
                   '; to look at it: ' + os.path.join(cfg.imgs_path, records[-1]['files'][
                       'overview']) if 'overview' in records[-1]['files'] else '')
    if cfg.checkpoint_every and b0 + cfg.batch_size < cfg.n_images:
      nxt = indices + cfg.batch_size    # the next batch starts from scratch
      run_ckpt.save(cfg=cfg, hashes=plan.hashes, batch_start=b0 + cfg.batch_size,
                    first_sample=first, stage=first_stage,
                    state=stages.initial_state(plan.request, first_stage, nxt, cfg.seed))
  sharding.barrier('tiled_ldm_jax.generate.done')   # every process has written its files
  if sharding.is_writer():
    run_ckpt.remove()
  return records


def _resumed(plan: Plan, run_ckpt: resume.RunCheckpoint, indices):
  """(stage, state, labels, extra) of the saved batch a resumed run continues."""
  cfg, meta = plan.cfg, plan.resume_meta
  stage = meta['stage']
  like = plan.pipe.stages.initial_state(plan.request, stage, indices, cfg.seed)
  labels_shape = ((len(indices),) + request_lib.mask_source_hw(
      cfg.size, plan.pipe.geometry.factor) if meta['has_labels'] else None)
  state, labels = run_ckpt.load(like, labels_shape)
  if stage == 'image' and meta['iterations'] == 0:
    state = None    # saved before the stage began: start it as a fresh run does
                    # (from the init image and its strength, if any)
  if labels is not None:
    labels = [label_maps.LabelMap(m, cfg.size) for m in labels]
  logging.info('resuming batch at image %d, %s stage, iteration %d', indices[0], stage,
               meta['iterations'])
  return stage, state, labels, meta.get('extra', {})


def _write(plan: Plan, number: int, index: int, z, labels, stats: dict, seconds: dict,
           flags_used, j: int, batch: int) -> dict:
  """Sample `number` (image `index`, slot `j` of its batch) written; its record."""
  record = _record(plan, number, index, labels, stats, seconds, flags_used)
  return write_lib.write_sample(plan, number, z, labels, record, mine=sharding.owns(j),
                                shared=write_lib.shares_decode(plan.cfg, batch))


def generate(cfg: GenerationConfig, *, flags_used: dict | None = None) -> list[dict]:
  """`run(inputs_lib.prepare(cfg))`."""
  return run(inputs_lib.prepare(cfg), flags_used=flags_used)
