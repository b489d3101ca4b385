"""Bytes a generation request needs on the host and on the device, checked before work.

An upper-bound model, per sampled batch of N images of H x W pixels (latent h x w x C at
factor f), from what the code holds at once:

  device  sampler state: x, x_low float32 [N, h, w, C] and times int32 [N, h, w]
          = N*h*w*(8C + 4); the latent-resolution label map int32 = 4*N*h*w; the model
          weights; the largest activations of one U-Net or decoder call (`activations`).
  host    label sources, never the pixel map: the mask model's map at its resolution
          (H/4 x W/4) or a label file's pixels, ~LABEL_SOURCE_BYTES each (the source,
          the mask stage's gray map and its clean's temporaries); GeoJSON none (rasterized
          by bands); the latent label map 4*N*h*w; latents fetched for decoding 4*N*h*w*C;
          output: PNG/JPEG are decoded and encoded whole: uint8 [H, W, 3] and the
          encoder's copy = 6*H*W, plus the PNG mask and its copies 3*H*W (one image at a
          time); TIFF/Zarr are written in bands of the decode (`decode.band_layout`:
          one tile row for 'original', up to 4 tile rows for 'shared'/'overlap'):
          float32 tiles and a uint8 band ~ (12 + 3)*W*band, twice (the band being
          written and the next one decoding; 'shared' also holds one band back), plus
          the pyramid's half-size band per level.
  solver  a solver with history (DPM-Solver++) keeps each pixel's last x0 prediction on
          the device: 4*N*h*w*C.
  init    an init image: its latent on the host 4*h*w*C (encoded once), the encode's band
          of window rows (2 tiles tall) and the TIFF segment rows it covers, ~ 4*tile*W*3
          uint8 (a PNG/JPEG init is decoded whole: 3*H*W);
          with a keep mask the sampler also holds the init latents and the mask on the
          device, N*h*w*(4C + 1).
  CPU     the device is the host: its bytes are added to the host's.

With TIFF/Zarr output every term grows with the latent area h*w = H*W/f^2 (or less);
only whole PNG/JPEG outputs grow with H*W. Activations follow one call's batch:
UNET_ACTIVATION x batch x P^2 x dim x 4 bytes and DECODER_ACTIVATION x tiles x p^2 x
width x 4 bytes (P latent patch, dim the U-Net's base width; p the tile in pixels, width
the VAE's first block), measured as the peak RSS growth of one call on CPU (full-size
SD VAE, 4 tiles of 512 px: 4.1 GiB, XLA temp 3.5 GiB; full-size U-Net at batch 8: 1.4 GiB).
Every blend mode's decoder calls are one `tile_batch` of tiles, including the 'shared'
decode's statistics pass (its tiles of the subsampled latent, with every GroupNorm pooled
over the call; the statistics it keeps are 2 x groups floats per GroupNorm), so the
one decoder term bounds them all; its extra decoder work is time, counted by
`decode.passes_per_pixel` (the plan's decoder tiles and TFLOP, `estimate.py`).
"""

from __future__ import annotations

import os

GiB = 1 << 30
# Fixed host cost of a run beside the request: Python, JAX, XLA's compiled programs.
HOST_BASE = GiB   # measured: 0.89-0.96 GiB peak RSS of demo-model runs, 1024-4096 px TIFF
LABEL_SOURCE_BYTES = 10    # per label-source pixel (see the module doc)
UNET_ACTIVATION = 48       # measured 44 (full-size 5-class U-Net), 29 (demo)
DECODER_ACTIVATION = 10    # measured 8.3 (SD VAE), plus room: full-size runs at 512-1536 px
                           # peaked 6.06-6.50 GiB, 2-3% under the estimate with 9


def activations(*, unet_batch: int, latent_patch: int, unet_dim: int, tile_batch: int,
                tile_px: int, vae_width: int) -> int:
  """Bytes of the largest activations of one U-Net or decoder call (module doc)."""
  unet = UNET_ACTIVATION * unet_batch * latent_patch ** 2 * unet_dim * 4
  decoder = DECODER_ACTIVATION * tile_batch * tile_px ** 2 * vae_width * 4
  return max(unet, decoder)


def request_bytes(*, image_hw, n_batch: int, latent_channels: int, factor: int,
                  whole_images: int, tile_px: int, weights_bytes: int = 0,
                  label_source_pixels: int | None = None, activation_bytes: int = 0,
                  host_is_device: bool = False, init: str | None = None,
                  init_whole: bool = False, band_px: int | None = None,
                  solver_history: bool = False) -> dict[str, int]:
  """{'host': bytes, 'device': bytes} one batch of the request needs (see module doc);
  `whole_images`: decoded images held whole at once (CLI PNG/JPEG 1, TIFF/Zarr 0, the
  Python API N); `label_source_pixels`: pixels of one image's label source (default
  the mask model's, H*W/16); `host_is_device`: the CPU backend; `init`: None, 'strength'
  (an init image) or 'keep' (and a keep mask); `init_whole`: the init image decoded
  whole (PNG/JPEG), not by bands; `band_px`: pixel rows of one decoded band (None:
  `tile_px`); `solver_history`: the solver keeps x0 per pixel."""
  h_px, w_px = (int(v) for v in image_hw)
  pixels = h_px * w_px
  latent = -(-h_px // factor) * -(-w_px // factor)
  c = int(latent_channels)
  if label_source_pixels is None:
    label_source_pixels = pixels // 16
  device = (n_batch * latent * (8 * c + 4 + 4) + int(weights_bytes)
            + int(activation_bytes))
  if solver_history:
    device += n_batch * latent * 4 * c
  host = n_batch * (LABEL_SOURCE_BYTES * int(label_source_pixels) + 4 * latent
                    + 4 * latent * c)
  band = int(tile_px if band_px is None else band_px)
  host += 9 * pixels * int(whole_images) + 2 * 15 * w_px * band
  if init is not None:
    host += 4 * latent * c + (3 * pixels if init_whole else 4 * 3 * w_px * int(tile_px))
    if init == 'keep':
      device += n_batch * latent * (4 * c + 1)
  host += HOST_BASE
  if host_is_device:
    host += device
  return {'host': host, 'device': device}


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
