"""Tiny AutoencoderKL for the CPU demo (trained by configs/demo_train_vae.py).

Same architecture family as SD2's VAE (configs/sd2_vae.py): 4 levels, 3 stride-2 stages
(8x downsampling), 4 latent channels; much narrower, one resnet per encoder level.
"""


def get_config():
  return {
      'model': 'vae',                     # which network: image_unet | mask_unet | vae
      'in_channels': 3,                   # image channels the encoder reads
      'out_channels': 3,                  # image channels the decoder writes
      'latent_channels': 4,               # channels of z
      'block_out_channels': (16, 32, 32, 32),  # width per level (3 stride-2 stages: /8)
      'layers_per_block': 1,              # resnets per encoder level (decoder: one more)
      'norm_num_groups': 8,               # GroupNorm groups (eps 1e-6)
      'scaling_factor': 0.18215,          # diffusers' factor, unused (latent_scale is used)
      'dtype': 'float32',                 # compute dtype (norms and softmax stay float32)
      'param_dtype': 'float32',           # storage dtype of the parameters
  }
