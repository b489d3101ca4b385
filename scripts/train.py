"""Trains one of the demo networks (image U-Net, mask U-Net, VAE); see configs/demo_train_*.py.

  python scripts/train.py --config=configs/demo_train_vae.py --workdir=runs/demo/vae
  python scripts/train.py --config=configs/demo_train_image.py --workdir=runs/demo/image_unet \
      [--steps=N] [--resume] [--set=vae=/path/to/vae/model --set=batch_size=8]

Checkpoints go to <workdir>/checkpoints, progress to the log and <workdir>/metrics.jsonl,
and at the end the EMA params to <workdir>/model (load it like a converted checkpoint).
"""

import json
import sys

from absl import app
from absl import flags

from tiled_ldm_jax import train
from tiled_ldm_jax.models import configs

flags.DEFINE_string('config', None, 'Training config file (configs/demo_train_*.py).')
flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, metrics, exported model.')
flags.DEFINE_integer('steps', None, 'Total steps (overrides the config).')
flags.DEFINE_bool('resume', False, 'Continue from the newest checkpoint in --workdir.')
flags.DEFINE_multi_string('set', [], 'Override a config field: --set=key=value.')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    summary = train.run(FLAGS.config, FLAGS.workdir, steps=FLAGS.steps, resume=FLAGS.resume,
                        overrides=FLAGS.set)
  except (train.WorkdirError, configs.ConfigError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  print(json.dumps(summary))


if __name__ == '__main__':
  app.run(main)
