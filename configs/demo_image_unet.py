"""Tiny image U-Net for the CPU demo (trained by configs/demo_train_image.py).

Same skeleton and conditioning as the released 5-class image model, about 1/100 of its
width: 5 labels (0 background, 1-4 the synthetic textures, see tiled_ldm_jax/data.py).
"""


def get_config():
  return {
      'model': 'image_unet',        # which network: image_unet | mask_unet | vae
      'dim': 32,                    # base width (time/class embeddings are 4*dim)
      'num_classes': 5,             # rows of the class embedding table (label ids 0..4)
      'dim_mults': (1, 2),          # width multiplier per resolution level (one downsampling)
      'channels': 4,                # latent channels in and out (the demo VAE's)
      'resnet_block_groups': 8,     # GroupNorm groups in every ResnetBlock
      'block_per_layer': 2,         # ResnetBlocks per level
      'dtype': 'float32',           # compute dtype (norms and softmax stay float32)
      'param_dtype': 'float32',     # storage dtype of the parameters
  }
