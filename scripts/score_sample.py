"""Scores a generated sample: mask adherence and seam ratio, as one JSON line.

  python scripts/score_sample.py --sample=results/large/sample0000.png

Mask adherence (`tiled_ldm_jax.evaluation.adherence`): a nearest-centroid classifier labels
16 px patches of the image; the score is the fraction of pure, non-zero-label patches
whose predicted class is their mask label (chance ~ 1 / (scored labels)). For samples
decoded by the bundled demo VAE it is the bundled classifier, fit on the real tissue
image through that VAE (tools/fit_demo_adherence.py); for other VAEs one fit on the
synthetic textures (`training/data.py`) through the sample's VAE. The
seam ratio (`seams.seam_ratio`) is ~1 without seams at the decoder's tile lines; the line
score (`seams.line_score`) sees straight lines anywhere, such as the sampler's window
borders: compare it with an untiled sample's (`tools/compare_seams.py`, docs/generate.md).
Adherence is only meaningful for the demo models and for models trained on the
synthetic textures. Mask, VAE, tile and label count default to the sample's JSON.
"""

import json

from absl import flags

from tiled_ldm_jax import flag_util
from tiled_ldm_jax.evaluation import adherence

_SAMPLE = flags.DEFINE_string('sample', None, 'Image written by sample_large_image.py.')
_MASK = flags.DEFINE_string('mask', None, 'Label PNG (default: <sample>_mask.png).')
_VAE = flags.DEFINE_string('vae_ckpt', None, 'VAE folder (default: from the sample JSON).')
_TILE = flags.DEFINE_integer('tile', None, 'Decode tile in px (default: the JSON patch_size).')
_LABELS = flags.DEFINE_integer('num_labels', None, 'Label count (default: the image model\'s).')
flags.mark_flags_as_required(['sample'])
_CACHE = flag_util.define_compilation_cache_flag()


def main(argv):
  del argv
  flag_util.use_compilation_cache(_CACHE.value)
  print(json.dumps(adherence.score_files(_SAMPLE.value, mask_path=_MASK.value,
                                         vae_dir=_VAE.value, tile=_TILE.value,
                                         num_labels=_LABELS.value)))


if __name__ == '__main__':
  flag_util.run(main, {'sample': 'file', 'mask': 'file', 'vae_ckpt': 'model',
                      'tile': 'int>0', 'num_labels': 'int>0'})
