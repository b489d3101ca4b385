"""The two sampling stages of a request, run on loaded models: mask stage, image stage.

    stages = pipe.stages                                   # Pipeline's runner
    req = pipe.request(1024, n_batch=2, label=1)           # request.py
    labels, counters = stages.run_mask(req, label=1, indices=[0, 1], seed=0)
    latents, counters = stages.run_image(req, labels, indices=[0, 1], seed=0)

`Pipeline`'s user calls and the commands (generate/) both run a stage here, with the
request they built once (its stage's windows, patch and decode are only read). A run
may go in chunks with a callback between them (the commands save a resumable state
there); a chunked run equals a whole one. Compiled samplers come from the process-wide
cache (`loop.compiled`): equal models and settings share one.

Randomness (SPEC 5): image n uses `fold_in(key(seed), n)`, the mask stage `fold_in(., 0)`
of it and the image stage `fold_in(., 1)`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tiled_ldm_jax import decode as decode_lib
from tiled_ldm_jax import masks as masks_lib
from tiled_ldm_jax import request as request_lib
from tiled_ldm_jax import sharding
from tiled_ldm_jax.files import label_maps
from tiled_ldm_jax.models import unet as unet_lib
from tiled_ldm_jax.models import vae as vae_lib
from tiled_ldm_jax.sampling import guidance
from tiled_ldm_jax.sampling import loop as loop_lib
from tiled_ldm_jax.sampling import processes

MASK, IMAGE = 0, 1    # each stage's fold_in of an image's key


def stage_keys(seed: int, indices, stage: int) -> jax.Array:
  """[N] keys of a stage (`MASK` / `IMAGE`) for images `indices` of a run."""
  return _fold_in_all(loop_lib.image_keys(seed, indices), stage)


# Module-level compiled helpers: eager vmaps of fresh lambdas would trace on every call.
_fold_in_all = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))


def stage_stats(state) -> dict:
  """A finished stage's counters, as JSON-able ints."""
  return {'patch_iterations': int(state.iterations),
          'denoiser_evaluations': int(state.evaluations)}


def check_labels(labels, num_classes: int) -> np.ndarray:
  """[N, H, W] int32 label maps, or ValueError (one line): shape, dtype, ids."""
  labels = np.asarray(labels)
  if labels.ndim != 3:
    raise ValueError(f'labels must be [N, H, W], got shape {labels.shape}')
  return masks_lib.validate_labels(labels, num_classes).astype(np.int32, copy=False)


class Stages:
  """The stage runner of a set of loaded models (`pipeline.Model`s) on `devices`."""

  def __init__(self, unet, vae, mask_unet, geometry, devices: int = 0):
    self.unet, self.vae, self.mask_unet = unet, vae, mask_unet
    self.geometry = geometry
    self.devices = devices

  def decoder(self, dtype: str):
    """The VAE decoder function at compute `dtype` (cached per config)."""
    return vae_lib.decode_fn(dataclasses.replace(self.vae.config, dtype=dtype))

  def sampler(self, req: request_lib.Request, which: str, n_images: int,
              keep: bool = False) -> loop_lib.Sampler:
    """The compiled sampler of stage `which` ('mask' | 'image') of `req`."""
    o = req.options
    stage = req.image if which == 'image' else req.mask
    model = self.unet if which == 'image' else self.mask_unet
    net, process = guidance.trained_unet(
        unet_lib.eps_fn(dataclasses.replace(model.config, dtype=o.dtype)), model.objective)
    process = process.with_solver(processes.solver_named(o.solver))
    denoise = (guidance.multilabel_guidance(net, model.config.num_classes, o.cond_scale)
               if which == 'image' else guidance.mask_denoiser(net, o.mask_cond_scale))
    settings = loop_lib.SamplerSettings(
        sampling_steps=o.sampling_steps, patch=stage.patch, eta=o.eta,
        progress_every=o.progress_every, progress_label=f'{which} stage', keep=keep,
        resample=o.resample if keep else 0, **stage.windows)
    mesh = sharding.make_mesh(n_images, settings.patches_per_step, self.devices)
    return loop_lib.compiled(denoise, settings, mesh, n_images, process)

  def initial_state(self, req: request_lib.Request, which: str, indices, seed: int):
    """The fresh state of stage `which` for images `indices` (no conditioning needed:
    also the template a saved state is restored into)."""
    stage = req.image if which == 'image' else req.mask
    model = self.unet if which == 'image' else self.mask_unet
    smp = self.sampler(req, which, len(indices))
    return smp.init(stage_keys(seed, indices, IMAGE if which == 'image' else MASK),
                    (len(indices),) + stage.latent_hw, model.config.channels)

  def mask_stage(self, req: request_lib.Request, label: int, indices, seed: int):
    """(sampler, initial state, conditioning: the class map, spatial) of the mask stage."""
    smp = self.sampler(req, 'mask', len(indices))
    classes = np.full((len(indices),) + req.mask.latent_hw, label, np.int32)
    state = smp.init(stage_keys(seed, indices, MASK), classes.shape,
                     self.mask_unet.config.channels)
    return smp, state, loop_lib.spatial(classes)

  def image_stage(self, req: request_lib.Request, labels, indices, seed: int, *, init=None,
                  strength: float = 1.0, keep=None):
    """(sampler, initial state, conditioning: the latent label map, spatial); `labels`
    [N, H, W] pixel maps of `req.image_hw`, an array or `label_maps.LabelMap`s (read at
    latent resolution only); `init` [N, h, w, C] latents to start from at `strength`
    (`loop.Sampler.init`); `keep` [N, H, W] pixels (non-zero) that follow `init` (read
    at latent resolution), or [N, H/f, W/f] latent pixels."""
    loop_lib.check_start(req.options.sampling_steps, strength, init=init is not None,
                         keep=keep is not None)
    f = self.geometry.factor
    latent = masks_lib.latent_label_maps(labels, f)
    if tuple(latent.shape[1:]) != tuple(req.image.latent_hw):
      raise ValueError(f'label maps of {latent.shape[1] * f}x{latent.shape[2] * f} px for '
                       f'a request of {req.image_hw[0]}x{req.image_hw[1]}')
    smp = self.sampler(req, 'image', len(indices), keep=keep is not None)
    state = smp.init(stage_keys(seed, indices, IMAGE), latent.shape,
                     self.unet.config.channels, init=init, strength=strength)
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

  def labels_from_mask_latents(self, req: request_lib.Request, z, *, lazy: bool = False):
    """Mask-model latents -> [N, H, W] label ids (decode, quantize, clean, upsample).

    The decode runs band by band and each band is quantized to 8-bit gray at once
    (per pixel), so the float mask image is never whole; the clean runs on the gray map
    at the mask's resolution. `lazy`: a list of `label_maps.LabelMap` (the cleaned map
    and its nearest upsampling, never held at pixel resolution) instead of an int32
    array; both are the same ids as `masks.clean_mask` of the whole decoded image.
    """
    num_labels = self.unet.config.num_classes
    f = self.geometry.factor
    out = []
    for zi in sharding.to_host(z):
      gray = np.empty((zi.shape[0] * f, zi.shape[1] * f), np.uint8)
      for r0, band in decode_lib.iter_decode_bands(self.decoder(req.options.dtype),
                                                   self.vae.params, zi, req.mask.decode):
        gray[r0:r0 + band.shape[0]] = masks_lib.mask_gray(
            masks_lib.quantize_mask_image(band, num_labels))
      out.append(label_maps.LabelMap(masks_lib.clean_gray(gray, num_labels), req.image_hw))
    return out if lazy else np.stack([np.asarray(m, np.int32) for m in out])

  def run_mask(self, req: request_lib.Request, label: int, indices, seed: int, *,
               state=None, chunk: int = 0, on_chunk=None, lazy: bool = False):
    """(labels [N, H, W], counters) of the mask stage; `state`: continue a saved one;
    `chunk` / `on_chunk`: as `run_to_end`; `lazy`: the labels as `label_maps.LabelMap`s."""
    smp, fresh, classes = self.mask_stage(req, label, indices, seed)
    state = run_to_end(smp, self.mask_unet.params, fresh if state is None else smp.place(state),
                       classes, req.options.sampling_steps, chunk, on_chunk)
    return self.labels_from_mask_latents(req, state.x, lazy=lazy), stage_stats(state)

  def run_image(self, req: request_lib.Request, labels, indices, seed: int, *,
                state=None, chunk: int = 0, on_chunk=None, init=None,
                strength: float = 1.0, keep=None, watch=None):
    """(latents [N, h, w, C], counters) of the image stage for pixel label maps [N, H, W]
    (an array or `label_maps.LabelMap`s); `watch`: `loop.Sampler.run`'s (a live preview)."""
    if len(indices) != len(labels):
      raise ValueError(f'{len(labels)} label maps but {len(indices)} indices')
    smp, fresh, latent = self.image_stage(req, labels, indices, seed, init=init,
                                          strength=strength, keep=keep)
    state = run_to_end(smp, self.unet.params, fresh if state is None else smp.place(state),
                       latent, req.options.sampling_steps, chunk, on_chunk, watch)
    return state.x, stage_stats(state)


def run_to_end(smp, params, state, cond, sampling_steps: int, chunk: int = 0,
               on_chunk=None, watch=None):
  """Runs a sampler to the end; with `chunk`, `chunk` iterations at a time with
  `on_chunk(state)` between chunks (not after the last). Chunked runs equal whole ones."""
  while int(state.level.min()) < sampling_steps:       # one host sync per chunk
    state = smp.run(params, state, cond, max_iterations=chunk or None, watch=watch)
    if on_chunk is not None and int(state.level.min()) < sampling_steps:
      on_chunk(state)
  return state
