"""Config of Stable Diffusion 2's VAE (`stabilityai/stable-diffusion-2-base`, AutoencoderKL).

`VAEConfig`'s defaults (tiled_ldm_jax/models/configs.py) are this VAE: 4 levels of
(128, 256, 512, 512) channels, 2 resnets per encoder level, 32 GroupNorm groups, 4 latent
channels, and DiffInfinite's latent scale 50 (its latents are this VAE's divided by 50,
not multiplied by `scaling_factor`).
"""

import ml_collections


def get_config():
  return ml_collections.ConfigDict({
      'model': 'vae',                     # which network: image_unet | mask_unet | vae
  })
