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

The solver is a strategy of the process (`solver=`): `DDIM()` (the default: DDIM with eta
for diffusion, Euler for flow; one step needs only the current prediction) or
`DPMSolver2M()` (DPM-Solver++(2M), deterministic, second order from the previous level's
x0 prediction of the same pixel). Both work on the process's `alpha_sigma(t)` (x_t =
alpha x0 + sigma noise) and `x0_of(x, pred, t)`, so one multistep solver serves eps, v,
x0 and flow models. A solver with `history` makes the sampler keep, per latent pixel, its
last x0 prediction and the time it was made at (`loop.SamplerState.x0_prev`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import ClassVar

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


def _bcast(a, x):
  """a [B] reshaped to broadcast against x [B, ...]."""
  return jnp.reshape(a, jnp.shape(a) + (1,) * (jnp.ndim(x) - jnp.ndim(a)))


@dataclasses.dataclass(frozen=True)
class DDIM:
  """The one-step solver: DDIM with eta for diffusion processes (the original's step),
  Euler for flow. Needs no history."""
  name: ClassVar[str] = 'ddim'
  history: ClassVar[bool] = False

  def solve(self, process, x, pred, t, t_next, noise, eta, history=None):
    """(x at t_next, None): the process's own one-step update."""
    del history
    return process.step(x, pred, t, t_next, noise, eta), None


@dataclasses.dataclass(frozen=True)
class DPMSolver2M:
  """DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep): deterministic (eta is
  not used), second order from the x0 prediction of the pixel's previous level.

  With x_t = alpha_t x0 + sigma_t noise, lambda = log(alpha / sigma), h = lambda_next -
  lambda_t, the update is x_next = (sigma_next / sigma_t) x + alpha_next (1 - e^-h) D with
  D = x0 (first order: the first level a pixel takes in this run, or a previous level at
  alpha = 0, the flow's t = 1) or D = (1 + 1 / 2r) x0 - (1 / 2r) x0_prev, r = h_prev / h
  (second order). The last step (t_next clean) returns x0, first order as DDIM's last
  step (diffusers' `lower_order_final`).
  """
  name: ClassVar[str] = 'dpmpp2m'
  history: ClassVar[bool] = True

  def solve(self, process, x, pred, t, t_next, noise, eta, history=None):
    """(x at t_next, x0) for a batch x [B, ...] at times t [B]; `history` = (x0_prev
    [B, ...], t_prev [B], has_prev [B] bool) or None (first order everywhere)."""
    del noise, eta   # an ODE solver
    x0 = process.x0_of(x, pred, t)
    a_t, s_t = process.alpha_sigma(t)
    a_n, s_n = process.alpha_sigma(t_next)
    lam = lambda a, s: jnp.log(jnp.maximum(a, 1e-20)) - jnp.log(jnp.maximum(s, 1e-20))
    # e^-h = (alpha_t sigma_next) / (sigma_t alpha_next): exact where alpha_t = 0 too.
    decay = (a_t * s_n) / jnp.maximum(s_t * a_n, 1e-20)
    d = x0
    if history is not None:
      x0_prev, t_prev, has_prev = history
      a_p, s_p = process.alpha_sigma(t_prev)
      h = lam(a_n, s_n) - lam(a_t, s_t)
      h_prev = lam(a_t, s_t) - lam(a_p, s_p)
      second = has_prev & (a_p > 0) & (s_n > 0) & (h > 0)
      c = jnp.where(second, 0.5 * h / jnp.where(second, h_prev, 1.0), 0.0)   # 1 / 2r
      d = x0 + _bcast(c, x) * (x0 - x0_prev)
    x_next = _bcast(s_n / jnp.maximum(s_t, 1e-20), x) * x + _bcast(a_n * (1 - decay), x) * d
    return jnp.where(_bcast(s_n > 0, x), x_next, x0), x0


SOLVERS = {'ddim': DDIM, 'dpmpp2m': DPMSolver2M}


def solver_named(name: str):
  """The solver object of a flag value ('ddim' or 'dpmpp2m')."""
  if name not in SOLVERS:
    raise ValueError(f'solver must be one of {tuple(SOLVERS)}, got {name!r}')
  return SOLVERS[name]()


class Diffusion:
  """DDIM (with eta) for eps, v or x0 models on a noise schedule, or another `solver`.

  `noise_schedule`: 'cosine' (the original's), 'linear', 'scaled_linear', a
  `noise_schedule(...)` object or a [T] `alphas_cumprod` array. `clip_x0`: clamp the
  predicted x0 to [-clip_x0, clip_x0] at every step (the DiffInfinite models: 1.0; None:
  no clamp). `solver`: `DDIM()` (default) or `DPMSolver2M()`.
  """

  def __init__(self, prediction: str = 'eps', noise_schedule='cosine',
               clip_x0: float | None = None, solver=None):
    if prediction not in diffusion.PREDICTIONS:
      raise ValueError(f'prediction must be one of {PREDICTIONS}, got {prediction!r}')
    self.schedule = as_schedule('cosine' if noise_schedule is None else noise_schedule)
    self.prediction = prediction
    self.clip_x0 = clip_x0
    self.solver = _check_solver(solver)

  def __repr__(self):
    return (f'Diffusion({self.prediction!r}, <{self.schedule.timesteps} steps>, '
            f'clip_x0={self.clip_x0}, solver={self.solver!r})')

  def _key(self):
    return (self.prediction, self.clip_x0, self.schedule.alphas_cumprod.tobytes(),
            self.solver.name)

  def program_key(self):
    """For `program_cache`: equal processes, equal keys."""
    return ('diffusion', self.prediction, self.clip_x0,
            hashlib.sha256(self.schedule.alphas_cumprod.tobytes()).hexdigest(),
            self.solver.name)

  def __eq__(self, other):
    return isinstance(other, Diffusion) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def with_solver(self, solver) -> 'Diffusion':
    """This process with another solver."""
    return Diffusion(self.prediction, self.schedule, self.clip_x0, solver)

  def time_grid(self, steps: int) -> np.ndarray:
    return diffusion.time_pairs(steps, self.schedule.timesteps)

  def step(self, x, pred, t, t_next, noise, eta: float):
    """One DDIM step (the `DDIM` solver's update)."""
    return diffusion.ddim_step(self.schedule, x, pred, t, t_next, noise, eta,
                               prediction=self.prediction, clip=self.clip_x0)

  def alpha_sigma(self, t):
    """(alpha, sigma) [B] at int timesteps t [B] (x_t = alpha x0 + sigma noise); t <= 0
    is clean (1, 0), as `step` treats it."""
    ac = jnp.asarray(self.schedule.alphas_cumprod, jnp.float32)
    t = jnp.asarray(t, jnp.int32)
    a = jnp.where(t > 0, ac[jnp.clip(t, 0, self.schedule.timesteps - 1)], 1.0)
    return jnp.sqrt(a), jnp.sqrt(jnp.maximum(1.0 - a, 0.0))

  def x0_of(self, x, pred, t):
    """The x0 a prediction implies (clamped to clip_x0 as `step` does)."""
    t_idx = jnp.clip(jnp.asarray(t, jnp.int32), 0, self.schedule.timesteps - 1)
    x0, _ = diffusion.to_x0_eps(self.schedule, x, pred, t_idx, self.prediction)
    return x0 if self.clip_x0 is None else jnp.clip(x0, -self.clip_x0, self.clip_x0)

  def solve(self, x, pred, t, t_next, noise, eta: float, history=None):
    """(x at t_next, x0 or None) by the solver."""
    return self.solver.solve(self, x, pred, t, t_next, noise, eta, history)

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
  """A flow-matching (rectified flow) velocity model from t = 1 to 0: Euler steps
  (`solver=DDIM()`, the default) or `DPMSolver2M()`."""

  def __init__(self, solver=None):
    self.solver = _check_solver(solver)

  def __repr__(self):
    return 'Flow()' if self.solver.name == 'ddim' else f'Flow(solver={self.solver!r})'

  def __eq__(self, other):
    return isinstance(other, Flow) and self.solver == other.solver

  def __hash__(self):
    return hash(('flow', self.solver.name))

  def program_key(self):
    return ('flow',) if self.solver.name == 'ddim' else ('flow', self.solver.name)

  def with_solver(self, solver) -> 'Flow':
    """This process with another solver."""
    return Flow(solver)

  def alpha_sigma(self, t):
    """(alpha, sigma) = (1 - t, t) at times t [B] in [0, 1]."""
    t = jnp.asarray(t, jnp.float32)
    return 1.0 - t, t

  def x0_of(self, x, pred, t):
    """x0 = x - t v."""
    return x - _bcast(jnp.asarray(t, jnp.float32), x) * pred

  def solve(self, x, pred, t, t_next, noise, eta: float, history=None):
    """(x at t_next, x0 or None) by the solver."""
    return self.solver.solve(self, x, pred, t, t_next, noise, eta, history)

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


def _check_solver(solver):
  solver = DDIM() if solver is None else solver
  if not isinstance(solver, tuple(SOLVERS.values())):
    raise ValueError(f'solver must be sampling.DDIM() or sampling.DPMSolver2M(), got '
                     f'{solver!r}')
  return solver

