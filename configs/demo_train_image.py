"""Demo training of the tiny image U-Net on the real tissue image; needs the demo VAE first.

  python scripts/train.py --config=configs/demo_train_image.py --workdir=runs/demo/image_unet

Random 128 px crops (latent 16 x 16) of the eight flips/rotations of the image of
tools/make_demo_data.py, conditioned on one label present in the crop as
`(labels == l) * l` at latent resolution (the sampler's per-label form), the mask zeroed
half the time. Labels: 1 epithelium (DAB), 2 stroma, 3 lumen/background (0 and 4 unused;
the U-Net keeps 5 label rows). Latents are the VAE's divided by the latent scale stored
with it. Sample with a matching --patch_size (e.g. 128). Fields not set here keep their
`TrainConfig` default (tiled_ldm_jax/training/config.py).
"""

import os

from tiled_ldm_jax import training


def get_config():
  config = training.default_config()
  config.task = 'image_unet'             # what to train: image_unet | mask_unet | vae
  config.model = os.path.join(os.path.dirname(__file__), 'demo_image_unet.py')  # model
  config.steps = 4000                    # total optimizer steps (see docs/demo.md for the time)
  config.batch_size = 16                 # examples per step
  config.image_size = 128                # crop side in pixels (latent 16 x 16)
  config.lr = 1e-3                       # peak learning rate
  config.ema_every = 1                   # EMA update period (original: 10; short run here)
  config.ema_warmup = 100                # EMA = params before this step
  config.save_every = 250                # checkpoint period in steps
  config.data = 'data/demo_tissue'       # tools/make_demo_data.py's folder (working dir)
  config.augment = False                 # the folder already holds the 8 flips/rotations
  config.vae = 'runs/demo/vae/model'     # trained VAE folder (relative to the working dir)
  return config
