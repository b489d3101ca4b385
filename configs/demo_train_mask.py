"""Demo training of the tiny mask U-Net on the real image's label map; needs the demo VAE.

  python scripts/train.py --config=configs/demo_train_mask.py --workdir=runs/demo/mask_unet

Mask images are the label map of tools/make_demo_data.py (1 epithelium, 2 stroma,
3 lumen/background) at 1/4 of the image scale (`mask_downscale`: 128 px, the whole map
in each of its eight flips/rotations, the sampler's default mask patch), rendered
labels / 4 as grey RGB and encoded by the VAE. Its layout class is 1 (the data's
`class_1/` folder; the sampler's default class), dropped half the time; class 0 is not
trained. Fields not set here keep their `TrainConfig` default
(tiled_ldm_jax/training/config.py).
"""

import os

from tiled_ldm_jax import training


def get_config():
  config = training.default_config()
  config.task = 'mask_unet'              # what to train: image_unet | mask_unet | vae
  config.model = os.path.join(os.path.dirname(__file__), 'demo_mask_unet.py')  # model
  config.steps = 600                     # total optimizer steps (see docs/demo.md for the time)
  config.batch_size = 16                 # examples per step
  config.image_size = 128                # mask crop side in pixels (latent 16 x 16)
  config.lr = 1e-3                       # peak learning rate
  config.ema_every = 1                   # EMA update period (original: 10; short run here)
  config.ema_warmup = 100                # EMA = params before this step
  config.save_every = 250                # checkpoint period in steps
  config.data = 'data/demo_tissue'       # tools/make_demo_data.py's folder (working dir)
  config.augment = False                 # the folder already holds the 8 flips/rotations
  config.vae = 'runs/demo/vae/model'     # trained VAE folder (relative to the working dir)
  return config
