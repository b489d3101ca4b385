"""Demo training of the tiny VAE on synthetic histology-like data (CPU, minutes).

  python scripts/train.py --config=configs/demo_train_vae.py --workdir=runs/demo/vae

Exports the EMA params to <workdir>/model, rescaled so the latent means have std
`export_latent_std` per channel: with the sampler's latent_scale 50 the diffusion
models then see latents of std export_latent_std / 50. 16 puts 99.9% of them inside
[-1, 1], where DDIM clips its x0 estimate (measured: 50 left 25% outside and the image
model's samples washed out; 10 halves the signal-to-noise ratio). Train this first:
the U-Net configs encode with runs/demo/vae/model.
"""


def get_config():
  return {
      'task': 'vae',                     # what to train: image_unet | mask_unet | vae
      'model': 'demo_vae.py',            # model config (relative to this file's folder)
      'steps': 1800,                     # total optimizer steps (~15 min on 2 busy cores)
      'batch_size': 8,                   # examples per step
      'image_size': 64,                  # training crop side in pixels (multiple of 8)
      'lr': 2e-3,                        # peak learning rate
      'warmup_frac': 0.1,                # fraction of steps rising to the peak
      'adam_b1': 0.9,                    # Adam first-moment decay
      'adam_b2': 0.99,                   # Adam second-moment decay
      'grad_clip': 1.0,                  # clip gradients to this global norm
      'ema_decay': 0.99,                 # EMA decay per update (short run: short memory)
      'ema_every': 1,                    # EMA update period in steps
      'ema_warmup': 100,                 # EMA = params before this step
      'save_every': 250,                 # checkpoint period in steps
      'keep_checkpoints': 2,             # newest checkpoints kept
      'log_every': 50,                   # progress log period in steps
      'seed': 0,                         # init, data order and per-step randomness
      'data': 'synthetic',               # 'synthetic' or a folder of name.jpg + name_mask.png
      'num_labels': 5,                   # label ids 0..4 (mask images are labels / 4)
      'num_layout_classes': 2,           # synthetic layout classes
      'region_size': 48.0,               # synthetic region size in image pixels
      'mask_downscale': 4,               # mask images: label maps at 1/4 scale
      'recon_loss': 'l1',                # reconstruction loss: l1 | l2
      'kl_weight': 1e-4,                 # weight of the mean KL to N(0, I)
      'mask_image_fraction': 0.25,       # share of each batch that is mask images
      'export_latent_std': 16.0,         # exported per-channel latent std (0: as trained)
      'latent_stats_batches': 8,         # batches measuring the latent statistics
  }
