"""Compares sampler options side by side; prints one JSON line per run, then a summary.

  # random vs grid (margin 0 and P/8): coverage, seconds, adherence, seams (demo models)
  python tools/compare_sampling.py --compare=schedules --image_size=1024 --seeds=0,1,2
  # float32 vs bfloat16: PSNR of the decoded image and seconds
  python tools/compare_sampling.py --compare=dtype --image_size=512
  # DPM-Solver++(2M) at 10/15/20 steps and DDIM at 10/20/50 against DDIM at 250 (eta 0):
  # PSNR, adherence, line score, U-Net work
  python tools/compare_sampling.py --compare=solvers --image_size=512 --seeds=0,1
  # ... untiled (one window over the whole latent: no window layout differs between runs)
  python tools/compare_sampling.py --compare=solvers --image_size=256 --patch_size=256 \
      --schedule=random --seeds=0,1

Adherence is only meaningful for models trained on the synthetic textures (the demo
models); with other models it is reported but means nothing.
"""

import collections
import json

from absl import flags
import numpy as np

from tiled_ldm_jax import flag_util
from tiled_ldm_jax import pipeline
from tiled_ldm_jax.evaluation import benchmark
from tiled_ldm_jax.evaluation import compare

_COMPARE = flags.DEFINE_enum('compare', 'schedules', ['schedules', 'dtype', 'solvers'],
                             'What to compare.')
_UNET = flags.DEFINE_string('unet_ckpt', None, 'Image model folder (default: the demo model).')
_VAE = flags.DEFINE_string('vae_ckpt', None, 'VAE folder (default: the demo VAE).')
_SIZE = flags.DEFINE_integer('image_size', 1024, 'Image side in pixels.')
_PATCH = flags.DEFINE_integer('patch_size', None, 'Patch side in px (default: the model\'s).')
_STEPS = flags.DEFINE_integer('sampling_steps', 20, 'DDIM steps.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (dtype: the first only).')
_SCHEDULE = flags.DEFINE_enum('schedule', None, ['random', 'grid'], 'solvers, dtype: the '
                              'placement (random: one window per iteration; default grid).')
_MARGINS = flags.DEFINE_list('grid_margins', None, 'schedules: grid margins in px to compare '
                             '(default: 0 and patch_size / 8).')
_LEVELS = flags.DEFINE_list('grid_margin_levels', None, 'schedules: also each grid margin > 0 '
                            'in only the last this many levels.')
_CACHE = flag_util.define_compilation_cache_flag()


def _summary(rows, key):
  groups = collections.defaultdict(list)
  for r in rows:
    groups[key(r)].append(r)
  return [{'variant': k, 'runs': len(g),
           **{f: float(np.mean([r[f] for r in g])) for f in g[0]
              if isinstance(g[0][f], float)}} for k, g in groups.items()]


def main(argv):
  del argv
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError:
    raise ValueError(f'--seeds must be integers, got {_SEEDS.value}') from None
  flag_util.use_compilation_cache(_CACHE.value)
  pipe = pipeline.Pipeline.from_pretrained(_UNET.value, _VAE.value)
  if _UNET.value:
    labels = benchmark.benchmark_label_map(_SIZE.value, _SIZE.value,
                                           pipe.unet.config.num_classes)
  else:
    labels = compare.demo_labels(_SIZE.value)
  options = dict(sampling_steps=_STEPS.value)
  if _PATCH.value:
    options['patch_size'] = _PATCH.value
  if _SCHEDULE.value:
    options['schedule'] = _SCHEDULE.value
    if _SCHEDULE.value == 'random':
      options['patches_per_step'] = 1
  o = pipe.resolve(**options)
  pipe.request(labels.shape, 1, o)   # checks the sizes
  if _COMPARE.value == 'schedules':
    try:
      margins = [int(m) for m in _MARGINS.value or (0, o.patch_size // 8)]
    except ValueError:
      raise ValueError(f'--grid_margins must be integers, got {_MARGINS.value}') from None
    try:
      levels = [int(v) for v in _LEVELS.value or ()]
    except ValueError:
      raise ValueError(f'--grid_margin_levels must be integers, got {_LEVELS.value}') from None
    variants = [dict(schedule='random', patches_per_step=1, grid_margin=0)]
    for m in margins:
      variants.append(dict(schedule='grid', grid_margin=m))
      variants += [dict(schedule='grid', grid_margin=m, grid_margin_levels=l)
                   for l in levels if m]
    for v in variants:
      pipe.request(labels.shape, 1, o, **v)
    rows = compare.compare_schedules(pipe, labels, seeds, variants, **options)
    summary = _summary(rows, lambda r: f"{r['schedule']} margin {r['grid_margin']} "
                                       f"levels {r['grid_margin_levels']}")
  elif _COMPARE.value == 'solvers':
    rows = compare.compare_solvers(pipe, labels, seeds, **options)
    summary = _summary(rows, lambda r: f"{r['solver']} {r['sampling_steps']}")
  else:
    rows = compare.compare_dtypes(pipe, labels, seeds[0], **options)
    summary = []
  for r in rows + summary:
    print(json.dumps(r))


if __name__ == '__main__':
  flag_util.run(main, {'unet_ckpt': 'model', 'vae_ckpt': 'model', 'image_size': 'int>0',
                       'patch_size': 'int>0', 'sampling_steps': 'int>0'})
