"""Starting from an existing image, measured on the demo models; one JSON line, a figure.

  python tools/compare_init_image.py --image_size=512 --sampling_steps=10 \
      --figure=docs/init_image.jpg

Measures: the tiled encode against one whole-image encode (max and mean |difference|
relative to the latents' largest magnitude) and encode -> decode PSNR; a demo slide
regenerated at each --strengths (PSNR of the result against it); the slide's left half
kept and its right half inpainted under another label map: PSNR of the kept half against
the slide, texture adherence of the new half to its labels, and the seam score at the
border column against the median of the same score at every other column.
The figure: the slide, strengths 0.3 and 0.6, and the inpainted one.
"""

import json

from absl import app
from absl import flags
import numpy as np
from PIL import Image

import tiled_ldm_jax
from tiled_ldm_jax import flag_util
from tiled_ldm_jax.evaluation import adherence
from tiled_ldm_jax.evaluation import seams

_SIZE = flags.DEFINE_integer('image_size', 512, 'Slide side in pixels.')
_STEPS = flags.DEFINE_integer('sampling_steps', 10, 'DDIM steps.')
_STRENGTHS = flags.DEFINE_list('strengths', ['0.2', '0.3', '0.5', '0.6', '1.0'],
                               'Strengths to regenerate the slide at.')
_FIGURE = flags.DEFINE_string('figure', None, 'Write the figure here (JPEG).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the slide.')


def _psnr(a, b) -> float:
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return float(10 * np.log10(255.0 ** 2 / mse))


def main(argv):
  del argv
  pipe = tiled_ldm_jax.Pipeline.from_pretrained()
  n, steps = _SIZE.value, _STEPS.value
  slide = pipe(label=1, image_size=n, seed=_SEED.value, sampling_steps=steps)
  img, labels = slide.images[0], slide.labels
  out = {'image_size': n, 'sampling_steps': steps}

  whole = pipe.encode(img[None], patch_size=n, halo_px=0)[0]
  tiled = pipe.encode(img[None])[0]
  scale = float(np.abs(whole).max())
  out['encode_tiled_vs_whole'] = {'max_rel': float(np.abs(tiled - whole).max()) / scale,
                                  'mean_rel': float(np.abs(tiled - whole).mean()) / scale}
  out['encode_decode_psnr'] = _psnr(pipe.decode(tiled[None])[0], img)

  regen = {}
  for s in _STRENGTHS.value:
    r = pipe(labels=labels, seed=_SEED.value + 1, sampling_steps=steps, init_image=img,
             strength=float(s))
    regen[s] = r.images[0]
    out.setdefault('strength_psnr', {})[s] = _psnr(r.images[0], img)

  new_labels = labels.copy()
  half = n // 2
  right = new_labels[:, :, half:]
  new_labels[:, :, half:] = np.where(right > 0, right % 4 + 1, 0)   # other classes there
  keep = np.zeros((n, n), bool)
  keep[:, :half] = True
  inp = pipe(labels=new_labels, seed=_SEED.value + 2, sampling_steps=steps, init_image=img,
             keep=keep).images[0]
  clf = adherence.fit_texture_classifier(pipe.unet.config.num_classes)
  per_column = [seams.seam_ratio(inp, tile=j, axes=(1,)) for j in range(8, n - 8, 8)
                if j != half]
  out['keep_left_half'] = {
      'kept_psnr': _psnr(inp[:, :half], img[:, :half]),
      'kept_psnr_encode_decode': _psnr(pipe.decode(tiled[None])[0][:, :half], img[:, :half]),
      'new_half_adherence': adherence.mask_adherence(
          inp[:, half:], new_labels[0, :, half:], clf)['adherence'],
      'border_seam': seams.seam_ratio(inp, tile=half, axes=(1,)),
      'median_column_seam': float(np.median(per_column))}
  print(json.dumps(out))
  if _FIGURE.value:
    tiles = [img, regen.get('0.3', img), regen.get('0.6', img), inp]
    gap = np.full((n, 8, 3), 255, np.uint8)
    row = np.concatenate(sum(([t, gap] for t in tiles), [])[:-1], axis=1)
    Image.fromarray(row).resize((row.shape[1] // 2, n // 2), Image.LANCZOS).save(
        _FIGURE.value, quality=90)


if __name__ == '__main__':
  flag_util.run(main)
