"""Config of the released 10-class image model.

Full size: see ../shared/reference/full_size_shapes/. Load with
`tiled_ldm_jax.models.config_files.load_model_config('configs/image_unet_10class.py')`.
Fields not set here keep their `UNetConfig` default (tiled_ldm_jax/models/configs.py).
"""

import ml_collections


def get_config():
  return ml_collections.ConfigDict({
      'model': 'image_unet',        # which network: image_unet | mask_unet | vae
      'dim': 256,                   # base width (time/class embeddings are 4*dim)
      'num_classes': 10,            # rows of the class embedding table
      'dim_mults': (1, 2, 4),       # width multiplier per resolution level
      'resnet_block_groups': 2,     # GroupNorm groups in every ResnetBlock
  })
