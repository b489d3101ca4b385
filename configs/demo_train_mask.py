"""Demo training of the tiny mask U-Net (CPU, minutes); needs the demo VAE first.

  python scripts/train.py --config=configs/demo_train_mask.py --workdir=runs/demo/mask_unet

Mask images are synthetic label maps at 1/4 of the image scale (128 px crops, the
sampler's default mask patch), rendered labels / 4 as grey RGB and encoded by the VAE;
the class is the layout class of the example, dropped half the time.
"""


def get_config():
  return {
      'task': 'mask_unet',               # what to train: image_unet | mask_unet | vae
      'model': 'demo_mask_unet.py',      # model config (relative to this file's folder)
      'steps': 1500,                     # total optimizer steps (~15 min on 2 busy cores)
      'batch_size': 16,                  # examples per step
      'image_size': 128,                 # mask crop side in pixels (latent 16 x 16)
      'lr': 1e-3,                        # peak learning rate
      'warmup_frac': 0.1,                # fraction of steps rising to the peak
      'adam_b1': 0.9,                    # Adam first-moment decay
      'adam_b2': 0.99,                   # Adam second-moment decay
      'grad_clip': 1.0,                  # clip gradients to this global norm
      'ema_decay': 0.995,                # EMA decay per update (DiffInfinite's)
      'ema_every': 1,                    # EMA update period (original: 10; short run here)
      'ema_warmup': 100,                 # EMA = params before this step
      'save_every': 250,                 # checkpoint period in steps
      'keep_checkpoints': 2,             # newest checkpoints kept
      'log_every': 50,                   # progress log period in steps
      'seed': 0,                         # init, data order and per-step randomness
      'data': 'synthetic',               # 'synthetic' or a folder of name.jpg + name_mask.png
      'num_labels': 5,                   # label ids 0..4 (mask images are labels / 4)
      'num_layout_classes': 2,           # synthetic layout classes = mask U-Net classes
      'region_size': 256.0,              # synthetic region size in image pixels: 64 px in
                                         # the mask; CleanMask's boundary removal and 6x6
                                         # min filter keep 81% of such regions (48: 22%)
      'mask_downscale': 4,               # masks at 1/4 scale (regions 64 px)
      'vae': 'runs/demo/vae/model',      # trained VAE folder (relative to the working dir)
      'latent_scale': 50.0,              # diffusion latent = VAE latent / 50 (as the sampler)
      'latent_sample': False,            # encode with the posterior mean
      'cond_drop_prob': 0.5,             # probability of the null class (guidance training)
  }
