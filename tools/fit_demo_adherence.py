"""Fits the demo models' adherence classifier on the real image through the demo VAE.

  python tools/fit_demo_adherence.py --data=data/demo_tissue \
      --vae_ckpt=tiled_ldm_jax/demo/vae --output=tiled_ldm_jax/demo/adherence.json

Reads the folder of tools/make_demo_data.py (the image in its eight flips/rotations and
its label map; no scikit-image needed here), passes each image through the VAE (encode,
decode the posterior mean: what the decoder can reproduce, as in
`adherence.vae_round_trip`), and fits `adherence.fit_on_examples` on the pure 16 px
patches of labels 1-3. It prints, and records in the JSON's "info":
- the agreement on the fit data (VAE round trips, right mask) and against the
  shifted-label mask (`adherence.shift_labels`);
- a held-out check: fit on the top half of the image (its eight flips/rotations), scored
  on the bottom half's round trip, and the other way round.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import numpy as np

from tiled_ldm_jax.evaluation import adherence
from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax.training import data as data_lib
from tiled_ldm_jax import masks
from tiled_ldm_jax.files import label_maps

_DATA = flags.DEFINE_string('data', 'data/demo_tissue', 'tools/make_demo_data.py folder')
_VAE = flags.DEFINE_string('vae_ckpt', 'tiled_ldm_jax/demo/vae', 'VAE folder')
_OUTPUT = flags.DEFINE_string('output', 'tiled_ldm_jax/demo/adherence.json', 'JSON to write')

NUM_LABELS = 5          # the demo image U-Net's label rows; 0 and 4 get no centroid
SCORED = (1, 2, 3)


def dihedral(a):
  for k in range(4):
    r = np.rot90(a, k, axes=(0, 1))
    yield r
    yield r[:, ::-1]


def main(argv):
  del argv
  pairs = data_lib.find_pairs(_DATA.value)
  _, vae_cfg, vae_params = checkpoint.load_model(_VAE.value, expect='vae')
  rt = adherence.vae_round_trip(vae_cfg, vae_params)
  examples = [(data_lib.read_image(i), label_maps.read_label_png(m)) for i, m in pairs]
  recon = [(rt(img), lab) for img, lab in examples]
  skip = tuple(l for l in range(NUM_LABELS) if l not in SCORED)
  clf = adherence.fit_on_examples(recon, NUM_LABELS, skip_labels=skip)

  def score(clf, items):
    agree = {}
    for img, lab in items:
      for name, m in (('right', lab), ('shifted', adherence.shift_labels(lab, SCORED))):
        r = adherence.mask_adherence(img, m, clf)
        a, n = agree.get(name, (0, 0))
        agree[name] = (a + r['adherence'] * r['patches'], n + r['patches'])
    return {k: round(a / n, 4) for k, (a, n) in agree.items()}

  fit = score(clf, recon)
  # Held out: the original orientation's halves (data folder: ihc_r0 is the original).
  orig = dict(zip([os.path.basename(i) for i, _ in pairs], examples))['ihc_r0.png']
  img, lab = orig
  h = img.shape[0] // 2
  halves = {'top': (img[:h], lab[:h]), 'bottom': (img[h:], lab[h:])}
  held = {}
  for fit_on, test_on in (('top', 'bottom'), ('bottom', 'top')):
    part = [(rt(np.ascontiguousarray(a)), np.ascontiguousarray(b)) for a, b in
            zip(dihedral(halves[fit_on][0]), dihedral(halves[fit_on][1]))]
    c = adherence.fit_on_examples(part, NUM_LABELS, skip_labels=skip)
    held[f'fit_{fit_on}_score_{test_on}'] = score(c, [(rt(halves[test_on][0]),
                                                       halves[test_on][1])])
  info = {'fit_on': f'{_DATA.value} ({len(pairs)} images) through {_VAE.value}',
          'labels': {'1': 'epithelium (DAB)', '2': 'stroma', '3': 'lumen/background'},
          'fit_data_agreement': fit, 'held_out_halves': held}
  adherence.save_classifier(_OUTPUT.value, clf, **info)
  print(f'wrote {_OUTPUT.value}: {info}')


if __name__ == '__main__':
  app.run(main)
