"""The training config: `TrainConfig`, its ConfigDict form, and loading a run's configs.

A training config file (`configs/demo_train_*.py`) starts from `default_config()` -- every
`TrainConfig` field at its default, the required ones as typed placeholders -- and sets
what it changes. Every field is therefore overridable on the command line
(`--config.batch_size=8`, type-checked by ml_collections), and each default is written
once, here.
"""

from __future__ import annotations

import dataclasses
import os
import typing

import ml_collections
from ml_collections import config_dict

from tiled_ldm_jax.models import config_files
from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax import geometry
from tiled_ldm_jax.models import configs as configs_lib

TASKS = ('image_unet', 'mask_unet', 'vae')
OBJECTIVES = diffusion.OBJECTIVES   # eps | v | flow


class WorkdirError(ValueError):
  """The workdir holds a run that this call may not continue (or only with --resume)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run (built from a `configs/demo_train_*.py` ConfigDict)."""
  task: str                          # what to train: image_unet | mask_unet | vae
  model: str                         # model config file (relative paths: to the working dir)
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
  ema_decay: float = 0.995           # EMA decay per EMA update (DiffInfinite's)
  ema_every: int = 10                # EMA updated on every ema_every-th step
  ema_warmup: int = 0                # before this step the EMA is a copy of the params
  save_every: int = 1000             # checkpoint period in steps (and always at the end)
  keep_checkpoints: int = 2          # newest checkpoints kept
  log_every: int = 50                # log loss, steps/s and ETA every this many steps
  seed: int = 0                      # init, data order and step randomness
  shard_params: bool = False         # data-parallel runs: shard params and optimizer state
                                     # FSDP-style over the devices (else replicated)
  objective: str = 'eps'             # U-Nets: what the network predicts. eps: the noise;
                                     # v: sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0;
                                     # flow: t ~ U[0, 1], x_t = (1 - t) x0 + t noise, the
                                     # velocity noise - x0, with time input t * 1000 (a
                                     # float: the sinusoidal embedding sees the range of
                                     # the diffusion timesteps). Stored in model.json.
  data: str = 'synthetic'            # 'synthetic', a folder of name.jpg + name_mask.png, or
                                     # a slide manifest file (CSV or JSON; training/slides.py)
  augment: bool = True               # folder and slide data: random flips, 90-degree rotations
  mpp: float = 0.0                   # slide data: tile resolution in um/px (0: each slide's
                                     # level 0 as is); mask model: mpp * mask_downscale
  mask_classes: str = ''             # slide data, GeoJSON annotations: class name to id,
                                     # 'Tumor=1,Stroma=2' (empty: 'label N' -> N, the names
                                     # of the GeoJSON written beside generated slides)
  unannotated: str = 'zero'          # slide data: unannotated tissue is label 0 ('zero') or
                                     # no tile is centred on it ('exclude')
  class_balance: float = 1.0         # slide data: class weights = annotated area ** (1 - this)
                                     # (1: every class as often, 0: in proportion to area)
  tissue_saturation: float = 0.08    # slide data: thumbnail pixels with (max-min)/max of RGB
                                     # above this are tissue
  num_labels: int = 5                # label ids 0..num_labels-1 (image U-Net: its num_classes)
  num_layout_classes: int = 2        # synthetic layout classes (the mask U-Net's classes)
  region_size: float = 48.0          # synthetic region size in image pixels
  region_size_max: float = 0.0       # > region_size: per example log-uniform in between
  mask_downscale: int = 4            # mask images are label maps at 1/mask_downscale scale
  vae: str = ''                      # U-Nets: trained VAE folder to encode with; the latent
                                     # scale is the one stored in it (its model.json)
  latent_sample: bool = False        # U-Nets: encode with a posterior sample, not the mean
  cond_drop_prob: float = 0.5        # U-Nets: probability of the unconditional form
  single_label_cond: bool = True     # image U-Net: condition on one present label (sampler form)
  recon_loss: str = 'l1'             # VAE: 'l1' or 'l2' reconstruction loss
  kl_weight: float = 1e-4            # VAE: weight of the mean KL term
  mask_image_fraction: float = 0.25  # VAE: share of each batch that is mask images
  export_latent_std: float = 10.0    # VAE: exported latents' per-channel std (0: no rescale)
                                     # (keep latent / export_latent_scale inside [-1, 1])
  export_latent_scale: float = geometry.DIFFINFINITE_LATENT_SCALE  # VAE: diffusion latent
                                     # = VAE latent / this; stored in the exported model.json
  latent_stats_batches: int = 8      # VAE: batches used to measure the latent statistics

  def __post_init__(self):
    err = configs_lib.ConfigError
    if self.task not in TASKS:
      raise err(f'task must be one of {TASKS}, got {self.task!r}')
    for name in ('steps', 'batch_size', 'image_size', 'ema_every', 'save_every',
                 'keep_checkpoints', 'log_every', 'mask_downscale', 'latent_stats_batches'):
      if getattr(self, name) < 1:
        raise err(f'{name} must be >= 1, got {getattr(self, name)}')
    for name, lo, hi in (('cond_drop_prob', 0, 1), ('mask_image_fraction', 0, 1)):
      if not lo <= getattr(self, name) <= hi:
        raise err(f'{name} must be in [{lo}, {hi}], got {getattr(self, name)}')
    if not 0.0 < self.warmup_frac < 1.0:
      raise err(f'warmup_frac must be in (0, 1), got {self.warmup_frac}')
    if not 0.0 <= self.ema_decay < 1.0:
      raise err(f'ema_decay must be in [0, 1), got {self.ema_decay}')
    if self.objective not in OBJECTIVES:
      raise err(f'objective must be one of {OBJECTIVES}, got {self.objective!r}')
    if self.recon_loss not in ('l1', 'l2'):
      raise err(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
    if self.task != 'vae' and not self.vae:
      raise err(f'task {self.task} needs `vae`, the folder of a trained VAE')
    if self.unannotated not in ('zero', 'exclude'):
      raise err(f"unannotated must be 'zero' or 'exclude', got {self.unannotated!r}")
    for name in ('class_balance', 'tissue_saturation'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise err(f'{name} must be in [0, 1], got {getattr(self, name)}')
    if not (self.mpp >= 0.0 and self.mpp < float('inf')):
      raise err(f'mpp must be >= 0 um/px (0: the slides\' level 0), got {self.mpp}')
    if self.num_labels < 2:
      raise err(f'num_labels must be >= 2, got {self.num_labels}')
    geometry.LatentGeometry(scale=self.export_latent_scale)  # validates the scale


def default_config() -> ml_collections.ConfigDict:
  """Every TrainConfig field at its default; required fields as typed placeholders (None
  until set). Training config files start from this."""
  hints = typing.get_type_hints(TrainConfig)
  d = {f.name: (config_dict.placeholder(hints[f.name]) if f.default is dataclasses.MISSING
                else f.default) for f in dataclasses.fields(TrainConfig)}
  return ml_collections.ConfigDict(d)


def from_config(config) -> TrainConfig:
  """TrainConfig from a ConfigDict or dict; unknown or missing fields are ConfigErrors."""
  return configs_lib.from_dict(TrainConfig, config)


def load_config(config):
  """(TrainConfig, model config) of a training config (a file path, ConfigDict or dict).

  `model` (the model config file) is resolved to an absolute path, relative to the
  working directory; its kind must be the task.
  """
  if isinstance(config, (str, os.PathLike)):
    config = config_files.load(os.fspath(config))
  cfg = from_config(config)
  cfg = dataclasses.replace(cfg, model=os.path.abspath(cfg.model))
  kind, model_cfg = config_files.load_model_config(cfg.model)
  if kind != cfg.task:
    raise configs_lib.ConfigError(f'task {cfg.task} but {cfg.model} describes a {kind}')
  return cfg, model_cfg


# Fields that do not change the compiled init/step programs (data, paths, bookkeeping;
# shapes are jit's business). `canonical` resets them, so runs that differ only there
# share compiled programs within a process.
_NOT_COMPILED = {'model': '', 'save_every': 1, 'keep_checkpoints': 1, 'log_every': 1,
                 'seed': 0, 'data': 'synthetic', 'augment': True, 'num_layout_classes': 1,
                 'region_size': 48.0, 'region_size_max': 0.0, 'mask_downscale': 1, 'vae': '-',
                 'export_latent_std': 0.0, 'export_latent_scale': 1.0,
                 'latent_stats_batches': 1, 'mask_image_fraction': 0.0, 'batch_size': 1,
                 'image_size': 8, 'mpp': 0.0, 'mask_classes': '', 'unannotated': 'zero',
                 'class_balance': 1.0, 'tissue_saturation': 0.08}


def canonical(cfg: TrainConfig) -> TrainConfig:
  """`cfg` with the fields that do not reach the compiled programs reset."""
  return dataclasses.replace(cfg, **_NOT_COMPILED)
