"""Makes the demo models' training data from a real stained tissue image.

  pip install -e ".[demo_data]"          # scikit-image: only this script needs it
  python tools/make_demo_data.py --out=data/demo_tissue \
      --label_png=tiled_ldm_jax/demo/mask.png --figure=docs/demo_data.jpg

The image is scikit-image's `skimage.data.immunohistochemistry()`: 512 x 512 RGB,
human colon (glands), DAB immunostain with hematoxylin counterstain; its docstring says
"no known copyright restrictions" and the file ships inside the scikit-image wheel
(nothing is downloaded). The label map is made by this rule (`label_map`), not by hand:

1. Colour deconvolution (`skimage.color.rgb2hed`): per pixel the hematoxylin (H) and
   DAB (D) optical densities.
2. Smoothing: D with a Gaussian of sigma 4 px (a cell is ~10 px: epithelium becomes one
   brown sheet, not membranes), H with sigma 8 px (stroma is sparse nuclei in pale
   fibres: the wider window measures how many nuclei are near).
3. Thresholds: epithelium (1) where smoothed D > Otsu's threshold of smoothed D (the
   brown/not-brown split is bimodal); of the rest, lumen/background (3) where smoothed H
   < `H_LUMEN` (pale, nearly no nuclei: gland lumen, empty space), else stroma (2).
4. Clean-up: connected components (4-connected) of any class smaller than `MIN_AREA`
   px are removed, and their pixels take the label of the nearest kept pixel.

Ids: 1 = epithelium (DAB), 2 = stroma, 3 = lumen/background; 0 is unused (the
sampler gives 0 the unconditional output) and so is 4 (the demo image U-Net keeps 5
label rows so its shapes stay those of the earlier demo model).

Written in the folder layout the training loader reads (`training/data.py`
`FolderSource`: `name.png` + `name_mask.png`): the whole 512 px image and its label map
in each of the eight flips/rotations (the dihedral group), under `class_1/`, so the mask
model's layout class is 1, the class the sampler asks for by default. The loaders take
random crops of these (128 px for the image models; the mask model's 1/4-scale maps are
128 px, i.e. the whole map).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import numpy as np
from tiled_ldm_jax.files import label_maps

SIGMA_D = 4.0        # px: Gaussian smoothing of the DAB density (see the module docstring)
SIGMA_H = 8.0        # px: Gaussian smoothing of the hematoxylin density
H_LUMEN = 0.012      # smoothed H below this (and not DAB): lumen/background
MIN_AREA = 400       # px: smaller components of any class are absorbed by their neighbours

EPITHELIUM, STROMA, LUMEN = 1, 2, 3
CLASS_NAMES = {EPITHELIUM: 'epithelium (DAB)', STROMA: 'stroma', LUMEN: 'lumen/background'}

_OUT = flags.DEFINE_string('out', 'data/demo_tissue', 'dataset folder to write')
_LABEL_PNG = flags.DEFINE_string('label_png', None,
                                 'also write the 512 px label map here (the demo mask)')
_FIGURE = flags.DEFINE_string('figure', None, 'also write image | label map (JPEG) here')


def require_skimage():
  try:
    import skimage  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise SystemExit('this script needs scikit-image: pip install -e ".[demo_data]"') from None


def tissue_image() -> np.ndarray:
  """The real image: uint8 [512, 512, 3]."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  return np.asarray(data.immunohistochemistry())


def label_map(rgb: np.ndarray) -> tuple[np.ndarray, dict]:
  """(uint8 labels [H, W] in {1, 2, 3}, the thresholds used) by the module's rule."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top (scikit-image's dependency)
  from skimage import color, filters  # pylint: disable=g-import-not-at-top
  hed = color.rgb2hed(rgb)
  d = filters.gaussian(hed[..., 2], sigma=SIGMA_D)
  h = filters.gaussian(hed[..., 0], sigma=SIGMA_H)
  d_thr = float(filters.threshold_otsu(d))
  labels = np.where(d > d_thr, EPITHELIUM, np.where(h < H_LUMEN, LUMEN, STROMA))
  labels = labels.astype(np.uint8)
  keep = np.zeros(labels.shape, bool)
  for c in (EPITHELIUM, STROMA, LUMEN):
    comp, n = ndimage.label(labels == c)
    if n:
      sizes = np.bincount(comp.ravel())
      big = sizes >= MIN_AREA
      big[0] = False
      keep |= big[comp]
  # Removed pixels take the label of the nearest kept pixel.
  _, (iy, ix) = ndimage.distance_transform_edt(~keep, return_indices=True)
  labels = labels[iy, ix]
  return labels, {'dab_threshold': d_thr, 'h_lumen': H_LUMEN, 'sigma_d': SIGMA_D,
                  'sigma_h': SIGMA_H, 'min_area': MIN_AREA}


def dihedral(a: np.ndarray):
  """The eight flips/rotations of `a` [H, W, ...]: (name, array)."""
  for k in range(4):
    r = np.rot90(a, k, axes=(0, 1))
    yield f'r{k * 90}', r
    yield f'r{k * 90}f', r[:, ::-1]


def write_dataset(root: str, rgb: np.ndarray, labels: np.ndarray) -> list[str]:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax import masks  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax.training import data as data_lib  # pylint: disable=g-import-not-at-top
  folder = os.path.join(root, 'class_1')
  os.makedirs(folder, exist_ok=True)
  paths = []
  for (name, img), (_, lab) in zip(dihedral(rgb), dihedral(labels)):
    path = os.path.join(folder, f'ihc_{name}.png')
    Image.fromarray(np.ascontiguousarray(img)).save(path)
    label_maps.write_label_png(os.path.join(folder, f'ihc_{name}{data_lib.MASK_SUFFIX}'),
                          np.ascontiguousarray(lab))
    paths.append(path)
  return paths


def write_figure(path: str, rgb: np.ndarray, labels: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax import masks  # pylint: disable=g-import-not-at-top
  col = masks.colour_labels(labels)
  gap = np.full((rgb.shape[0], 8, 3), 255, np.uint8)
  Image.fromarray(np.concatenate([rgb, gap, col], 1)).save(path, quality=90)


def main(argv):
  del argv
  require_skimage()
  rgb = tissue_image()
  labels, thresholds = label_map(rgb)
  paths = write_dataset(_OUT.value, rgb, labels)
  counts = np.bincount(labels.ravel(), minlength=4)
  print(f'wrote {len(paths)} image/mask pairs to {_OUT.value}; thresholds {thresholds}')
  for c, name in CLASS_NAMES.items():
    print(f'  label {c} {name}: {counts[c] / labels.size:.1%} of the pixels')
  if _LABEL_PNG.value:
    from tiled_ldm_jax import masks  # pylint: disable=g-import-not-at-top
    label_maps.write_label_png(_LABEL_PNG.value, labels)
    print(f'wrote the label map to {_LABEL_PNG.value}')
  if _FIGURE.value:
    write_figure(_FIGURE.value, rgb, labels)
    print(f'wrote {_FIGURE.value}')


if __name__ == '__main__':
  app.run(main)
