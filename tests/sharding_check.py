"""Run in its own process with 8 emulated CPU devices (see test_sharding.py)."""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tiled_ldm_jax import sampler

A = jnp.asarray(np.random.RandomState(0).randn(4, 4).astype(np.float32) * 0.5)


def local_eps(params, x, t, labels):
  return jnp.tanh(x @ params + 1e-3 * t[:, None, None, None] + 0.1 * labels[..., None]), x.shape[0]


def main():
  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ('data',))
  results = {}
  for mode, n, k in (('images', 8, 1), ('patches', 1, 8)):
    labels = jnp.asarray(np.random.RandomState(1).randint(0, 3, (n, 40, 40)), jnp.int32)
    keys = sampler.image_keys(0, range(n))
    settings = sampler.SamplerSettings(steps=3, patch=8, patches_per_step=k)
    one = sampler.Sampler(local_eps, settings).sample(A, keys, labels)
    smp = sampler.Sampler(local_eps, settings, mesh=mesh)
    many = smp.sample(A, keys, labels)
    shards = len(many.x.sharding.device_set)
    # Same randomness, so the same patches in the same order: identical step counts and
    # patch choices. Values agree to float32 rounding, not bitwise: XLA compiles the
    # per-device shapes (batch 1 instead of 8) into different matmul kernels.
    assert int(one.iterations) == int(many.iterations)
    assert int(one.patches) == int(many.patches)
    np.testing.assert_array_equal(np.asarray(one.times), np.asarray(many.times))
    diff = float(np.abs(np.asarray(one.x) - np.asarray(many.x)).max())
    assert diff < 1e-5, (mode, diff)
    results[mode] = shards
  print('OK', results)


if __name__ == '__main__':
  sys.exit(main())
