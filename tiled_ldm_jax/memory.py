"""Bytes a generation request needs on the host and on the device, checked before work.

An upper-bound model, per sampled batch of N images of H x W pixels (latent h x w x C at
factor f), from what the code holds at once:

  device  sampler state: x, x_low float32 [N, h, w, C] and times int32 [N, h, w]
          = N*h*w*(8C + 4); labels int32 [N, H, W] = 4*N*H*W; plus the model weights.
  host    label maps: int32 [N, H, W] and one validated copy = 8*N*H*W;
          latents fetched for decoding: 4*N*h*w*C;
          output: PNG/JPEG are decoded and encoded whole: uint8 [H, W, 3] and the encoder's
          copy = 6*H*W (one image at a time); TIFF/Zarr are written in bands of one decode
          tile row: float32 tiles and a uint8 band ~ (12 + 3)*W*tile, plus the pyramid's
          half-size band per level (< the band again).

Every term grows with the pixel count H*W (labels, whole-image PNG) or the latent area
h*w = H*W/f^2; nothing grows faster. Calibrated against peak RSS of
`scripts/sample_large_image.py` on the demo models (1024 px: 1.28 GiB PNG, 1.24 GiB TIFF).
"""

from __future__ import annotations

import os

GiB = 1 << 30
# Fixed host cost of a run beside the request: Python, JAX, XLA's compiled programs.
HOST_BASE = 3 * GiB // 2   # measured: 1.28 GiB peak RSS for a 1024 px PNG on the demo models


def request_bytes(*, image_hw, n_batch: int, latent_channels: int, factor: int,
                  whole_images: int, tile_px: int, weights_bytes: int = 0) -> dict[str, int]:
  """{'host': bytes, 'device': bytes} one batch of the request needs (see module doc);
  `whole_images`: decoded images held whole at once (CLI PNG/JPEG 1, TIFF/Zarr 0, the
  Python API N)."""
  h_px, w_px = (int(v) for v in image_hw)
  pixels = h_px * w_px
  latent = -(-h_px // factor) * -(-w_px // factor)
  c = int(latent_channels)
  device = n_batch * (latent * (8 * c + 4) + 4 * pixels) + int(weights_bytes)
  host = n_batch * (8 * pixels + 4 * latent * c)
  host += 6 * pixels * int(whole_images) + 2 * 15 * w_px * int(tile_px)
  return {'host': HOST_BASE + host, 'device': device}


def host_available() -> int | None:
  """MemAvailable from /proc/meminfo (Linux), else free physical pages; None if unknown."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError, AttributeError):
    return None


def device_available() -> int | None:
  """bytes_limit - bytes_in_use of the first JAX device, where the backend reports it
  (GPU/TPU); None (no device check) on CPU or when unknown."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without the API raise
    return None
  if not stats or 'bytes_limit' not in stats:
    return None
  return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))


def check(need: dict[str, int], what: str, *, host: int | None = -1,
          device: int | None = -1) -> None:
  """ValueError naming both numbers if `need` exceeds what is available (-1: measure)."""
  host = host_available() if host == -1 else host
  device = device_available() if device == -1 else device
  for where, avail in (('host', host), ('device', device)):
    if avail is not None and need[where] > avail:
      raise ValueError(f'{what} needs {need[where] / GiB:.1f} GiB of {where} memory, '
                       f'{avail / GiB:.1f} GiB available')
