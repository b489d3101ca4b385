"""Side-by-side measurements of sampler options on one set of models (evaluation only).

`compare_schedules`: random vs grid placement (and grid margins) on the same label map
and seeds: coverage, seconds, mask adherence and seam visibility.
`compare_dtypes`: float32 vs bfloat16 compute on the same seed: PSNR of the decoded image
and seconds.

Both time the stage after a warm-up call with the same settings (so compile time is not
in `seconds`) and return plain dicts, one per run, for a script to print as JSON.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from tiled_ldm_jax import request as request_lib
from tiled_ldm_jax.sampling import placements
from tiled_ldm_jax.sampling import windows as windows_lib
from tiled_ldm_jax.evaluation import adherence
from tiled_ldm_jax.evaluation import seams
from tiled_ldm_jax.files import label_maps

WARMUP_SEED = 10_000   # never one of the measured seeds


def default_classifier(pipe):
  """The adherence classifier `score_sample.py` would use for this pipeline's VAE: the
  bundled one (fit on the real demo image) for the demo VAE, else one fit on synthetic
  textures through the VAE's round trip."""
  path = adherence.demo_classifier_for(pipe.paths.get('vae', ''))
  if path:
    return adherence.load_classifier(path)
  return adherence.fit_texture_classifier(
      pipe.unet.config.num_classes, n_images=12,
      transform=adherence.vae_round_trip(pipe.vae.config, pipe.vae.params))


def demo_labels(image_size: int) -> np.ndarray:
  """[H, W] int32: the bundled 512 px demo mask scaled (nearest) to `image_size`."""
  from tiled_ldm_jax import demo  # pylint: disable=g-import-not-at-top
  m = label_maps.read_label_png(demo.mask_path())
  rows = np.arange(image_size) * m.shape[0] // image_size
  cols = np.arange(image_size) * m.shape[1] // image_size
  return m[rows][:, cols].astype(np.int32)


def _timed_latents(pipe, labels, seed, o):
  start = time.perf_counter()
  req = pipe.request(labels.shape[1:3], len(labels), o)
  smp, state, latent = pipe.stages.image_stage(req, labels, np.arange(len(labels)), seed)
  state = smp.run(pipe.unet.params, state, latent)
  jax.block_until_ready(state.x)
  return state, time.perf_counter() - start, smp


def last_level_grid(pipe, o, image_hw, seed: int) -> tuple[int, int, int]:
  """(cell px, first row border px, first col border px) of the grid schedule's last
  level for image 0: borders lie at `first + k * cell`."""
  req = pipe.request(image_hw, 1, o)
  smp, state, _ = pipe.stages.image_stage(req, np.zeros((1,) + tuple(image_hw), np.int32),
                                           [0], seed)
  s = smp.settings
  cell = s.patch - 2 * int(smp.placement.margin_at(s.sampling_steps - 1))
  off = np.asarray(windows_lib.grid_offset(state.keys[0], s.sampling_steps - 1, cell))
  f = pipe.geometry.factor
  return cell * f, int((-off[0]) % cell) * f, int((-off[1]) % cell) * f


def grid_seam_ratio(img: np.ndarray, tile: int, first_row: int, first_col: int) -> float:
  """Seam ratio at the borders of one shifted grid (rows and columns pooled equally)."""
  x = img.astype(np.float32) / 255
  # seam_ratio counts borders at offset + k * tile for k >= 1: start one tile earlier.
  return float(np.mean([seams.seam_ratio(x, tile, first_row - tile, axes=(0,)),
                        seams.seam_ratio(x, tile, first_col - tile, axes=(1,))]))


def compare_schedules(pipe, labels: np.ndarray, seeds, variants, *, classifier=None,
                      **options) -> list[dict]:
  """One row per (variant, seed). `variants`: [dicts of `Options` fields, e.g.
  {'schedule': 'grid', 'grid_margin': 8, 'grid_margin_levels': 1}], `labels` [H, W].
  Adherence by the texture classifier and by the held-out colour one
  (`adherence.fit_colour_classifier`).

  Seams (`seams.seam_ratio`, ~1 when invisible) are measured for every variant at the
  cell borders of the last level of the margin-0 grid of that seed (for random placement
  these lines are a control) and, for a grid, also at its own last level's borders.
  """
  labels = np.asarray(labels, np.int32)[None]
  round_trip = adherence.vae_round_trip(pipe.vae.config, pipe.vae.params)
  if classifier is None:
    classifier = default_classifier(pipe)
  colour = adherence.fit_colour_classifier(pipe.unet.config.num_classes,
                                           transform=round_trip)
  rows = []
  for variant in variants:
    o = pipe.resolve(**{**options, **variant})
    _timed_latents(pipe, labels, WARMUP_SEED, o)
    for seed in seeds:
      state, seconds, smp = _timed_latents(pipe, labels, seed, o)
      img = pipe.decode(state.x, options=o)[0]
      # The same lines for every variant: the margin-0 grid's last-level cell borders
      # (random: a control; a grid with a margin: its cells are smaller, see seam_own).
      tile, r0, c0 = last_level_grid(pipe, pipe.resolve(o, schedule='grid', grid_margin=0),
                                     labels.shape[1:], seed)
      seam = grid_seam_ratio(img, tile, r0, c0)
      seam_own = (grid_seam_ratio(img, *last_level_grid(pipe, o, labels.shape[1:], seed))
                  if isinstance(smp.placement, placements.GridPlacement) else seam)
      n, h, w = state.times.shape
      p = pipe.geometry.latent_size(o.patch_size, 'patch_size')
      rows.append({
          'schedule': o.schedule,
          'grid_margin': request_lib.stage_margin(o, o.patch_size, pipe.geometry.factor),
          'grid_margin_levels': o.grid_margin_levels, 'seed': int(seed),
          'seconds': seconds,
          'coverage': int(state.patches) * p * p / (n * h * w * o.sampling_steps),
          'patch_iterations': int(state.iterations),
          'adherence': adherence.mask_adherence(img, labels[0], classifier)['adherence'],
          'adherence_colour': adherence.mask_adherence(img, labels[0], colour)['adherence'],
          'denoiser_evaluations': int(state.evaluations),
          'seam_ratio': seam, 'seam_ratio_own_grid': seam_own})
  return rows


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR in dB of two uint8 images (inf when equal)."""
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


SOLVER_RUNS = (('dpmpp2m', 10), ('dpmpp2m', 15), ('dpmpp2m', 20), ('ddim', 10), ('ddim', 20),
               ('ddim', 50))
SOLVER_REFERENCE = ('ddim', 250)


def _line_score(img) -> float | None:
  try:
    return seams.line_score(img)
  except ValueError:     # an image smaller than the measure's segments
    return None


def compare_solvers(pipe, labels: np.ndarray, seeds, runs=SOLVER_RUNS,
                    reference=SOLVER_REFERENCE, *, classifier=None, **options) -> list[dict]:
  """One row per (solver, steps, seed): PSNR of the image to the reference run's (DDIM
  at 250 steps), all with eta 0, the same label map `labels` [H, W] and initial noise;
  mask adherence; line score (`seams.line_score`); U-Net samples per latent pixel-step;
  seconds. The reference's own row has its adherence and line score."""
  labels = np.asarray(labels, np.int32)[None]
  options = {k: v for k, v in options.items() if k not in ('sampling_steps', 'solver', 'eta')}
  if classifier is None:
    classifier = default_classifier(pipe)
  rows = []
  for seed in seeds:
    ref = None
    for solver, steps in (reference,) + tuple(runs):
      o = pipe.resolve(solver=solver, sampling_steps=steps, eta=0.0, **options)
      state, seconds, smp = _timed_latents(pipe, labels, seed, o)
      img = pipe.decode(state.x, options=o)[0]
      ref = img if ref is None else ref
      n, h, w = state.times.shape
      p = pipe.geometry.latent_size(o.patch_size, 'patch_size')
      rows.append({
          'solver': solver, 'sampling_steps': steps, 'seed': int(seed),
          'reference': f'{reference[0]} {reference[1]}',
          'psnr_vs_reference': psnr(img, ref),
          'adherence': adherence.mask_adherence(img, labels[0], classifier)['adherence'],
          'line_score': _line_score(img),
          'unet_samples_per_pixel_step': int(state.evaluations) * p * p / (n * h * w * steps),
          'seconds': seconds})
  return rows


def compare_dtypes(pipe, labels: np.ndarray, seed: int, dtypes=('float32', 'bfloat16'),
                   **options) -> list[dict]:
  """One row per dtype: sampling and decode seconds, PSNR of the image against dtypes[0]."""
  labels = np.asarray(labels, np.int32)[None]
  rows, first = [], None
  for dtype in dtypes:
    o = pipe.resolve(dtype=dtype, **options)
    pipe.decode(_timed_latents(pipe, labels, WARMUP_SEED, o)[0].x, options=o)   # compile
    state, seconds, smp = _timed_latents(pipe, labels, seed, o)
    start = time.perf_counter()
    img = pipe.decode(state.x, options=o)[0]
    decode_seconds = time.perf_counter() - start
    first = img if first is None else first
    rows.append({'dtype': dtype, 'seed': seed, 'sample_seconds': seconds,
                 'decode_seconds': decode_seconds, 'psnr_vs_' + dtypes[0]: psnr(img, first),
                 'image_size': labels.shape[1], 'device': jax.devices()[0].device_kind})
  return rows
