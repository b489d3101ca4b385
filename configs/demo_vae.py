"""Tiny AutoencoderKL for the CPU demo (trained by configs/demo_train_vae.py).

Same architecture family as SD2's VAE (configs/sd2_vae.py): 4 levels, 3 stride-2 stages
(8x downsampling), 4 latent channels; much narrower, one resnet per encoder level.
Fields not set here keep their `VAEConfig` default (tiled_ldm_jax/models/configs.py);
the latent scale is set by the training export (`export_latent_scale`).
"""

import ml_collections


def get_config():
  return ml_collections.ConfigDict({
      'model': 'vae',                     # which network: image_unet | mask_unet | vae
      'block_out_channels': (16, 32, 32, 32),  # width per level (3 stride-2 stages: /8)
      'layers_per_block': 1,              # resnets per encoder level (decoder: one more)
      'norm_num_groups': 8,               # GroupNorm groups (eps 1e-6)
  })
