"""A tiny image U-Net config for tests that train through the command (the model's size
is not what they check; compile time is what it costs)."""

import ml_collections


def get_config():
  return ml_collections.ConfigDict({
      'model': 'image_unet', 'dim': 8, 'num_classes': 5, 'dim_mults': (1,),
      'resnet_block_groups': 4, 'block_per_layer': 1,
  })
