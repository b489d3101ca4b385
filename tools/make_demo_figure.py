"""The README's first figure: a default demo output beside crops of the real image.

  python scripts/sample_large_image.py                   # results/large/sample0000.png
  python tools/make_demo_figure.py --sample=results/large/sample0000.png \
      --output=docs/demo_overview.jpg

Left: two 252 px crops of the real training image (from the dataset folder of
tools/make_demo_data.py, original orientation; no scikit-image needed); middle: the top
left 512 px of the demo output; right: its mask in label colours
(`masks.colour_labels`: 1 red epithelium, 2 green stroma, 3 blue lumen/background). All
at full resolution, so glands and nuclei have the same scale in all three.
"""

from __future__ import annotations

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from tiled_ldm_jax import masks
from tiled_ldm_jax.files import image_files
from tiled_ldm_jax.files import label_maps

_SAMPLE = flags.DEFINE_string('sample', 'results/large/sample0000.png', 'demo output')
_REAL = flags.DEFINE_string('real', 'data/demo_tissue/class_1/ihc_r0.png', 'real image')
_OUTPUT = flags.DEFINE_string('output', 'docs/demo_overview.jpg', 'figure to write')
GAP = 8


def main(argv):
  del argv
  img = image_files.read_rgb(_SAMPLE.value, what='sample')
  labels = label_maps.read_label_png(_SAMPLE.value[:-4] + '_mask.png')
  real = image_files.read_rgb(_REAL.value, what='real image')
  h = min(512, img.shape[0], img.shape[1])
  out, col = img[:h, :h], masks.colour_labels(labels[:h, :h])
  c = (h - GAP) // 2            # two crops stacked in the output's height
  crops = np.concatenate([real[:c, :c], np.full((h - 2 * c, c, 3), 255, np.uint8),
                          real[-c:, -c:]], 0)
  gap = np.full((h, GAP, 3), 255, np.uint8)
  Image.fromarray(np.concatenate([crops, gap, out, gap, col], 1)).save(_OUTPUT.value,
                                                                       quality=88)
  print(f'wrote {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
