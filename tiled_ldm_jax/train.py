"""Training the three networks (image U-Net, mask U-Net, VAE) with optax and orbax.

Objectives (DiffInfinite's, SPEC sections 1, 2 and 5):
- image U-Net: latents `z = VAE.encode(image) / latent_scale` (posterior mean, or a
  sample), cosine schedule, t uniform in [0, 1000), predict the noise, L2 loss. The
  conditioning is the label map at latent resolution (`labels[::f, ::f]`), by default
  reduced to one label l present in the patch, `(labels == l) * l` -- exactly the form
  the sampler feeds (SPEC 2, multi-label patches) -- and replaced by all zeros with
  probability `cond_drop_prob` per sample (classifier-free guidance).
- mask U-Net: the same on latents of mask images (`labels / (num_labels - 1)` as grey
  RGB, labels at 1/`mask_downscale` scale), class-conditioned on the layout class, the
  class dropped (`null`) with probability `cond_drop_prob`.
- VAE: L1 (or L2) reconstruction of a posterior sample plus `kl_weight` times the KL
  to N(0, I) (both means over elements); batches mix images and mask images.
Images are in [0, 1] in and out of the VAE, as the pipeline's decode expects.

Optimisation: Adam(b1, b2) on a one-cycle cosine learning rate, gradients clipped at
global norm `grad_clip`; an EMA of the params, `ema <- decay*ema + (1-decay)*params` on
every `ema_every`-th step (a copy of the params before step `ema_warmup`). The train
step is one jitted function with the `TrainState` donated.

Exact resume: batch `step` is a pure function of (seed, step) (see `data`), the step's
randomness comes from the state's key, and the state (step, params, EMA, optimizer,
key) is checkpointed with orbax every `save_every` steps. A run interrupted and resumed
therefore ends with bitwise the same params as an uninterrupted one.

At the end the EMA params are exported with `checkpoint.save_model` to
`<workdir>/model`, a folder the sampler loads like a converted checkpoint. For the VAE,
the export is first re-parametrised (exactly) so that its latent means have zero mean
and std `export_latent_std` per channel over the training data; with the pipeline's
fixed `latent_scale = 50` that sets the diffusion models' latent scale. Choose it so the
diffusion latents stay inside [-1, 1], where DDIM clips its x0 estimate (the export logs
and records the share outside); within that, larger is better: the signal-to-noise ratio
of the noised latents grows with it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import time
import typing
from typing import Any, Callable, Iterable, Sequence

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tiled_ldm_jax import checkpoint
from tiled_ldm_jax import config_files
from tiled_ldm_jax import data as data_lib
from tiled_ldm_jax import diffusion
from tiled_ldm_jax.models import configs as configs_lib
from tiled_ldm_jax.models import unet as unet_lib
from tiled_ldm_jax.models import vae as vae_lib

TASKS = ('image_unet', 'mask_unet', 'vae')
# PRNG of init and training steps. 'rbg' (XLA RngBitGenerator) draws compile several
# times faster on CPU than the default threefry, whose unrolled rounds dominate the
# compile time of small models; its keys split and fold with threefry as usual.
RNG_IMPL = 'rbg'


def rng_key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl=RNG_IMPL)


# ----------------------------------------------------------------------------- config


class WorkdirError(ValueError):
  """The workdir holds a run that this call may not continue (or only with --resume)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run (built from a `configs/demo_train_*.py` dict)."""
  task: str                          # what to train: image_unet | mask_unet | vae
  model: str                         # model config file (relative: to the train config's folder)
  steps: int                         # total optimizer steps (also the one-cycle length)
  batch_size: int                    # examples per step
  image_size: int                    # training crop side in pixels (mask U-Net: mask pixels)
  lr: float = 1e-4                   # peak learning rate of the one-cycle schedule
  warmup_frac: float = 0.1           # fraction of the steps spent rising to `lr`
  lr_div_factor: float = 25.0        # initial lr = lr / lr_div_factor
  lr_final_div_factor: float = 1e4   # final lr = initial lr / lr_final_div_factor
  adam_b1: float = 0.9               # Adam first-moment decay
  adam_b2: float = 0.99              # Adam second-moment decay
  grad_clip: float = 1.0             # clip gradients to this global norm
  ema_decay: float = 0.995           # EMA decay per EMA update
  ema_every: int = 10                # EMA updated on every ema_every-th step
  ema_warmup: int = 0                # before this step the EMA is a copy of the params
  save_every: int = 1000             # checkpoint period in steps (and always at the end)
  keep_checkpoints: int = 2          # newest checkpoints kept
  log_every: int = 50                # log loss, steps/s and ETA every this many steps
  seed: int = 0                      # init, data order and step randomness
  data: str = 'synthetic'            # 'synthetic' or a folder of name.jpg + name_mask.png
  augment: bool = True               # folder data: random flips and 90-degree rotations
  num_labels: int = 5                # label ids 0..num_labels-1 (image U-Net: its num_classes)
  num_layout_classes: int = 2        # synthetic layout classes (the mask U-Net's classes)
  region_size: float = 48.0          # synthetic region size in image pixels
  region_size_max: float = 0.0       # > region_size: per example log-uniform in between
  mask_downscale: int = 4            # mask images are label maps at 1/mask_downscale scale
  vae: str = ''                      # trained VAE folder the U-Nets encode with
  latent_scale: float = 50.0         # diffusion latent = VAE latent / latent_scale
  latent_sample: bool = False        # encode with a posterior sample instead of the mean
  cond_drop_prob: float = 0.5        # U-Nets: probability of the unconditional form
  single_label_cond: bool = True     # image U-Net: condition on one present label (sampler form)
  recon_loss: str = 'l1'             # VAE: 'l1' or 'l2' reconstruction loss
  kl_weight: float = 1e-4            # VAE: weight of the mean KL term
  mask_image_fraction: float = 0.25  # VAE: share of each batch that is mask images
  export_latent_std: float = 10.0    # VAE: exported latents' per-channel std (0: no rescale)
                                     # (keep latent / latent_scale inside [-1, 1])
  latent_stats_batches: int = 8      # VAE: batches used to measure the latent statistics

  def __post_init__(self):
    err = configs_lib.ConfigError
    if self.task not in TASKS:
      raise err(f'task must be one of {TASKS}, got {self.task!r}')
    for name in ('steps', 'batch_size', 'image_size', 'ema_every', 'save_every',
                 'keep_checkpoints', 'log_every', 'mask_downscale', 'latent_stats_batches'):
      if getattr(self, name) < 1:
        raise err(f'{name} must be >= 1, got {getattr(self, name)}')
    if not 0.0 <= self.cond_drop_prob <= 1.0:
      raise err(f'cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}')
    if not 0.0 < self.warmup_frac < 1.0:
      raise err(f'warmup_frac must be in (0, 1), got {self.warmup_frac}')
    if not 0.0 <= self.ema_decay < 1.0:
      raise err(f'ema_decay must be in [0, 1), got {self.ema_decay}')
    if self.recon_loss not in ('l1', 'l2'):
      raise err(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
    if not 0.0 <= self.mask_image_fraction <= 1.0:
      raise err(f'mask_image_fraction must be in [0, 1], got {self.mask_image_fraction}')
    if self.task != 'vae' and not self.vae:
      raise err(f'task {self.task} needs `vae`, the folder of a trained VAE')
    if self.num_labels < 2:
      raise err(f'num_labels must be >= 2, got {self.num_labels}')


# Fields that do not change the compiled init/step programs (data, paths, bookkeeping;
# shapes are jit's business). `_canonical` resets them, so runs that differ only there
# share compiled programs within a process.
_NOT_COMPILED = {'model': '', 'save_every': 1, 'keep_checkpoints': 1, 'log_every': 1,
                 'seed': 0, 'data': 'synthetic', 'augment': True, 'num_layout_classes': 1,
                 'region_size': 48.0, 'region_size_max': 0.0, 'mask_downscale': 1, 'vae': '-',
                 'export_latent_std': 0.0, 'latent_stats_batches': 1,
                 'mask_image_fraction': 0.0, 'batch_size': 1, 'image_size': 8}


def _canonical(cfg: TrainConfig) -> TrainConfig:
  return dataclasses.replace(cfg, **_NOT_COMPILED)


_HINTS = None


def _field_types() -> dict[str, Any]:
  global _HINTS
  if _HINTS is None:
    _HINTS = typing.get_type_hints(TrainConfig)
  return _HINTS


def _parse_value(name: str, text: str):
  kind = _field_types()[name]
  if kind is bool:
    if text.lower() in ('1', 'true', 'yes'):
      return True
    if text.lower() in ('0', 'false', 'no'):
      return False
    raise configs_lib.ConfigError(f'{name} must be true or false, got {text!r}')
  try:
    return kind(text)
  except ValueError as e:
    raise configs_lib.ConfigError(f'{name}: cannot read {text!r} as {kind.__name__}') from e


def config_from_dict(d: dict[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
  """TrainConfig from a `get_config()` dict and `key=value` overrides (strings)."""
  d = dict(d)
  fields = set(_field_types())
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep:
      raise configs_lib.ConfigError(f'override must be key=value, got {item!r}')
    if key not in fields:
      raise configs_lib.ConfigError(f'unknown training config field {key!r}')
    d[key] = _parse_value(key, value)
  unknown = set(d) - fields
  if unknown:
    raise configs_lib.ConfigError(f'unknown training config fields: {sorted(unknown)}')
  missing = {f.name for f in dataclasses.fields(TrainConfig)
             if f.default is dataclasses.MISSING} - set(d)
  if missing:
    raise configs_lib.ConfigError(f'training config lacks: {sorted(missing)}')
  return TrainConfig(**d)


def load_config(path: str, overrides: Sequence[str] = (), steps: int | None = None):
  """(TrainConfig, model config) of a training config file; `model` resolved next to it."""
  cfg = config_from_dict(config_files.load_config_dict(path), overrides)
  if steps is not None:
    cfg = dataclasses.replace(cfg, steps=int(steps))
  model_path = cfg.model
  if not os.path.isabs(model_path):
    model_path = os.path.join(os.path.dirname(os.path.abspath(path)), model_path)
  cfg = dataclasses.replace(cfg, model=os.path.abspath(model_path))
  kind, model_cfg = config_files.load_model_config(cfg.model)
  if kind != cfg.task:
    raise configs_lib.ConfigError(f'task {cfg.task} but {cfg.model} describes a {kind}')
  return cfg, model_cfg


# ----------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 [] optimizer steps taken
  params: Any              # the trained params
  ema_params: Any          # their exponential moving average (what is exported)
  opt_state: Any           # optax state
  rng: jax.Array           # uint32 key data (`RNG_IMPL`); split once per step


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  schedule = optax.cosine_onecycle_schedule(
      transition_steps=cfg.steps, peak_value=cfg.lr, pct_start=cfg.warmup_frac,
      div_factor=cfg.lr_div_factor, final_div_factor=cfg.lr_final_div_factor)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adam(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2))


def ema_update(ema, params, step, *, decay: float, every: int, warmup: int = 0):
  """EMA after optimizer step `step` (1-based): before `warmup` a copy of `params`; then on
  steps that are multiples of `every`, `decay * ema + (1 - decay) * params`; else unchanged."""
  step = jnp.asarray(step)
  copy = step < warmup
  update = (step % every) == 0

  def leaf(e, p):
    mixed = decay * e + (1.0 - decay) * p
    return jnp.where(copy, p, jnp.where(update, mixed, e)).astype(e.dtype)
  return jax.tree_util.tree_map(leaf, ema, params)


# ----------------------------------------------------------------------------- tasks


def _encode_latents(encode, vae_params, images, key, cfg: TrainConfig):
  mean, logvar = encode(vae_params, images)
  z = mean
  if cfg.latent_sample:
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
  return jax.lax.stop_gradient(z.astype(jnp.float32) / cfg.latent_scale)


def _noised(z, key, timesteps: int):
  """(x_t, t, noise) for t uniform in [0, timesteps) per sample (cosine schedule)."""
  k_t, k_n = jax.random.split(key)
  ac = jnp.asarray(diffusion.Schedule(timesteps).alphas_cumprod)
  t = jax.random.randint(k_t, (z.shape[0],), 0, timesteps)
  noise = jax.random.normal(k_n, z.shape, z.dtype)
  a = ac[t].reshape(-1, 1, 1, 1)
  return jnp.sqrt(a) * z + jnp.sqrt(1.0 - a) * noise, t, noise


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


def _diffusion_loss(eps, noise):
  return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise))


@dataclasses.dataclass(frozen=True)
class Task:
  """What `train` needs of one network."""
  kind: str
  model_config: Any
  loss: Callable[..., tuple[jax.Array, dict]]              # (params, frozen, batch, key)
  frozen: Any                                              # non-trained params (the VAE)
  batches: Callable[[int], dict[str, np.ndarray]]          # step -> host batch


def _source(cfg: TrainConfig, batch_size: int, *, with_images: bool, downscale: int,
            stream: int, num_classes: int):
  if cfg.data == 'synthetic':
    spec = data_lib.SynthSpec(num_classes=num_classes,
                              num_layout_classes=cfg.num_layout_classes,
                              region_size=cfg.region_size,
                              region_size_max=cfg.region_size_max)
    return data_lib.SyntheticSource(spec, cfg.image_size, batch_size, cfg.seed,
                                    with_images=with_images, downscale=downscale,
                                    stream=stream)
  return data_lib.FolderSource(cfg.data, cfg.image_size, batch_size, cfg.seed,
                               with_images=with_images, downscale=downscale,
                               augment_data=cfg.augment, num_classes=num_classes,
                               stream=stream)


def _load_vae(cfg: TrainConfig, model_cfg):
  _, vae_cfg, vae_params = checkpoint.load_model(cfg.vae, expect='vae')
  if vae_cfg.latent_channels != model_cfg.channels:
    raise configs_lib.ConfigError(f'{cfg.vae} has {vae_cfg.latent_channels} latent '
                                  f'channels, the U-Net {model_cfg.channels}')
  multiple = vae_cfg.downsample_factor * model_cfg.downsample_factor
  if cfg.image_size % multiple:
    raise configs_lib.ConfigError(f'image_size {cfg.image_size} is not a multiple of {multiple}'
                                  ' (VAE factor x U-Net downsampling)')
  return vae_cfg, jax.tree_util.tree_map(jnp.asarray, vae_params)


def image_unet_task(cfg: TrainConfig, model_cfg: configs_lib.UNetConfig) -> Task:
  vae_cfg, vae_params = _load_vae(cfg, model_cfg)
  if cfg.num_labels != model_cfg.num_classes:
    raise configs_lib.ConfigError(f'num_labels {cfg.num_labels} != the image U-Net\'s '
                                  f'num_classes {model_cfg.num_classes}')
  src = _source(cfg, cfg.batch_size, with_images=True, downscale=1, stream=0,
                num_classes=cfg.num_labels)
  return Task('image_unet', model_cfg,
              _image_unet_loss(_canonical(cfg), model_cfg, vae_cfg), vae_params,
              lambda step: {k: v for k, v in src.batch(step).items()
                            if k in ('image', 'labels')})


@functools.lru_cache(maxsize=8)
def _image_unet_loss(cfg: TrainConfig, model_cfg, vae_cfg):
  """Cached per config, so `train` calls with equal configs reuse one compiled step."""
  encode, apply = vae_lib.encode_fn(vae_cfg), unet_lib.eps_fn(model_cfg)
  f = vae_cfg.downsample_factor

  def loss(params, vae_params, batch, key):
    k_z, k_noise, k_lab, k_drop = jax.random.split(key, 4)
    z = _encode_latents(encode, vae_params, batch['image'], k_z, cfg)
    labels = batch['labels'][:, ::f, ::f]
    cond = (pick_label_cond(labels, k_lab, model_cfg.num_classes) if cfg.single_label_cond
            else labels)
    drop = jax.random.bernoulli(k_drop, cfg.cond_drop_prob, (labels.shape[0],))
    cond = jnp.where(drop[:, None, None], 0, cond)
    x_t, t, noise = _noised(z, k_noise, diffusion.NUM_TRAIN_STEPS)
    return _diffusion_loss(apply(params, x_t, t, cond), noise), {}
  return loss


def mask_unet_task(cfg: TrainConfig, model_cfg: configs_lib.UNetConfig) -> Task:
  vae_cfg, vae_params = _load_vae(cfg, model_cfg)
  if cfg.data == 'synthetic' and cfg.num_layout_classes > model_cfg.num_classes:
    raise configs_lib.ConfigError(f'num_layout_classes {cfg.num_layout_classes} > the mask '
                                  f'U-Net\'s num_classes {model_cfg.num_classes}')
  src = _source(cfg, cfg.batch_size, with_images=False, downscale=cfg.mask_downscale,
                stream=0, num_classes=cfg.num_labels)

  def batches(step):
    b = src.batch(step)
    if b['layout_class'].max() >= model_cfg.num_classes:
      raise ValueError(f'layout class {b["layout_class"].max()} at step {step} is not a '
                       f'class of the mask U-Net (num_classes {model_cfg.num_classes})')
    return {'labels': b['labels'], 'layout_class': b['layout_class']}
  return Task('mask_unet', model_cfg,
              _mask_unet_loss(_canonical(cfg), model_cfg, vae_cfg), vae_params, batches)


@functools.lru_cache(maxsize=8)
def _mask_unet_loss(cfg: TrainConfig, model_cfg, vae_cfg):
  encode, apply = vae_lib.encode_fn(vae_cfg), unet_lib.eps_fn(model_cfg)
  grey = 1.0 / (cfg.num_labels - 1)

  def loss(params, vae_params, batch, key):
    k_z, k_noise, k_drop = jax.random.split(key, 3)
    images = jnp.repeat(batch['labels'][..., None].astype(jnp.float32) * grey, 3, axis=-1)
    z = _encode_latents(encode, vae_params, images, k_z, cfg)
    classes = batch['layout_class']
    null = jax.random.bernoulli(k_drop, cfg.cond_drop_prob, classes.shape)
    x_t, t, noise = _noised(z, k_noise, diffusion.NUM_TRAIN_STEPS)
    return _diffusion_loss(apply(params, x_t, t, classes, null), noise), {}
  return loss


def vae_task(cfg: TrainConfig, model_cfg: configs_lib.VAEConfig) -> Task:
  if cfg.image_size % model_cfg.downsample_factor:
    raise configs_lib.ConfigError(f'image_size {cfg.image_size} is not a multiple of '
                                  f'{model_cfg.downsample_factor}')
  n_mask = int(round(cfg.batch_size * cfg.mask_image_fraction))
  n_img = cfg.batch_size - n_mask
  img_src = _source(cfg, n_img, with_images=True, downscale=1, stream=0,
                    num_classes=cfg.num_labels) if n_img else None
  mask_src = _source(cfg, n_mask, with_images=False, downscale=cfg.mask_downscale,
                     stream=1, num_classes=cfg.num_labels) if n_mask else None

  def batches(step):
    parts = []
    if img_src is not None:
      parts.append(img_src.batch(step)['image'])
    if mask_src is not None:
      parts.append(data_lib.render_mask_image(mask_src.batch(step)['labels'], cfg.num_labels))
    return {'image': np.concatenate(parts).astype(np.float32)}

  return Task('vae', model_cfg, _vae_loss(_canonical(cfg), model_cfg), None, batches)


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


def make_task(cfg: TrainConfig, model_cfg) -> Task:
  return {'image_unet': image_unet_task, 'mask_unet': mask_unet_task,
          'vae': vae_task}[cfg.task](cfg, model_cfg)


# ----------------------------------------------------------------------------- step


def make_train_step(loss_fn, tx: optax.GradientTransformation, cfg: TrainConfig):
  """`(state, frozen, batch) -> (state, metrics)`, jitted, the state donated."""

  def step(state: TrainState, frozen, batch):
    rng, key = jax.random.split(jax.random.wrap_key_data(state.rng, impl=RNG_IMPL))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, frozen, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_step = state.step + 1
    ema = ema_update(state.ema_params, params, new_step, decay=cfg.ema_decay,
                     every=cfg.ema_every, warmup=cfg.ema_warmup)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}
    return TrainState(step=new_step, params=params, ema_params=ema, opt_state=opt_state,
                      rng=jax.random.key_data(rng)), metrics
  return jax.jit(step, donate_argnums=0)


def init_state(task: Task, cfg: TrainConfig) -> TrainState:
  """Step 0: fresh params (from `cfg.seed`), EMA = a copy of them, empty optimizer state."""
  params, opt_state, rng = _jit_init_state(task.kind, task.model_config, _canonical(cfg))(
      np.int32(cfg.seed))
  # The EMA gets buffers of its own (the state is donated; no buffer may appear twice).
  ema = jax.device_put(jax.device_get(params))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                    opt_state=opt_state, rng=rng)


def abstract_state(task: Task, cfg: TrainConfig) -> TrainState:
  """The TrainState's shapes and dtypes (no compute): the target of a restore."""
  params, opt_state, rng = jax.eval_shape(
      _jit_init_state(task.kind, task.model_config, _canonical(cfg)), np.int32(cfg.seed))
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                    ema_params=params, opt_state=opt_state, rng=rng)


@functools.lru_cache(maxsize=8)
def _jit_init_state(kind: str, model_cfg, cfg: TrainConfig):
  """One compiled program per config (op-by-op init would compile every shape apart)."""
  lib = vae_lib if kind == 'vae' else unet_lib
  tx = make_optimizer(cfg)

  def init(seed):
    k_init, k_state = jax.random.split(jax.random.key(seed, impl=RNG_IMPL))
    params = lib.init_params(model_cfg, k_init)
    return params, tx.init(params), jax.random.key_data(k_state)
  return jax.jit(init)


def _prefetch(fn: Callable[[int], Any], steps: Iterable[int], depth: int = 2):
  """Yields (step, fn(step)), computing up to `depth` batches ahead in a thread."""
  steps = iter(steps)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    queue = collections.deque()
    for s in steps:
      queue.append((s, pool.submit(fn, s)))
      if len(queue) >= depth:
        break
    while queue:
      s, fut = queue.popleft()
      nxt = next(steps, None)
      if nxt is not None:
        queue.append((nxt, pool.submit(fn, nxt)))
      yield s, fut.result()


# ----------------------------------------------------------------------------- VAE export


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
  """`clipped_share` of the VAE's `held_out_latents` at `cfg.latent_scale`."""
  return clipped_share(held_out_latents(cfg, vae_cfg, params, batches, n_batches),
                       cfg.latent_scale)


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


# ----------------------------------------------------------------------------- loop


def _flat(record: dict) -> dict[str, Any]:
  return {f'{section}.{k}': v for section, d in record.items() for k, v in d.items()}


def _check_resume_config(path: str, record: dict) -> None:
  with open(path) as f:
    old = _flat(json.load(f))
  new = _flat(record)
  diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  if diff:
    raise WorkdirError(f'{path}: the run was started with a different config; differing: '
                       + ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff))


def _write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _cast_like(tree, abstract):
  return jax.tree_util.tree_map(lambda v, s: jnp.asarray(v, s.dtype), tree, abstract)


def train(cfg: TrainConfig, model_cfg, workdir: str, *, resume: bool = False,
          until: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; exports `<workdir>/model` when all steps are done.

  Args:
    cfg, model_cfg: the run (see `load_config`).
    workdir: holds `train_config.json`, `checkpoints/`, `metrics.jsonl` and `model/`.
    resume: continue from the newest checkpoint (without it, existing checkpoints are
      an error, so a run is never silently overwritten).
    until: stop (after a checkpoint) once this many steps are done, without exporting.

  Returns:
    A summary: steps done, last logged loss, steps/s, seconds, export folder (or None).
  """
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  export_dir = os.path.join(workdir, 'model')
  os.makedirs(workdir, exist_ok=True)
  record = {'train': dataclasses.asdict(cfg), 'model': configs_lib.config_to_dict(model_cfg)}
  record = json.loads(json.dumps(record))
  cfg_path = os.path.join(workdir, 'train_config.json')
  latest = checkpoint.latest_step(ckpt_dir)
  if latest is not None and not resume:
    raise WorkdirError(f'{workdir} already holds checkpoints (newest step {latest}); '
                          'pass resume=True (--resume) to continue it, or use a new workdir')
  if os.path.exists(cfg_path) and latest is not None:
    _check_resume_config(cfg_path, record)
  _write_json(cfg_path, record)

  task = make_task(cfg, model_cfg)
  if latest is None:
    state = init_state(task, cfg)
  else:
    abstract = abstract_state(task, cfg)
    state = _cast_like(checkpoint.restore_train_state(ckpt_dir, abstract, latest), abstract)
    logging.info('resumed %s from step %d', workdir, latest)
  start = int(state.step)
  stop = cfg.steps if until is None else min(int(until), cfg.steps)
  n_params = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(state.params))
  logging.info('%s: %d params, steps %d -> %d of %d, batch %d, %d px', cfg.task, n_params,
               start, stop, cfg.steps, cfg.batch_size, cfg.image_size)

  step_fn = compiled_step(task, cfg)
  frozen = task.frozen
  summary = {'task': cfg.task, 'start_step': start, 'steps_done': start, 'loss': None,
             'steps_per_s': None, 'seconds': 0.0, 'export': None}
  t_run = time.perf_counter()
  t_log, n_log, loss_sum = None, 0, 0.0
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  for step, host_batch in _prefetch(task.batches, range(start, stop)):
    batch = {k: jnp.asarray(v) for k, v in host_batch.items()}
    state, metrics = step_fn(state, frozen, batch)
    done = step + 1
    if t_log is None:                      # first step: compile time, not throughput
      jax.block_until_ready(metrics['loss'])
      logging.info('step %d: loss %.5f (first step, with compilation, %.1f s)', done,
                   float(metrics['loss']), time.perf_counter() - t_run)
      t_log, n_log, loss_sum = time.perf_counter(), 0, 0.0
    else:
      loss_sum = loss_sum + metrics['loss']
      n_log += 1
    if n_log and (done % cfg.log_every == 0 or done == stop):
      loss = float(loss_sum) / n_log
      now = time.perf_counter()
      rate = n_log / max(now - t_log, 1e-9)
      eta = (cfg.steps - done) / rate
      extra = {k: float(v) for k, v in metrics.items() if k != 'loss'}
      logging.info('step %d/%d: loss %.5f, %.2f steps/s, ETA %.0f s  %s', done, cfg.steps,
                   loss, rate, eta, ' '.join(f'{k} {v:.4g}' for k, v in extra.items()))
      with open(metrics_path, 'a') as f:
        f.write(json.dumps({'step': done, 'loss': loss, 'steps_per_s': rate, **extra}) + '\n')
      summary.update(loss=loss, steps_per_s=rate)
      t_log, n_log, loss_sum = now, 0, 0.0
    if done % cfg.save_every == 0 or done == stop:
      checkpoint.save_train_state(ckpt_dir, done, state, max_to_keep=cfg.keep_checkpoints)
  summary['steps_done'] = int(state.step)
  summary['seconds'] = time.perf_counter() - t_run
  if int(state.step) >= cfg.steps:
    summary['export'] = export(cfg, model_cfg, task, state.ema_params, export_dir, workdir)
  return summary


def compiled_step(task: Task, cfg: TrainConfig):
  """The jitted `(state, task.frozen, batch) -> (state, metrics)` of this run (state donated)."""
  return _cached_step(task.loss, _canonical(cfg))


@functools.lru_cache(maxsize=8)
def _cached_step(loss_fn, cfg: TrainConfig):
  """One jitted step per (loss, config): equal runs in a process compile once."""
  return make_train_step(loss_fn, make_optimizer(cfg), cfg)


def export(cfg: TrainConfig, model_cfg, task: Task, ema_params, export_dir: str,
           workdir: str) -> str:
  """Writes the EMA params as a model folder (VAE: latent-normalised first)."""
  if os.path.exists(os.path.join(export_dir, 'model.json')):
    logging.info('%s already exported', export_dir)
    return export_dir
  params = jax.device_get(ema_params)
  info = {'task': cfg.task, 'step': cfg.steps}
  if cfg.task == 'vae' and cfg.export_latent_std > 0:
    z = held_out_latents(cfg, model_cfg, params, task.batches, cfg.latent_stats_batches)
    mean, std = z.mean(0), z.std(0)
    params = normalize_vae_latents(params, mean, std, cfg.export_latent_std)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, model_cfg.params_dtype), params)
    # The exported latents are c (z - mean) exactly (normalize_vae_latents): no re-encode.
    clipped = clipped_share((z - mean) * (cfg.export_latent_std / np.maximum(std, 1e-12)),
                            cfg.latent_scale)
    info.update(latent_mean_before=mean.tolist(), latent_std_before=std.tolist(),
                latent_std_after=cfg.export_latent_std, clipped_fraction=clipped)
    logging.info('VAE latents: mean %s, std %s -> std %g; %.2g of latent / %g outside '
                 '[-1, 1]', np.round(mean, 3), np.round(std, 3), cfg.export_latent_std,
                 clipped, cfg.latent_scale)
    if clipped > 1e-3:
      logging.warning('%.1f%% of the diffusion latents lie outside [-1, 1], where DDIM '
                      'clips its x0 estimate (SPEC 2): lower export_latent_std',
                      100 * clipped)
  checkpoint.save_model(export_dir, cfg.task, model_cfg, params)
  _write_json(os.path.join(workdir, 'export.json'), info)
  logging.info('exported EMA params to %s', export_dir)
  return export_dir


def run(config_path: str, workdir: str, *, steps: int | None = None, resume: bool = False,
        overrides: Sequence[str] = (), until: int | None = None) -> dict[str, Any]:
  """The `scripts/train.py` entry point: load the config file, train, export."""
  cfg, model_cfg = load_config(config_path, overrides, steps)
  return train(cfg, model_cfg, workdir, resume=resume, until=until)
