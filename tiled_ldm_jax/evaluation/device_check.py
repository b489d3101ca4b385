"""What this accelerator does with the full-size models, one JSON record per measurement.

`run(smoke=False)`: the released shapes (5-class image U-Net, SD2 VAE) with random
weights: the U-Net forward at batch 1, 8, 32 in float32 and bfloat16 (TFLOP/s from XLA's
FLOP count), the sampler at 2048 px, 50 steps, patch 512 (random K=1, random K=4, grid
with packed guidance) in seconds and as a fraction of the best forward rate, the
2048 px tiled decode, and compile seconds. `smoke=True` runs the same code on the demo
models at toy sizes (CPU, about a minute), so the command is known to work before a
device is lent. Records: `name`, `seconds`, `tflops` where it applies;
`fraction_of_forward_peak` is the sampler's U-Net FLOP rate over the best float32
forward rate measured (on CPU the tiny demo forward is dispatch-bound, so it can exceed
1 there).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tiled_ldm_jax import decode
from tiled_ldm_jax import demo
from tiled_ldm_jax import geometry
from tiled_ldm_jax.evaluation import benchmark
from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax.models import config_files
from tiled_ldm_jax.models import unet as unet_lib
from tiled_ldm_jax.models import vae as vae_lib
from tiled_ldm_jax.sampling import windows

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'configs')


@dataclasses.dataclass(frozen=True)
class _Plan:
  batches: tuple[int, ...]
  image_size: int
  patch_size: int
  sampling_steps: int
  decode_size: int


FULL = _Plan(batches=(1, 8, 32), image_size=2048, patch_size=512, sampling_steps=50, decode_size=2048)
SMOKE = _Plan(batches=(1,), image_size=256, patch_size=128, sampling_steps=1, decode_size=128)


def _models(smoke: bool):
  """(U-Net config, params, VAE config, params): demo weights, or random full-size ones."""
  if smoke:
    _, uc, up = checkpoint.load_model(demo.model_path('image_unet'), expect='image_unet')
    _, vc, vp = checkpoint.load_model(demo.model_path('vae'), expect='vae')
    return uc, up, vc, vp
  _, uc = config_files.load_model_config(os.path.join(_CONFIGS, 'image_unet_5class.py'))
  _, vc = config_files.load_model_config(os.path.join(_CONFIGS, 'sd2_vae.py'))
  up = jax.jit(unet_lib.init_params, static_argnums=0)(uc, jax.random.key(0))
  vp = jax.jit(vae_lib.init_params, static_argnums=0)(vc, jax.random.key(1))
  return uc, up, vc, vp


def _forward(config, params, batch: int, patch: int, dtype: str) -> dict:
  config = dataclasses.replace(config, dtype=dtype)
  eps = jax.jit(unet_lib.eps_fn(config))
  x = jax.random.normal(jax.random.key(0), (batch, patch, patch, config.channels))
  t = jnp.full((batch,), 500, jnp.int32)
  labels = jnp.ones((batch, patch, patch), jnp.int32) % config.num_classes
  start = time.perf_counter()
  jax.block_until_ready(eps(params, x, t, labels))
  compile_s = time.perf_counter() - start
  n, start = 5, time.perf_counter()
  for _ in range(n):
    out = eps(params, x, t, labels)
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / n
  flops = benchmark.forward_flops(config, params, batch, patch)
  return {'name': f'unet_forward_b{batch}_{dtype}', 'seconds': seconds,
          'tflops': flops / seconds / 1e12, 'compile_seconds': compile_s}


def run(smoke: bool = False, emit: Callable[[dict], None] = print) -> list[dict]:
  """Runs every measurement, `emit`ting each record as it is made; returns them."""
  plan = SMOKE if smoke else FULL
  records = []

  def out(record):
    record = {'device': str(jax.devices()[0].device_kind), **record}
    records.append(record)
    emit(record)

  uc, up, vc, vp = _models(smoke)
  f = geometry.LatentGeometry.of_vae(vc).factor
  patch = plan.patch_size // f
  best = 0.0
  for dtype in ('float32', 'bfloat16'):
    for b in plan.batches:
      r = _forward(uc, up, b, patch, dtype)
      best = max(best, r['tflops']) if dtype == 'float32' else best
      out(r)
  for name, kw in (('sampler_random_k1', dict(schedule='random', patches_per_step=1)),
                   ('sampler_random_k4', dict(schedule='random', patches_per_step=4)),
                   ('sampler_grid_packed', dict(schedule='grid', patches_per_step=_grid_k(
                       plan, f)))):
    r = benchmark.run_sampler_benchmark(
        uc, up, image_size=plan.image_size, patch_size=plan.patch_size, sampling_steps=plan.sampling_steps,
        cond_scale=3.0, repeats=1, time_denoiser=False, **kw)
    tflops = r['denoiser_gflop'] / 1e3 / r['seconds']
    out({'name': name, 'seconds': r['seconds'], 'compile_seconds': r['compile_seconds'],
         'tflops': tflops, 'fraction_of_forward_peak': tflops / best if best else None,
         'denoiser_evaluations': r['denoiser_evaluations'], 'coverage': r['coverage'],
         'image_size': plan.image_size, 'sampling_steps': plan.sampling_steps})
  z = np.random.default_rng(0).standard_normal(
      (plan.decode_size // f, plan.decode_size // f, vc.latent_channels)).astype(np.float32)
  s = decode.TiledDecodeSettings(patch_size=plan.patch_size, factor=f, tile_batch=8,
                                 latent_scale=geometry.LatentGeometry.of_vae(vc).scale)
  fn = vae_lib.decode_fn(vc)
  start = time.perf_counter()
  decode.decode_image(fn, vp, z[:s.latent_patch], s)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  decode.decode_image(fn, vp, z, s)
  out({'name': f'decode_{plan.decode_size}', 'seconds': time.perf_counter() - start,
       'compile_seconds': compile_s})
  return records


def _grid_k(plan: _Plan, f: int) -> int:
  side = plan.image_size // f
  return windows.grid_batch((side, side), plan.patch_size // f, 0)
