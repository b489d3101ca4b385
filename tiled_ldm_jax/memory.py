"""Bytes a generation request needs on the host and on the device, checked before work.

A model of the peak, per sampled batch of N images of H x W pixels (latent h x w x C at
factor f), from what the code holds at once. A run has two phases that never overlap:
sampling (the sampler state and the U-Net's activations) and decoding (the decoder's
activations); the stage's sampler state is freed before its latent is decoded. So the
device holds the weights plus the larger of the two:

  device  weights (all models loaded) + max(sampling, decoding), where
          sampling = x, x_low float32 [N, h, w, C] and times int32 [N, h, w]
                     = N*h*w*(8C + 4), the latent-resolution label map int32 = 4*N*h*w,
                     a solver's history (DPM-Solver++: each pixel's last x0 prediction,
                     4*N*h*w*C), a keep mask's init latents and mask (N*h*w*(4C + 1)),
                     and one U-Net call's activations (`unet_activation`);
          decoding = one decoder call's activations (`decoder_activation`);
          each call also holds its model's weights once more (the params are host
          numpy arrays, copied into the call's argument buffers on CPU;
          `Pipeline.memory_need`).
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
          the pyramid's half-size band per level; HOST_BASE for the process itself.
  init    an init image: its latent on the host 4*h*w*C (encoded once), the encode's band
          of window rows (2 tiles tall) and the TIFF segment rows it covers, ~ 4*tile*W*3
          uint8 (a PNG/JPEG init is decoded whole: 3*H*W).

On CPU the device is the host: one memory holds both, and the request fits if host +
device does (`check`); the two figures are reported apart, never one inside the other.

Activations are XLA's temporary buffers of one call (`compiled.memory_analysis()`), per
element of the largest activation: UNET_ACTIVATION x batch x P^2 x dim x 4 bytes and
DECODER_ACTIVATION x tiles x p^2 x width x 4 bytes (P latent patch, dim the U-Net's base
width; p the tile in pixels, width the VAE's first block). Every blend mode's decoder
calls are one `tile_batch` of tiles, including the 'shared' decode's statistics pass
(its tiles of the subsampled latent, with every GroupNorm pooled over the call; the
statistics it keeps are 2 x groups floats per GroupNorm), so the one decoder term bounds
them all; its extra decoder work is time, counted by `decode.passes_per_pixel` (the
plan's decoder tiles and TFLOP, `estimate.py`). The model against measured peaks:
docs/generate.md ("What memory a run takes"), `tests/test_memory_plan.py`.
"""

from __future__ import annotations

import os

GiB = 1 << 30
# The process beside the request: Python, JAX, XLA's runtime and compiled programs, and
# what the allocators keep (peak RSS less the modelled terms, measured on demo and
# full-size runs, docs/generate.md).
HOST_BASE = 1 << 30
LABEL_SOURCE_BYTES = 10    # per label-source pixel (see the module doc)
# XLA temporaries per element of the largest activation (`memory_analysis` of one call
# on CPU): the U-Net at its sampling batch, the decoder at 4 tiles of 512 px.
UNET_ACTIVATION = 26       # full-size U-Net at batch 8: 18.6; demo at 55: 20, at 8: 26
DECODER_ACTIVATION = 7     # demo VAE 448 MiB, SD2 VAE 3.5 GiB: 7.0 for both


def unet_activation(*, unet_batch: int, latent_patch: int, unet_dim: int) -> int:
  """Bytes of one U-Net call's activations (module doc)."""
  return UNET_ACTIVATION * unet_batch * latent_patch ** 2 * unet_dim * 4


def decoder_activation(*, tile_batch: int, tile_px: int, vae_width: int) -> int:
  """Bytes of one decoder call's activations (module doc)."""
  return DECODER_ACTIVATION * tile_batch * tile_px ** 2 * vae_width * 4


def activations(*, unet_batch: int, latent_patch: int, unet_dim: int, tile_batch: int,
                tile_px: int, vae_width: int) -> int:
  """Bytes of the largest activations of one U-Net or decoder call (module doc)."""
  return max(unet_activation(unet_batch=unet_batch, latent_patch=latent_patch,
                             unet_dim=unet_dim),
             decoder_activation(tile_batch=tile_batch, tile_px=tile_px,
                                vae_width=vae_width))


def request_bytes(*, image_hw, n_batch: int, latent_channels: int, factor: int,
                  whole_images: int, tile_px: int, weights_bytes: int = 0,
                  label_source_pixels: int | None = None, unet_activation_bytes: int = 0,
                  decoder_activation_bytes: int = 0, init: str | None = None,
                  init_whole: bool = False, band_px: int | None = None,
                  solver_history: bool = False) -> dict[str, int]:
  """{'host': bytes, 'device': bytes} one batch of the request needs (see module doc);
  `whole_images`: decoded images held whole at once (CLI PNG/JPEG 1, TIFF/Zarr 0, the
  Python API N); `label_source_pixels`: pixels of one image's label source (default
  the mask model's, H*W/16); `init`: None, 'strength' (an init image) or 'keep' (and a
  keep mask); `init_whole`: the init image decoded whole (PNG/JPEG), not by bands;
  `band_px`: pixel rows of one decoded band (None: `tile_px`); `solver_history`: the
  solver keeps x0 per pixel."""
  h_px, w_px = (int(v) for v in image_hw)
  pixels = h_px * w_px
  latent = -(-h_px // factor) * -(-w_px // factor)
  c = int(latent_channels)
  if label_source_pixels is None:
    label_source_pixels = pixels // 16
  sampling = n_batch * latent * (8 * c + 4 + 4) + int(unet_activation_bytes)
  if solver_history:
    sampling += n_batch * latent * 4 * c
  host = n_batch * (LABEL_SOURCE_BYTES * int(label_source_pixels) + 4 * latent
                    + 4 * latent * c)
  band = int(tile_px if band_px is None else band_px)
  host += 9 * pixels * int(whole_images) + 2 * 15 * w_px * band
  if init is not None:
    host += 4 * latent * c + (3 * pixels if init_whole else 4 * 3 * w_px * int(tile_px))
    if init == 'keep':
      sampling += n_batch * latent * (4 * c + 1)
  host += HOST_BASE
  device = int(weights_bytes) + max(sampling, int(decoder_activation_bytes))
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
          device: int | None = -1, host_is_device: bool = False) -> None:
  """ValueError naming both numbers if `need` exceeds what is available (-1: measure);
  `host_is_device` (CPU): host and device bytes share the host's memory."""
  host = host_available() if host == -1 else host
  device = device_available() if device == -1 else device
  need = dict(need)
  if host_is_device:
    need['host'] += need['device']
    device = None
  for where, avail in (('host', host), ('device', device)):
    if avail is not None and need[where] > avail:
      raise ValueError(f'{what} needs {need[where] / GiB:.1f} GiB of {where} memory, '
                       f'{avail / GiB:.1f} GiB available')
