"""Run in its own process with 8 emulated CPU devices (see test_eight_devices.py): every
prediction type through `sampling.sample` on a mesh equals one device, for the images
split (N = 8) and the patch split (N = 2, K = 4), on both schedules; two cases start
from init latents with a keep mask and resampling (images split and patch split)."""

import os
import sys

if 'device_count=' not in os.environ.get('XLA_FLAGS', ''):   # run by hand; the tests set it
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

jax.config.update('jax_disable_most_optimizations', True)

from tiled_ldm_jax import sampling  # pylint: disable=g-import-not-at-top
from tiled_ldm_jax.evaluation import sampling_check as sc  # pylint: disable=g-import-not-at-top

# (prediction, schedule, noise schedule, images, K): each type once, both splits and
# both schedules covered.
CASES = (('eps', 'random', 'cosine', 8, 1, False), ('v', 'grid', 'scaled_linear', 2, 4, False),
         ('x0', 'grid', 'linear', 8, 2, True), ('flow', 'random', 'cosine', 2, 4, True))


def main():
  assert jax.device_count() == 8, jax.devices()
  splits = {}
  for prediction, schedule, noise, n, k, from_init in CASES:
    kw = dict(keys=sampling.image_keys(0, range(n)), latent_shape=(24, 24, sc.CHANNELS),
              patch=8, sampling_steps=3, process=sc.process_of(prediction, noise, 1.0),
              windows=sc.windows_of(schedule, k), eta=1.0,
              return_state=True)
    if from_init:
      rng = np.random.RandomState(n)
      keep = np.zeros((n, 24, 24), bool)
      keep[:, :, :10] = True
      kw.update(init=rng.uniform(-0.8, 0.8, (n, 24, 24, sc.CHANNELS)).astype(np.float32),
                strength=0.7, keep=keep, resample=1)
    fn = sc.local_denoiser(prediction)
    cond = sc._cond(n, 24, 24, seed=2)  # pylint: disable=protected-access
    one = sampling.sample(fn, jnp.asarray(sc.MIX), cond, devices=1, **kw)
    many = sampling.sample(fn, jnp.asarray(sc.MIX), cond, devices=8, **kw)
    assert len(many.x.sharding.device_set) == 8, many.x.sharding
    splits[prediction] = 'images' if n % 8 == 0 else 'patches'
    # Same keys: same patches in the same order; values to float32 rounding (XLA picks
    # other kernels for the per-device shapes).
    assert int(one.iterations) == int(many.iterations)
    np.testing.assert_array_equal(np.asarray(one.times), np.asarray(many.times))
    diff = float(np.abs(np.asarray(one.x) - np.asarray(many.x)).max())
    assert diff < 1e-5, (prediction, diff)
    print(prediction, schedule, splits[prediction], 'init + keep' if from_init else '',
          f'max diff {diff:.2e}')
  print('OK', splits)


if __name__ == '__main__':
  sys.exit(main())
