"""Progress lines: their period (10 s and 5%, whichever is rarer), rates, ETA, rounded
durations; the TPU probe's INFO line dropped, other lines kept."""

import logging

import numpy as np

from tiled_ldm_jax import flag_util
from tiled_ldm_jax import progress


def test_duration_rounding():
  assert [progress.duration(s) for s in (0.44, 12.34, 70.44888418100001, 3599.6, 7380, None)
          ] == ['0.4 s', '12 s', '1 min 10 s', '60 min 00 s', '2 h 03 min', '?']
  assert progress.durations({'mask_stage': None, 'image_stage': 70.44888418100001,
                             'decode_and_write': 5.04}) == 'image stage 1 min 10 s, ' \
                                                           'decode and write 5.0 s'


def _run(total_seconds: float, steps: int):
  now = [0.0]
  lines = []
  log = progress.Progress('image stage', 'iterations', log=lambda f, m: lines.append(m),
                          clock=lambda: now[0])
  log.start()
  for i in range(1, steps + 1):
    now[0] = total_seconds * i / steps
    log.update(i / steps, i)
  log.finish(steps)
  return lines


def test_period_is_the_rarer_of_10_s_and_5_percent():
  short = _run(85.0, 43)              # the stage: 43 iterations in 85 s
  assert short[0] == 'image stage: started' and short[-1] == \
      'image stage: done (43 iterations) in 1 min 25 s'
  assert 7 <= len(short) - 2 <= 9, short            # about every 10 s
  assert short[1] == ('image stage: 14% (6 iterations), 1.98 s per iteration, 12 s '
                      'elapsed, ETA 1 min 13 s'), short[1]
  long = _run(36000.0, 4000)          # 10 hours: about every 5%, not every 10 s
  assert 18 <= len(long) - 2 <= 20, len(long)
  fast = _run(5.0, 1000)              # 5 s: start and end only
  assert len(fast) == 2


def test_rows_pass_through_with_progress():
  now = [0.0]
  lines = []
  log = progress.Progress('decode and write', 'rows', log=lambda f, m: lines.append(m),
                          clock=lambda: now[0])
  def bands():
    for r in range(0, 100, 10):
      now[0] += 5.0
      yield r, [0] * 10
  got = [r for r, _ in log.rows(bands(), 100)]
  assert got == list(range(0, 100, 10))
  assert lines[0] == 'decode and write: 20% (20/100 rows), 2 rows/s, 10 s elapsed, ETA 40 s'


def test_tpu_probe_line_dropped_others_kept(caplog):
  flag_util.quiet_tpu_probe()
  logger = logging.getLogger('jax._src.xla_bridge')
  with caplog.at_level(logging.INFO, logger='jax._src.xla_bridge'):
    logger.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: "
                'libtpu.so: cannot open shared object file: No such file or directory')
    logger.info("Unable to initialize backend 'tpu': UNKNOWN: TPU initialization failed")
    logger.warning("Unable to initialize backend 'tpu': libtpu.so: cannot open shared "
                   'object file')
  kept = [r.getMessage() for r in caplog.records]
  assert len(kept) == 2 and 'TPU initialization failed' in kept[0], kept


def test_sampler_chunks_follow_time_and_share():
  from tiled_ldm_jax.sampling import loop  # pylint: disable=g-import-not-at-top
  # A 20-iteration stage at 8 s an iteration: the host looks after every iteration.
  assert loop.next_chunk(1, 8.0, 3 / 20, 3, 50) == 1
  # A fast device: 10 ms an iteration, 4000 iterations: 2 s of work, 2.5% of the stage,
  # growing 2x a chunk from 1 (the first chunk held the compile).
  chunks, its, spent = [], 0, 30.0
  chunk = 1
  for _ in range(12):
    its += chunk
    chunks.append(chunk)
    chunk = loop.next_chunk(chunk, spent, its / 4000, its, 10 ** 6)
    spent = 0.01 * chunk
  assert chunks[:8] == [1, 1, 2, 4, 8, 16, 32, 64] and max(chunks) == 100, chunks
  assert loop.next_chunk(64, 0.64, 0.5, 2000, 50) == 50        # --progress_every caps it


def test_progress_chunks_equal_the_whole_run(monkeypatch):
  """Progress on (chunks of adaptive length, host syncs between them) samples exactly
  what one uninterrupted call does, and logs the stage's start and end."""
  from test_sampler import A, local_eps, random_labels  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax.sampling import loop  # pylint: disable=g-import-not-at-top
  labels = random_labels(2, 16, 24)
  keys = loop.image_keys(11, [0, 1])
  settings = dict(sampling_steps=3, patch=8, eta=1.0, patches_per_step=2)
  whole = loop.Sampler(local_eps, loop.SamplerSettings(**settings)).sample(
      A, keys, loop.spatial(labels))
  lines = []
  real = progress.Progress.__init__
  def init(self, *a, **k):
    real(self, *a, **{**k, 'log': lambda f, m: lines.append(m)})
  monkeypatch.setattr(progress.Progress, '__init__', init)
  loud = loop.Sampler(local_eps, loop.SamplerSettings(**settings, progress_every=50,
                                                      progress_label='test stage'))
  logged = loud.sample(A, keys, loop.spatial(labels))
  np.testing.assert_array_equal(logged.x, whole.x)
  assert int(logged.iterations) == int(whole.iterations) > 2
  assert lines[0] == 'test stage: started' and lines[-1].startswith(
      f'test stage: done ({int(whole.iterations)} iterations)'), lines
  assert loud.compiles() == 1           # chunks of any length: one program
