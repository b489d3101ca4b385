"""A U-Net you trained (scripts/train.py, objective eps | v | flow) sampled at any size with
`sampling.sample`, decoded through a VAE: the README's "your own model" example.

The body of `sample_trained_unet` is the example's code; `scripts/sample_own_model.py`
runs it. The DiffInfinite pipeline (`pipeline.Pipeline`) reads the same `objective` from
model.json and samples such a model too; this shows the public sampler on its own.
"""

from __future__ import annotations

import numpy as np

from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax import geometry
from tiled_ldm_jax import masks
from tiled_ldm_jax import pipeline
from tiled_ldm_jax import stages
from tiled_ldm_jax import sampling
from tiled_ldm_jax.sampling import guidance
from tiled_ldm_jax.models import unet


def check_request(unet_dir: str, vae_dir: str, labels: np.ndarray, patch_size: int) -> None:
  """One-line ValueError for a label map [H, W] the example cannot sample, read from the
  models' model.json alone (before any model is loaded or JAX starts)."""
  _, unet_config = checkpoint.read_model_json(unet_dir)
  _, vae_config = checkpoint.read_model_json(vae_dir)
  f = geometry.LatentGeometry.of_vae(vae_config).factor
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise ValueError(f'labels must be one [H, W] label map, got shape {labels.shape}')
  masks.latent_labels(labels, f)                   # H, W multiples of the factor
  masks.validate_labels(labels, unet_config.num_classes)
  if patch_size % f or min(labels.shape) < patch_size:
    raise ValueError(f'patch_size {patch_size} must be a multiple of {f} and at most the '
                     f'image side {min(labels.shape)}')


def sample_trained_unet(unet_dir: str, vae_dir: str, labels: np.ndarray, *, sampling_steps: int = 20,
                        seed: int = 0, cond_scale: float = 3.0, patch_size: int = 128,
                        windows=None) -> np.ndarray:
  """One image [H, W, 3] uint8 for a pixel label map `labels` [H, W] (ids < the U-Net's
  classes; H, W multiples of the VAE factor and >= patch_size). `windows`: a
  `sampling.Random(...)` (default) or `sampling.Grid(...)`."""
  pipe = pipeline.Pipeline.from_pretrained(unet_dir, vae_dir)   # loads and checks both
  labels = stages.check_labels(np.asarray(labels)[None], pipe.unet.config.num_classes)
  net, process = guidance.trained_unet(unet.eps_fn(pipe.unet.config),
                                       pipe.unet.objective)  # Flow(): t * 1000
  denoise = sampling.multilabel_guidance(net, pipe.unet.config.num_classes, cond_scale)
  f = pipe.geometry.factor                                       # pixels per latent pixel
  z = sampling.sample(denoise, pipe.unet.params,
                      sampling.spatial(masks.latent_labels(labels, f)),  # [1, h, w] cropped
                      keys=sampling.image_keys(seed, [0]),
                      latent_shape=(labels.shape[1] // f, labels.shape[2] // f,
                                    pipe.unet.config.channels),
                      patch=patch_size // f, sampling_steps=sampling_steps, process=process,
                      windows=windows)                           # z: [1, h, w, C]
  image = pipe.decode(z, patch_size=patch_size)[0]               # Hann-blended tiles
  return image                                                   # [H, W, 3] uint8
