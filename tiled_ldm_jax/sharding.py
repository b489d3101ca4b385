"""Meshes over the devices JAX is given, multi-host start-up, and moving results to the host.

The sampler (`Sampler(mesh=...)`) splits the image batch over a 1-D mesh axis 'data' when
the batch is a multiple of the mesh size, else the patches of each iteration. `make_mesh`
picks the largest usable device count for a batch, so any batch runs on any machine.
"""

from __future__ import annotations

from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

AXIS = 'data'


_JOINED = None   # the arguments this process joined its multi-process run with


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """`jax.distributed.initialize` for multi-host runs.

  With no arguments on a Cloud TPU pod slice (or a SLURM/Open MPI launch) JAX reads
  everything from the environment; on GPU hosts pass all three. Single-process runs do
  not call this. A process joins one run: calling again with the same arguments does
  nothing (one interpreter serving several requests), other arguments are an error.
  """
  global _JOINED
  args = (coordinator_address, num_processes, process_id)
  if _JOINED is not None:
    if args != _JOINED:
      raise ValueError(f'this process already joined a multi-process run with {_JOINED} '
                       f'(address, processes, id); it cannot join another with {args}')
    return
  # CPU devices talk through gloo (the default 'none' has no cross-process collectives);
  # it must be set before the backend starts.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {k: v for k, v in (('coordinator_address', coordinator_address),
                              ('num_processes', num_processes), ('process_id', process_id))
            if v is not None}
  jax.distributed.initialize(**kwargs)
  _JOINED = args
  logging.info('process %d of %d; %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def usable_devices(n_images: int, patches_per_step: int, available: int) -> int:
  """The largest d <= available dividing the image batch or the patch batch (N*K)."""
  for d in range(available, 0, -1):
    if n_images % d == 0 or (n_images * patches_per_step) % d == 0:
      return d
  return 1


def _balanced(pool: Sequence[jax.Device], d: int) -> list[jax.Device]:
  """`d` devices of `pool`, the same number from each process (first ones of each)."""
  by_process: dict[int, list[jax.Device]] = {}
  for dev in pool:
    by_process.setdefault(dev.process_index, []).append(dev)
  per = d // len(by_process)
  return [dev for p in sorted(by_process) for dev in by_process[p][:per]]


def make_mesh(n_images: int, patches_per_step: int, devices: int | None = None,
              device_list: Sequence[jax.Device] | None = None) -> Mesh | None:
  """A 1-D mesh over as many devices as the batch can use; None for a single device.

  With several processes the mesh takes the same number of devices from every process
  (a process without a device in the mesh would skip its collectives and hang the
  others); when no such count divides the batch, every process samples the whole
  batch on its own first device (None: same keys, same result, no collectives). Every
  process reaches the same decision from the same flags.

  Args:
    n_images: images sampled together; patches_per_step: K.
    devices: at most this many devices (None or 0: all of `jax.devices()`).
  """
  pool = list(device_list or jax.devices())
  if devices:
    if devices > len(pool):
      raise ValueError(f'asked for {devices} devices, JAX sees {len(pool)}')
    pool = pool[:devices]
  counts = {}
  for dev in pool:
    counts[dev.process_index] = counts.get(dev.process_index, 0) + 1
  if len(counts) > 1:
    per, n_proc = min(counts.values()), len(counts)
    for d in range(per * n_proc, n_proc - 1, -n_proc):
      if n_images % d == 0 or (n_images * patches_per_step) % d == 0:
        if d < len(pool):
          logging.warning('using %d of %d devices (%d per process)', d, len(pool),
                          d // n_proc)
        return Mesh(np.array(_balanced(pool, d)), (AXIS,))
    logging.warning('no device count that is a multiple of the %d processes divides the '
                    'batch (%d images x %d patches): every process samples the whole batch '
                    'on one device', n_proc, n_images, patches_per_step)
    return None
  d = usable_devices(n_images, patches_per_step, len(pool))
  if d < len(pool):
    logging.warning('using %d of %d devices: neither the batch (%d images) nor the patch '
                    'batch (x%d patches) divides by more', d, len(pool), n_images,
                    patches_per_step)
  return Mesh(np.array(pool[:d]), (AXIS,)) if d > 1 else None


def put_global(a, sharding):
  """`a` (the same value on every process) as a global array with `sharding`.

  One process: `device_put`. Several: `device_put` refuses a sharding over devices this
  process cannot address, so each process builds its own shards from its host copy
  (typed PRNG keys travel as their key data).
  """
  if jax.process_count() == 1:
    return jax.device_put(a, sharding)
  if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
    data = put_global(jax.random.key_data(a), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
  host = np.asarray(a)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
  """A (possibly multi-host sharded) array as one numpy array on every process."""
  if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)   # numpy, or a local array (no mesh): every process has it all


def barrier(name: str) -> None:
  """All processes wait here (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def allgather(x) -> np.ndarray:
  """[P, ...]: every process's host array `x` (the same shape on all) on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def warm_collectives(mesh) -> None:
  """Multi-process runs: one all-reduce over every device of `mesh`, at start-up.

  On CPU, gloo sets up its context for a set of devices at the first collective over
  it and gives up if the processes arrive more than 30 s apart. At start-up they are
  seconds apart; after compiling (the first training step) they can be further apart
  on a loaded machine. Later collectives reuse the context.
  """
  if jax.process_count() == 1:
    return
  spec = jax.sharding.PartitionSpec(mesh.axis_names)
  shard = jax.sharding.NamedSharding(mesh, spec)
  ones = jax.make_array_from_callback((mesh.devices.size,), shard,
                                      lambda index: np.ones((1,), np.int32))
  total = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))(ones)
  if int(total) != mesh.devices.size:
    raise RuntimeError(f'all-reduce over {mesh.devices.size} devices gave {int(total)}')


def broadcast_int(value: int) -> int:
  """Process 0's `value` on every process (a decision that reads the disk, made once)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def owns(index: int) -> bool:
  """Whether this process decodes and writes image `index` of a batch (round-robin)."""
  return index % jax.process_count() == jax.process_index()


def is_writer() -> bool:
  """Process 0 writes what is shared by the run (run checkpoint metadata, its removal)."""
  return jax.process_index() == 0
