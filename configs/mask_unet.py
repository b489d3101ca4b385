"""Config of the released mask model (class-conditioned, 2 classes).

Full size: see ../shared/reference/full_size_shapes/. Load with
`tiled_ldm_jax.models.config_files.load_model_config('configs/mask_unet.py')`.
Fields not set here keep their `UNetConfig` default (tiled_ldm_jax/models/configs.py).
"""

import ml_collections


def get_config():
  return ml_collections.ConfigDict({
      'model': 'mask_unet',         # which network: image_unet | mask_unet | vae
      'dim': 64,                    # base width (time/class embeddings are 4*dim)
      'num_classes': 2,             # rows of the class embedding table
      'dim_mults': (1, 2, 4, 8),    # width multiplier per resolution level
      'resnet_block_groups': 2,     # GroupNorm groups in every ResnetBlock
  })
