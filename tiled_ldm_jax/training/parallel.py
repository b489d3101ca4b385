"""Data-parallel training: the mesh, the train state's and the batch's shardings.

One 1-D mesh, axis 'data', over the first `devices` of `jax.devices()` (all processes'
devices in a multi-host run). The global batch is split along 'data' (each device gets
batch_size / devices examples); the params, EMA and optimizer state are replicated, or
with `shard_params` sharded FSDP-style: each leaf along its largest dimension divisible
by the device count (replicated if none is), so a model that does not fit one device
does. The step's randomness is drawn from the replicated key for the whole global batch,
so a run's numbers do not depend on the device count (up to the summation order of the
cross-device mean).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tiled_ldm_jax import sharding as sharding_lib
from tiled_ldm_jax.models.configs import ConfigError

AXIS = 'data'


def make_mesh(batch_size: int, devices: int | None = None) -> Mesh:
  """The 'data' mesh over `devices` devices (None or 0: all); errors if the global batch
  does not split evenly over them."""
  pool = jax.devices()
  n = devices or len(pool)
  if n < 1 or n > len(pool):
    raise ConfigError(f'asked for {n} devices, JAX sees {len(pool)}')
  if batch_size % n:
    raise ConfigError(f'batch_size {batch_size} is not divisible by the {n} devices '
                     '(the global batch is split evenly over them)')
  return Mesh(np.array(pool[:n]), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data'."""
  return NamedSharding(mesh, P(AXIS))


def fsdp_spec(shape, n: int) -> P:
  """The largest dimension divisible by `n` split over 'data' (ties: the first); P() if
  none is (or n == 1)."""
  dims = [i for i, d in enumerate(shape) if n > 1 and d % n == 0 and d >= n]
  if not dims:
    return P()
  best = max(dims, key=lambda i: (shape[i], -i))
  return P(*[AXIS if i == best else None for i in range(len(shape))])


def state_shardings(abstract_state, mesh: Mesh, shard_params: bool):
  """A NamedSharding per TrainState leaf: step and key replicated; params, EMA and
  optimizer state replicated or (shard_params) FSDP-sharded."""
  n = mesh.devices.size

  def leaf(x):
    return NamedSharding(mesh, fsdp_spec(np.shape(x), n) if shard_params else P())
  sharded = {k: jax.tree_util.tree_map(leaf, getattr(abstract_state, k))
             for k in ('params', 'ema_params', 'opt_state')}
  return abstract_state.replace(step=replicated(mesh), rng=replicated(mesh), **sharded)


def put(tree, shardings):
  """Host (or single-device) values onto the mesh, in every process (multi-host safe)."""
  return jax.tree_util.tree_map(
      lambda x, s: sharding_lib.put_global(np.asarray(x), s), tree, shardings)


def put_local_batch(local_batch: dict, mesh: Mesh, batch_size: int) -> dict:
  """This process's rows of the global batch (`loader.process_rows`) as global arrays
  split over 'data'. One process: its rows are the whole batch (`device_put`)."""
  s = batch_sharding(mesh)
  if jax.process_count() == 1:
    return {k: sharding_lib.put_global(np.asarray(v), s) for k, v in local_batch.items()}
  return {k: jax.make_array_from_process_local_data(s, np.asarray(v),
                                                    (batch_size,) + np.shape(v)[1:])
          for k, v in local_batch.items()}


def check_process_rows(mesh: Mesh, batch_size: int, rows: range) -> None:
  """Errors unless this process's devices in `mesh` hold exactly the batch `rows` it
  loads (the mesh lists the processes' devices in process order)."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  held = sorted({i for idx in index_map.values()
                 for i in range(*idx[0].indices(batch_size))})
  if held != list(rows):
    raise ConfigError(f'process {jax.process_index()} loads batch rows {rows.start}..'
                      f'{rows.stop - 1} but its devices hold rows {held[:1]}..{held[-1:]} '
                      '(use every process\'s devices: --devices 0)')


def to_host(tree):
  """Every leaf as one numpy array on every process (gathers sharded leaves)."""
  return jax.tree_util.tree_map(sharding_lib.to_host, tree)
