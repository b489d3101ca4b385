"""Exported programs on disk (`program_cache`): a second sampler with the same key loads
the loop without tracing it, gives the same bits, and a damaged file is made again."""

import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiled_ldm_jax import program_cache
from tiled_ldm_jax.sampling import loop as loop_lib

TRACES = []


def _eps(params, x, t, labels):
  TRACES.append(1)          # runs once per trace of the loop, never per iteration
  return jnp.tanh(x * params + 1e-3 * t[:, None, None, None] + 0.1 * labels[..., None])


KEYED = program_cache.keyed(_eps, 'test_program_cache._eps', 1)
SETTINGS = loop_lib.SamplerSettings(sampling_steps=3, patch=8, patches_per_step=2)


def _run(denoise, settings=SETTINGS):
  labels = jnp.asarray(np.random.RandomState(0).randint(0, 3, (2, 16, 24)), jnp.int32)
  smp = loop_lib.Sampler(denoise, settings)      # a new instance: no in-memory programs
  state = smp.sample(jnp.float32(0.7), loop_lib.image_keys(5, [0, 1]), loop_lib.spatial(labels))
  return smp, state


@pytest.fixture
def folder(tmp_path):
  program_cache.use_dir(str(tmp_path))
  yield tmp_path
  program_cache.use_dir(None)


def _files(folder):
  return sorted(p.name for p in folder.iterdir() if not p.name.startswith('.'))


def test_second_sampler_loads_without_tracing_and_matches_plain_jit(folder):
  program_cache.use_dir(None)
  _, plain = _run(KEYED)
  program_cache.use_dir(str(folder))

  TRACES.clear()
  smp, first = _run(KEYED)
  assert TRACES and len(_files(folder)) == 1 and smp.compiles() == 1
  TRACES.clear()
  smp, second = _run(KEYED)
  assert not TRACES, 'the loop was traced again'
  assert smp.compiles() == 1
  for a, b, c in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(first),
                     jax.tree_util.tree_leaves(second)):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b, c = (jax.random.key_data(v) for v in (a, b, c))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  assert int(second.level.min()) == SETTINGS.sampling_steps


def test_other_settings_other_program_and_unkeyed_functions_are_not_kept(folder):
  _run(KEYED)
  _run(KEYED, loop_lib.SamplerSettings(sampling_steps=4, patch=8, patches_per_step=2))
  assert len(_files(folder)) == 2
  _run(_eps)                       # no program key: plain jit, nothing written
  assert len(_files(folder)) == 2


@pytest.mark.parametrize('damage', ['truncate', 'garbage'])
def test_damaged_file_is_made_again(folder, damage, monkeypatch):
  _, good = _run(KEYED)
  (name,) = _files(folder)
  path = folder / name
  blob = path.read_bytes()
  path.write_bytes(blob[:len(blob) // 3] if damage == 'truncate' else os.urandom(len(blob)))
  warned = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *a: warned.append(msg % a))
  TRACES.clear()
  _, again = _run(KEYED)
  assert TRACES and any('making it again' in w for w in warned), warned
  np.testing.assert_array_equal(good.x, again.x)
  TRACES.clear()
  _run(KEYED)                                # replaced by a whole export: loads again
  assert not TRACES
