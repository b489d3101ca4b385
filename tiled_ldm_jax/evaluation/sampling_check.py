"""Checks of `sampling.sample` with analytic denoisers (tests/test_sampling.py and
tools/check_sampling.py print the same table).

Patch equivalence. A pixel-local denoiser (each output pixel a function of that pixel's
value, its time, its spatial cond and its image's cond) sampled with small patches must
give what one patch covering the whole latent gives. This holds because (1) the initial
noise is drawn per image over the whole latent (`fold_in(key, 0)`), not per patch; (2)
every pixel takes exactly the S steps of the same time grid, each at the level it is at,
with the model fed that pixel's value at that level (the lower-level copy), so a pixel's
trajectory depends only on its own values; (3) eta = 0 for the DDIM types, because the
step noise (eta > 0) is drawn per patch slot and iteration, so its value at a pixel
depends on where the patches fell; flow steps draw no noise.

Oracle. A denoiser that knows the target image (read from a spatial cond, so a misplaced
crop misses) and returns the exact prediction lands on the target: DDIM with eta = 0
reproduces x0 at every step and returns it on the last; the Euler step on the exact
velocity `(x - x0) / t` ends at x0 at t = 0.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from tiled_ldm_jax.sampling import processes
from tiled_ldm_jax import sampling

CHANNELS = 3
MIX = np.random.RandomState(0).randn(CHANNELS, CHANNELS).astype(np.float32) * 0.5


@functools.cache   # one function object per type: compiled samplers are reused
def local_denoiser(prediction: str):
  """Pixel-local and bounded; reads a spatial map and a per-image scale from the cond."""
  scale_t = 1.0 if prediction == 'flow' else 1e-3

  def denoise(params, x, t, cond):
    tt = t.astype(jnp.float32) * scale_t
    z = (x @ params + 0.3 * tt[:, None, None, None] + 0.2 * cond['map'][..., None]
         + 0.1 * cond['scale'][:, None, None, None])
    return jnp.tanh(z)
  return denoise


def oracle_denoiser(prediction: str, schedule=None):
  """The exact prediction for the target image `cond['target']` (cropped per patch)."""
  def denoise(params, x, t, cond):
    del params
    x0 = cond['target']
    b = (-1, 1, 1, 1)
    if prediction == 'flow':
      return (x - x0) / t.reshape(b)
    ac = jnp.asarray(schedule.alphas_cumprod)[jnp.clip(t, 0, schedule.timesteps - 1)]
    sa, s1a = jnp.sqrt(ac).reshape(b), jnp.sqrt(1.0 - ac).reshape(b)
    eps = (x - sa * x0) / s1a
    return {'eps': eps, 'x0': x0, 'v': sa * eps - s1a * x0}[prediction]
  return denoise


def _cond(n, h, w, seed):
  rng = np.random.RandomState(seed)
  return {'map': sampling.spatial(rng.uniform(-1, 1, (n, h, w)).astype(np.float32)),
          'scale': rng.uniform(-1, 1, (n,)).astype(np.float32)}


def patch_equivalence(prediction: str, schedule: str, noise_schedule: str, *,
                      hw=(16, 16), patch: int = 8, sampling_steps: int = 4, n: int = 2,
                      clip_x0: float | None = 1.0, windows=None) -> float:
  """Max |small patches - one whole-latent patch| for the pixel-local denoiser
  (`windows`: the small patches' placement, default by `schedule`).

  clip_x0 = 1 (as the DiffInfinite models): without it an eps model's x0 at t = 999 of
  the cosine schedule is 1/sqrt(a_999) times its input, which amplifies the float32
  rounding differences of the two compiled programs (different patch shapes) into
  ~1e-2 at the end (measured), although both compute the same maths.
  """
  keys = sampling.image_keys(0, range(n))
  cond = _cond(n, *hw, seed=1)
  common = dict(keys=keys, latent_shape=hw + (CHANNELS,), sampling_steps=sampling_steps, eta=0.0, devices=1,
                process=process_of(prediction, noise_schedule, clip_x0))
  small = dict(windows=windows or _SMALL_WINDOWS[schedule])
  fn = local_denoiser(prediction)
  tiled = sampling.sample(fn, jnp.asarray(MIX), cond, patch=patch, **small, **common)
  whole = sampling.sample(fn, jnp.asarray(MIX), cond, patch=max(hw), **common)
  return float(jnp.abs(tiled - whole).max())


def process_of(prediction: str, noise_schedule='cosine', clip_x0=None):
  """The sampling strategy of a prediction type named in a table."""
  if prediction == 'flow':
    return sampling.Flow()
  return sampling.Diffusion(prediction, noise_schedule, clip_x0)


# A table names its placements; these are their objects.
_SMALL_WINDOWS = {'random': sampling.Random(2), 'grid': sampling.Grid(margin=2, patches_per_step=4)}
_WINDOWS = {'random': lambda k: sampling.Random(k or 1),
            'grid': lambda k: sampling.Grid(patches_per_step=k)}


def windows_of(schedule: str, patches_per_step: int | None = None):
  return _WINDOWS[schedule](patches_per_step)


def oracle_error(prediction: str, schedule: str, noise_schedule: str = 'cosine', *,
                 hw=(16, 16), patch: int = 8, sampling_steps: int = 4, n: int = 2,
                 eta: float = 0.0) -> float:
  """Max |sample - target| for the oracle denoiser."""
  keys = sampling.image_keys(3, range(n))
  target = np.random.RandomState(2).uniform(-0.9, 0.9, (n,) + hw + (CHANNELS,))
  fn = oracle_denoiser(prediction, processes.noise_schedule(noise_schedule))
  out = sampling.sample(fn, None, {'target': sampling.spatial(target.astype(np.float32))},
                        keys=keys, latent_shape=hw + (CHANNELS,), patch=patch, sampling_steps=sampling_steps,
                        process=process_of(prediction, noise_schedule),
                        windows=windows_of(schedule), eta=eta, devices=1)
  return float(np.abs(np.asarray(out) - target).max())


def table(noise_schedules=processes.NOISE_SCHEDULES, schedules=('random', 'grid'),
          predictions=processes.PREDICTIONS) -> list[dict]:
  """Rows {prediction, schedule, noise_schedule, patch_error, oracle_error}; flow has one
  row per schedule (no noise schedule)."""
  rows = []
  for prediction in predictions:
    for schedule in schedules:
      for ns in (noise_schedules if prediction != 'flow' else ('-',)):
        name = 'cosine' if ns == '-' else ns
        rows.append({'prediction': prediction, 'schedule': schedule, 'noise_schedule': ns,
                     'patch_error': patch_equivalence(prediction, schedule, name),
                     'oracle_error': oracle_error(prediction, schedule, name)})
  return rows


def format_table(rows) -> str:
  lines = ['| prediction | schedule | noise schedule | small vs whole patch | oracle |',
           '|---|---|---|---|---|']
  lines += [f"| {r['prediction']} | {r['schedule']} | {r['noise_schedule']} | "
            f"{r['patch_error']:.2e} | {r['oracle_error']:.2e} |" for r in rows]
  return '\n'.join(lines)

