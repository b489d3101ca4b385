"""Tiny mask U-Net for the CPU demo (trained by configs/demo_train_mask.py).

Class-conditioned like the released mask model; its 2 classes are the synthetic data's
layout classes (class c favours the labels l with (l - 1) % 2 == c).
"""


def get_config():
  return {
      'model': 'mask_unet',         # which network: image_unet | mask_unet | vae
      'dim': 16,                    # base width (time/class embeddings are 4*dim)
      'num_classes': 2,             # rows of the class embedding table (layout classes)
      'dim_mults': (1, 2),          # width multiplier per resolution level (one downsampling)
      'channels': 4,                # latent channels in and out (the demo VAE's)
      'resnet_block_groups': 8,     # GroupNorm groups in every ResnetBlock
      'block_per_layer': 2,         # ResnetBlocks per level
      'dtype': 'float32',           # compute dtype (norms and softmax stay float32)
      'param_dtype': 'float32',     # storage dtype of the parameters
  }
