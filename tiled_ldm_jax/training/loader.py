"""Training data through grain: each process loads only its rows of every global batch.

grain (the JAX ecosystem's data loader) is the one optional dependency of training
(`pip install -e .[train]`); `require_grain` turns its absence into a one-line error.

The pipeline, per process:
  `Records` (a grain RandomAccessDataSource: local record j = row `first + j % b` of
  step `j // b`, b = batch_size / process_count, first = process_index * b)
  -> `MapDataset.batch(b)` (local batch s = this process's rows of global step s)
  -> `to_iter_dataset(ReadOptions(num_threads))` (batches read ahead by worker threads,
     delivered in order).
A record is `task.example(step, row)`, a pure function of (seed, step, row), so batches
are deterministic, independent of the thread count, and for one process equal bitwise
to `task.batches(step)`. Process shards are rows of each global batch, not grain's
`ShardByJaxProcess` (which splits the record range into contiguous blocks, i.e. would
give each process whole steps instead of its part of every step).

The iterator state (`get_state()`, a small JSON dict) is saved beside every training
checkpoint (`checkpoint.save_loader_state`) and restored on resume; since the dataset is
random access, it is also recomputable from the step (`state_at`), which a resume uses
when the saved state is missing or belongs to another step.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

INSTALL_HINT = 'pip install -e .[train]'


class GrainMissingError(ValueError):
  """grain is not installed (a ValueError, so callers that catch bad input catch it)."""


def require_grain():
  """The grain module, or a one-line GrainMissingError saying how to install it."""
  try:
    import grain  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise GrainMissingError('training loads its data with grain, which is not installed: '
                     f'{INSTALL_HINT}') from None
  return grain


def process_rows(batch_size: int, process_index: int, process_count: int) -> range:
  """The rows of a global batch of `batch_size` that process `process_index` loads."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process {process_index} of {process_count}')
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by the {process_count} '
                     'processes (each loads an equal share of the global batch)')
  b = batch_size // process_count
  return range(process_index * b, (process_index + 1) * b)


class Records:
  """grain RandomAccessDataSource: this process's records of steps [0, steps)."""

  def __init__(self, example: Callable[[int, int], dict], steps: int, rows: range):
    self.example, self.steps, self.rows = example, int(steps), rows

  def __len__(self) -> int:
    return self.steps * len(self.rows)

  def __getitem__(self, j: int) -> dict[str, np.ndarray]:
    step, r = divmod(int(j), len(self.rows))
    if not 0 <= step < self.steps:
      raise IndexError(f'record {j} of {len(self)}')
    return self.example(step, self.rows[r])

  def __repr__(self) -> str:   # grain logs sources by repr; keep it short
    return f'Records(steps={self.steps}, rows={self.rows})'


class Loader:
  """This process's batches of steps [0, steps) of a task (see the module docstring).

  Args:
    example: (step, row) -> dict of numpy arrays (`Task.example`).
    batch_size: rows of the global batch.
    steps: number of steps (batches) the dataset holds.
    process_index, process_count: this process and how many share each global batch
      (default: JAX's; tests pass them to simulate several processes in one).
    num_threads: grain worker threads reading batches ahead (0: read in the caller).
    prefetch: batches buffered ahead.
  """

  def __init__(self, example: Callable[[int, int], dict], batch_size: int, steps: int, *,
               process_index: int | None = None, process_count: int | None = None,
               num_threads: int = 2, prefetch: int = 2):
    grain = require_grain()
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index, process_count = jax.process_index(), jax.process_count()
    self.rows = process_rows(batch_size, process_index, process_count)
    self.steps = int(steps)
    ds = grain.MapDataset.source(Records(example, steps, self.rows))
    ds = ds.batch(len(self.rows), drop_remainder=True)   # local batch s = step s
    self.dataset = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                        prefetch_buffer_size=prefetch))

  @staticmethod
  def state_at(step: int) -> dict[str, Any]:
    """The iterator state whose next batch is step `step` (grain's MapDataset iterator
    counts batches in `next_index`)."""
    return {'next_index': int(step)}

  def iterator(self, state: dict[str, Any] | None = None) -> Iterator:
    """A grain iterator over the local batches: from step 0, or from `state` (a saved
    `get_state()` of an iterator of this loader, or `state_at(step)`)."""
    it = iter(self.dataset)
    if state is not None:
      it.set_state(state)
    return it
