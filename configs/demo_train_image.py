"""Demo training of the tiny image U-Net (CPU, ~30 min); needs the demo VAE first.

  python scripts/train.py --config=configs/demo_train_image.py --workdir=runs/demo/image_unet

128 px synthetic crops (latent 16 x 16; regions of 48-384 px, so some crops hold many
labels and some lie inside one), conditioned on one label present in the crop
as `(labels == l) * l` at latent resolution (the sampler's per-label form), the mask
zeroed half the time. Latents are the VAE's divided by the latent scale stored with it.
Sample with a matching --patch_size (e.g. 128). Fields not set here keep their
`TrainConfig` default (tiled_ldm_jax/training/config.py).
"""

import os

from tiled_ldm_jax import training


def get_config():
  config = training.default_config()
  config.task = 'image_unet'             # what to train: image_unet | mask_unet | vae
  config.model = os.path.join(os.path.dirname(__file__), 'demo_image_unet.py')  # model
  config.steps = 6000                    # total optimizer steps (~35 min on 2 cores)
  config.batch_size = 16                 # examples per step
  config.image_size = 128                # crop side in pixels (latent 16 x 16)
  config.lr = 1e-3                       # peak learning rate
  config.ema_every = 1                   # EMA update period (original: 10; short run here)
  config.ema_warmup = 100                # EMA = params before this step
  config.save_every = 250                # checkpoint period in steps
  config.region_size_max = 384.0         # region size log-uniform in [48, 384] per example:
                                         # crops with many labels and crops inside one
                                         # (measured: a model trained on 48 only left
                                         # large regions blank)
  config.vae = 'runs/demo/vae/model'     # trained VAE folder (relative to the working dir)
  return config
