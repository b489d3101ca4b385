"""Several processes writing one image (`output/shared_writer.py`), run here as threads with
thread collectives: the files equal the single-process ones, byte for byte in pixels.
(tests/test_multiprocess.py runs the same through two real processes.)"""

import threading

import numpy as np
import pytest

from tiled_ldm_jax.output import ome_zarr
from tiled_ldm_jax.output import shared_writer
from tiled_ldm_jax.output import writers
from tiled_ldm_jax.evaluation import benchmark

tifffile = pytest.importorskip('tifffile')


class _Threads:
  """Barrier and all-gather between `n` threads (the collectives' stand-ins)."""

  def __init__(self, n: int):
    self.n, self.wall, self.slots = n, threading.Barrier(n, timeout=300), [None] * n

  def barrier(self, name):
    del name
    self.wall.wait()

  def allgather(self, pid):
    def gather(x):
      self.slots[pid] = np.array(x)
      self.wall.wait()
      out = np.stack(self.slots)
      self.wall.wait()              # nobody overwrites a slot before all have read
      return out
    return gather


def _run_threads(n, fn):
  errors = []

  def body(pid):
    try:
      fn(pid)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)
      threads.wall.abort()
  threads = _Threads(n)
  workers = [threading.Thread(target=body, args=(pid,)) for pid in range(n)]
  fn.threads = threads
  for w in workers:
    w.start()
  for w in workers:
    w.join(600)
  assert not errors, errors
  return threads


@pytest.fixture(scope='module')
def image(demo_pipeline):
  """The demo pipeline, a random 256 x 384 px latent (2 bands of 128 px) and labels.
  The original's blend: the default 'shared' decodes 512 px tiles, one band here (its
  band ranges: tests/test_decode_shared.py; several real processes writing with it:
  tests/test_multiprocess.py)."""
  pipe = demo_pipeline
  o = pipe.resolve(blend_mode='original')
  z = np.random.default_rng(0).normal(size=(32, 48, 4)).astype(np.float32)
  labels = benchmark.benchmark_label_map(256, 384, 4)
  src = pipe.band_source(z, options=o)
  assert (src.band_rows, src.n_bands) == (128, 2)
  return pipe, o, z, labels


def test_split_ranges():
  assert shared_writer.split_ranges(4, 2, 2) == [(0, 2), (2, 4)]
  assert shared_writer.split_ranges(5, 2, 2) == [(0, 2), (2, 5)]
  assert shared_writer.split_ranges(1, 3) == [(0, 0), (0, 0), (0, 1)]
  for n, parts, unit in ((17, 3, 4), (8, 8, 1), (3, 4, 2)):
    r = shared_writer.split_ranges(n, parts, unit)
    assert r[0][0] == 0 and r[-1][1] == n and len(r) == parts
    assert all(a % unit == 0 or a == b for a, b in r) and all(
        r[i][1] == r[i + 1][0] for i in range(parts - 1))


def test_zarr_written_by_several_equals_one(tmp_path, image):
  """3 processes, 2 bands, chunks of one band: process 0 decodes nothing but creates,
  builds the levels and renames."""
  pipe, o, z, labels = image
  processes = 3
  one = tmp_path / 'one.zarr'
  ome_zarr.write_ome_zarr(one, pipe.iter_decode(z, options=o), (256, 384, 3), labels=labels,
                          tile=128)
  many = tmp_path / 'many.zarr'

  def fn(pid):
    shared_writer.write_zarr(pipe.band_source(z, options=o), labels, str(many), tile=128,
                             process_index=pid,
                             process_count=processes, barrier=fn.threads.barrier)
  _run_threads(processes, fn)
  for array in ('image', 'labels'):
    a = ome_zarr._open_levels(ome_zarr._group(str(one), array), None)  # pylint: disable=protected-access
    b = ome_zarr._open_levels(ome_zarr._group(str(many), array), None)  # pylint: disable=protected-access
    assert len(a) == len(b) > 1
    for la, lb in zip(a, b):
      np.testing.assert_array_equal(la.read().result(), lb.read().result())
  assert not list(tmp_path.glob('.*partial'))


def test_tiff_gathered_by_process_0_equals_one(tmp_path, image):
  pipe, o, z, _ = image
  processes = 2
  one = tmp_path / 'one.tif'
  writers.write_tiff(one, pipe.iter_decode(z, options=o), (256, 384, 3), compression='zlib',
                     tile=128)
  many = tmp_path / 'many.tif'
  decoded = [0] * processes
  real_iter = pipe.iter_decode

  def fn(pid):
    shared_writer.write_tiff(pipe.band_source(z, options=o), str(many), process_index=pid,
                             process_count=processes, allgather=fn.threads.allgather(pid),
                             compression='zlib', tile=128)
  pipe.iter_decode = lambda *a, **k: _counting(real_iter(*a, **k), decoded)
  try:
    _run_threads(processes, fn)
  finally:
    del pipe.iter_decode
  with tifffile.TiffFile(one) as fa, tifffile.TiffFile(many) as fb:
    assert len(fa.series[0].levels) == len(fb.series[0].levels) > 1
    for la, lb in zip(fa.series[0].levels, fb.series[0].levels):
      np.testing.assert_array_equal(la.asarray(), lb.asarray())
  # Each band yielded once, by all processes together (a rebuilt carry is not yielded).
  assert decoded[0] == pipe.band_source(z, options=o).n_bands


def _counting(bands, counter):
  for band in bands:
    counter[0] += 1
    yield band
