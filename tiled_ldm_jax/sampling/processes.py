"""What one sampler step does with a model's prediction: DDIM for eps / v / x0 models on a
noise schedule, Euler for flow matching.

A process gives the sampler (`loop.Sampler`) two things:
- `time_grid(steps)`: [S, 2] pairs (t, t_next), one per level: the time the denoiser is
  told at level L and where the step lands. Diffusion: int timesteps indexing the noise
  schedule's `alphas_cumprod` (the original's `int(linspace(-1, T-1, S+1))`, reversed);
  flow: floats 1 -> 0 on a uniform grid.
- `step(x, pred, t, t_next, noise, eta)`: one update of a batch of patches [B, P, P, C].
- `noised(x0, noise, t)`: a clean latent taken to time t (starting from an image).
The sampler's per-pixel step counts index this grid, so the random-patch and grid
schedules (levels, per-pixel times) are the same code for every prediction type.

Flow matching convention: `x_t = (1 - t) x0 + t noise`, the model predicts the velocity
`noise - x0`, and a step is `x + (t_next - t) v` (deterministic: eta and noise unused).
"""

from __future__ import annotations

import hashlib

import jax.numpy as jnp
import numpy as np

from tiled_ldm_jax.sampling import diffusion

PREDICTIONS = diffusion.PREDICTIONS + ('flow',)
NOISE_SCHEDULES = ('cosine', 'linear', 'scaled_linear')
SD_BETAS = (0.00085, 0.012)   # Stable Diffusion's beta range (linear and scaled_linear)


def noise_schedule(name: str, timesteps: int = diffusion.NUM_TRAIN_STEPS, *,
                   beta_start: float = SD_BETAS[0],
                   beta_end: float = SD_BETAS[1]) -> diffusion.Schedule:
  """A `diffusion.Schedule` (`.alphas_cumprod` [T]) by name.

  'cosine': the original's (s = 0.008, betas clipped to 0.999); 'linear': betas
  `linspace(beta_start, beta_end, T)`; 'scaled_linear': betas
  `linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2` (Stable Diffusion's).
  """
  if name == 'cosine':
    return diffusion.Schedule(timesteps)
  if name == 'linear':
    betas = np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
  elif name == 'scaled_linear':
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=np.float64) ** 2
  else:
    raise ValueError(f'noise_schedule must be one of {NOISE_SCHEDULES}, got {name!r}')
  return diffusion.Schedule(alphas_cumprod=np.cumprod(1.0 - betas))


def as_schedule(value) -> diffusion.Schedule:
  """A name, a `diffusion.Schedule` (or any object with `alphas_cumprod`) or a [T] array."""
  if isinstance(value, str):
    return noise_schedule(value)
  if isinstance(value, diffusion.Schedule):
    return value
  ac = np.asarray(getattr(value, 'alphas_cumprod', value), np.float64)
  if ac.ndim != 1 or ac.size < 1 or not np.all((ac > 0) & (ac <= 1)):
    raise ValueError(f'alphas_cumprod must be a [T] array of values in (0, 1], got shape '
                     f'{ac.shape}')
  return diffusion.Schedule(alphas_cumprod=ac)


class Diffusion:
  """DDIM (with eta) for eps, v or x0 models on a noise schedule.

  `noise_schedule`: 'cosine' (the original's), 'linear', 'scaled_linear', a
  `noise_schedule(...)` object or a [T] `alphas_cumprod` array. `clip_x0`: clamp the
  predicted x0 to [-clip_x0, clip_x0] at every step (the DiffInfinite models: 1.0; None:
  no clamp).
  """

  def __init__(self, prediction: str = 'eps', noise_schedule='cosine',
               clip_x0: float | None = None):
    if prediction not in diffusion.PREDICTIONS:
      raise ValueError(f'prediction must be one of {PREDICTIONS}, got {prediction!r}')
    self.schedule = as_schedule('cosine' if noise_schedule is None else noise_schedule)
    self.prediction = prediction
    self.clip_x0 = clip_x0

  def __repr__(self):
    return (f'Diffusion({self.prediction!r}, <{self.schedule.timesteps} steps>, '
            f'clip_x0={self.clip_x0})')

  def _key(self):
    return (self.prediction, self.clip_x0, self.schedule.alphas_cumprod.tobytes())

  def program_key(self):
    """For `program_cache`: equal processes, equal keys."""
    return ('diffusion', self.prediction, self.clip_x0,
            hashlib.sha256(self.schedule.alphas_cumprod.tobytes()).hexdigest())

  def __eq__(self, other):
    return isinstance(other, Diffusion) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def time_grid(self, steps: int) -> np.ndarray:
    return diffusion.time_pairs(steps, self.schedule.timesteps)

  def step(self, x, pred, t, t_next, noise, eta: float):
    return diffusion.ddim_step(self.schedule, x, pred, t, t_next, noise, eta,
                               prediction=self.prediction, clip=self.clip_x0)

  def noised(self, x0, noise, t):
    """x0 taken to time t (int timesteps, a scalar or [N] for x0 [N, ...]):
    sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    a = jnp.asarray(self.schedule.alphas_cumprod, jnp.float32)[jnp.asarray(t, jnp.int32)]
    a = jnp.reshape(a, jnp.shape(a) + (1,) * (jnp.ndim(x0) - jnp.ndim(a)))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise

  def renoise(self, x, noise, t_from, t_to):
    """x at time t_from taken forward to the noisier t_to (per sample, [B] each):
    q(x_to | x_from) = N(sqrt(a_to / a_from) x, 1 - a_to / a_from), where t_from <= 0 is
    clean (a = 1, as `step` treats it)."""
    ac = jnp.asarray(self.schedule.alphas_cumprod, jnp.float32)
    last = self.schedule.timesteps - 1
    t_from, t_to = jnp.asarray(t_from, jnp.int32), jnp.asarray(t_to, jnp.int32)
    a_from = jnp.where(t_from > 0, ac[jnp.clip(t_from, 0, last)], 1.0)
    r = ac[jnp.clip(t_to, 0, last)] / a_from
    r = jnp.reshape(r, jnp.shape(r) + (1,) * (jnp.ndim(x) - jnp.ndim(r)))
    return jnp.sqrt(r) * x + jnp.sqrt(jnp.maximum(1.0 - r, 0.0)) * noise


class Flow:
  """Euler steps of a flow-matching (rectified flow) velocity model from t = 1 to 0."""

  def __repr__(self):
    return 'Flow()'

  def __eq__(self, other):
    return isinstance(other, Flow)

  def __hash__(self):
    return hash('flow')

  def program_key(self):
    return ('flow',)

  def time_grid(self, steps: int) -> np.ndarray:
    if steps < 1:
      raise ValueError(f'sampling steps must be >= 1, got {steps}')
    t = np.linspace(1.0, 0.0, steps + 1, dtype=np.float64).astype(np.float32)
    return np.stack([t[:-1], t[1:]], axis=1)

  def noised(self, x0, noise, t):
    """x0 taken to time t in [0, 1] (a scalar or [N] for x0 [N, ...]): (1 - t) x0 + t noise."""
    t = jnp.asarray(t, jnp.float32)
    t = jnp.reshape(t, jnp.shape(t) + (1,) * (jnp.ndim(x0) - jnp.ndim(t)))
    return (1.0 - t) * x0 + t * noise

  def renoise(self, x, noise, t_from, t_to):
    """x at time t_from taken forward to t_to >= t_from (per sample, [B] each): x_to =
    c x + sigma noise with c = (1 - t_to) / (1 - t_from) and sigma^2 = t_to^2 - (c t_from)^2,
    so that x_to = (1 - t_to) x0 + (noise of variance t_to^2)."""
    t_from, t_to = jnp.asarray(t_from, jnp.float32), jnp.asarray(t_to, jnp.float32)
    c = (1.0 - t_to) / jnp.maximum(1.0 - t_from, 1e-12)
    sigma = jnp.sqrt(jnp.maximum(t_to ** 2 - (c * t_from) ** 2, 0.0))
    shape = lambda a: jnp.reshape(a, jnp.shape(a) + (1,) * (jnp.ndim(x) - jnp.ndim(a)))
    return shape(c) * x + shape(sigma) * noise

  def step(self, x, pred, t, t_next, noise, eta: float):
    del noise, eta   # an ODE step
    bshape = (-1,) + (1,) * (x.ndim - 1)
    return x + (t_next - t).reshape(bshape) * pred


def make(prediction: str = 'eps', noise_schedule_=None, clip: float | None = 1.0):
  """The process of a prediction type ('eps', 'v', 'x0' or 'flow'), for callers that
  hold the type as a string (a model.json's objective)."""
  if prediction == 'flow':
    return Flow()
  return Diffusion(prediction, noise_schedule_, clip)
