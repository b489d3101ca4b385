"""Generates large images: mask model (or --mask) -> image model -> tiled decode -> files.

  python scripts/sample_large_image.py --unet_ckpt=/tmp/image_unet --vae_ckpt=/tmp/vae \
      --mask_unet_ckpt=/tmp/mask_unet --image_size=2048 --imgs_path=./results/large

Writes sampleNNNN.<ext>, sampleNNNN_mask.png (label ids) and sampleNNNN.json under
--imgs_path, numbering after the samples already there. Bad input is reported in one
line before anything is computed.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from tiled_ldm_jax import decode
from tiled_ldm_jax import pipeline
from tiled_ldm_jax import sharding


flags.DEFINE_integer('n_images', 1, 'Images to generate.')
flags.DEFINE_integer('batch_size', 1, 'Images sampled together (n_images must be a multiple).')
flags.DEFINE_integer('label', 1, 'Class the mask model lays out (ignored with --mask).')
flags.DEFINE_integer('image_size', 1024, 'Image side in pixels (multiple of 8).')
flags.DEFINE_float('cond_scale', 3.0, 'Image guidance w: null + (1+w)(cond - null).')
flags.DEFINE_float('mask_cond_scale', 0.0, 'Mask model guidance (the original uses 0).')
flags.DEFINE_integer('sampling_steps', 50, 'DDIM steps for both stages.')
flags.DEFINE_string('imgs_path', './results/large', 'Output folder.')
flags.DEFINE_integer('patch_size', None, 'Image model patch and decode tile, pixels '
                     '(default 512; 128 with the demo models).')
flags.DEFINE_integer('mask_patch_size', None, 'Mask model patch and decode tile, pixels '
                     '(default 128).')
flags.DEFINE_integer('patches_per_step', 1, 'Non-overlapping patches per sampler iteration.')
flags.DEFINE_integer('seed', 0, 'Root PRNG seed; image n uses fold_in(seed, n).')
flags.DEFINE_string('mask', None, 'PNG of label ids (any size; resized nearest), or '
                    '"demo" for the bundled one. Replaces the mask model.')
flags.DEFINE_string('unet_ckpt', None, 'Converted image model folder (none of the three: demo models).')
flags.DEFINE_string('mask_unet_ckpt', None, 'Converted mask model folder.')
flags.DEFINE_string('vae_ckpt', None, 'Converted VAE folder.')
flags.DEFINE_enum('output_format', 'png', list(pipeline.FORMATS), 'Image file format.')
flags.DEFINE_float('eta', 1.0, 'DDIM eta (0: deterministic given the initial noise).')
flags.DEFINE_integer('tile_batch', 4, 'VAE tiles per decoder call.')
flags.DEFINE_enum('blend_mode', 'original', list(decode.BLEND_MODES),
                  'Tiled decode blend: original (the original\'s, for parity) or partition '
                  '(weights that leave no residual seam).')
flags.DEFINE_integer('progress_every', 50, 'Sampler progress log period in iterations.')
flags.DEFINE_integer('checkpoint_every', 0, 'Save the sampler state every N iterations under '
                     'imgs_path/checkpoint (0: off).')
flags.DEFINE_integer('devices', 0, 'Devices to shard the batch/patches over (0: all).')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0 '
                    '(GPU hosts; TPU pods and SLURM read the environment).')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with the flags '
                  'above or, if they are unset, from the environment (TPU pod slices).')
flags.DEFINE_bool('resume', False, 'Continue the run saved under imgs_path/checkpoint '
                  '(same flags required).')

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.distributed or FLAGS.coordinator_address:
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
  names = [f.name for f in pipeline.GenerationConfig.__dataclass_fields__.values()
           if f.name in FLAGS]
  cfg = pipeline.GenerationConfig(**{name: FLAGS[name].value for name in names})
  try:
    prepared = pipeline.validate(cfg)
  except (ValueError, OSError) as e:  # bad input: one line, before any compute
    sys.exit(f'error: {e}')
  records = pipeline.generate(prepared.cfg, flags_used={n: FLAGS[n].value for n in names},
                              prepared=prepared)
  for r in records:
    logging.info('sample%04d: %s', r['sample'], r['seconds'])
  if not sharding.is_writer():
    return
  print(f'wrote {len(records)} image(s) to {prepared.cfg.imgs_path}: ' +
        ', '.join(r['files']['image'] for r in records))


if __name__ == '__main__':
  app.run(main)
