"""`sampling.sample` for any denoiser: every prediction type on both schedules, noise
schedules, conditioning pytrees, guidance wrappers, devices and input errors.

Why small patches must equal one whole-latent patch (and why eta = 0 for DDIM): see
`tiled_ldm_jax/evaluation/sampling_check.py`. In short, the initial noise is drawn per
image over the whole latent, every pixel takes the same S steps each at its own level,
and a pixel-local denoiser sees only that pixel's value at that level, so a pixel's
trajectory cannot depend on where the patches fell -- except through the DDIM step
noise (eta > 0), which is drawn per patch slot, hence eta = 0 here (flow draws none).
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax.sampling import processes
from tiled_ldm_jax.sampling import loop as loop_lib
from tiled_ldm_jax import sampling
from tiled_ldm_jax.evaluation import sampling_check as sc


# One noise schedule per diffusion type here (the whole-latent run is then shared by the
# two schedules); tools/check_sampling.py runs every combination.
NOISE = {'eps': 'cosine', 'v': 'scaled_linear', 'x0': 'linear', 'flow': 'cosine'}


@pytest.mark.parametrize('schedule', ['random', 'grid'])
@pytest.mark.parametrize('prediction', ['eps', 'v', 'x0', 'flow'])
def test_small_patches_equal_one_whole_patch(prediction, schedule):
  err = sc.patch_equivalence(prediction, schedule, NOISE[prediction])
  assert err < 1e-5, err


@pytest.mark.parametrize('prediction', ['eps', 'v', 'x0', 'flow'])
def test_oracle_lands_on_the_target(prediction):
  """The target is read from a spatial cond: a crop at the wrong place would miss it."""
  err = sc.oracle_error(prediction, 'random', NOISE[prediction])
  assert err < 1e-5, err


def test_the_local_denoiser_is_not_trivial():
  """The equivalence is not vacuous: other keys or cond change the sample."""
  fn = sc.local_denoiser('flow')
  kw = dict(latent_shape=(16, 16, sc.CHANNELS), patch=8, sampling_steps=4, process=sampling.Flow(),
            devices=1)
  cond = sc._cond(2, 16, 16, seed=1)  # pylint: disable=protected-access
  a = sampling.sample(fn, jnp.asarray(sc.MIX), cond, keys=sampling.image_keys(0, [0, 1]), **kw)
  b = sampling.sample(fn, jnp.asarray(sc.MIX), dict(cond, scale=-cond['scale']),
                      keys=sampling.image_keys(0, [0, 1]), **kw)
  assert float(jnp.abs(a - b).max()) > 1e-2
  assert float(jnp.abs(a[0] - a[1]).max()) > 1e-2


@pytest.mark.parametrize('schedule', ['random', 'grid'])
def test_spatial_cond_is_cropped_at_the_patch_and_other_leaves_per_image(schedule):
  """At level 0 every model input equals the initial noise at the patch's place. The
  spatial cond holds that noise plus 100 x the image's id and the per-image leaf holds
  the id, so `x + 100 id == cond crop` checks both the crop's place and the image."""
  n, h, w = 2, 16, 24
  keys = sampling.image_keys(4, range(n))
  noise0 = np.asarray(loop_lib.init_state(keys, (h, w), 2, 8).x)
  ids = np.array([3.0, 7.0], np.float32)
  cond = {'noise': sampling.spatial(noise0 + 100 * ids[:, None, None, None]), 'id': ids}
  seen = []

  def denoise(params, x, t, c):
    jax.debug.callback(lambda *a: seen.append([np.asarray(v) for v in a]),
                       t, x, c['noise'], c['id'])
    return jnp.zeros_like(x)

  sampling.sample(denoise, None, cond, keys=keys, latent_shape=(h, w, 2), patch=8,
                  sampling_steps=2, process=sampling.Flow(), windows=sc.windows_of(schedule, 2),
                  devices=1)
  checked = 0
  for t, x, crop, idx in seen:
    for b in range(len(t)):
      if t[b] == 1.0 and idx[b] != 0:          # level 0, a valid slot (idle: all zeros)
        assert idx[b] in ids
        np.testing.assert_array_equal(x[b] + 100 * idx[b], crop[b])
        checked += 1
  assert checked >= (h // 8) * (w // 8) * n   # at least a cover of each image


def test_classifier_free_guidance_wrapper():
  def model(params, x, t, cond):
    return x * params + cond['class'][:, None, None, None] + 0.01 * t[:, None, None, None]
  x = jnp.asarray(np.random.RandomState(0).randn(3, 4, 4, 2), jnp.float32)
  t = jnp.array([5, 6, 7])
  cond = {'class': jnp.array([1.0, 2.0, 3.0])}
  guided = sampling.classifier_free_guidance(model, 2.0, {'class': 0.0})
  out, evals = guided(0.5, x, t, cond)
  null = model(0.5, x, t, {'class': jnp.zeros(3)})
  np.testing.assert_allclose(out, null + 3.0 * (model(0.5, x, t, cond) - null), atol=1e-6)
  assert evals == 6
  out0, evals0 = sampling.classifier_free_guidance(model, 0.0, {'class': 0.0})(0.5, x, t, cond)
  np.testing.assert_allclose(out0, model(0.5, x, t, cond))
  assert evals0 == 3
  fn_null = sampling.classifier_free_guidance(model, 2.0, lambda c: {'class': c['class'] * 0})
  np.testing.assert_allclose(fn_null(0.5, x, t, cond)[0], out, atol=1e-6)


def test_diffinfinite_path_is_the_same_loop():
  """`sampling.sample` with the image model's guidance wrapper, eps, cosine, clip 1 gives
  the pipeline's `Sampler` result bit for bit, and counts the guidance passes."""
  a_mat = jnp.asarray(np.random.RandomState(0).randn(4, 4).astype(np.float32) * 0.5)

  def eps(params, x, t, labels):   # a mask-conditioned toy eps model
    return jnp.tanh(x @ params + 1e-3 * t[:, None, None, None] + 0.1 * labels[..., None])
  labels = jnp.asarray(np.random.RandomState(1).randint(0, 3, (2, 16, 16)), jnp.int32)
  keys = sampling.image_keys(0, [0, 1])
  guided = sampling.multilabel_guidance(eps, 3, 2.0)
  state = sampling.sample(guided, a_mat, sampling.spatial(labels), keys=keys,
                          latent_shape=(16, 16, 4), patch=8, sampling_steps=3,
                          process=sampling.Diffusion(clip_x0=1.0),
                          devices=1, return_state=True)
  smp = loop_lib.Sampler(guided, loop_lib.SamplerSettings(sampling_steps=3, patch=8))
  ref = smp.sample(a_mat, keys, loop_lib.spatial(labels))
  np.testing.assert_array_equal(state.x, ref.x)
  assert int(state.evaluations) == int(ref.evaluations) > int(state.patches)


def test_no_recompile_for_new_keys_or_cond():
  fn = sc.local_denoiser('v')
  kw = dict(latent_shape=(16, 16, sc.CHANNELS), patch=8, sampling_steps=2,
            process=sampling.Diffusion('v', 'linear'), devices=1, eta=1.0)
  before = loop_lib.compiled.cache_info()   # the one compiled-sampler cache
  for seed in (0, 1):
    sampling.sample(fn, jnp.asarray(sc.MIX), sc._cond(2, 16, 16, seed),  # pylint: disable=protected-access
                    keys=sampling.image_keys(seed, [0, 1]), **kw)
  after = loop_lib.compiled.cache_info()
  assert after.misses == before.misses + 1 and after.hits == before.hits + 1
  smp = sampling.api._sampler(fn, None, loop_lib.SamplerSettings(sampling_steps=2, patch=8), processes.Diffusion(  # pylint: disable=protected-access
      'v', 'linear', None), None, 2)
  assert smp.compiles() == 1


@pytest.mark.parametrize('make,match', [
    (lambda: sampling.Diffusion('score'), 'prediction must be one of'),
    (lambda: sampling.Diffusion(noise_schedule='sigmoid'), 'noise_schedule must be one of'),
    (lambda: sampling.Diffusion(noise_schedule=np.array([0.5, 2.0])),
     r'alphas_cumprod must be a \[T\] array'),
])
def test_bad_strategy_is_one_line_error(make, match):
  with pytest.raises(ValueError, match=match) as e:
    make()
  assert '\n' not in str(e.value)


def test_noise_schedules():
  for name, betas in (('linear', np.linspace(0.00085, 0.012, 1000)),
                      ('scaled_linear', np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)):
    ac = sampling.noise_schedule(name).alphas_cumprod
    np.testing.assert_allclose(ac, np.cumprod(1 - betas), rtol=1e-6)
  np.testing.assert_array_equal(sampling.noise_schedule('cosine').alphas_cumprod,
                                diffusion.Schedule().alphas_cumprod)
  custom = np.linspace(0.999, 0.01, 200)
  assert processes.as_schedule(custom).timesteps == 200
  assert processes.as_schedule(sampling.noise_schedule('linear', 50)).timesteps == 50
  assert processes.Flow().time_grid(4).tolist() == [[1, .75], [.75, .5], [.5, .25], [.25, 0]]


@pytest.mark.parametrize('kwargs,match', [
    (dict(process='flow'), r'process must be sampling.Diffusion\(...\) or sampling.Flow\(\)'),
    (dict(windows='grid'), r'windows must be sampling.Random\(...\) or sampling.Grid'),
    (dict(windows=sampling.Random(0)), 'patches_per_step must be >= 1'),
    (dict(windows=sampling.Grid(margin=4)), 'grid_margin must be in'),
    (dict(latent_shape=(16, 16)), r'latent_shape must be \(h, w, C\)'),
    (dict(patch=32), 'smaller than the patch'),
    (dict(keys=jax.random.split(jax.random.PRNGKey(0), 2)), 'typed PRNG keys'),
    (dict(cond={'m': sampling.spatial(np.zeros((2, 8, 16)))}), 'spatial conditioning leaf'),
    (dict(cond={'c': np.zeros((3,))}), r'not \[N, \.\.\.\] with N = 2'),
    (dict(sampling_steps=1001), 'sampling steps'),
])
def test_bad_input_is_one_line_error(kwargs, match):
  kw = dict(keys=sampling.image_keys(0, [0, 1]), latent_shape=(16, 16, 2), patch=8,
            sampling_steps=2, cond=None)
  kw.update(kwargs)
  cond = kw.pop('cond')
  with pytest.raises(ValueError, match=match) as e:
    sampling.sample(lambda p, x, t, c: x, None, cond, devices=1, **kw)
  assert '\n' not in str(e.value)


def test_readme_example_runs():
  text = (pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'own_model.md').read_text()
  blocks = re.findall(r'<!-- sampling-example -->\s*```python\n(.*?)```', text, re.S)
  assert len(blocks) == 1, 'docs/own_model.md must hold one marked sampling example'
  scope = {}
  exec(compile(blocks[0], 'docs/own_model.md', 'exec'), scope)  # pylint: disable=exec-used
  assert scope['x'].shape == (2, 96, 128, 4)
  assert scope['error'] < 1e-5, scope['error']


def test_dtype_is_the_denoisers_input_dtype():
  seen = []

  def denoise(params, x, t, cond):
    seen.append(x.dtype)            # at trace time
    return -x                       # bfloat16 out: the update stays float32
  x = sampling.sample(denoise, None, None, keys=sampling.image_keys(0, [0]),
                      latent_shape=(8, 8, 2), patch=8, sampling_steps=2, process=sampling.Flow(),
                      dtype=jnp.bfloat16, devices=1)
  assert seen and all(d == jnp.bfloat16 for d in seen)
  assert x.dtype == jnp.float32


# ------------------------------------------------------------------ starting from latents

def _init_run(prediction, schedule, strength, *, patch, init, steps=4, eta=0.0):
  keys = sampling.image_keys(0, range(2))
  cond = sc._cond(2, 16, 16, seed=1)  # pylint: disable=protected-access
  windows = (sampling.Random(2) if schedule == 'random' else
             sampling.Grid(margin=2, patches_per_step=4)) if patch < 16 else sampling.Random()
  return sampling.sample(sc.local_denoiser(prediction), jnp.asarray(sc.MIX), cond, keys=keys,
                         latent_shape=(16, 16, sc.CHANNELS), patch=patch, sampling_steps=steps,
                         eta=eta, devices=1, windows=windows, init=init, strength=strength,
                         process=sc.process_of(prediction, NOISE[prediction], 1.0),
                         return_state=True)


@pytest.mark.parametrize('schedule', ['random', 'grid'])
@pytest.mark.parametrize('prediction', ['eps', 'v', 'flow'])
def test_strength_runs_the_last_steps_from_the_noised_init(prediction, schedule):
  """Small patches equal one whole patch from the same noised init (the start level and
  noising are per pixel, not per patch), only round(s S) steps run, s = 1 is from noise."""
  init = np.random.RandomState(7).uniform(-0.8, 0.8, (2, 16, 16, sc.CHANNELS)).astype(np.float32)
  tiled = _init_run(prediction, schedule, 0.5, patch=8, init=init)
  whole = _init_run(prediction, schedule, 0.5, patch=16, init=init)
  np.testing.assert_allclose(tiled.x, whole.x, atol=1e-5)
  assert int(whole.iterations) == 2                    # one whole window per level, 2 of 4
  fresh = _init_run(prediction, schedule, 1.0, patch=8, init=None)
  from_init = _init_run(prediction, schedule, 1.0, patch=8, init=init)
  np.testing.assert_array_equal(fresh.x, from_init.x)   # strength 1: the init is unused
  assert not np.allclose(tiled.x, fresh.x, atol=1e-3)


@pytest.mark.parametrize('prediction', ['eps', 'v', 'x0', 'flow'])
def test_strength_with_the_oracle_lands_on_the_target(prediction):
  """From any init at any strength, the oracle still lands on its target; with the
  target as init and strength 0.25 the first denoised value is already the target."""
  keys = sampling.image_keys(3, range(2))
  target = np.random.RandomState(2).uniform(-0.9, 0.9, (2, 16, 16, sc.CHANNELS)).astype(np.float32)
  fn = sc.oracle_denoiser(prediction, processes.noise_schedule(NOISE[prediction]))
  for init, strength in ((np.zeros_like(target), 0.5), (target, 0.25)):
    out = sampling.sample(fn, None, {'target': sampling.spatial(target)}, keys=keys,
                          latent_shape=(16, 16, sc.CHANNELS), patch=8, sampling_steps=8,
                          process=sc.process_of(prediction, NOISE[prediction]),
                          windows=sampling.Grid(), eta=0.0, devices=1, init=init,
                          strength=strength)
    np.testing.assert_allclose(np.asarray(out), target, atol=1e-5)


def test_bad_init_or_strength_is_one_line_error():
  keys = sampling.image_keys(0, range(1))
  args = dict(keys=keys, latent_shape=(16, 16, 4), patch=8, sampling_steps=4, devices=1)
  fn = lambda params, x, t, cond: x
  for kw, match in ((dict(strength=0.0), 'strength'), (dict(strength=1.5), 'strength'),
                    (dict(init=np.zeros((1, 8, 16, 4)), strength=0.5), 'init latents'),
                    (dict(init=np.full((1, 16, 16, 4), np.nan), strength=0.5), 'NaN')):
    with pytest.raises(ValueError, match=match):
      sampling.sample(fn, None, {}, **args, **kw)


# Every prediction on both placements, every (placement, resampling) pair with two
# predictions: the dimensions are independent code paths (process / placement / passes),
# so pairs cover them at half the cost of the full 4 x 4 product (each case compiles).
@pytest.mark.parametrize('prediction,schedule,resample', [
    ('eps', 'random', 0), ('eps', 'grid', 1), ('v', 'grid', 0), ('v', 'random', 2),
    ('x0', 'random', 0), ('x0', 'grid', 1), ('flow', 'grid', 0), ('flow', 'random', 2)])
def test_keep_pixels_land_on_the_init_free_pixels_on_the_target(prediction, schedule,
                                                                  resample):
  """The oracle test with a keep mask: kept pixels end exactly on the init, the others
  on the oracle's target, whatever the strength and the resampling passes."""
  keys = sampling.image_keys(4, range(2))
  rng = np.random.RandomState(6)
  target = rng.uniform(-0.9, 0.9, (2, 16, 24, sc.CHANNELS)).astype(np.float32)
  init = rng.uniform(-0.9, 0.9, target.shape).astype(np.float32)
  keep = np.zeros((2, 16, 24), bool)
  keep[:, :, :12] = True
  keep[1, 5:9, 14:20] = True
  fn = sc.oracle_denoiser(prediction, processes.noise_schedule(NOISE[prediction]))
  for strength in (1.0, 0.5):
    out = np.asarray(sampling.sample(
        fn, None, {'target': sampling.spatial(target)}, keys=keys,
        latent_shape=(16, 24, sc.CHANNELS), patch=8, sampling_steps=6,
        process=sc.process_of(prediction, NOISE[prediction]), windows=sc.windows_of(schedule),
        eta=0.0, devices=1, init=init, strength=strength, keep=keep, resample=resample))
    np.testing.assert_allclose(out[keep], init[keep], atol=1e-5)
    np.testing.assert_allclose(out[~keep], target[~keep], atol=1e-5)


def test_keep_needs_init_and_its_shape():
  keys = sampling.image_keys(0, range(1))
  args = dict(keys=keys, latent_shape=(16, 16, 4), patch=8, sampling_steps=4, devices=1)
  fn = lambda params, x, t, cond: x
  with pytest.raises(ValueError, match='keep needs init'):
    sampling.sample(fn, None, {}, keep=np.ones((1, 16, 16)), **args)
  with pytest.raises(ValueError, match='keep must be'):
    sampling.sample(fn, None, {}, keep=np.ones((1, 8, 16)), init=np.zeros((1, 16, 16, 4)),
                    **args)


@pytest.mark.parametrize('process', [processes.Diffusion('eps', 'cosine'), processes.Flow()])
def test_renoise_takes_a_noised_value_to_the_later_time(process):
  """q(x_to | x_from) composed with q(x_from | x0) is q(x_to | x0): the same mean and
  variance per pixel (50,000 draws), for a clean start too."""
  grid = process.time_grid(10)
  rng = np.random.RandomState(0)
  x0 = jnp.full((50_000,), 0.6, jnp.float32)
  for t_from, t_to in ((grid[5, 1], grid[5, 0]), (grid[-1, 1], grid[-1, 0]),
                       (grid[8, 0], grid[2, 0])):
    n1, n2 = (jnp.asarray(rng.randn(50_000), jnp.float32) for _ in range(2))
    clean = isinstance(process, processes.Diffusion) and t_from <= 0
    start = x0 if clean else process.noised(x0, n1, jnp.full((50_000,), t_from))
    got = np.asarray(process.renoise(start, n2, jnp.full((50_000,), t_from),
                                     jnp.full((50_000,), t_to)))
    want = np.asarray(process.noised(x0, jnp.asarray(rng.randn(50_000), jnp.float32),
                                     jnp.full((50_000,), t_to)))
    assert abs(got.mean() - want.mean()) < 0.02, (t_from, t_to)
    assert abs(got.std() - want.std()) < 0.02, (t_from, t_to)


def test_resampling_costs_only_the_windows_at_the_keep_border():
  """Resampling passes run only in windows holding kept and free pixels: nothing kept
  (or everything) costs no more samples than no resampling; a half keep costs more,
  but less than (1 + passes) times."""
  keys = sampling.image_keys(1, range(1))
  target = np.random.RandomState(3).uniform(-0.9, 0.9, (1, 16, 32, sc.CHANNELS)).astype(np.float32)
  oracle = sc.oracle_denoiser('eps', processes.noise_schedule('cosine'))

  def fn(params, x, t, cond, valid):   # counts the slots it is asked for, as the U-Net's
    return oracle(params, x, t, cond), jnp.sum(valid).astype(jnp.int32)
  fn.skips_idle = True

  def evals(keep, resample):
    state = sampling.sample(
        fn, None, {'target': sampling.spatial(target)}, keys=keys,
        latent_shape=(16, 32, sc.CHANNELS), patch=8, sampling_steps=4,
        process=sc.process_of('eps', 'cosine'), windows=sampling.Grid(), devices=1,
        init=np.zeros_like(target), keep=keep, resample=resample, return_state=True)
    return int(state.evaluations)
  half = np.zeros((1, 16, 32), bool)
  half[:, :, :12] = True
  none, every = np.zeros_like(half), np.ones_like(half)
  assert evals(none, 3) == evals(none, 0)
  assert evals(every, 3) == evals(every, 0)
  base, more = evals(half, 0), evals(half, 3)
  assert base < more < 4 * base, (base, more)
