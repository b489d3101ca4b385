"""Benchmarks the patch sampler on an image model; prints one JSON line.

  python tools/benchmark_sampler.py --unet_ckpt=/tmp/image_unet --image_size=256 \
      --patch_size=128 --sampling_steps=20 --cond_scale=3 --patches_per_step=1
  # no checkpoint: random weights in the released model's shapes (GPU/TPU benchmark)
  python tools/benchmark_sampler.py --full_size --image_size=2048 --patch_size=512 \
      --sampling_steps=50 --schedule=grid --dtype=bfloat16
"""

import json
import os
import sys

from absl import flags

from tiled_ldm_jax.evaluation import benchmark
from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax.models import config_files
from tiled_ldm_jax import flag_util
from tiled_ldm_jax import geometry
from tiled_ldm_jax import request
from tiled_ldm_jax.models import unet as unet_lib

_CKPT = flags.DEFINE_string('unet_ckpt', None, 'Converted image model folder.')
_FULL = flags.DEFINE_bool('full_size', False, 'Instead of --unet_ckpt: random weights in the '
                          'shapes of --unet_config (default: the released 5-class model).')
_UNET_CONFIG = flags.DEFINE_string('unet_config', 'configs/image_unet_5class.py',
                                   '--full_size: the model config file.')
_COUNT = flags.DEFINE_bool('count_only', False, 'Do not run the U-Net: count the patch '
                           'iterations, U-Net samples and FLOPs the run needs (a zero model).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'U-Net compute dtype (params and sampler state stay float32).')
_SIZE = flags.DEFINE_integer('image_size', 256, 'Image side in pixels.')
_PATCH = flags.DEFINE_integer('patch_size', 128, 'Patch side in pixels.')
_STEPS = flags.DEFINE_integer('sampling_steps', 20, 'DDIM sampling steps.')
_W = flags.DEFINE_float('cond_scale', 3.0, 'Guidance weight w: null + (1+w)(cond-null).')
_K = flags.DEFINE_integer('patches_per_step', None, 'Windows per image per iteration '
                         '(default, or 0: the commands\' default, `request.Options`).')
_BATCH = flags.DEFINE_integer('batch_size', 1, 'Images sampled together.')
_SEED = flags.DEFINE_integer('seed', 0, 'Root PRNG seed.')
_SCHEDULE = flags.DEFINE_enum('schedule', None, ['random', 'grid'],
                              'Window placement (default: the commands\').')
_MARGIN = flags.DEFINE_integer('grid_margin', None, 'Grid: pixels of context per side '
                               '(default: the commands\').')
_MARGIN_LEVELS = flags.DEFINE_integer('grid_margin_levels', None, 'Grid: the margin only in '
                                      'the last this many levels (default: the commands\').')
_CACHE = flag_util.define_compilation_cache_flag()
_MARGIN_FIRST = flags.DEFINE_integer('grid_margin_first_levels', None, 'Grid: the margin also '
                                     'in the first this many levels (default: the commands\').')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs after the compile run.')
_DEVICES = flags.DEFINE_integer('devices', 1, 'If > 1: seconds per image on 1 device vs this '
                                'many (the batch split over them) and the scaling efficiency.')
_ORIG_REPO = flags.DEFINE_string('original_repo', None, 'Also time the original PyTorch '
                                 'sampler from this DiffInfinite checkout (never shipped).')
_ORIG_CKPT = flags.DEFINE_string('original_checkpoint', None,
                                 'The model-N.pt the converted --unet_ckpt came from.')
_ORIG_CONFIG = flags.DEFINE_string('original_config', None, 'Its config.json.')
_ORIG_THREADS = flags.DEFINE_integer('original_threads', 2, 'torch threads for the original.')


def _model():
  """(config, params) of the checkpoint, or random ones of the config file's shapes.
  ValueError / OSError become one `error:` line (flag_util.run)."""
  if _FULL.value == bool(_CKPT.value):
    raise ValueError('give exactly one of --unet_ckpt and --full_size')
  if _CKPT.value:
    _, config, params = checkpoint.load_model(_CKPT.value, expect='image_unet')
    return config, params
  kind, config = config_files.load_model_config(_UNET_CONFIG.value)
  if kind != 'image_unet':
    raise ValueError(f'{_UNET_CONFIG.value} is a {kind} config, not an image_unet one')
  import jax  # pylint: disable=g-import-not-at-top
  if _COUNT.value:    # shapes are enough to count FLOPs
    return config, unet_lib.abstract_params(config)
  return config, jax.jit(unet_lib.init_params, static_argnums=0)(config, jax.random.key(0))


def _placement() -> dict:
  """Schedule, K, margin (latent pixels) and margin levels: the flags given, else the
  defaults of the commands and the API (`request.Options`, `request.window_fields`)."""
  given = {'schedule': _SCHEDULE.value, 'patches_per_step': _K.value or None,   # 0: default
           'grid_margin': _MARGIN.value, 'grid_margin_levels': _MARGIN_LEVELS.value,
           'grid_margin_first_levels': _MARGIN_FIRST.value}
  o = request.Options(patch_size=_PATCH.value, sampling_steps=_STEPS.value,
                       **{k: v for k, v in given.items() if v is not None})
  f = geometry.LatentGeometry().factor
  margin = request.stage_margin(o, _PATCH.value, f)
  if margin % f:
    raise ValueError(f'--grid_margin must be a multiple of {f} pixels, got {margin}')
  side = _SIZE.value // f
  return request.window_fields(o, _PATCH.value, f, (side, side))


def main(argv):
  del argv
  flag_util.use_compilation_cache(_CACHE.value)
  config, params = _model()
  placement = _placement()
  kwargs = dict(image_size=_SIZE.value, patch_size=_PATCH.value, sampling_steps=_STEPS.value,
                cond_scale=_W.value, seed=_SEED.value, repeats=_REPEATS.value,
                patches_per_step=placement.pop('patches_per_step'))
  if _COUNT.value:
    result = benchmark.count_work(config, params, **placement, **kwargs)
  elif _DEVICES.value > 1:
    result = benchmark.run_scaling_benchmark(
        config, params, devices=_DEVICES.value,
        batch_size=_BATCH.value if _BATCH.value > 1 else None, **placement, **kwargs)
  else:
    result = benchmark.run_sampler_benchmark(config, params, batch_size=_BATCH.value,
                                             dtype=_DTYPE.value, **placement, **kwargs)
    if _ORIG_REPO.value:   # side by side, in the same process and conditions
      sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
      import original_sampler  # pylint: disable=g-import-not-at-top
      labels = benchmark.benchmark_label_map(_SIZE.value, _SIZE.value, config.num_classes)
      orig = original_sampler.time_original(
          _ORIG_REPO.value, _ORIG_CKPT.value, _ORIG_CONFIG.value, labels, _PATCH.value,
          _STEPS.value, _W.value, _SEED.value, repeats=1, num_threads=_ORIG_THREADS.value)
      result.update({k: v for k, v in orig.items() if k.startswith('original_') or
                     k == 'torch_version'})
      result['speedup_vs_original'] = orig['original_seconds'] / result['seconds']
  print(json.dumps(result))


if __name__ == '__main__':
  flag_util.run(main, {
      'unet_ckpt': 'model', 'image_size': 'int>0', 'patch_size': 'int>0', 'sampling_steps': 'int>0',
      'cond_scale': 'finite', 'patches_per_step': 'int>=0', 'batch_size': 'int>0',
      'grid_margin': 'int>=0', 'grid_margin_levels': 'int>=0',
      'grid_margin_first_levels': 'int>=0', 'repeats': 'int>0', 'devices': 'int>0',
      'original_repo': 'dir', 'original_checkpoint': 'file', 'original_config': 'file',
      'original_threads': 'int>0'})
