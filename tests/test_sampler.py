"""The random-patch sampler: exact step counts, the level invariant, equality with
full-image DDIM for a pixel-local denoiser, reproducibility and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax.sampling import loop as loop_lib

A = jnp.asarray(np.random.RandomState(0).randn(4, 4).astype(np.float32) * 0.5)


def local_eps(params, x, t, labels):
  """Pixel-local: each output pixel depends only on that pixel's value, time and label."""
  e = jnp.tanh(x @ params + 1e-3 * t[:, None, None, None] + 0.1 * labels[..., None])
  return e, x.shape[0]


def full_image_ddim(keys, labels, steps, eta=0.0):
  n, h, w = labels.shape
  x = loop_lib.init_state(keys, (h, w), 4, 1).x
  sched = diffusion.Schedule()
  for t, tn in diffusion.time_pairs(steps):
    tt, tnn = jnp.full((n,), t), jnp.full((n,), tn)
    eps, _ = local_eps(A, x, tt, labels)
    x = diffusion.ddim_step(sched, x, eps, tt, tnn, jnp.zeros_like(x), eta)
  return x


def random_labels(n, h, w, seed=1, classes=3):
  return jnp.asarray(np.random.RandomState(seed).randint(0, classes, (n, h, w)), jnp.int32)


@pytest.mark.parametrize('h,w,p,k', [(16, 16, 8, 1), (24, 40, 8, 3), (20, 12, 8, 2),
                                     (12, 20, 12, 1), (32, 24, 8, 4)])
def test_tiled_equals_full_image_ddim_for_pixel_local_model(h, w, p, k):
  steps = 6
  keys = loop_lib.image_keys(0, [0, 1])
  labels = random_labels(2, h, w)
  smp = loop_lib.Sampler(local_eps, loop_lib.SamplerSettings(sampling_steps=steps, patch=p,
                                                           patches_per_step=k, eta=0.0))
  state = smp.sample(A, keys, loop_lib.spatial(labels))
  assert state.x.shape == (2, h, w, 4) and state.x.dtype == jnp.float32
  assert (np.asarray(state.times) == steps).all()
  np.testing.assert_allclose(state.x, full_image_ddim(keys, labels, steps), atol=1e-5)
  assert smp.compiles() == 1


def test_each_pixel_takes_exactly_s_steps_and_levels_stay_within_one():
  steps, p, k = 4, 8, 3
  labels = random_labels(2, 24, 32)
  keys = loop_lib.image_keys(3, [0, 1])
  smp = loop_lib.Sampler(local_eps, loop_lib.SamplerSettings(sampling_steps=steps, patch=p,
                                                           patches_per_step=k, eta=1.0))
  state = smp.init(keys, labels.shape)
  prev = np.asarray(state.times)
  for _ in range(10_000):
    if prev.min() >= steps:
      break
    state = smp.step_patch(A, state, loop_lib.spatial(labels))
    times = np.asarray(state.times)
    assert ((times - prev) >= 0).all() and ((times - prev) <= 1).all()
    for n in range(times.shape[0]):
      assert times[n].max() - times[n].min() <= 1
      # Only the lowest level advances.
      moved = times[n] != prev[n]
      assert (prev[n][moved] == prev[n].min()).all()
    prev = times
  assert (prev == steps).all()
  assert smp.compiles() == 1  # one compile for every iteration


def test_same_key_same_output_different_keys_differ():
  labels = random_labels(1, 16, 24)
  smp = loop_lib.Sampler(local_eps, loop_lib.SamplerSettings(sampling_steps=3, patch=8, eta=1.0))
  a = smp.sample(A, loop_lib.image_keys(7, [0]), loop_lib.spatial(labels)).x
  b = smp.sample(A, loop_lib.image_keys(7, [0]), loop_lib.spatial(labels)).x
  c = smp.sample(A, loop_lib.image_keys(8, [0]), loop_lib.spatial(labels)).x
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
  assert smp.compiles() == 1  # a new key does not recompile


def test_image_does_not_depend_on_its_batch():
  labels = random_labels(3, 16, 16)
  smp = loop_lib.Sampler(local_eps, loop_lib.SamplerSettings(sampling_steps=3, patch=8, eta=1.0,
                                                           patches_per_step=2))
  batch = smp.sample(A, loop_lib.image_keys(5, [0, 1, 2]), loop_lib.spatial(labels))
  alone = smp.sample(A, loop_lib.image_keys(5, [2]), loop_lib.spatial(labels[2:]))
  np.testing.assert_allclose(batch.x[2], alone.x[0], atol=1e-6)


def test_counters():
  labels = random_labels(1, 16, 16)
  state = loop_lib.Sampler(local_eps, loop_lib.SamplerSettings(sampling_steps=2, patch=8)).sample(
      A, loop_lib.image_keys(0, [0]), loop_lib.spatial(labels))
  # K = 1, one image: one patch and one denoiser sample per iteration.
  assert int(state.patches) == int(state.iterations) == int(state.evaluations)
  assert int(state.iterations) >= 2 * 4  # at least (16/8)^2 patches per level


@pytest.mark.parametrize('image_hw,patch,multiple,match', [
    ((64, 64), 128, 1, 'larger than the image'),
    ((60, 64), 32, 1, 'multiple of 8'),
    ((64, 64), 36, 1, 'multiple of 8'),
    ((64, 64), 16, 4, 'multiple of 32'),
])
def test_bad_requests(image_hw, patch, multiple, match):
  from tiled_ldm_jax import geometry
  from tiled_ldm_jax import request
  with pytest.raises(ValueError, match=match):
    request.check_patch(geometry.LatentGeometry(), image_hw, patch, multiple, 'patch_size')


@pytest.mark.parametrize('steps', [0, 1001])
def test_bad_step_counts(steps):
  from tiled_ldm_jax import pipeline
  with pytest.raises(ValueError, match='sampling steps'):
    pipeline.Options(sampling_steps=steps)


def test_bad_labels_fail_before_compute():
  from tiled_ldm_jax import pipeline
  from tiled_ldm_jax.models.configs import UNetConfig, VAEConfig
  cfg = UNetConfig(kind='image', dim=8, num_classes=3, dim_mults=(1, 2), resnet_block_groups=2)
  vae = VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
  pipe = pipeline.Pipeline(pipeline.Model(cfg, None), pipeline.Model(vae, None))
  labels = np.zeros((1, 64, 64), np.int32)
  labels[0, 0, 0] = 3
  with pytest.raises(ValueError, match=r'out of range \[0, 3\): 3'):
    pipe.sample_latents(labels, patch_size=32, sampling_steps=5)
  with pytest.raises(ValueError, match='larger than the image'):
    pipe.sample_latents(labels * 0, patch_size=128, sampling_steps=5)


def test_chunked_run_equals_uninterrupted():
  labels = random_labels(2, 16, 24)
  keys = loop_lib.image_keys(11, [0, 1])
  smp = loop_lib.Sampler(local_eps, loop_lib.SamplerSettings(sampling_steps=3, patch=8, eta=1.0,
                                                           patches_per_step=2))
  whole = smp.sample(A, keys, loop_lib.spatial(labels))
  state = smp.init(keys, labels.shape)
  chunks = 0
  while int(state.level.min()) < 3:
    state = smp.run(A, state, loop_lib.spatial(labels), max_iterations=4)
    chunks += 1
  assert chunks > 2
  np.testing.assert_array_equal(state.x, whole.x)
  assert int(state.iterations) == int(whole.iterations)
  assert smp.compiles() == 1  # the chunk length is dynamic: no recompiles
