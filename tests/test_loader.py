"""The grain training loader: deterministic, per-process shards, resumable iterator state.

Several processes are simulated by passing process_index/process_count (no real
multi-process run); examples are 16 px, so the file runs in seconds.
"""

import os
import sys

import numpy as np
import pytest

from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax.training import data
from tiled_ldm_jax import training
from tiled_ldm_jax.training import loader as loader_lib

SPEC = data.SynthSpec(region_size=8.0)
STEPS, BATCH = 6, 4


def _synthetic(seed=1):
  src = data.SyntheticSource(SPEC, 16, BATCH, seed)
  return src, lambda step, row: data.record(src.step_example(step, row), with_images=True)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      assert x[k].dtype == y[k].dtype
      np.testing.assert_array_equal(x[k], y[k])


def test_batches_are_deterministic_and_equal_the_source_batches():
  src, example = _synthetic()
  got = _take(loader_lib.Loader(example, BATCH, STEPS, process_index=0,
                                process_count=1).iterator(), STEPS)
  again = _take(loader_lib.Loader(example, BATCH, STEPS, process_index=0, process_count=1,
                                  num_threads=0).iterator(), STEPS)
  _assert_batches_equal(got, again)                               # threads change nothing
  _assert_batches_equal(got, [src.batch(s) for s in range(STEPS)])   # the old batches, bitwise
  other = next(loader_lib.Loader(_synthetic(seed=2)[1], BATCH, STEPS, process_index=0,
                                 process_count=1).iterator())
  assert not np.array_equal(other['image'], got[0]['image'])
  with pytest.raises(StopIteration):
    next(loader_lib.Loader(example, BATCH, 1, process_index=0, process_count=1)
         .iterator(loader_lib.Loader.state_at(1)))


def test_two_process_shards_are_disjoint_and_make_the_global_batch():
  _, example = _synthetic()
  whole = _take(loader_lib.Loader(example, BATCH, STEPS, process_index=0,
                                  process_count=1).iterator(), 3)
  shards = [loader_lib.Loader(example, BATCH, STEPS, process_index=p, process_count=2)
            for p in range(2)]
  assert [list(s.rows) for s in shards] == [[0, 1], [2, 3]]
  parts = [_take(s.iterator(), 3) for s in shards]
  for step in range(3):
    a, b = parts[0][step], parts[1][step]
    assert a['image'].shape == (BATCH // 2, 16, 16, 3)
    assert not any(np.array_equal(x, y) for x in a['image'] for y in b['image'])
    for k in whole[step]:
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), whole[step][k])
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    loader_lib.Loader(example, BATCH, STEPS, process_index=0, process_count=3)


def test_iterator_state_round_trip_mid_epoch(tmp_path):
  """A folder dataset of 5 pairs, batches of 2: step 2 starts mid-epoch (example 4 of
  epoch 0, then epoch 1). The state saved after 2 batches (as JSON beside a checkpoint)
  restores an iterator that yields exactly the batches the first one yields next."""
  data.write_synthetic_dataset(str(tmp_path / 'ds'), 5, 24, seed=0, spec=SPEC)
  src = data.FolderSource(str(tmp_path / 'ds'), 16, 2, seed=4)
  example = lambda step, row: data.record(src.step_example(step, row), with_images=True)
  loader = loader_lib.Loader(example, 2, STEPS, process_index=0, process_count=1)
  it = loader.iterator()
  _take(it, 2)
  state = it.get_state()
  assert state == loader_lib.Loader.state_at(2)
  checkpoint.save_loader_state(str(tmp_path / 'ckpt'), 2, 0, state)
  assert os.path.exists(tmp_path / 'ckpt' / '2' / 'loader_state.process0.json')
  restored = checkpoint.load_loader_state(str(tmp_path / 'ckpt'), 2, 0)
  assert checkpoint.load_loader_state(str(tmp_path / 'ckpt'), 3, 0) is None
  expected = _take(it, 3)
  _assert_batches_equal(_take(loader.iterator(restored), 3), expected)
  _assert_batches_equal(expected, [src.batch(s) for s in range(2, 5)])


def test_missing_grain_is_a_one_line_error(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'grain', None)   # `import grain` raises ImportError
  with pytest.raises(ValueError, match=r'pip install -e \.\[train\]') as err:
    loader_lib.require_grain()
  assert '\n' not in str(err.value)
  cfg = training.from_config(dict(task='vae', model='unused.py', steps=1, batch_size=1,
                                  image_size=16))
  with pytest.raises(ValueError, match='grain'):
    training.train(cfg, None, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')                # nothing written
