"""DPM-Solver++(2M) in the patch sampler, against a whole-image implementation written here.

The reference below is independent of `sampling/processes.py`: float64 numpy, one image,
the same time grid. A Gaussian data distribution gives an exact denoiser (E[x0 | x_t] in
closed form) that acts per pixel, so small patches on either placement must give the
whole-image result exactly when every pixel's solver history is its own; and the exact
probability-flow ODE solution is known well enough (DDIM at 1000 steps) to show the
second-order solver's error falls faster than DDIM's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiled_ldm_jax import sampling
from tiled_ldm_jax.sampling import loop as loop_lib
from tiled_ldm_jax.sampling import processes

MU, SD = 0.3, 0.5        # the data: x0 ~ N(MU, SD^2) per pixel
H, W, C = 16, 24, 2


def _alpha_sigma(process, t):
  if isinstance(process, sampling.Flow):
    t = np.float64(t)
    return 1.0 - t, t
  a = 1.0 if t <= 0 else np.float64(process.schedule.alphas_cumprod[int(t)])
  return np.sqrt(a), np.sqrt(1.0 - a)


def _x0_hat(x, alpha, sigma):
  """E[x0 | x_t = x] for x0 ~ N(MU, SD^2): the exact denoiser."""
  return MU + alpha * SD ** 2 / (alpha ** 2 * SD ** 2 + sigma ** 2) * (x - alpha * MU)


def _denoiser(process):
  """The exact denoiser as the model's prediction type (per pixel, jnp)."""
  prediction = 'flow' if isinstance(process, sampling.Flow) else process.prediction

  def denoise(params, x, t, cond):
    del params, cond
    if prediction == 'flow':
      tt = t.astype(jnp.float32).reshape(-1, 1, 1, 1)
      alpha, sigma = 1.0 - tt, tt
    else:
      ac = jnp.asarray(process.schedule.alphas_cumprod)[jnp.clip(t, 0, None)]
      a = jnp.where(t > 0, ac, 1.0).reshape(-1, 1, 1, 1)
      alpha, sigma = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    x0 = MU + alpha * SD ** 2 / (alpha ** 2 * SD ** 2 + sigma ** 2) * (x - alpha * MU)
    eps = (x - alpha * x0) / sigma
    if prediction == 'eps':
      return eps
    if prediction == 'x0':
      return x0
    if prediction == 'v':
      return alpha * eps - sigma * x0
    return (x - x0) / jnp.maximum(sigma, 1e-12)     # flow velocity noise - x0
  return denoise


def reference_dpmpp2m(process, x, steps):
  """DPM-Solver++(2M) over the whole image in float64 (first order at the first and the
  last step), on the process's time grid."""
  x = np.asarray(x, np.float64)
  pairs = process.time_grid(steps)
  prev = None
  lam = lambda a, s: np.log(a) - np.log(s)
  for i, (t, t_next) in enumerate(pairs):
    a_t, s_t = _alpha_sigma(process, t)
    a_n, s_n = _alpha_sigma(process, t_next)
    x0 = _x0_hat(x, a_t, s_t)
    if s_n == 0:
      x = x0
      break
    ratio = s_n / s_t
    decay = a_t * s_n / (s_t * a_n)
    d = x0
    if prev is not None and prev[1] > 0:
      x0_prev, a_p, s_p = prev
      h = lam(a_n, s_n) - lam(a_t, s_t)
      h_prev = lam(a_t, s_t) - lam(a_p, s_p)
      d = x0 + h / (2 * h_prev) * (x0 - x0_prev)
    x = ratio * x + a_n * (1 - decay) * d
    prev = (x0, a_t, s_t)
  return x


def reference_ddim(process, x, steps):
  """Deterministic DDIM (flow: Euler) over the whole image in float64."""
  x = np.asarray(x, np.float64)
  for t, t_next in process.time_grid(steps):
    a_t, s_t = _alpha_sigma(process, t)
    a_n, s_n = _alpha_sigma(process, t_next)
    x0 = _x0_hat(x, a_t, s_t)
    x = a_n * x0 + s_n * (x - a_t * x0) / s_t
  return x


PROCESSES = {
    # eps on the linear schedule: at the cosine's last timestep x0 = x / sqrt(a) - ...
    # amplifies float32 rounding ~300x (DDIM as much as DPM-Solver++), 2e-4 off float64
    'eps': lambda solver: sampling.Diffusion('eps', 'linear', solver=solver),
    'v': lambda solver: sampling.Diffusion('v', 'cosine', solver=solver),
    'x0': lambda solver: sampling.Diffusion('x0', 'scaled_linear', solver=solver),
    'flow': lambda solver: sampling.Flow(solver=solver),
}


def _noise(keys, patch):
  return np.asarray(loop_lib.init_state(keys, (H, W), C, patch).x)


def _sample(process, windows, patch, steps, keys, **kw):
  return np.asarray(sampling.sample(
      _denoiser(process), None, None, keys=keys, latent_shape=(H, W, C), patch=patch,
      sampling_steps=steps, process=process, windows=windows, eta=0.0, devices=1, **kw))


@pytest.mark.parametrize('prediction', ['eps', 'v', 'x0', 'flow'])
def test_one_window_equals_the_whole_image_reference(prediction):
  """patch = latent: the sampler is the whole-image solver."""
  process = PROCESSES[prediction](sampling.DPMSolver2M())
  keys = sampling.image_keys(3, [0, 1])
  got = np.asarray(sampling.sample(
      _denoiser(process), None, None, keys=keys, latent_shape=(H, H, C), patch=H,
      sampling_steps=7, process=process, windows=sampling.Grid(), eta=0.0, devices=1))
  x_t = np.asarray(loop_lib.init_state(keys, (H, H), C, H).x)
  want = reference_dpmpp2m(process, x_t, 7)
  np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize('windows', [sampling.Grid(margin=1), sampling.Random(2)],
                         ids=['grid', 'random'])
@pytest.mark.parametrize('prediction', ['eps', 'flow'])
def test_small_patches_keep_each_pixels_history(prediction, windows):
  """A per-pixel denoiser with 8 x 8 windows: the result is the whole-image solver's
  only if every pixel's x0 history is its own (a wrong crop, a history written in the
  margin or not at all fails this)."""
  process = PROCESSES[prediction](sampling.DPMSolver2M())
  keys = sampling.image_keys(5, [0, 1])
  got = _sample(process, windows, 8, 6, keys)
  want = reference_dpmpp2m(process, _noise(keys, 8), 6)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # and second order matters here: the first-order (DDIM) result is far from it
  assert np.abs(reference_ddim(process, _noise(keys, 8), 6) - want).max() > 1e-3


@pytest.mark.parametrize('process', [sampling.Diffusion('eps', 'cosine'),
                                     sampling.Diffusion('v', 'cosine'), sampling.Flow()],
                         ids=['eps', 'v', 'flow'])
def test_fewer_steps_for_the_same_accuracy(process):
  """Error to the ODE's solution (both solvers at 500 steps agree on it), on the cosine
  schedule of the DiffInfinite models: DPM-Solver++ at 15 steps is closer than DDIM at
  50, and at 10 steps under half of DDIM's error at 10. (On the linear schedules the
  original's time grid ends with a jump from t = T/S to clean, whose error both solvers
  share, so the gain there is smaller.)"""
  x_t = _noise(sampling.image_keys(0, [0]), 8)
  exact = reference_dpmpp2m(process, x_t, 500)
  err = lambda a: float(np.abs(a - exact).max())
  assert err(reference_ddim(process, x_t, 500)) < 0.01
  assert err(reference_dpmpp2m(process, x_t, 15)) < err(reference_ddim(process, x_t, 50))
  assert err(reference_dpmpp2m(process, x_t, 10)) < err(reference_ddim(process, x_t, 10)) / 2


def test_chunked_run_equals_whole_run():
  """The history lives in the state: a run cut in chunks (as resume does) is the same."""
  process = PROCESSES['eps'](sampling.DPMSolver2M())
  settings = loop_lib.SamplerSettings(sampling_steps=5, patch=8, eta=0.0, schedule='grid',
                                      patches_per_step=3, grid_margin=1)
  smp = loop_lib.Sampler(_denoiser(process), settings, process=process)
  keys = sampling.image_keys(1, [0])
  whole = smp.run(None, smp.init(keys, (1, H, W), C), None)
  state = smp.init(keys, (1, H, W), C)
  for _ in range(40):
    state = smp.run(None, state, None, max_iterations=2)
  np.testing.assert_array_equal(np.asarray(state.x), np.asarray(whole.x))
  assert int(state.level[0]) == 5


def test_strength_starts_first_order():
  """From an init at strength 0.5 the first level run has no history: the result is the
  reference solver started at that level from the noised init."""
  process = PROCESSES['eps'](sampling.DPMSolver2M())
  keys = sampling.image_keys(2, [0])
  init = np.full((1, H, W, C), 0.2, np.float32)
  got = _sample(process, sampling.Grid(), 8, 6, keys, init=init, strength=0.5)
  level = loop_lib.start_level(6, 0.5)
  t0 = process.time_grid(6)[level][0]
  a, s = _alpha_sigma(process, t0)
  x_t = a * init + s * _noise(keys, 8)

  class Tail:   # the time grid from `level` on
    schedule = process.schedule
    def time_grid(self, steps):
      return process.time_grid(6)[level:]
  want = reference_dpmpp2m(Tail(), x_t, None)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_solver_values_are_checked():
  with pytest.raises(ValueError, match='solver must be one of'):
    processes.solver_named('heun')
  with pytest.raises(ValueError, match='solver must be'):
    sampling.Diffusion('eps', solver='dpmpp2m')
  assert processes.solver_named('dpmpp2m') == sampling.DPMSolver2M()
  assert (sampling.Diffusion(solver=sampling.DPMSolver2M()).program_key()
          != sampling.Diffusion().program_key())


def _diffusers_dpmpp2m(torch, diffusers, process, x, steps):
  """diffusers' `DPMSolverMultistepScheduler` (DPM-Solver++, order 2, midpoint, the final
  step first order to sigma 0) on `process`'s schedule (float64) and time grid (its
  custom timesteps), with the exact denoiser; x [H, W, C] float64."""
  ac = np.asarray(process.schedule.alphas_cumprod, np.float64)
  betas = 1.0 - ac / np.concatenate([[1.0], ac[:-1]])
  scheduler = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=len(ac), trained_betas=betas, algorithm_type='dpmsolver++',
      solver_order=2, solver_type='midpoint', prediction_type='epsilon',
      thresholding=False, lower_order_final=True, final_sigmas_type='zero',
      use_karras_sigmas=False)
  scheduler.alphas_cumprod = torch.from_numpy(ac)   # its float32 cumprod drifts ~1e-5
  scheduler.set_timesteps(timesteps=[int(t) for t, _ in process.time_grid(steps)])
  sample = torch.from_numpy(x)
  for t in scheduler.timesteps:
    a = ac[int(t)]
    x0 = _x0_hat(sample.numpy(), np.sqrt(a), np.sqrt(1 - a))
    eps = (sample.numpy() - np.sqrt(a) * x0) / np.sqrt(1 - a)
    sample = scheduler.step(torch.from_numpy(eps), t, sample).prev_sample
  return sample.numpy()


def test_agrees_with_diffusers_dpm_solver():
  """Cross-check with diffusers' DPM-Solver++(2M) where torch and diffusers are
  installed (the project never needs them, so CI skips this; docs/generate.md says where
  it ran). The tiled sampler (16 x 16 latent, 8 x 8 grid windows) on the linear schedule
  equals diffusers' whole-image result; on the cosine schedule of the DiffInfinite
  models, diffusers equals this file's float64 reference (which the sampler is tested
  against above; float32 on the cosine's last step is ~1e-4 off, see PROCESSES)."""
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  steps = 12
  keys = sampling.image_keys(3, [0])
  process = sampling.Diffusion('eps', 'linear', solver=sampling.DPMSolver2M())
  got = np.asarray(sampling.sample(
      _denoiser(process), None, None, keys=keys, latent_shape=(H, H, C), patch=8,
      sampling_steps=steps, process=process, windows=sampling.Grid(margin=1), eta=0.0,
      devices=1))[0]
  x = np.asarray(loop_lib.init_state(keys, (H, H), C, 8).x, np.float64)[0]
  theirs = _diffusers_dpmpp2m(torch, diffusers, process, x, steps)
  np.testing.assert_allclose(got, theirs, atol=2e-5)
  # the check can fail: first-order DDIM on the same grid is far from it
  assert np.abs(reference_ddim(process, x, steps) - theirs).max() > 1e-2
  cosine = sampling.Diffusion('eps', 'cosine', solver=sampling.DPMSolver2M())
  np.testing.assert_allclose(_diffusers_dpmpp2m(torch, diffusers, cosine, x, steps),
                             reference_dpmpp2m(cosine, x, steps), atol=2e-5)
