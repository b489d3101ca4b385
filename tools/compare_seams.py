"""Seams of sampler variants against the untiled floor; one JSON line per run, a summary,
and a figure (demo models by default).

  python tools/compare_seams.py --image_size=512 --labels=2,3 --seeds=0,1,2 \
      --steps=10,20,50 --variants='{"default": {}}' --out_dir=/tmp/seams \
      --figure=docs/seams.jpg

`--variants`: a JSON object, name -> `Options` overrides (e.g. {"m16": {"grid_margin":
16}}). Each variant's floor is the same label, seed, steps and solver sampled untiled
(one window over the whole latent), decoded like the others.
"""

import json

from absl import flags

from tiled_ldm_jax import flag_util
from tiled_ldm_jax import pipeline
from tiled_ldm_jax.evaluation import seam_study

_UNET = flags.DEFINE_string('unet_ckpt', None, 'Image model folder (default: the demo model).')
_VAE = flags.DEFINE_string('vae_ckpt', None, 'VAE folder (default: the demo VAE).')
_SIZE = flags.DEFINE_integer('image_size', 512, 'Image side in pixels.')
_LABELS = flags.DEFINE_list('labels', ['2', '3'], 'Labels, one image of each everywhere.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
_STEPS = flags.DEFINE_list('steps', ['10', '20', '50'], 'Sampling steps.')
_VARIANTS = flags.DEFINE_string('variants', '{"default": {}}', 'JSON: name -> Options '
                                'overrides.')
_OUT = flags.DEFINE_string('out_dir', None, 'Folder for the images (needed by --figure).')
_FIGURE = flags.DEFINE_string('figure', None, 'Write a figure of the first label and seed.')
_FIGURE_VARIANTS = flags.DEFINE_list('figure_variants', None, 'Variants (rows) in the figure '
                                     '(default all, the untiled floors included).')
_FROM_LOG = flags.DEFINE_string('from_log', None, 'Only draw --figure from the rows of an '
                                'earlier run\'s output (its --out_dir images).')
_CACHE = flag_util.define_compilation_cache_flag()


def _ints(name, values):
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ValueError(f'--{name} must be integers, got {values}') from None


def main(argv):
  del argv
  labels, seeds = _ints('labels', _LABELS.value), _ints('seeds', _SEEDS.value)
  steps = _ints('steps', _STEPS.value)
  try:
    variants = json.loads(_VARIANTS.value)
  except ValueError as e:
    raise ValueError(f'--variants is not JSON: {e}') from None
  if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
    raise ValueError('--variants must be a JSON object of name -> {option: value}')
  if _FIGURE.value and not _OUT.value:
    raise ValueError('--figure needs --out_dir')
  if _FROM_LOG.value:
    if not _FIGURE.value:
      raise ValueError('--from_log needs --figure')
    seam_study.figure(_OUT.value, seam_study.read_rows(_FROM_LOG.value), _FIGURE.value,
                      label=labels[0], seed=seeds[0], variants=_FIGURE_VARIANTS.value)
    return
  flag_util.use_compilation_cache(_CACHE.value)
  pipe = pipeline.Pipeline.from_pretrained(_UNET.value, _VAE.value)
  for overrides in variants.values():
    pipe.resolve(**overrides)          # bad options: one line before any sampling
  rows = seam_study.study(pipe, image_size=_SIZE.value, labels=labels, seeds=seeds,
                          steps=steps, variants=variants, out_dir=_OUT.value)
  for r in seam_study.summary(rows):
    print(json.dumps({'summary': r}))
  if _FIGURE.value:
    seam_study.figure(_OUT.value, rows, _FIGURE.value, label=labels[0], seed=seeds[0],
                      variants=_FIGURE_VARIANTS.value)


if __name__ == '__main__':
  flag_util.run(main, {'image_size': 'int>0', 'from_log': 'file'})
