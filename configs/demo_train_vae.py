"""Demo training of the tiny VAE on the real tissue image (CPU, minutes).

  python tools/make_demo_data.py --out=data/demo_tissue     # once; needs .[demo_data]
  python scripts/train.py --config=configs/demo_train_vae.py --workdir=runs/demo/vae

The data are the eight flips/rotations of scikit-image's immunohistochemistry image
and its label map (tools/make_demo_data.py, docs/demo.md); batches mix random 64 px
crops of the image and of the 1/4-scale label maps rendered as the mask model's grey
images.

Exports the EMA params to <workdir>/model, rescaled so the latent means have std
`export_latent_std` per channel; with the exported latent scale (`export_latent_scale`,
default 50, stored in the VAE's model.json) the diffusion models then see latents of
std export_latent_std / 50. 16 puts 99.9% of them inside [-1, 1], where DDIM clips its
x0 estimate (measured: 50 left 25% outside and the image model's samples washed out; 10
halves the signal-to-noise ratio). Train this first: the U-Net configs encode with
runs/demo/vae/model. Fields not set here keep their `TrainConfig` default
(tiled_ldm_jax/training/config.py); any field can be overridden, e.g.
`--config.steps=3 --config.batch_size=2`.
"""

import os

from tiled_ldm_jax import training


def get_config():
  config = training.default_config()
  config.task = 'vae'                    # what to train: image_unet | mask_unet | vae
  config.model = os.path.join(os.path.dirname(__file__), 'demo_vae.py')  # model config
  config.steps = 800                     # total optimizer steps (see docs/demo.md for the time)
  config.batch_size = 8                  # examples per step (a quarter of them mask images)
  config.image_size = 64                 # training crop side in pixels (multiple of 8)
  config.lr = 2e-3                       # peak learning rate
  config.ema_decay = 0.99                # EMA decay per update (short run: short memory)
  config.ema_every = 1                   # EMA update period in steps
  config.ema_warmup = 100                # EMA = params before this step
  config.save_every = 250                # checkpoint period in steps
  config.export_latent_std = 16.0        # exported per-channel latent std (see above)
  config.data = 'data/demo_tissue'       # tools/make_demo_data.py's folder (working dir)
  config.augment = False                 # the folder already holds the 8 flips/rotations
  return config
