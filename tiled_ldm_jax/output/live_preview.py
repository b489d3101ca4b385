"""A live preview of a long run: a small PNG of the canvas and of each pixel's progress.

`sample_large_image.py --live_preview_minutes=N` writes `sampleNNNN_live.png` every N
minutes of the image stage and once when it ends, replacing it atomically
(`files/atomic.py`): on the left the whole canvas as it stands, on the right the steps
each latent pixel has taken (black: none, white: all S), at one preview pixel per k x k
latent pixels, k = ceil(longer latent side / PREVIEW_SIDE).

The canvas is not decoded: a linear map from the latent's C channels (and a constant)
to RGB, fitted by least squares once per VAE (`fit_rgb_map`), turns each latent pixel
into a colour. The map is fitted when the run starts, from one encoder and one decoder call on a small
batch of random colour images (`fit_rgb_map`: the VAE's own, so any converted VAE gets
its map; a fit at export would need every model folder exported again and would not
follow a VAE swapped in later). A latent pixel's colour is mostly its own channels,
which is what a linear map can say.

A preview reads the latent strided on the device (every k-th row and column, then the
map), so its compute and its device-to-host transfer are O(preview size), never the
canvas's; it runs between the sampler's chunks (`loop.Sampler.run`'s `watch`), so the
sampler's program is the same with the preview on or off. With a solver that keeps
each pixel's x0 prediction (DPM-Solver++, the default), the canvas is that prediction
where a pixel has one (what the image will look like), else the noisy latent itself.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tiled_ldm_jax.output import writers

PREVIEW_SIDE = 512    # preview pixels on the longer side of the canvas, at most
FIT_SIDE = 16         # latent pixels of each fitting image's side (128 px at f = 8)
FIT_BATCH = 4
GAP = 8               # white pixels between the canvas and the progress map


def random_images(key, n: int, side: int) -> jax.Array:
  """[n, side, side, 3] images in [0, 1]: random colours on a coarse grid (side / 16),
  upsampled, plus a little pixel noise: areas of one colour, as tissue has, over the
  whole gamut."""
  k1, k2 = jax.random.split(key)
  cells = max(1, side // 16)
  coarse = jax.random.uniform(k1, (n, cells, cells, 3))
  smooth = jax.image.resize(coarse, (n, side, side, 3), 'linear')
  return jnp.clip(smooth + 0.05 * jax.random.normal(k2, smooth.shape), 0.0, 1.0)


def fit_rgb_map(decode: Callable, encode: Callable, params, scale: float, factor: int, *,
                clip=(0.0, 1.0), seed: int = 0) -> np.ndarray:
  """[C + 1, 3] float32 M with rgb ~ [z, 1] @ M (rgb in [0, 1]) for diffusion latents z.

  The latents are those of FIT_BATCH random images (`encode(params, x) -> (mean, _)`,
  z = mean / scale): latents of images, not of noise, whose colours a generated latent
  shares (a fit on random normal latents got the structure but washed the colours out:
  mean error 22 of 255 on a demo image, against 11 with this, `tests/test_live_preview.py`).
  The target is what `decode(params, z * scale)` makes of them, averaged over each latent pixel's f x f
  block; least squares over every latent pixel of the batch."""
  images = random_images(jax.random.key(seed), FIT_BATCH, FIT_SIDE * factor)
  mean = jax.jit(encode)(params, images)[0]
  z = np.asarray(mean, np.float64) / scale
  img = np.asarray(jax.jit(decode)(params, mean), np.float64)
  if clip is not None:
    img = np.clip(img, *clip)
  n, h, w, c = z.shape
  rgb = img[..., :3].reshape(n, h, factor, w, factor, 3).mean(axis=(2, 4))  # per latent px
  a = np.concatenate([z.reshape(-1, c), np.ones((n * h * w, 1))], axis=1)
  m, *_ = np.linalg.lstsq(a, rgb.reshape(-1, 3), rcond=None)
  return m.astype(np.float32)


def stride(latent_hw: Sequence[int], side: int = PREVIEW_SIDE) -> int:
  """k: one preview pixel per k x k latent pixels, the longer side at most `side`."""
  return max(1, math.ceil(max(latent_hw) / side))


@functools.partial(jax.jit, static_argnames=('k', 'steps'))
def _small(x, x0_prev, times, start, rgb_map, *, k: int, steps: int):
  """(uint8 canvas [N, h/k, w/k, 3], uint8 progress [N, h/k, w/k]) from the sampler
  state's arrays, each read strided first so nothing latent-sized is computed."""
  x = x[:, ::k, ::k]
  t = times[:, ::k, ::k]
  if x0_prev.shape[1:3] == times.shape[1:3]:     # a solver with per-pixel x0 predictions
    has = (t > start[:, None, None])[..., None]
    x = jnp.where(has, x0_prev[:, ::k, ::k], x)
  c = x.shape[-1]
  rgb = jnp.einsum('nhwc,cd->nhwd', x, rgb_map[:c]) + rgb_map[c]
  canvas = jnp.round(jnp.clip(rgb, 0.0, 1.0) * 255).astype(jnp.uint8)
  progress = jnp.round(t.astype(jnp.float32) * (255.0 / steps)).astype(jnp.uint8)
  return canvas, progress


def compose(canvas: np.ndarray, progress: np.ndarray) -> np.ndarray:
  """[h, 2w + GAP, 3] uint8: the canvas, a white gap, the progress map in grey."""
  h = canvas.shape[0]
  grey = np.repeat(progress[..., None], 3, axis=-1)
  return np.concatenate([canvas, np.full((h, GAP, 3), 255, np.uint8), grey], axis=1)


class LivePreview:
  """The sampler's `watch`: `(state, done)` after every chunk of iterations; writes each
  image's PNG (`paths[n]`) when `every_s` seconds have passed since the last write (or
  the start) and when the stage is done."""

  def __init__(self, paths: Sequence[str], rgb_map: np.ndarray, steps: int,
               every_s: float, *, clock: Callable[[], float] = time.monotonic):
    self.paths, self.steps, self.every_s, self.clock = list(paths), steps, every_s, clock
    self.rgb_map = jnp.asarray(rgb_map, jnp.float32)
    self.last = clock()
    self.writes = 0

  def __call__(self, state, done: bool = False) -> None:
    if not done and self.clock() - self.last < self.every_s:
      return
    self.write(state)

  def images(self, state) -> np.ndarray:
    """[N, h/k, 2 w/k + GAP, 3] uint8 previews of the state's images."""
    k = stride(state.times.shape[1:])
    canvas, progress = jax.device_get(_small(state.x, state.x0_prev, state.times,
                                             state.start, self.rgb_map, k=k,
                                             steps=self.steps))
    return np.stack([compose(c, p) for c, p in zip(canvas, progress)])

  def write(self, state) -> None:
    for path, image in zip(self.paths, self.images(state)):
      writers.write_image(path, image)       # atomic: a temporary name, then a rename
    self.writes += 1
    self.last = self.clock()


@functools.lru_cache(maxsize=4)
def _pipeline_map(pipe, dtype: str) -> np.ndarray:
  """One fit per loaded VAE (and compute dtype) in this process."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  config = dataclasses.replace(pipe.vae.config, dtype=dtype)
  return fit_rgb_map(vae_lib.decode_fn(config), vae_lib.encode_fn(config), pipe.vae.params,
                     pipe.geometry.scale, pipe.geometry.factor)


def for_pipeline(pipe, options, paths: Sequence[str], minutes: float) -> LivePreview:
  """A `LivePreview` of `pipe`'s image stage (its VAE's map, fitted once per process)."""
  return LivePreview(paths, _pipeline_map(pipe, options.dtype), options.sampling_steps,
                     60.0 * minutes)
