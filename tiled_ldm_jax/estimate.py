"""What a request will cost, before it runs: windows, U-Net samples, FLOPs, bytes, seconds.

`plan(pipe, request, ...)` counts, per stage, the latent shape, the sampler's
iterations and windows and the U-Net samples they run, the decoder's tiles, the U-Net
and decoder TFLOP (XLA's cost analysis of one forward), and the host and device bytes
(`memory.request_bytes`). `timed(pipe, plan)` adds seconds from short timed U-Net and
decoder calls on the current device. `scripts/sample_large_image.py --dry_run` prints
both; every sample's JSON record holds the plan of its run (without the timing).

How exact each count is:
- grid: iterations are exact; windows are the expected number over the random grid
  offsets (the empty edge cells of an offset are skipped).
- random: the expected windows per pixel and step of the original's placement,
  `windows.RANDOM_COVERAGE` (measured), so iterations and samples are estimates.
- U-Net samples of the image stage: windows x (labels per window + 1) plus the padding
  of the packed chunks (half a chunk per call). Labels per window are counted on the
  given label map (the windows of a grid at offset 0); for mask-model layouts, which
  are not known before the mask stage runs, `MASK_LABELS_PER_WINDOW` is assumed.
- mask stage: its batch is fixed, so samples = iterations x N x K (x 2 with guidance).
- decoder tiles: `decode.passes_per_pixel` x h w / P^2 of the stage's blend mode, exact
  (for 'shared': its tiles over the latent and its reflected margin, plus the
  statistics pass's whole tile batches).
Every count is O(1) in the image size apart from the label count of a given map
(one vectorized pass over the latent-resolution map per class).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import functools

from tiled_ldm_jax import decode as decode_lib
from tiled_ldm_jax import masks as masks_lib
from tiled_ldm_jax import memory
from tiled_ldm_jax.models import unet as unet_lib
from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax.sampling import loop as loop_lib

# Labels per window assumed for mask-model layouts (one class and background).
MASK_LABELS_PER_WINDOW = 1.0


def labels_per_window(latent_labels: np.ndarray, patch: int, num_classes: int) -> float:
  """Mean non-zero labels present in the P x P windows of a grid at offset 0 over label
  maps [N, h, w] (latent resolution); edge windows are the partial cells."""
  n, h, w = latent_labels.shape
  n_r, n_c = -(-h // patch), -(-w // patch)
  pad = np.full((n, n_r * patch, n_c * patch), -1, np.int32)
  pad[:, :h, :w] = latent_labels
  cells = pad.reshape(n, n_r, patch, n_c, patch)
  present = sum((cells == lab).any(axis=(2, 4)).astype(np.float64)
                for lab in range(1, num_classes))
  return float(np.mean(present))


def _abstract(tree):
  return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _unet_flops(model, patch: int) -> float:
  return _unet_flops_cached(model.config, patch, _Shapes(_abstract(model.params)))


def _decoder_flops(pipe, dtype: str, tile: int) -> float:
  return _decoder_flops_cached(pipe.stages.decoder(dtype), pipe.vae.config.latent_channels,
                               tile, _Shapes(_abstract(pipe.vae.params)))


class _Shapes:
  """Abstract params as a cache key (their tree of shapes and dtypes)."""

  def __init__(self, tree):
    self.tree = tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    self.key = (treedef, tuple((a.shape, str(a.dtype)) for a in leaves))

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return self.key == other.key


@functools.lru_cache(maxsize=64)
def _unet_flops_cached(config, patch: int, params: _Shapes) -> float:
  """FLOPs of one batch-1 forward (XLA's count of the lowered program; nothing runs)."""
  x = jax.ShapeDtypeStruct((1, patch, patch, config.channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  if config.kind == 'image':
    cond = (jax.ShapeDtypeStruct((1, patch, patch), jnp.int32),)
  else:
    cond = (jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1,), bool))
  return lowered_flops(jax.jit(unet_lib.eps_fn(config)).lower(params.tree, x, t, *cond))


@functools.lru_cache(maxsize=64)
def _decoder_flops_cached(decoder, channels: int, tile: int, params: _Shapes) -> float:
  z = jax.ShapeDtypeStruct((1, tile, tile, channels), jnp.float32)
  return lowered_flops(jax.jit(decoder).lower(params.tree, z))


def lowered_flops(lowered) -> float:
  """FLOPs of a lowered program by XLA's cost analysis (nan where it gives none)."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def _decode_tiles(latent_hw, c: int, settings) -> float:
  """Decoder tiles of one image (tiles x P^2 = passes per pixel x h w)."""
  h, w = latent_hw
  p = decode_lib.tile_px(settings) // settings.factor
  return decode_lib.passes_per_pixel((h, w, c), settings) * h * w / p ** 2


def border_share(keep, patch: int) -> float:
  """The share of patch x patch windows of a [h, w] keep mask holding kept and free
  pixels: about the share of windows that the keep-mask resampling runs again (the mean
  over two grids, unshifted and shifted by half a window, as the grid's offsets move
  windows across a border that one grid could have aligned with). Read one row of
  windows at a time (memory: patch rows of the mask)."""
  k = np.asarray(keep, bool)
  h, w = k.shape
  shares = []
  for off in (0, patch // 2):
    rows = np.arange(-off, h, patch)                 # window row starts (may be < 0)
    cols = np.maximum(np.arange(-off, w, patch), 0)  # where each window's columns start
    mixed = cells = 0
    for r in rows:
      band = k[max(r, 0):r + patch]
      kept = np.logical_or.reduceat(band, cols, axis=1).any(axis=0)
      free = np.logical_or.reduceat(~band, cols, axis=1).any(axis=0)
      mixed += int((kept & free).sum())
      cells += len(cols)
    shares.append(mixed / cells)
  return float(np.mean(shares))


def plan(pipe, req, *, n_images: int = 1, labels=None, strength: float = 1.0,
         keep=None) -> dict:
  """The work and memory of a request (see the module doc): `pipe` the `Pipeline`, `req`
  its `request.Request` (the mask stage is planned when it has one); `labels` the given
  [N, H, W] (or [H, W]) map, `keep` the [H/f, W/f] latent keep mask (its border windows
  run `o.resample` more passes)."""
  o, n_batch = req.options, req.n_batch
  f = pipe.geometry.factor
  h_px, w_px = req.image_hw
  stages = {}
  if req.mask is not None:
    m = req.mask
    fields = m.windows
    it, win = m.placement.count(m.latent_hw, m.patch, o.sampling_steps, n_batch,
                                fields['patches_per_step'])
    passes = 2 if o.mask_cond_scale else 1
    samples = it * n_batch * fields['patches_per_step'] * passes
    stages['mask_stage'] = dict(
        latent_shape=[n_batch, *m.latent_hw, pipe.mask_unet.config.channels],
        patch=m.patch, **fields, patch_iterations=round(it), windows=round(win),
        unet_samples=round(samples), unet_batch=n_batch * fields['patches_per_step'] * passes,
        unet_gflop_per_sample=_unet_flops(pipe.mask_unet, m.patch) / 1e9,
        decoder_tiles=round(n_batch * _decode_tiles(m.latent_hw,
                                                    pipe.vae.config.latent_channels,
                                                    m.decode)),
        decoder_tile=decode_lib.tile_px(m.decode) // f, decoder_tile_batch=m.decode.tile_batch)
    per_window, source = MASK_LABELS_PER_WINDOW, 'assumed (mask-model layouts)'
  else:
    if hasattr(labels, 'latent'):          # a lazy map: read at latent resolution only
      latent = labels.latent(f)[None]
    else:
      lab = np.asarray(labels)
      latent = masks_lib.latent_labels(lab[None] if lab.ndim == 2 else lab, f)
    per_window = labels_per_window(latent, req.image.patch, pipe.unet.config.num_classes)
    source = 'counted on the label map'
  stage = req.image
  patch, latent_hw, fields = stage.patch, stage.latent_hw, stage.windows
  steps = o.sampling_steps - loop_lib.start_level(o.sampling_steps, strength)  # levels run
  it, win = stage.placement.count(latent_hw, patch, steps, n_batch,
                                  fields['patches_per_step'])
  batch = n_batch * fields['patches_per_step']
  chunk = diffusion.pack_chunk(batch)
  passes = per_window + 1      # the unconditional pass: w != 0, or label 0 present
  samples = win * passes + (it * chunk / 2 if chunk > 1 else 0)
  border = border_share(keep, patch) if keep is not None and o.resample else 0.0
  resampled = win * border * o.resample        # windows run again at the keep border
  samples += resampled * passes
  settings = stage.decode
  stages['image_stage'] = dict(
      latent_shape=[n_batch, *latent_hw, pipe.unet.config.channels], patch=patch, **fields,
      patch_iterations=round(it), windows=round(win),
      labels_per_window=round(per_window, 3), labels_per_window_source=source,
      resampled_windows=round(resampled),
      unet_samples=round(samples), unet_batch=chunk,
      unet_gflop_per_sample=_unet_flops(pipe.unet, patch) / 1e9,
      sampling_steps_run=steps,
      coverage=round(win * patch ** 2 / (n_batch * latent_hw[0] * latent_hw[1] * steps), 3),
      unet_samples_per_latent_pixel_step=round(
          samples * patch ** 2 / (n_batch * latent_hw[0] * latent_hw[1] * steps), 3),
      decoder_tiles=round(n_batch * _decode_tiles(latent_hw, pipe.vae.config.latent_channels,
                                                  settings)),
      decoder_tile=decode_lib.tile_px(settings) // f, decoder_tile_batch=settings.tile_batch,
      decoder_passes_per_pixel=round(decode_lib.passes_per_pixel(
          (*latent_hw, pipe.vae.config.latent_channels), settings), 3))
  tflop = 0.0
  for name, s in stages.items():
    s['decoder_gflop_per_tile'] = _decoder_flops(pipe, o.dtype, s['decoder_tile']) / 1e9
    s['unet_tflop'] = round(s['unet_samples'] * s['unet_gflop_per_sample'] / 1e3, 3)
    s['decoder_tflop'] = round(s['decoder_tiles'] * s['decoder_gflop_per_tile'] / 1e3, 3)
    tflop += s['unet_tflop'] + s['decoder_tflop']
  return {'image_size': [h_px, w_px], 'n_images': n_images, 'batch_size': n_batch,
          'batches': -(-n_images // n_batch), 'stages': stages,
          'tflop_per_batch': round(tflop, 3), 'host_bytes': req.memory['host'],
          'device_bytes': req.memory['device'],
          # CPU: the device's bytes are in the host's memory too (the check adds them)
          'host_is_device': jax.default_backend() == 'cpu'}


def _time_call(fn, *args, repeats: int = 3) -> float:
  """Best seconds of one call of a jitted `fn` after its compile run."""
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def timed(pipe, p: dict, o) -> dict:
  """`p` with `seconds` per stage and in all, from one timed U-Net call at each stage's
  batch and one decoder call of a tile batch on the current device (x calls needed)."""
  p = {**p, 'stages': {k: dict(v) for k, v in p['stages'].items()}, 'device':
       jax.devices()[0].device_kind}
  total = 0.0
  for name, s in p['stages'].items():
    model = pipe.unet if name == 'image_stage' else pipe.mask_unet
    cfg = dataclasses.replace(model.config, dtype=o.dtype)
    b, q = s['unet_batch'], s['patch']
    x = jnp.zeros((b, q, q, cfg.channels), jnp.float32)
    t = jnp.full((b,), 500, jnp.int32)
    cond = ((jnp.ones((b, q, q), jnp.int32),) if cfg.kind == 'image'
            else (jnp.ones((b,), jnp.int32), jnp.zeros((b,), bool)))
    unet_call = _time_call(jax.jit(unet_lib.eps_fn(cfg)), model.params, x, t, *cond)
    tb, tile = s['decoder_tile_batch'], s['decoder_tile']
    z = jnp.zeros((tb, tile, tile, pipe.vae.config.latent_channels), jnp.float32)
    dec_call = _time_call(jax.jit(pipe.stages.decoder(o.dtype)), pipe.vae.params, z)
    s['unet_seconds'] = round(s['unet_samples'] / b * unet_call, 2)
    s['decoder_seconds'] = round(s['decoder_tiles'] / tb * dec_call, 2)
    total += s['unet_seconds'] + s['decoder_seconds']
  p['seconds_per_batch'] = round(total, 2)
  p['seconds'] = round(total * p['batches'], 2)
  return p


def summary(p: dict) -> str:
  """A few readable lines of a (timed) plan."""
  lines = [f"{p['image_size'][0]}x{p['image_size'][1]} px, {p['n_images']} image(s) in "
           f"{p['batches']} batch(es) of {p['batch_size']}"]
  for name, s in p['stages'].items():
    lines.append(
        f"  {name}: latent {'x'.join(map(str, s['latent_shape'][1:3]))}, "
        f"{s['schedule']} K={s['patches_per_step']}, {s['patch_iterations']} iterations, "
        f"{s['windows']} windows"
        + (f" (+{s['resampled_windows']} resampled at the keep border)"
           if s.get('resampled_windows') else '')
        + f", {s['unet_samples']} U-Net samples "
        f"({s['unet_tflop']} TFLOP), decode {s['decoder_tiles']} tiles "
        f"({s['decoder_tflop']} TFLOP)"
        + (f", ~{s['unet_seconds'] + s['decoder_seconds']:.0f} s" if 'unet_seconds' in s
           else ''))
  host, device = p['host_bytes'] / memory.GiB, p['device_bytes'] / memory.GiB
  lines.append(f"  memory: {host + device:.2f} GiB in all on this CPU (host {host:.2f} GiB "
               f"+ device {device:.2f} GiB, one memory)" if p.get('host_is_device') else
               f"  memory: host {host:.2f} GiB, device {device:.2f} GiB")
  for why in p.get('refused', ()):
    lines.append(f"  the run would be refused: {why}")
  if 'seconds' in p:
    lines.append(f"  time: ~{p['seconds']:.0f} s on {p['device']} (from timed calls)")
  return '\n'.join(lines)
