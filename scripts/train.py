"""Trains one of the demo networks (image U-Net, mask U-Net, VAE); see configs/demo_train_*.py.

  python scripts/train.py --config=configs/demo_train_vae.py --workdir=runs/demo/vae
  python scripts/train.py --config=configs/demo_train_image.py --workdir=runs/demo/image_unet \
      [--resume] [--config.steps=N --config.batch_size=8 --config.vae=/path/to/vae/model]
      [--devices=N] [--coordinator_address=host:port --num_processes=P --process_id=i]

Own data: `--config.data=` a folder of name.jpg + name_mask.png tiles, or a manifest of
whole-slide images and their QuPath annotations with `--config.mpp=` (docs/training.md).
`--config.<field>=value` overrides any `TrainConfig` field (ml_collections config flags;
types are checked, unknown fields are an error). Checkpoints go to <workdir>/checkpoints,
progress to the log and <workdir>/metrics.jsonl, and at the end the EMA params to
<workdir>/model (load it like a converted checkpoint).
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from tiled_ldm_jax import flag_util
from tiled_ldm_jax import sharding
from tiled_ldm_jax import training

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file (configs/demo_train_*.py); override fields '
    'with --config.<field>=value.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Run folder: checkpoints, metrics, exported model.')
_RESUME = flags.DEFINE_bool('resume', False, 'Continue from the newest checkpoint in --workdir.')
_DEVICES = flags.DEFINE_integer('devices', 0, 'Data-parallel over this many devices (0: all, '
                                'every process\'s in a multi-host run); the global batch '
                                '--config.batch_size must divide by it.')
_CACHE = flag_util.define_compilation_cache_flag()
flags.DEFINE_bool('distributed', False, 'Multi-host: call jax.distributed.initialize() '
                  '(arguments from the cluster environment or the flags below).')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0 '
                    '(implies --distributed).')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index.')
flags.mark_flags_as_required(['config', 'workdir'])


def _parse_flags(argv):
  """absl's flag parsing, with a clear error for an override of an unknown field (which
  ml_collections reports as a bare KeyError or AttributeError)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    known = sorted(training.default_config())
    names = [a[len('--config.'):].split('=')[0] for a in argv if a.startswith('--config.')]
    unknown = [n for n in names if n.split('.')[0] not in known] or [repr(e)]
    raise ValueError(f'unknown config field(s) {", ".join(unknown)} in --config.<field> '
                     f'overrides; TrainConfig fields: {", ".join(known)}') from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  flag_util.use_compilation_cache(_CACHE.value)
  if flags.FLAGS.distributed or flags.FLAGS.coordinator_address:
    sharding.initialize_distributed(flags.FLAGS.coordinator_address,
                                    flags.FLAGS.num_processes, flags.FLAGS.process_id)
  # WorkdirError, ConfigError, bad data, missing grain: ValueError / OSError, one line
  summary = training.run(_CONFIG.value, _WORKDIR.value, resume=_RESUME.value,
                         devices=_DEVICES.value or None)
  if sharding.is_writer():
    print(json.dumps(summary))


if __name__ == '__main__':
  flag_util.run(main, {'devices': 'int>=0'}, parse=_parse_flags)
