"""Tiny image U-Net for the CPU demo (trained by configs/demo_train_image.py).

Same skeleton and conditioning as the released 5-class image model, about 1/100 of its
width: 5 labels (0 background, 1-4 the synthetic textures, see tiled_ldm_jax/training/data.py).
Fields not set here keep their `UNetConfig` default (tiled_ldm_jax/models/configs.py).
"""

import ml_collections


def get_config():
  return ml_collections.ConfigDict({
      'model': 'image_unet',        # which network: image_unet | mask_unet | vae
      'dim': 32,                    # base width (time/class embeddings are 4*dim)
      'num_classes': 5,             # rows of the class embedding table (label ids 0..4)
      'dim_mults': (1, 2),          # width multiplier per resolution level (one downsampling)
  })
