"""What is trained: one `Task` per network -- its batches, its loss, its frozen params.

Objectives (DiffInfinite's, SPEC sections 1, 2 and 5):
- image U-Net: diffusion latents of the images (the VAE's posterior mean, or a sample,
  mapped by the VAE's `LatentGeometry`: divided by the latent scale stored with it),
  cosine schedule, t uniform in [0, 1000), predict the noise, L2 loss (`objective` eps;
  v and flow predict other targets, see `objective_inputs`). The conditioning
  is the label map at latent resolution (`labels[::f, ::f]`), by default reduced to one
  label l present in the patch, `(labels == l) * l` -- exactly the form the sampler feeds
  (SPEC 2, multi-label patches) -- and replaced by all zeros with probability
  `cond_drop_prob` per sample (classifier-free guidance).
- mask U-Net: the same on latents of mask images (`labels / (num_labels - 1)` as grey
  RGB, labels at 1/`mask_downscale` scale), class-conditioned on the layout class, the
  class dropped (`null`) with probability `cond_drop_prob`.
- VAE: L1 (or L2) reconstruction of a posterior sample plus `kl_weight` times the KL
  to N(0, I) (both means over elements); batches mix images and mask images.
Images are in [0, 1] in and out of the VAE, as the pipeline's decode expects.

Loss functions are cached per (canonical config, model configs), so runs with equal
configs in one process share one compiled train step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax.training import data as data_lib
from tiled_ldm_jax.training import slides as slides_lib
from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax.sampling import processes
from tiled_ldm_jax import geometry
from tiled_ldm_jax.models import configs as configs_lib
from tiled_ldm_jax.models import unet as unet_lib
from tiled_ldm_jax.models import vae as vae_lib
from tiled_ldm_jax.training.config import TrainConfig, canonical


@dataclasses.dataclass(frozen=True)
class Task:
  """What the training loop needs of one network.

  `example(step, row)` is row `row` of the global batch of step `step` (a dict of numpy
  arrays, a pure function of (seed, step, row)); the loader (`training.loader`) reads
  only the rows of its process. `batches(step)` stacks all `batch_size` rows.
  """
  kind: str
  model_config: Any
  loss: Callable[..., tuple[jax.Array, dict]]              # (params, frozen, batch, key)
  frozen: Any                                              # non-trained params (the VAE)
  example: Callable[[int, int], dict[str, np.ndarray]]     # (step, row) -> one record
  batch_size: int                                          # rows of the global batch

  def batches(self, step: int) -> dict[str, np.ndarray]:
    """The whole global batch of `step` on the host (export's held-out batches, tests)."""
    rows = [self.example(step, r) for r in range(self.batch_size)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def make_task(cfg: TrainConfig, model_cfg) -> Task:
  return {'image_unet': image_unet_task, 'mask_unet': mask_unet_task,
          'vae': vae_task}[cfg.task](cfg, model_cfg)


# ----------------------------------------------------------------------------- pieces


def _encode_latents(encode, vae_params, images, key, sample: bool,
                    geo: geometry.LatentGeometry):
  """Diffusion latents of `images` (no gradient): the VAE latent mapped by `geo`."""
  mean, logvar = encode(vae_params, images)
  z = mean
  if sample:
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
  return jax.lax.stop_gradient(geo.to_diffusion_latent(z.astype(jnp.float32)))


def _noised(z, key, timesteps: int):
  """(x_t, t, noise) for t uniform in [0, timesteps) per sample (cosine schedule)."""
  k_t, k_n = jax.random.split(key)
  t = jax.random.randint(k_t, (z.shape[0],), 0, timesteps)
  noise = jax.random.normal(k_n, z.shape, z.dtype)
  process = processes.Diffusion(noise_schedule=diffusion.Schedule(timesteps))
  return process.noised(z, noise, t), t, noise


FLOW_TIME_SCALE = diffusion.FLOW_TIME_SCALE   # flow: the U-Net's time input is t * this


def objective_inputs(objective: str, z, key, timesteps: int = diffusion.NUM_TRAIN_STEPS):
  """(x_t, the U-Net's time input, the regression target) of one batch of latents z.

  eps: the cosine-schedule x_t, integer t in [0, timesteps), target the noise (the
  original objective; draws exactly as before). v: same x_t and t, target
  sqrt(abar_t) * noise - sqrt(1 - abar_t) * z. flow: t ~ U[0, 1), x_t = (1 - t) z +
  t noise, target the velocity noise - z, time input t * FLOW_TIME_SCALE (float), so the
  sinusoidal time embedding sees the range of the diffusion timesteps.
  """
  if objective == 'flow':
    k_t, k_n = jax.random.split(key)
    t = jax.random.uniform(k_t, (z.shape[0],), jnp.float32)
    noise = jax.random.normal(k_n, z.shape, z.dtype)
    return processes.Flow().noised(z, noise, t), t * FLOW_TIME_SCALE, noise - z
  x_t, t, noise = _noised(z, key, timesteps)
  if objective == 'eps':
    return x_t, t, noise
  a = jnp.asarray(diffusion.Schedule(timesteps).alphas_cumprod)[t].reshape(-1, 1, 1, 1)
  return x_t, t, jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * z


def pick_label_cond(labels, key, num_classes: int):
  """Per sample, `(labels == l) * l` for l drawn uniformly among the non-zero labels
  present; all zeros where none is. labels [B, h, w] -> [B, h, w]."""
  b = labels.shape[0]
  ids = jnp.arange(1, num_classes, dtype=labels.dtype)
  present = (labels.reshape(b, -1, 1) == ids).any(axis=1)                    # [B, L]
  logits = jnp.where(present, 0.0, -jnp.inf)
  choice = jax.random.categorical(key, jnp.where(present.any(1, keepdims=True), logits, 0.0))
  lab = jnp.where(present.any(1), ids[choice], 0)                             # [B]
  sel = labels == lab[:, None, None]
  return jnp.where(sel & (lab[:, None, None] > 0), labels, 0)


def _diffusion_loss(pred, target):
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


def _source(cfg: TrainConfig, batch_size: int, *, with_images: bool, downscale: int,
            stream: int):
  """The run's data: synthetic, a folder of image/mask pairs, or slides (a manifest)."""
  if cfg.data == 'synthetic':
    spec = data_lib.SynthSpec(num_classes=cfg.num_labels,
                              num_layout_classes=cfg.num_layout_classes,
                              region_size=cfg.region_size,
                              region_size_max=cfg.region_size_max)
    return data_lib.SyntheticSource(spec, cfg.image_size, batch_size, cfg.seed,
                                    with_images=with_images, downscale=downscale,
                                    stream=stream)
  if slides_lib.is_manifest(cfg.data):
    return slides_lib.from_config(cfg, batch_size, with_images=with_images,
                                  downscale=downscale, stream=stream)
  return data_lib.FolderSource(cfg.data, cfg.image_size, batch_size, cfg.seed,
                               with_images=with_images, downscale=downscale,
                               augment_data=cfg.augment, num_classes=cfg.num_labels,
                               stream=stream)


def _load_vae(cfg: TrainConfig, model_cfg):
  """(VAE config, VAE params) of `cfg.vae`, checked against the U-Net and the crop size."""
  _, vae_cfg, vae_params = checkpoint.load_model(cfg.vae, expect='vae')
  if vae_cfg.latent_channels != model_cfg.channels:
    raise configs_lib.ConfigError(f'{cfg.vae} has {vae_cfg.latent_channels} latent '
                                  f'channels, the U-Net {model_cfg.channels}')
  multiple = vae_cfg.downsample_factor * model_cfg.downsample_factor
  if cfg.image_size % multiple:
    raise configs_lib.ConfigError(f'image_size {cfg.image_size} is not a multiple of {multiple}'
                                  ' (VAE factor x U-Net downsampling)')
  return vae_cfg, jax.tree_util.tree_map(jnp.asarray, vae_params)


# ----------------------------------------------------------------------------- image U-Net


def image_unet_task(cfg: TrainConfig, model_cfg: configs_lib.UNetConfig) -> Task:
  vae_cfg, vae_params = _load_vae(cfg, model_cfg)
  if cfg.num_labels != model_cfg.num_classes:
    raise configs_lib.ConfigError(f'num_labels {cfg.num_labels} != the image U-Net\'s '
                                  f'num_classes {model_cfg.num_classes}')
  src = _source(cfg, cfg.batch_size, with_images=True, downscale=1, stream=0)

  def example(step, row):
    rec = data_lib.record(src.step_example(step, row), with_images=True)
    return {'image': rec['image'], 'labels': rec['labels']}
  return Task('image_unet', model_cfg,
              _image_unet_loss(canonical(cfg), model_cfg, vae_cfg), vae_params, example,
              cfg.batch_size)


@functools.lru_cache(maxsize=8)
def _image_unet_loss(cfg: TrainConfig, model_cfg, vae_cfg):
  encode, apply = vae_lib.encode_fn(vae_cfg), unet_lib.eps_fn(model_cfg)
  geo = geometry.LatentGeometry.of_vae(vae_cfg)

  def loss(params, vae_params, batch, key):
    k_z, k_noise, k_lab, k_drop = jax.random.split(key, 4)
    z = _encode_latents(encode, vae_params, batch['image'], k_z, cfg.latent_sample, geo)
    labels = batch['labels'][:, ::geo.factor, ::geo.factor]
    cond = (pick_label_cond(labels, k_lab, model_cfg.num_classes) if cfg.single_label_cond
            else labels)
    drop = jax.random.bernoulli(k_drop, cfg.cond_drop_prob, (labels.shape[0],))
    cond = jnp.where(drop[:, None, None], 0, cond)
    x_t, t, target = objective_inputs(cfg.objective, z, k_noise)
    return _diffusion_loss(apply(params, x_t, t, cond), target), {}
  return loss


# ----------------------------------------------------------------------------- mask U-Net


def mask_unet_task(cfg: TrainConfig, model_cfg: configs_lib.UNetConfig) -> Task:
  vae_cfg, vae_params = _load_vae(cfg, model_cfg)
  if cfg.data == 'synthetic' and cfg.num_layout_classes > model_cfg.num_classes:
    raise configs_lib.ConfigError(f'num_layout_classes {cfg.num_layout_classes} > the mask '
                                  f'U-Net\'s num_classes {model_cfg.num_classes}')
  src = _source(cfg, cfg.batch_size, with_images=False, downscale=cfg.mask_downscale,
                stream=0)
  if isinstance(src, slides_lib.SlideSource) and \
      src.max_layout_class() >= model_cfg.num_classes:
    raise configs_lib.ConfigError(
        f'slide tiles have layout classes up to {src.max_layout_class()} (a slide\'s '
        'layout_class in the manifest, else the tile\'s most frequent label) but the mask '
        f'U-Net has num_classes {model_cfg.num_classes}')

  def example(step, row):
    rec = data_lib.record(src.step_example(step, row), with_images=False)
    if rec['layout_class'] >= model_cfg.num_classes:
      raise ValueError(f'layout class {rec["layout_class"]} at step {step} is not a '
                       f'class of the mask U-Net (num_classes {model_cfg.num_classes})')
    return {'labels': rec['labels'], 'layout_class': rec['layout_class']}
  return Task('mask_unet', model_cfg,
              _mask_unet_loss(canonical(cfg), model_cfg, vae_cfg), vae_params, example,
              cfg.batch_size)


@functools.lru_cache(maxsize=8)
def _mask_unet_loss(cfg: TrainConfig, model_cfg, vae_cfg):
  encode, apply = vae_lib.encode_fn(vae_cfg), unet_lib.eps_fn(model_cfg)
  geo = geometry.LatentGeometry.of_vae(vae_cfg)
  grey = 1.0 / (cfg.num_labels - 1)

  def loss(params, vae_params, batch, key):
    k_z, k_noise, k_drop = jax.random.split(key, 3)
    images = jnp.repeat(batch['labels'][..., None].astype(jnp.float32) * grey, 3, axis=-1)
    z = _encode_latents(encode, vae_params, images, k_z, cfg.latent_sample, geo)
    classes = batch['layout_class']
    null = jax.random.bernoulli(k_drop, cfg.cond_drop_prob, classes.shape)
    x_t, t, target = objective_inputs(cfg.objective, z, k_noise)
    return _diffusion_loss(apply(params, x_t, t, classes, null), target), {}
  return loss


# ----------------------------------------------------------------------------- VAE


def vae_task(cfg: TrainConfig, model_cfg: configs_lib.VAEConfig) -> Task:
  if cfg.image_size % model_cfg.downsample_factor:
    raise configs_lib.ConfigError(f'image_size {cfg.image_size} is not a multiple of '
                                  f'{model_cfg.downsample_factor}')
  n_mask = int(round(cfg.batch_size * cfg.mask_image_fraction))
  n_img = cfg.batch_size - n_mask
  img_src = (_source(cfg, n_img, with_images=True, downscale=1, stream=0)
             if n_img else None)
  mask_src = (_source(cfg, n_mask, with_images=False, downscale=cfg.mask_downscale, stream=1)
              if n_mask else None)

  def example(step, row):
    """Rows [0, n_img) are images, the rest mask images (as the sampler renders them)."""
    if row < n_img:
      image = img_src.step_example(step, row).image
    else:
      labels = mask_src.step_example(step, row - n_img).labels
      image = data_lib.render_mask_image(labels, cfg.num_labels)
    return {'image': np.asarray(image, np.float32)}

  return Task('vae', model_cfg, _vae_loss(canonical(cfg), model_cfg), None, example,
              cfg.batch_size)


@functools.lru_cache(maxsize=8)
def _vae_loss(cfg: TrainConfig, model_cfg):
  model = vae_lib.AutoencoderKL(model_cfg)

  def loss(params, frozen, batch, key):
    del frozen
    x = batch['image']
    mean, logvar = model.apply({'params': params}, x, method=vae_lib.AutoencoderKL.encode)
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    rec = model.apply({'params': params}, z, method=vae_lib.AutoencoderKL.decode)
    err = rec.astype(jnp.float32) - x
    recon = jnp.mean(jnp.abs(err)) if cfg.recon_loss == 'l1' else jnp.mean(jnp.square(err))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return recon + cfg.kl_weight * kl, {'recon': recon, 'kl': kl}
  return loss
