"""Progress lines for the long stages (sampling, decode and write) and rounded durations.

A stage logs a start line, then a line when at least `EVERY_SECONDS` and at least
`EVERY_FRACTION` of the work have passed since the last one (whichever is rarer: a
one-minute stage gets a line about every 10 s, a ten-hour one about every 30 min), then
an end line; each with the share done, the rate, the time elapsed and an ETA (linear in
the share done). Lines go to absl logging at INFO: `--verbosity=-1` quiets them.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from absl import logging


def duration(seconds: float) -> str:
  """Seconds rounded for people: '0.4 s', '12.3 s', '4 min 05 s', '2 h 03 min'."""
  if seconds is None or not math.isfinite(seconds):
    return '?'
  if seconds < 60:
    return f'{seconds:.1f} s' if seconds < 9.95 else f'{seconds:.0f} s'
  if seconds < 3600:
    m, s = divmod(int(round(seconds)), 60)
    return f'{m} min {s:02d} s'
  h, m = divmod(int(round(seconds / 60)), 60)
  return f'{h} h {m:02d} min'


def durations(seconds: dict) -> str:
  """{'image_stage': 70.44, ...} -> 'image stage 70 s, ...' (None values left out)."""
  return ', '.join(f'{k.replace("_", " ")} {duration(v)}' for k, v in seconds.items()
                   if v is not None)


class Progress:
  """`start()`, `update(fraction, done)` as the work goes, `finish(done)`."""

  EVERY_SECONDS = 10.0
  EVERY_FRACTION = 0.05

  def __init__(self, label: str, unit: str = '', total: int | None = None,
               log: Callable[..., None] = logging.info,
               clock: Callable[[], float] = time.monotonic):
    self.label, self.unit, self.total = label, unit, total
    self.log, self.clock = log, clock
    self.started = self.last = clock()
    self.last_fraction = 0.0
    self.lines = 0

  def start(self, detail: str = '') -> None:
    self.started = self.last = self.clock()
    self.last_fraction = 0.0
    self._emit(f'{self.label}: started' + (f' ({detail})' if detail else ''))

  def _emit(self, line: str) -> None:
    self.lines += 1
    self.log('%s', line)

  def _count(self, done) -> str:
    if done is None:
      return ''
    of = f'/{self.total}' if self.total else ''
    return f' ({int(done)}{of} {self.unit})'.replace(' )', ')')

  def update(self, fraction: float, done: int | None = None) -> bool:
    """Logs a line if it is time (see the module doc); returns whether it did."""
    fraction = min(max(float(fraction), 0.0), 1.0)
    now = self.clock()
    if fraction >= 1.0 or (now - self.last < self.EVERY_SECONDS
                           or fraction - self.last_fraction < self.EVERY_FRACTION):
      return False
    self.last, self.last_fraction = now, fraction
    elapsed = now - self.started
    rate = ''
    if done and elapsed > 0 and self.unit:   # slow work as seconds per item
      per = done / elapsed
      rate = (f', {per:.3g} {self.unit}/s' if per >= 1 else
              f', {1 / per:.3g} s per {self.unit.rstrip("s")}')
    eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float('nan')
    self._emit(f'{self.label}: {100 * fraction:.0f}%{self._count(done)}{rate}, '
               f'{duration(elapsed)} elapsed, ETA {duration(eta)}')
    return True

  def finish(self, done: int | None = None) -> float:
    """Logs the end line; returns the seconds since `start`."""
    elapsed = self.clock() - self.started
    self._emit(f'{self.label}: done{self._count(done)} in {duration(elapsed)}')
    return elapsed

  def rows(self, bands, height: int):
    """Passes `(row_start, rows)` bands through, counting rows of `height` as it goes."""
    self.total = height
    for row0, rows in bands:
      yield row0, rows
      self.update((row0 + len(rows)) / height, row0 + len(rows))
