"""Sampler benchmark: the loop's wall time against the denoiser calls it makes.

`overhead_ratio = seconds / denoiser_seconds`, where `denoiser_seconds` times the same
number of U-Net calls, at the batch size the sampler used, as isolated jitted calls. A
ratio near 1 means the patch bookkeeping (choice, crops, writes, while loop) is free.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from tiled_ldm_jax.sampling import guidance
from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax import estimate
from tiled_ldm_jax import geometry
from tiled_ldm_jax import request
from tiled_ldm_jax.sampling import loop as loop_lib
from tiled_ldm_jax.sampling import placements
from tiled_ldm_jax.models import unet as unet_lib


def benchmark_label_map(height: int, width: int, num_classes: int,
                        dtype=np.int32) -> np.ndarray:
  """[H, W] `dtype`: left half 1, right half 2, centre square of half the side 3, top
  eighth of rows 0; every label taken modulo num_classes."""
  m = np.full((height, width), 1 % num_classes, dtype)
  m[:, width // 2:] = 2 % num_classes
  m[height // 4: height // 4 + height // 2, width // 4: width // 4 + width // 2] = (
      3 % num_classes)
  m[: height // 8] = 0
  return m


def _block(tree):
  return jax.tree_util.tree_map(lambda a: a.block_until_ready(), tree)


def time_denoiser_calls(config, params, batch: int, patch: int, calls: int,
                        repeats: int = 3) -> float:
  """Seconds for `calls` isolated jitted U-Net calls at batch `batch` (best of repeats)."""
  eps = jax.jit(unet_lib.eps_fn(config))
  x = jax.random.normal(jax.random.key(0), (batch, patch, patch, config.channels))
  t = jnp.full((batch,), 500, jnp.int32)
  labels = jnp.ones((batch, patch, patch), jnp.int32) % config.num_classes
  _block(eps(params, x, t, labels))
  n = min(calls, 50)  # time a sample of calls, scale to the count
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(n):
      out = eps(params, x, t, labels)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / n)
  return best * calls


def forward_flops(config, params, batch: int, patch: int) -> float:
  """FLOPs of one U-Net call on `batch` latent patches of side `patch` (XLA's count)."""
  eps = jax.jit(unet_lib.eps_fn(config))
  x = jax.ShapeDtypeStruct((batch, patch, patch, config.channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  labels = jax.ShapeDtypeStruct((batch, patch, patch), jnp.int32)
  return estimate.lowered_flops(eps.lower(params, x, t, labels))


def original_evaluations(config, cond_scale: float, settings, keys, cond) -> int:
  """U-Net samples the original's `ddim_multimask` would run for the same patches.

  Patch placement depends only on the keys and the levels, never on the latent values,
  so a sampler whose denoiser returns zeros and counts the original's passes
  (`diffusion.original_pass_count`) visits exactly the patches the real run visits.
  """
  def counting(params, x, t, labels):
    del params, t
    valid = jnp.ones((x.shape[0],), bool)
    return jnp.zeros(x.shape, jnp.float32), diffusion.original_pass_count(
        labels, valid, num_classes=config.num_classes, w=cond_scale)
  # Idle slots get all-zero labels and count 1 each in original_pass_count; with K = 1
  # and a single image there are none.
  state = loop_lib.Sampler(counting, settings).sample(None, keys, cond, config.channels)
  return int(state.evaluations)


def run_sampler_benchmark(config, params, *, image_size: int, patch_size: int, sampling_steps: int,
                          cond_scale: float, patches_per_step: int, seed: int = 0,
                          repeats: int = 3, batch_size: int = 1, mesh=None,
                          time_denoiser: bool = True, schedule: str = 'random',
                          grid_margin: int = 0, grid_margin_levels: int | None = None,
                          grid_margin_first_levels: int = 0,
                          dtype: str = 'float32') -> dict:
  """Times `Sampler.sample` (compile separately) and the denoiser calls it makes.

  `dtype`: the U-Net's compute dtype (params as given; the sampler state stays float32).
  """
  config = dataclasses.replace(config, dtype=dtype)
  labels = benchmark_label_map(image_size, image_size, config.num_classes)
  labels = np.broadcast_to(labels, (batch_size,) + labels.shape)
  geom = geometry.LatentGeometry()
  request.check_patch(geom, (image_size, image_size), patch_size,
                      config.downsample_factor, 'patch_size')
  settings = loop_lib.SamplerSettings(
      sampling_steps=sampling_steps, patch=patch_size // geom.factor,
      patches_per_step=patches_per_step, schedule=schedule, grid_margin=grid_margin,
      grid_margin_levels=grid_margin_levels, grid_margin_first_levels=grid_margin_first_levels)
  denoise = guidance.multilabel_guidance(unet_lib.eps_fn(config), config.num_classes, cond_scale)
  smp = loop_lib.Sampler(denoise, settings, mesh=mesh, n_images=batch_size)
  cond = loop_lib.spatial(jnp.asarray(labels[:, ::geom.factor, ::geom.factor]))
  keys = loop_lib.image_keys(seed, np.arange(batch_size))

  start = time.perf_counter()
  state = _block(smp.sample(params, keys, cond, config.channels))
  first = time.perf_counter() - start
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = _block(smp.sample(params, keys, cond, config.channels))
    runs.append(time.perf_counter() - start)
  if smp.compiles() != 1:
    raise RuntimeError(f'sampler compiled {smp.compiles()} times; expected once')
  seconds = float(np.median(runs))
  batch = batch_size * patches_per_step
  evaluations = int(state.evaluations)
  calls = evaluations // batch
  denoiser_seconds = (time_denoiser_calls(config, params, batch, patch_size // geom.factor, calls)
                      if time_denoiser else float('nan'))
  return {
      'image_size': image_size, 'patch_size': patch_size, 'sampling_steps': sampling_steps,
      'cond_scale': cond_scale, 'patches_per_step': patches_per_step,
      'batch_size': batch_size,
      'seconds': seconds, 'compile_seconds': first - seconds,
      'patch_iterations': int(state.iterations), 'patches': int(state.patches),
      'denoiser_evaluations': evaluations, 'denoiser_calls': calls,
      'original_evaluations': (original_evaluations(config, cond_scale, settings, keys, cond)
                               if patches_per_step == 1 and batch_size == 1
                               and isinstance(smp.placement, placements.RandomPlacement)
                               else None),
      'denoiser_seconds': denoiser_seconds,
      'overhead_ratio': seconds / denoiser_seconds,
      # U-Net samples x FLOPs of one (batch-1) forward: the work a perfect device must do
      'denoiser_gflop': evaluations * forward_flops(
          config, params, 1, patch_size // geom.factor) / 1e9,
      'device': str(jax.devices()[0].device_kind),
      'devices': 1 if mesh is None else int(mesh.devices.size),
      'seconds_per_image': seconds / batch_size,
      'schedule': schedule, 'grid_margin': grid_margin,
      'grid_margin_levels': grid_margin_levels,
      'grid_margin_first_levels': grid_margin_first_levels, 'dtype': dtype,
      'seconds_per_patch_iteration': seconds / int(state.iterations),
      # patches x P^2 / (h w S): 1.0 is a perfect tiling (latent pixels, per image)
      'coverage': int(state.patches) * (patch_size // geom.factor) ** 2
                  / (batch_size * (image_size // geom.factor) ** 2 * sampling_steps),
  }


def count_work(config, params, *, image_size: int, patch_size: int, sampling_steps: int,
               cond_scale: float, patches_per_step: int, seed: int = 0,
               schedule: str = 'random', grid_margin: int = 0,
               grid_margin_levels: int | None = None, grid_margin_first_levels: int = 0,
               **unused) -> dict:
  """The U-Net work of a run without running the U-Net: the sampler with a zero model.

  Placement never depends on latent values and the guided step's pass count only on the
  labels, so the counts equal the real run's. FLOPs = samples x one batch-1 forward.
  """
  del unused
  geom = geometry.LatentGeometry()
  p = patch_size // geom.factor
  settings = loop_lib.SamplerSettings(
      sampling_steps=sampling_steps, patch=p, patches_per_step=patches_per_step,
      schedule=schedule, grid_margin=grid_margin, grid_margin_levels=grid_margin_levels,
      grid_margin_first_levels=grid_margin_first_levels)
  zero = lambda params, x, t, cond, null=None: jnp.zeros(x.shape, jnp.float32)
  denoise = guidance.multilabel_guidance(zero, config.num_classes, cond_scale)
  # Built at latent resolution (what the sampler reads): a 100,000 px pixel map would be
  # 40 GB. Equal to the pixel map's [::f, ::f] for sides that are multiples of 8 f.
  side = image_size // geom.factor
  cond = loop_lib.spatial(jnp.asarray(benchmark_label_map(side, side, config.num_classes,
                                                          np.uint8)[None]))
  smp, keys = loop_lib.Sampler(denoise, settings), loop_lib.image_keys(seed, [0])
  _block(smp.sample(None, keys, cond, config.channels))           # compile
  start = time.perf_counter()
  state = _block(smp.sample(None, keys, cond, config.channels))
  seconds = time.perf_counter() - start
  flops = forward_flops(config, params, 1, p)
  return {'image_size': image_size, 'patch_size': patch_size, 'sampling_steps': sampling_steps,
          'schedule': schedule, 'grid_margin': grid_margin,
          'grid_margin_levels': grid_margin_levels,
          'grid_margin_first_levels': grid_margin_first_levels,
          'patches_per_step': patches_per_step, 'patch_iterations': int(state.iterations),
          'denoiser_evaluations': int(state.evaluations),
          'gflop_per_forward': flops / 1e9,
          'denoiser_gflop': int(state.evaluations) * flops / 1e9,
          'coverage': int(state.patches) * p * p
                      / ((image_size // geom.factor) ** 2 * sampling_steps),
          'unet_samples_per_latent_pixel_step': int(state.evaluations) * p * p
                      / ((image_size // geom.factor) ** 2 * sampling_steps),
          # the sampler's own cost: the whole loop with a model that costs nothing
          'zero_model_seconds': seconds,
          'zero_model_seconds_per_patch_iteration': seconds / int(state.iterations)}


def run_scaling_benchmark(config, params, *, devices: int, batch_size: int | None = None,
                          **kwargs) -> dict:
  """Seconds per image on 1 device and on `devices` (images split over them).

  The batch (default: `devices` images) is the same in both runs, so
  `efficiency = seconds_1 / (devices * seconds_N)` is 1 for perfect scaling.
  """
  from tiled_ldm_jax import sharding  # pylint: disable=g-import-not-at-top
  batch_size = batch_size or devices
  one = run_sampler_benchmark(config, params, batch_size=batch_size, time_denoiser=False,
                              **kwargs)
  mesh = sharding.make_mesh(batch_size, kwargs.get('patches_per_step', 1), devices)
  many = run_sampler_benchmark(config, params, batch_size=batch_size, mesh=mesh,
                               time_denoiser=False, **kwargs)
  n = 1 if mesh is None else int(mesh.devices.size)
  return {
      'devices': n, 'batch_size': batch_size, 'device': one['device'],
      'seconds_per_image_1': one['seconds_per_image'],
      'seconds_per_image_n': many['seconds_per_image'],
      'speedup': one['seconds'] / many['seconds'],
      'efficiency': one['seconds'] / (n * many['seconds']),
      'compile_seconds_1': one['compile_seconds'], 'compile_seconds_n': many['compile_seconds'],
      'patch_iterations': many['patch_iterations'],
      'same_iterations': one['patch_iterations'] == many['patch_iterations'],
  }
