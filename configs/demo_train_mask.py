"""Demo training of the tiny mask U-Net (CPU, minutes); needs the demo VAE first.

  python scripts/train.py --config=configs/demo_train_mask.py --workdir=runs/demo/mask_unet

Mask images are synthetic label maps at 1/4 of the image scale (`mask_downscale`; 128 px
crops, the sampler's default mask patch), rendered labels / 4 as grey RGB and encoded by
the VAE; the class is the layout class of the example, dropped half the time. Fields not
set here keep their `TrainConfig` default (tiled_ldm_jax/training/config.py).
"""

import os

from tiled_ldm_jax import training


def get_config():
  config = training.default_config()
  config.task = 'mask_unet'              # what to train: image_unet | mask_unet | vae
  config.model = os.path.join(os.path.dirname(__file__), 'demo_mask_unet.py')  # model
  config.steps = 1500                    # total optimizer steps (~15 min on 2 busy cores)
  config.batch_size = 16                 # examples per step
  config.image_size = 128                # mask crop side in pixels (latent 16 x 16)
  config.lr = 1e-3                       # peak learning rate
  config.ema_every = 1                   # EMA update period (original: 10; short run here)
  config.ema_warmup = 100                # EMA = params before this step
  config.save_every = 250                # checkpoint period in steps
  config.region_size = 256.0             # synthetic region size in image pixels: 64 px in
                                         # the mask; CleanMask's boundary removal and 6x6
                                         # min filter keep 81% of such regions (48: 22%)
  config.vae = 'runs/demo/vae/model'     # trained VAE folder (relative to the working dir)
  return config
