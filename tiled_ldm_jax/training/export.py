"""Exporting a finished run: the EMA params as a model folder the sampler loads.

For the VAE the export also fixes the latent space the diffusion models will see. Its
params are first re-parametrised (exactly) so that the latent means have zero mean and
std `export_latent_std` per channel over held-out training data, and its config stores
`latent_scale = export_latent_scale` (diffusion latent = VAE latent / latent_scale, see
`geometry.LatentGeometry`), which the U-Net trainings and the sampler read back from
its `model.json`. Choose the pair so the diffusion latents stay inside [-1, 1], where
DDIM clips its x0 estimate (the export logs and records the share outside); within
that, a larger std / scale ratio is better: the signal-to-noise ratio of the noised
latents grows with it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from tiled_ldm_jax.files import atomic
from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax import geometry
from tiled_ldm_jax.models import vae as vae_lib
from tiled_ldm_jax.training.config import TrainConfig
from tiled_ldm_jax.training.tasks import Task


def held_out_latents(cfg: TrainConfig, vae_cfg, params, batches: Callable[[int], dict],
                     n_batches: int) -> np.ndarray:
  """Posterior means [N, latent] (float64) of `n_batches` held-out batches (steps
  numbered after the run's, so the training batches are not reused)."""
  encode = jax.jit(vae_lib.encode_fn(vae_cfg))
  zs = []
  for i in range(n_batches):
    mean, _ = encode(params, jnp.asarray(batches(cfg.steps + 1 + i)['image']))
    zs.append(np.asarray(mean, np.float64).reshape(-1, mean.shape[-1]))
  return np.concatenate(zs)


def clipped_share(z: np.ndarray, latent_scale: float) -> float:
  """Share of diffusion latents `z / latent_scale` outside [-1, 1]. DDIM clips x0 to
  [-1, 1] (the original does), so a latent scale that puts real latents out there
  corrupts sampling."""
  return float(np.mean(np.abs(z) > latent_scale))


def clipped_fraction(cfg: TrainConfig, vae_cfg, params, batches: Callable[[int], dict],
                     n_batches: int) -> float:
  """`clipped_share` of the VAE's `held_out_latents` at the latent scale of `vae_cfg`."""
  return clipped_share(held_out_latents(cfg, vae_cfg, params, batches, n_batches),
                       geometry.LatentGeometry.of_vae(vae_cfg).scale)


def normalize_vae_latents(params, mean, std, target_std: float):
  """Exact re-parametrisation of a VAE: new latent `c * (z - mean)`, `c = target_std / std`
  per channel. `quant_conv` is scaled and shifted (the log-variance shifted by 2 log c)
  and `post_quant_conv` undoes it, so decode(encode(x)) is unchanged."""
  mean = np.asarray(mean, np.float64)
  c = target_std / np.maximum(np.asarray(std, np.float64), 1e-12)
  params = jax.tree_util.tree_map(lambda a: np.array(a, np.float64), params)
  lat = mean.shape[0]
  q = params['quant_conv']
  q['kernel'][..., :lat] *= c
  q['bias'][:lat] = c * (q['bias'][:lat] - mean)
  q['bias'][lat:] += 2.0 * np.log(c)
  pq = params['post_quant_conv']
  pq['bias'] = pq['bias'] + mean @ pq['kernel'][0, 0]
  pq['kernel'] = pq['kernel'] / c[None, None, :, None]
  return params


def _normalised_vae(cfg: TrainConfig, vae_cfg, params, task: Task):
  """(params with latents of std `export_latent_std`, statistics for export.json)."""
  z = held_out_latents(cfg, vae_cfg, params, task.batches, cfg.latent_stats_batches)
  mean, std = z.mean(0), z.std(0)
  params = normalize_vae_latents(params, mean, std, cfg.export_latent_std)
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, vae_cfg.params_dtype), params)
  # The exported latents are c (z - mean) exactly (normalize_vae_latents): no re-encode.
  scale = geometry.LatentGeometry.of_vae(vae_cfg).scale
  clipped = clipped_share((z - mean) * (cfg.export_latent_std / np.maximum(std, 1e-12)),
                          scale)
  logging.info('VAE latents: mean %s, std %s -> std %g; %.2g of latent / %g outside '
               '[-1, 1]', np.round(mean, 3), np.round(std, 3), cfg.export_latent_std,
               clipped, scale)
  if clipped > 1e-3:
    logging.warning('%.1f%% of the diffusion latents lie outside [-1, 1], where DDIM '
                    'clips its x0 estimate (SPEC 2): lower export_latent_std or raise '
                    'export_latent_scale', 100 * clipped)
  return params, {'latent_mean_before': mean.tolist(), 'latent_std_before': std.tolist(),
                  'latent_std_after': cfg.export_latent_std, 'clipped_fraction': clipped}


def export(cfg: TrainConfig, model_cfg, task: Task, ema_params, export_dir: str,
           workdir: str) -> str:
  """Writes the EMA params as a model folder (VAE: latent-normalised, its latent scale
  stored) and `<workdir>/export.json`; a folder already exported is kept."""
  if os.path.exists(os.path.join(export_dir, 'model.json')):
    logging.info('%s already exported', export_dir)
    return export_dir
  params = jax.device_get(ema_params)
  info: dict[str, Any] = {'task': cfg.task, 'step': cfg.steps}
  if cfg.task == 'vae':
    model_cfg = dataclasses.replace(model_cfg, latent_scale=cfg.export_latent_scale)
    info['latent_scale'] = cfg.export_latent_scale
    if cfg.export_latent_std > 0:
      params, stats = _normalised_vae(cfg, model_cfg, params, task)
      info.update(stats)
  extra = {}
  if cfg.task != 'vae':
    # What the U-Net predicts (eps | v | flow; flow's time input is t * 1000): a sampler
    # reads it from model.json to pick the prediction type.
    info['objective'] = cfg.objective
    extra = {'objective': cfg.objective}
  checkpoint.save_model(export_dir, cfg.task, model_cfg, params, extra=extra)
  atomic.write_json(os.path.join(workdir, 'export.json'), info)
  logging.info('exported EMA params to %s', export_dir)
  return export_dir

