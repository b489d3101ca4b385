"""Measures a demo output against the real image: adherence per class and stain colours.

  pip install -e ".[demo_data]"          # scikit-image: rgb2hed and the real image
  python scripts/sample_large_image.py   # the default demo output, results/large
  python tools/measure_demo.py --sample=results/large/sample0000.png

Prints two markdown tables (docs/demo.md):

1. Adherence (`evaluation.adherence`, the bundled classifier fit on the real image
   through the demo VAE, `tools/fit_demo_adherence.py`): per class the pure 16 px
   patches of the sample's mask that the classifier reads as their label; beside it the
   same against the shifted-label mask (1 -> 2 -> 3 -> 1: `adherence.shift_labels`), the
   chance level of a random guess (1/3) and the majority baseline (every patch read as
   the most frequent class: that class's share of the scored patches).
2. Stain colours: per class, the mean and standard deviation over pixels of the
   hematoxylin (H) and DAB (D) optical densities (`skimage.color.rgb2hed`) of the
   sample's pixels under its mask, beside the real image's under its label map (and the
   real image's VAE round trip: what the decoder can reproduce at best).
"""

from __future__ import annotations

from absl import app
from absl import flags
import numpy as np

from tiled_ldm_jax import demo
from tiled_ldm_jax import masks
from tiled_ldm_jax.evaluation import adherence
from tiled_ldm_jax.evaluation import seams
from tiled_ldm_jax.files import image_files
from tiled_ldm_jax.files import label_maps

_SAMPLE = flags.DEFINE_string('sample', 'results/large/sample0000.png', 'demo output image')
_MASK = flags.DEFINE_string('mask', None, 'its label PNG (default <sample>_mask.png)')
_TILE = flags.DEFINE_integer('tile', demo.PATCH_SIZE, 'decode tile for the seam ratio')

SCORED = (1, 2, 3)
NAMES = {1: 'epithelium (DAB)', 2: 'stroma', 3: 'lumen/background'}


def stain_stats(rgb: np.ndarray, labels: np.ndarray) -> dict:
  """{label: (mean H, std H, mean D, std D, pixels)} over the pixels of each label."""
  from skimage import color  # pylint: disable=g-import-not-at-top
  hed = color.rgb2hed(rgb)
  out = {}
  for l in SCORED:
    sel = labels == l
    if sel.any():
      h, d = hed[..., 0][sel], hed[..., 2][sel]
      out[l] = (h.mean(), h.std(), d.mean(), d.std(), int(sel.sum()))
  return out


def main(argv):
  del argv
  try:
    from skimage import data  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit('this tool needs scikit-image: pip install -e ".[demo_data]"') from None
  stem = _SAMPLE.value[:-4]
  img = image_files.read_rgb(_SAMPLE.value, what='sample')
  labels = label_maps.read_label_png(_MASK.value or stem + '_mask.png')
  clf = adherence.load_classifier(demo.classifier_path())
  right = adherence.mask_adherence(img, labels, clf)
  wrong = adherence.mask_adherence(img, adherence.shift_labels(labels, SCORED), clf)
  counts = {l: right['per_label'].get(l, [0, 0])[1] for l in SCORED}
  n = sum(counts.values())
  print(f'sample {_SAMPLE.value}: {img.shape[1]} x {img.shape[0]}, seam ratio '
        f'{seams.seam_ratio(img.astype(np.float32) / 255, _TILE.value):.2f} (tile {_TILE.value})')
  print('\n| class | patches | adherence | shifted-label mask |\n|---|---|---|---|')
  for l in SCORED:
    a, t = right['per_label'].get(l, [0, 0])
    shifted_label = adherence.shift_labels(np.array([l]), SCORED)[0]
    w = wrong['per_label'].get(int(shifted_label), [0, 0])
    print(f'| {l} {NAMES[l]} | {t} | {a / max(t, 1):.3f} ({a}/{t}) | '
          f'{w[0] / max(w[1], 1):.3f} |')
  print(f'| all | {right["patches"]} | **{right["adherence"]:.3f}** | '
        f'{wrong["adherence"]:.3f} |')
  print(f'\nchance (random guess of 3 classes) 0.333; majority baseline '
        f'{max(counts.values()) / max(n, 1):.3f} (class {max(counts, key=counts.get)})')

  real = np.asarray(data.immunohistochemistry())
  real_labels = label_maps.read_label_png(demo.mask_path())
  from tiled_ldm_jax.models import checkpoint  # pylint: disable=g-import-not-at-top
  _, vae_cfg, vae_params = checkpoint.load_model(demo.model_path('vae'), expect='vae')
  rt = adherence.vae_round_trip(vae_cfg, vae_params)
  recon = np.round(rt(real.astype(np.float32) / 255) * 255).astype(np.uint8)
  rows = {'real image': stain_stats(real, real_labels),
          'real through the VAE': stain_stats(recon, real_labels),
          'demo output': stain_stats(img, labels)}
  print('\n| class | pixels of | H mean | H std | DAB mean | DAB std | pixels |')
  print('|---|---|---|---|---|---|---|')
  for l in SCORED:
    for what, st in rows.items():
      if l in st:
        hm, hs, dm, ds, px = st[l]
        print(f'| {l} {NAMES[l]} | {what} | {hm:.4f} | {hs:.4f} | {dm:.4f} | {ds:.4f} | {px} |')


if __name__ == '__main__':
  app.run(main)
