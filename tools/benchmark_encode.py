"""Encodes one init image with the demo VAE and prints one JSON line.

  python tools/benchmark_encode.py --image=slide.tif --read=rows     # band by band
  python tools/benchmark_encode.py --image=slide.tif --read=whole    # the array at once
  (peak memory: run under /usr/bin/time -v)

--make_tiff=N first writes an N x N RGB test TIFF (smooth pattern, 512 px zlib tiles)
to --image.
"""

import json
import time

from absl import flags
import numpy as np

import tiled_ldm_jax
from tiled_ldm_jax import flag_util
from tiled_ldm_jax.files import large_images

_IMAGE = flags.DEFINE_string('image', None, 'Init image (PNG, JPEG, TIFF, OME-Zarr).',
                             required=True)
_READ = flags.DEFINE_enum('read', 'rows', ['rows', 'whole'],
                          'rows: pipe.encode(source), band by band; whole: the image read '
                          'into one array first.')
_MAKE = flags.DEFINE_integer('make_tiff', 0, 'Write an N x N test TIFF to --image first.')


def main(argv):
  del argv
  if _MAKE.value:
    import tifffile  # pylint: disable=g-import-not-at-top
    n = _MAKE.value
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    wave = (np.sin(x / 50.0) * np.cos(y / 70.0))[..., None]
    del x, y
    img = (127 + 100 * wave * np.array([1.0, 0.5, -0.7], np.float32)).astype(np.uint8)
    tifffile.imwrite(_IMAGE.value, img, tile=(512, 512), compression='zlib')
    del img, wave
  pipe = tiled_ldm_jax.Pipeline.from_pretrained()
  source = large_images.open_rgb_source(_IMAGE.value)
  start = time.perf_counter()
  z = pipe.encode(source if _READ.value == 'rows'
                  else source.read_rows(0, source.shape[0])[None])
  print(json.dumps({'image': list(source.shape), 'read': _READ.value,
                    'latent': list(z.shape), 'seconds': time.perf_counter() - start}))


if __name__ == '__main__':
  flag_util.run(main)
