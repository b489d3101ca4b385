"""Demo training of the tiny image U-Net (CPU, ~30 min); needs the demo VAE first.

  python scripts/train.py --config=configs/demo_train_image.py --workdir=runs/demo/image_unet

128 px synthetic crops (latent 16 x 16; regions of 48-384 px, so some crops hold many
labels and some lie inside one), conditioned on one label present in the crop
as `(labels == l) * l` at latent resolution (the sampler's per-label form), the mask
zeroed half the time. Sample with a matching --patch_size (e.g. 128).
"""


def get_config():
  return {
      'task': 'image_unet',              # what to train: image_unet | mask_unet | vae
      'model': 'demo_image_unet.py',     # model config (relative to this file's folder)
      'steps': 6000,                     # total optimizer steps (~35 min on 2 cores)
      'batch_size': 16,                  # examples per step
      'image_size': 128,                 # crop side in pixels (latent 16 x 16)
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
      'augment': True,                   # folder data: random flips and 90-degree rotations
      'num_labels': 5,                   # label ids 0..4 (= the U-Net's num_classes)
      'num_layout_classes': 2,           # synthetic layout classes
      'region_size': 48.0,               # synthetic region size in image pixels, drawn
      'region_size_max': 384.0,          # log-uniform in [48, 384] per example: crops with
                                         # many labels and crops inside one (measured: a
                                         # model trained on 48 only left large regions blank)
      'vae': 'runs/demo/vae/model',      # trained VAE folder (relative to the working dir)
      'latent_scale': 50.0,              # diffusion latent = VAE latent / 50 (as the sampler)
      'latent_sample': False,            # encode with the posterior mean
      'cond_drop_prob': 0.5,             # probability of the all-zero mask (guidance training)
      'single_label_cond': True,         # condition on one present label (sampler's form)
  }
