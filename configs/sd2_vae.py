"""Config of Stable Diffusion 2's VAE (`stabilityai/stable-diffusion-2-base`, AutoencoderKL).

DiffInfinite's latents are this VAE's latents divided by 50 (not `scaling_factor`): the
sampler and the tiled decode take that factor from their own configs.
"""


def get_config():
  return {
      'model': 'vae',                     # which network: image_unet | mask_unet | vae
      'in_channels': 3,                   # image channels the encoder reads
      'out_channels': 3,                  # image channels the decoder writes
      'latent_channels': 4,               # channels of z
      'block_out_channels': (128, 256, 512, 512),  # width per level (3 stride-2 stages: /8)
      'layers_per_block': 2,              # resnets per encoder level (decoder: one more)
      'norm_num_groups': 32,              # GroupNorm groups (eps 1e-6)
      'scaling_factor': 0.18215,          # diffusers' factor, kept for reference only
      'dtype': 'float32',                 # compute dtype (norms and softmax stay float32)
      'param_dtype': 'float32',           # storage dtype of the parameters
  }
