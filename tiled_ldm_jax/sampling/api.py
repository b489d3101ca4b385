"""Sample your own model: the large-image random-patch sampler for any JAX denoiser.

    from tiled_ldm_jax import sampling
    x = sampling.sample(denoise, params, cond, keys=sampling.image_keys(0, [0, 1]),
                        latent_shape=(256, 256, 4), patch=64, sampling_steps=50,
                        process=sampling.Diffusion('v', 'scaled_linear'))
    # x: [N, 256, 256, 4]

`denoise(params, x [B, P, P, C], t [B], cond_patch) -> [B, P, P, C]` is the model's
prediction for B patches. For 'eps', 'v' and 'x0' models `t` is the int timestep
indexing the noise schedule's `alphas_cumprod`, and a step is DDIM (eta); for 'flow'
`t` is a float in [0, 1], `x_t = (1 - t) x0 + t noise`, the model predicts `noise - x0`
and a step is Euler on a uniform grid from 1 to 0 (`sampling/processes.py`).

`cond` is any pytree (None for an unconditional model). Leaves wrapped with
`spatial(array)` ([N, h, w, ...] at latent resolution, e.g. a label map) reach the
denoiser cropped to each patch ([B, P, P, ...]); other leaves ([N, ...], e.g. a class id
or a text embedding) as the row of the patch's image ([B, ...]).

This is the loop the DiffInfinite pipeline runs (`loop.Sampler`); guidance is a
denoiser wrapper (`classifier_free_guidance`, `multilabel_guidance`). Compiled samplers
are cached per (denoiser, settings, process, placement), so calling `sample` again with
new keys or cond of the same shapes does not recompile.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import jax.numpy as jnp

from tiled_ldm_jax.sampling import guidance
from tiled_ldm_jax.sampling import processes
from tiled_ldm_jax import program_cache
from tiled_ldm_jax.sampling import loop as loop_lib
from tiled_ldm_jax.sampling import windows as windows_lib
from tiled_ldm_jax import sharding

# Re-exported: the public names of this module.
Spatial = loop_lib.Spatial
spatial = loop_lib.spatial
noise_schedule = processes.noise_schedule
classifier_free_guidance = guidance.classifier_free_guidance
multilabel_guidance = guidance.multilabel_guidance
image_keys = loop_lib.image_keys
PREDICTIONS = processes.PREDICTIONS
NOISE_SCHEDULES = processes.NOISE_SCHEDULES
# The strategies: how a step uses the prediction, where the windows go.
Diffusion = processes.Diffusion
Flow = processes.Flow
DDIM = processes.DDIM                 # solvers: `Diffusion(..., solver=)`, `Flow(solver=)`
DPMSolver2M = processes.DPMSolver2M
Random = windows_lib.Random
Grid = windows_lib.Grid


def sample(denoise, params, cond, *, keys, latent_shape, patch: int, sampling_steps: int,
           process=None, windows=None, eta: float = 1.0, dtype=None, mesh=None,
           devices: int = 0, progress_every: int = 0, return_state: bool = False,
           init=None, strength: float = 1.0, keep=None, resample: int = 0):
  """N latents [N, h, w, C] sampled patch by patch (see the module docstring).

  Args:
    denoise: `(params, x, t, cond_patch) -> pred` (or `(pred, samples evaluated)`).
    params: passed through to `denoise` (a jit argument: weights are not constants).
    cond: conditioning pytree; `spatial(...)` leaves are cropped per patch.
    keys: [N] typed PRNG keys, one per image (`image_keys(seed, range(N))`); image n
      depends only on keys[n].
    latent_shape: (h, w, C). patch: the latent window side P (<= h, w).
    sampling_steps: sampling steps S (every latent pixel takes exactly S).
    process: what a step does with the prediction: `Diffusion(prediction, noise_schedule,
      clip_x0, solver)` (default `Diffusion()`: eps, cosine, no clamp, DDIM) or
      `Flow(solver)` (Euler); `solver=DPMSolver2M()`: DPM-Solver++(2M), deterministic,
      second order (the sampler keeps each pixel's last x0 prediction: one more
      latent-sized buffer).
    windows: where each iteration's windows go: `Random(patches_per_step)` (default
      `Random()`, DiffInfinite's) or `Grid(margin, patches_per_step, margin_levels)`.
    eta: DDIM eta (0: deterministic given the initial noise; unused for flow and by
      DPMSolver2M).
    dtype: the dtype `x` is given to `denoise` in (e.g. jnp.bfloat16); the state and the
      update stay float32.
    mesh / devices: a 1-D `jax.sharding.Mesh`, or at most this many devices (0: all);
      images are split over devices when N divides, else each iteration's patches.
    return_state: return the final `loop.SamplerState` (x and counters) instead of x.
    init / strength: start from clean latents init [N, h, w, C] noised to the level where
      the last round(strength * sampling_steps) steps begin (strength in (0, 1]; 1: from
      noise); only those steps run (`loop.Sampler.init`).
    keep: [N, h, w] (non-zero = keep; needs init): kept pixels follow init noised to
      each level (replaced at every step, as RePaint), the others are generated.
    resample: with keep, RePaint resampling passes per step of the windows that hold
      kept and free pixels (the process needs `renoise`; 0: none).
  """
  process = Diffusion() if process is None else process
  windows = Random() if windows is None else windows
  h, w, c = _check(keys, latent_shape, patch, process, windows, cond)
  loop_lib.check_start(sampling_steps, strength, init=init is not None,  # before any work
                       keep=keep is not None)
  if keep is not None:
    if tuple(np.shape(keep)) != (keys.shape[0], h, w):
      raise ValueError(f'keep must be [N, h, w] = {[keys.shape[0], h, w]}, got '
                       f'{list(np.shape(keep))}')
    cond = (cond, loop_lib.known(init, keep))
    if resample and not hasattr(process, 'renoise'):
      raise ValueError(f'resample needs a process with renoise(x, noise, t_from, t_to); '
                       f'{process!r} has none')
  settings = loop_lib.SamplerSettings(sampling_steps=sampling_steps, patch=patch, eta=eta,
                                      progress_every=progress_every, keep=keep is not None,
                                      resample=resample if keep is not None else 0,
                                      **windows.settings((h, w), patch))
  k = settings.patches_per_step
  n = keys.shape[0]
  if mesh is None:
    mesh = sharding.make_mesh(n, k, devices)
  smp = _sampler(denoise, None if dtype is None else jnp.dtype(dtype), settings, process,
                 mesh, n)
  state = smp.run(params, smp.init(keys, (n, h, w), c, init=init, strength=strength), cond)
  return state if return_state else state.x


def _check(keys, latent_shape, patch, process, windows, cond):
  """One-line ValueErrors before anything is compiled."""
  if not isinstance(process, (Diffusion, Flow)):
    raise ValueError(f'process must be sampling.Diffusion(...) or sampling.Flow(), got '
                     f'{process!r}')
  if not isinstance(windows, (Random, Grid)):
    raise ValueError(f'windows must be sampling.Random(...) or sampling.Grid(...), got '
                     f'{windows!r}')
  if len(tuple(latent_shape)) != 3:
    raise ValueError(f'latent_shape must be (h, w, C), got {latent_shape}')
  if not (hasattr(keys, 'dtype') and jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
          and keys.ndim == 1):
    raise ValueError('keys must be [N] typed PRNG keys (jax.random.key / image_keys)')
  h, w, c = (int(v) for v in latent_shape)
  loop_lib.check_shapes((keys.shape[0], h, w), patch)
  loop_lib.check_cond(cond, (keys.shape[0], h, w))
  return h, w, c


def _sampler(denoise, dtype, settings, process, mesh, n_images) -> loop_lib.Sampler:
  """The compiled sampler (`loop.compiled`, the one cache) of a request."""
  if dtype is not None:
    denoise = _cast(denoise, dtype)
  return loop_lib.compiled(denoise, settings, mesh, n_images, process)


@functools.lru_cache(maxsize=16)
def _cast(denoise, dtype):
  """`denoise` seeing x in `dtype` (the update stays float32); one per (denoiser, dtype)."""
  def cast(params, x, t, cond):
    return denoise(params, x.astype(dtype), t, cond)
  return program_cache.keyed(cast, 'cast', denoise, str(jnp.dtype(dtype)))
