"""Tiny mask U-Net for the CPU demo (trained by configs/demo_train_mask.py).

Class-conditioned like the released mask model; its 2 classes are the synthetic data's
layout classes (class c favours the labels l with (l - 1) % 2 == c).
Fields not set here keep their `UNetConfig` default (tiled_ldm_jax/models/configs.py).
"""

import ml_collections


def get_config():
  return ml_collections.ConfigDict({
      'model': 'mask_unet',         # which network: image_unet | mask_unet | vae
      'dim': 16,                    # base width (time/class embeddings are 4*dim)
      'num_classes': 2,             # rows of the class embedding table (layout classes)
      'dim_mults': (1, 2),          # width multiplier per resolution level (one downsampling)
  })
