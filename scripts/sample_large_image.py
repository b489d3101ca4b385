"""Generates large images: mask model (or --mask) -> image model -> tiled decode -> files.

  python scripts/sample_large_image.py --image_size=2048 --output_format=tiff
  python scripts/sample_large_image.py --unet_ckpt=/tmp/image_unet --vae_ckpt=/tmp/vae
      --mask_unet_ckpt=/tmp/mask_unet --mask=slide.geojson --mask_classes=Tumor=1,Stroma=2

Writes sampleNNNN.<ext>, sampleNNNN_mask.png (label ids, palette colours), for TIFF and
OME-Zarr sampleNNNN_overview.jpg (image and labels, small) and sampleNNNN.json under
--imgs_path, numbering after the samples already there; logs each stage's progress. Bad input is reported in one
line before anything is computed. The flags are the fields of `pipeline.Options` (how to
sample) and `generate.GenerationConfig` (what and where; defaults and help live there);
this file only parses them.
"""

import json

from absl import app
from absl import flags
from absl import logging

from tiled_ldm_jax import estimate
from tiled_ldm_jax import flag_util
from tiled_ldm_jax import generate
from tiled_ldm_jax import pipeline
from tiled_ldm_jax import progress
from tiled_ldm_jax import sharding

_FIELDS = (flag_util.define_dataclass_flags(pipeline.Options,
                                            progress_every=50)   # the CLI logs progress
           + flag_util.define_dataclass_flags(generate.GenerationConfig))
_CACHE = flag_util.define_compilation_cache_flag()
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0 '
                    '(GPU hosts; TPU pods and SLURM read the environment).')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with the flags '
                  'above or, if they are unset, from the environment (TPU pod slices).')
FLAGS = flags.FLAGS
# --help's sections (flag_util.help_text); a flag in none is listed under 'other'.
_GROUPS = (
    ('what to make', ('n_images', 'batch_size', 'image_size', 'label', 'seed', 'dry_run',
                      'preview')),
    ('models (none of the three: the bundled demo models)',
     ('unet_ckpt', 'vae_ckpt', 'mask_unet_ckpt')),
    ('inputs', ('mask', 'mask_classes', 'init_image', 'init_offset', 'strength',
                'keep_mask')),
    ('outputs', ('imgs_path', 'output_format', 'tiff_compression', 'jpeg_quality', 'mpp',
                 'checkpoint_every', 'resume', 'progress_every', 'live_preview_minutes')),
    ('sampling', ('sampling_steps', 'solver', 'cond_scale', 'mask_cond_scale', 'patch_size',
                  'mask_patch_size', 'patches_per_step', 'schedule', 'grid_margin',
                  'grid_margin_levels', 'grid_margin_first_levels', 'eta', 'resample',
                  'dtype', 'tile_batch', 'blend_mode')),
    ('devices and hosts', ('devices', 'compilation_cache_dir', 'distributed',
                           'coordinator_address', 'num_processes', 'process_id')),
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  flag_util.use_compilation_cache(_CACHE.value)
  if FLAGS.distributed or FLAGS.coordinator_address:
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
  values = {name: FLAGS[name].value for name in _FIELDS}
  # Bad input: one line (flag_util.run), before any compute. A full disk later: one line
  # too, and a sample's files appear together or not at all.
  plan = generate.prepare(generate.GenerationConfig.from_flat(**values))
  if plan.cfg.dry_run:
    if sharding.is_writer():
      out = generate.dry_run(plan)
      print(json.dumps(out))
      print(estimate.summary(out))
      if 'labels' in out:
        print(generate.label_summary(out['labels']))
    return
  records = generate.run(plan, flags_used=values)
  for r in records:
    logging.info('sample%04d: %s', r['sample'], progress.durations(r['seconds']))
  if sharding.is_writer():
    print(f'wrote {len(records)} image(s) to {plan.cfg.imgs_path}: ' +
          ', '.join(r['files']['image'] for r in records))


if __name__ == '__main__':
  flag_util.run(main, groups=_GROUPS)
