"""Images of any size to diffusion latents through the VAE encoder, tile by tile.

The encoder is not local (three stride-2 stages, then attention over its whole input),
so a tile of P latent pixels is encoded from a window of P + 2m latent pixels (m: the
halo, `halo_px / factor`, the window shifted inside the image at its borders) and only
the tile's own P x P latents are kept: every latent pixel comes from one window, with
at least m latent pixels of context on each side that the image has. Windows of a row
are encoded `tile_batch` at a time in one jitted program of fixed shape, so memory is
one batch of windows plus the output latent [h, w, C]. Images no larger than a window
are encoded whole. Latents are the encoder's mean mapped to the diffusion latent
(`geometry.to_diffusion_latent`); images are RGB in [0, 1] (uint8 is divided by 255).

An image is an array or a row source (`files/large_images.py`: `.shape` (H, W, 3) and
`.read_rows(r0, r1)` -> uint8 rows): the windows of a tile row are read as one band of
rows, so a TIFF or OME-Zarr slide is never whole in memory (the band, (P + 2m) f rows of
uint8, one batch of windows and the output latent are).
"""

from __future__ import annotations

import functools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np


def check_size(shape, factor: int) -> None:
  """ValueError unless an image's (H, W, ..) are multiples of the VAE factor."""
  if shape[0] % factor or shape[1] % factor:
    raise ValueError(f'image {shape[0]}x{shape[1]} is not a multiple of the VAE '
                     f'factor {factor}')


def check_images(images, factor: int) -> np.ndarray:
  """[N, H, W, 3] float32 in [0, 1] (uint8 / 255); ValueError for shapes, values."""
  a = np.asarray(images)
  if a.ndim == 3:
    a = a[None]
  if a.ndim != 4 or a.shape[-1] != 3:
    raise ValueError(f'images must be [N, H, W, 3] RGB, got shape {a.shape}')
  check_size(a.shape[1:], factor)
  if a.dtype == np.uint8:
    return a.astype(np.float32) / np.float32(255)
  if not np.issubdtype(a.dtype, np.floating):
    raise ValueError(f'images must be uint8 or float in [0, 1], got {a.dtype}')
  a = a.astype(np.float32)
  if not np.isfinite(a).all():
    raise ValueError('images hold NaN or inf')
  if a.size and (a.min() < -1e-3 or a.max() > 1 + 1e-3):
    raise ValueError(f'float images must be in [0, 1], got [{a.min():.3g}, {a.max():.3g}]')
  return np.clip(a, 0.0, 1.0)


@functools.lru_cache(maxsize=16)
def _encode_batch(encode):
  return jax.jit(lambda params, x: encode(params, x)[0])


def _starts(size: int, tile: int, window: int, halo: int):
  """(tile start, window start) per tile along one axis (latent pixels)."""
  return [(t, min(max(t - halo, 0), size - window)) for t in range(0, size, tile)]


def encode_image(encode, params, image, *, factor: int, scale: float, tile_px: int = 512,
                 halo_px: int = 256, tile_batch: int = 4) -> np.ndarray:
  """One image -> diffusion latent [H/f, W/f, C] (module doc).

  `image`: [H, W, 3] in [0, 1] (float32) or a row source of uint8 rows.
  `encode`: `(params, x [B, H, W, 3]) -> (mean, logvar)` (`models.vae.encode_fn`).
  """
  source = image if hasattr(image, 'read_rows') else None
  if source is None:
    image = np.asarray(image, np.float32)
  shape = source.shape if source is not None else image.shape
  h, w = shape[0] // factor, shape[1] // factor
  p, m = max(1, tile_px // factor), max(0, halo_px // factor)
  wh, ww = min(h, p + 2 * m), min(w, p + 2 * m)
  fn = _encode_batch(encode)
  rows, cols = _starts(h, p, wh, m), _starts(w, p, ww, m)
  out = None
  for i, (y0, wy) in enumerate(rows):
    band = (source.read_rows(wy * factor, (wy + wh) * factor) if source is not None
            else image[wy * factor:(wy + wh) * factor])
    crops = [band[:, wx * factor:(wx + ww) * factor] for _, wx in cols]
    for b0 in range(0, len(crops), tile_batch):
      batch = crops[b0:b0 + tile_batch]
      x = np.stack(batch + batch[-1:] * (tile_batch - len(batch)))
      if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255)
      z = np.asarray(fn(params, jnp.asarray(x)))
      if out is None:
        out = np.zeros((h, w, z.shape[-1]), np.float32)
      for k, (x0, wx) in enumerate(cols[b0:b0 + len(batch)]):
        th, tw = min(p, h - y0), min(p, w - x0)
        out[y0:y0 + th, x0:x0 + tw] = z[k, y0 - wy:y0 - wy + th, x0 - wx:x0 - wx + tw]
    if len(rows) >= 10 and (i + 1) % max(1, len(rows) // 10) == 0:
      logging.info('encode: %d/%d tile rows', i + 1, len(rows))
  return out / np.float32(scale)
