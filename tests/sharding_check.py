"""Run in the test run's 8-device interpreter (see test_eight_devices.py)."""

import os
import sys

if 'device_count=' not in os.environ.get('XLA_FLAGS', ''):   # run by hand; the tests set it
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tiled_ldm_jax.sampling import loop as loop_lib

A = jnp.asarray(np.random.RandomState(0).randn(4, 4).astype(np.float32) * 0.5)


def local_eps(params, x, t, labels):
  return jnp.tanh(x @ params + 1e-3 * t[:, None, None, None] + 0.1 * labels[..., None]), x.shape[0]


def pipeline_check():
  """The whole command (bundled demo models, given mask) on 2 of the 8 devices (batch of
  2) vs on one device."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax import generate  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax import sharding
  tmp = tempfile.mkdtemp()
  images = {}
  for devices in (1, 0):
    cfg = generate.GenerationConfig.from_flat(
        mask='demo', imgs_path=f'{tmp}/out{devices}', image_size=128, patch_size=64,
        sampling_steps=2, n_images=2, batch_size=2, devices=devices, progress_every=0)
    generate.generate(cfg)
    images[devices] = [np.asarray(Image.open(f'{tmp}/out{devices}/sample{i:04d}.png'), np.int16)
                       for i in range(2)]
  for a, b in zip(images[1], images[0]):
    assert np.abs(a - b).max() <= 1, np.abs(a - b).max()
    assert a.std() > 1   # a real image, not a constant one
  mesh = sharding.make_mesh(cfg.batch_size, cfg.options.patches_per_step or 1, cfg.devices)
  return len(mesh.devices)


def main():
  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ('data',))
  results = {}
  for mode, n, k in (('images', 8, 1), ('patches', 1, 8)):
    labels = jnp.asarray(np.random.RandomState(1).randint(0, 3, (n, 40, 40)), jnp.int32)
    keys = loop_lib.image_keys(0, range(n))
    settings = loop_lib.SamplerSettings(sampling_steps=3, patch=8, patches_per_step=k)
    one = loop_lib.Sampler(local_eps, settings).sample(A, keys, loop_lib.spatial(labels))
    smp = loop_lib.Sampler(local_eps, settings, mesh=mesh, n_images=n)
    assert smp.split == mode
    many = smp.sample(A, keys, loop_lib.spatial(labels))
    shards = len(many.x.sharding.device_set)
    # Same randomness, so the same patches in the same order: identical step counts and
    # patch choices. Values agree to float32 rounding, not bitwise: XLA compiles the
    # per-device shapes (batch 1 instead of 8) into different matmul kernels.
    assert int(one.iterations) == int(many.iterations)
    assert int(one.patches) == int(many.patches)
    np.testing.assert_array_equal(np.asarray(one.times), np.asarray(many.times))
    # Under the suite's unoptimized XLA flags the batch-1 and batch-8 kernels differ by
    # ~1e-7, which the eps model's x0 at t = 999 (x / sqrt(a_999), ~300x) amplifies:
    # 2.1e-4 measured on the project's 2-core machine (at commit e39323d too), 5.5e-7 with
    # the default flags. A wrong split (keys, crops) differs by O(1).
    diff = float(np.abs(np.asarray(one.x) - np.asarray(many.x)).max())
    assert diff < 1e-3, (mode, diff)
    results[mode] = shards
  results['pipeline'] = pipeline_check()
  print('OK', results)


if __name__ == '__main__':
  sys.exit(main())
