"""Starting from an existing image, measured on the demo models; one JSON line, a figure.

  python tools/compare_init_image.py --image_size=512 --sampling_steps=10 \
      --figure=docs/init_image.jpg

Measures: the tiled encode against one whole-image encode (max and mean |difference|
relative to the latents' largest magnitude) and encode -> decode PSNR; a demo slide
regenerated at each --strengths (PSNR of the result against it); the slide's left half
(--kept_columns) kept and its right half inpainted under another label map, at each --resample: PSNR of
the kept half against the slide, texture adherence of the new half to its labels, and the
seam score at the border column against the median of the same score at every other
column.
The figure: the slide, strengths 0.3 and 0.6, and the inpainted one.
"""

import json

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
_KEPT = flags.DEFINE_integer(
    'kept_columns', None, 'Columns kept on the left (default half + 8: off the decoder\'s '
    'tile lines, which score higher in any tiled image; a multiple of 8).')
_KEEP_SEEDS = flags.DEFINE_integer('keep_seeds', 4, 'Seeds of each inpainting measure.')
_RESAMPLE = flags.DEFINE_list('resample', ['0', '2'],
                              'Keep-mask resampling passes to measure (the figure: the last).')


def _psnr(a, b) -> float:
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return float(10 * np.log10(255.0 ** 2 / mse))


def _mean_sd(values):
  return {'mean': float(np.mean(values)), 'sd': float(np.std(values)), 'n': len(values)}


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
  half = n // 2 + 8 if _KEPT.value is None else _KEPT.value
  right = new_labels[:, :, half:]
  new_labels[:, :, half:] = np.where(right > 0, right % 4 + 1, 0)   # other classes there
  keep = np.zeros((n, n), bool)
  keep[:, :half] = True
  clf = adherence.fit_texture_classifier(pipe.unet.config.num_classes)
  kept_ed = _psnr(pipe.decode(tiled[None])[0][:, :half], img[:, :half])
  border = lambda im: seams.seam_ratio(im, tile=half, axes=(1,))
  seeds = range(_SEED.value + 2, _SEED.value + 2 + _KEEP_SEEDS.value)
  inp = None
  # Under other labels the border column is also where the new labels begin: slides
  # generated from noise under the same labels show what that label change alone scores
  # there; under the slide's own labels the same baseline is a plain slide's column.
  for name, lab in (('keep_left_half', new_labels), ('keep_left_half_same_labels', labels)):
    free = [border(pipe(labels=lab, seed=sd, sampling_steps=steps).images[0])
            for sd in seeds]
    out[name] = {'from_noise_border_seam': _mean_sd(free)}
    for r in _RESAMPLE.value:
      rows = []
      for sd in seeds:
        res = pipe(labels=lab, seed=sd, sampling_steps=steps, init_image=img, keep=keep,
                   resample=int(r))
        im = res.images[0]
        per_column = [seams.seam_ratio(im, tile=j, axes=(1,)) for j in range(8, n - 8, 8)
                      if j != half]
        rows.append((_psnr(im[:, :half], img[:, :half]),
                     adherence.mask_adherence(im[:, half:], lab[0, :, half:],
                                              clf)['adherence'],
                     border(im), float(np.median(per_column)),
                     res.stats['image_stage']['denoiser_evaluations']))
        if name == 'keep_left_half':
          inp = im
      kept, adh, seam, median, evals = map(list, zip(*rows))
      out[name][f'resample_{r}'] = {
          'kept_psnr': _mean_sd(kept), 'kept_psnr_encode_decode': kept_ed,
          'new_half_adherence': _mean_sd(adh), 'border_seam': _mean_sd(seam),
          'median_column_seam': _mean_sd(median), 'unet_samples': _mean_sd(evals)}
  print(json.dumps(out))
  if _FIGURE.value:
    tiles = [img, regen.get('0.3', img), regen.get('0.6', img), inp]
    gap = np.full((n, 8, 3), 255, np.uint8)
    row = np.concatenate(sum(([t, gap] for t in tiles), [])[:-1], axis=1)
    Image.fromarray(row).resize((row.shape[1] // 2, n // 2), Image.LANCZOS).save(
        _FIGURE.value, quality=90)


if __name__ == '__main__':
  flag_util.run(main)
