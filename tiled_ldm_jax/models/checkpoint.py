"""Converted model folders: an orbax checkpoint of the params plus `model.json`.

The only module that imports orbax. Layout of a folder:
  model.json   {"format": 2, "model": "image_unet"|"mask_unet"|"vae", "config": {...},
                "parts": [[0, 37], [37, 80], ...]}
  params/part_NNNNN/   orbax PyTree checkpoints of {leaf index: array}, the param leaves in
               `tree_leaves` order, about 16 MiB each (written one part at a time, so a
               conversion never holds the whole model twice)
Format 1 folders (one `params/` PyTree of the Flax params, no "parts") still load.
Restores run against the abstract tree built from `model.json`, so a folder whose
params do not fit its config is an error, not a silently different model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Iterable, Iterator

from absl import logging as absl_logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from tiled_ldm_jax.files import atomic
from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax.files import json_files
from tiled_ldm_jax import sharding
from tiled_ldm_jax.models import configs as configs_lib

MODEL_KINDS = tuple(configs_lib.MODEL_KINDS)


@contextlib.contextmanager
def quiet_orbax():
  """orbax logs every save/restore at INFO through absl; keep only warnings meanwhile."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(min(level, absl_logging.WARNING))
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)
_FORMAT = 2
_FORMATS = (1, 2)   # 1: one `params/` tree; 2: `params/part_*` (save_model_leaves)


def _local_checkpointer() -> ocp.Checkpointer:
  """An orbax PyTree checkpointer for this process alone. Model folders are written by
  one process (process 0 exports a trained model) and read by each on its own, so in a
  multi-process run they must not wait at orbax's barriers for the other processes."""
  if jax.process_count() == 1:
    return ocp.PyTreeCheckpointer()
  me = jax.process_index()
  opts = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                            barrier_sync_key_prefix=f'local_{me}')
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=opts),
                          multiprocessing_options=opts)


def _abstract(model: str, config):
  if model == 'vae':
    from tiled_ldm_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
    return vae_lib.abstract_params(config)
  from tiled_ldm_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  return unet_lib.abstract_params(config)


def save_model(directory: str, model: str, config, params, extra: dict | None = None) -> None:
  """Writes `directory` atomically (a temporary sibling renamed at the end); `extra`:
  further model.json entries (e.g. a trained U-Net's `objective`)."""
  save_model_leaves(directory, model, config, jax.tree_util.tree_leaves(params), extra=extra)


# Leaves are written in parts of about this many bytes: a converter that yields one leaf
# at a time then holds one part, not the model (a whole-tree orbax save held about 2.5x it).
PART_BYTES = 16 << 20


def _parts(leaves: Iterable[Any], part_bytes: int) -> Iterator[list[np.ndarray]]:
  part, size = [], 0
  for leaf in leaves:
    leaf = np.asarray(leaf)
    part.append(leaf)
    size += leaf.nbytes
    if size >= part_bytes:
      yield part
      part, size = [], 0
  if part:
    yield part


def save_model_leaves(directory: str, model: str, config, leaves: Iterable[Any],
                      part_bytes: int = PART_BYTES, extra: dict | None = None) -> None:
  """Like `save_model`, from the param leaves in `tree_leaves` order (any iterable: a
  generator is consumed one part at a time and each part is freed once written).

  Layout (format 2): `params/part_NNNNN/` orbax PyTrees of {leaf index: array}; the index
  ranges are in `model.json` under "parts". Format 1 folders (one `params/` tree) load too.
  """
  if model not in MODEL_KINDS:
    raise ValueError(f'model must be one of {MODEL_KINDS}, got {model!r}')
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f'output folder exists and is not empty: {directory}')
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  # Not tempfile.mkdtemp: its 0700 mode would survive the rename; os.mkdir honours the umask.
  tmp = os.path.join(parent, f'.tmp-{os.path.basename(directory)}-{uuid.uuid4().hex[:12]}')
  os.mkdir(tmp)
  try:
    os.mkdir(os.path.join(tmp, 'params'))
    ranges, start = [], 0
    with quiet_orbax(), _local_checkpointer() as ckptr:
      for n, part in enumerate(_parts(leaves, part_bytes)):
        flat = {f'{start + i:06d}': v for i, v in enumerate(part)}
        ckptr.save(os.path.join(tmp, 'params', f'part_{n:05d}'), flat)
        ranges.append([start, start + len(part)])
        start += len(part)
        del part, flat
    meta = {**(extra or {}), 'format': _FORMAT, 'model': model,
            'config': configs_lib.config_to_dict(config),
            'parts': ranges}
    with open(os.path.join(tmp, 'model.json'), 'w') as f:
      json.dump(meta, f, indent=1)
    if os.path.exists(directory):
      os.rmdir(directory)
    os.replace(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _restore_parts(directory: str, abstract, ranges, what: str):
  """The tree of `abstract` from the parts written by `save_model_leaves`."""
  specs = jax.tree_util.tree_leaves(abstract)
  if not ranges or ranges[0][0] != 0 or ranges[-1][1] != len(specs) or any(
      a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
    raise ValueError(f'{what} (parts {ranges} do not cover {len(specs)} leaves)')
  leaves = []
  for n, (start, stop) in enumerate(ranges):
    part = {f'{i:06d}': specs[i] for i in range(start, stop)}
    got = _restore_tree(os.path.join(directory, 'params', f'part_{n:05d}'), part, what)
    leaves.extend(got[f'{i:06d}'] for i in range(start, stop))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)


def _restore_tree(path: str, abstract, what: str):
  """Restores an orbax PyTree at `path` against `abstract`; ValueError listing misfits."""
  with quiet_orbax(), _local_checkpointer() as ckptr:
    restore_args = jax.tree_util.tree_map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray),
                                          abstract)
    try:
      tree = ckptr.restore(path, item=abstract, restore_args=restore_args)
    except (ValueError, KeyError) as e:   # orbax's message lists the whole tree
      detail = ' '.join(str(e).split())
      raise ValueError(f'{what} ({detail[:300]}{"..." if len(detail) > 300 else ""})'
                       ) from None
  bad = [f'{jax.tree_util.keystr(p)}: {np.shape(v)} != {s.shape}'
         for (p, v), s in zip(jax.tree_util.tree_leaves_with_path(tree),
                              jax.tree_util.tree_leaves(abstract))
         if tuple(np.shape(v)) != tuple(s.shape)]
  if bad:
    more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
    raise ValueError(f'{what}: ' + '; '.join(bad[:3]) + more)
  return tree


def _model_meta(directory: str) -> dict[str, Any]:
  """model.json of a model folder, every field used type-checked (one-line ValueErrors)."""
  path = os.path.join(directory, 'model.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'not a converted model folder (no model.json): {directory}')
  meta = json_files.read_object(path, 'model.json')
  if meta.get('format') not in _FORMATS or meta.get('model') not in MODEL_KINDS:
    raise ValueError(f'{path}: unsupported format {str(meta.get("format"))[:40]!r} / model '
                     f'{str(meta.get("model"))[:40]!r}')
  if not isinstance(meta.get('config'), dict):
    raise ValueError(f'{path}: "config" must be an object')
  objective = meta.get('objective', 'eps')
  if objective not in OBJECTIVES:
    raise ValueError(f'{directory}: unknown objective {str(objective)[:40]!r} (have '
                     f'{OBJECTIVES})')
  if meta['format'] == 2 or 'parts' in meta:   # format 1 has none; a stray one is refused
    parts = meta.get('parts')
    ok = isinstance(parts, list) and all(
        isinstance(r, list) and len(r) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r)
        for r in parts)
    if not ok:
      raise ValueError(f'{path}: "parts" must be a list of [start, stop] index pairs')
  return meta


def read_model_json(directory: str) -> tuple[str, Any]:
  meta = _model_meta(directory)
  try:
    config = configs_lib.model_config(meta['model'], meta['config'])
  except configs_lib.ConfigError as e:
    raise ValueError(f'{os.path.join(directory, "model.json")}: {e}') from None
  return meta['model'], config


OBJECTIVES = diffusion.OBJECTIVES


def read_objective(directory: str) -> str:
  """A U-Net folder's `objective` (model.json; 'eps' when absent: converted originals)."""
  return _model_meta(directory).get('objective', 'eps')


def _read_parts(directory: str):
  """The part ranges of a format 2 folder; None for format 1 (one `params/` tree)."""
  meta = _model_meta(directory)
  return meta.get('parts') if meta['format'] == 2 else None


def load_model(directory: str, expect: str | None = None):
  """(model kind, config, params) from a folder written by `save_model`."""
  directory = os.path.abspath(directory)
  model, config = read_model_json(directory)
  if expect is not None and model != expect:
    raise ValueError(f'{directory} holds a {model} model, expected {expect}')
  abstract = _abstract(model, config)
  what = f'{directory}: params do not fit model.json'
  ranges = _read_parts(directory)
  if ranges is None:
    params = _restore_tree(os.path.join(directory, 'params'), abstract, what)
  else:
    params = _restore_parts(directory, abstract, ranges, what)
  params = jax.tree_util.tree_map(lambda v, s: np.asarray(v, s.dtype), params, abstract)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not np.isfinite(leaf).all():   # NaN/inf weights sample black images, silently
      raise ValueError(f'{directory}: parameter {jax.tree_util.keystr(path)} holds NaN or '
                       'inf values')
  return model, config, params


# ----------------------------------------------------------------------------- train states
#
# Training checkpoints: an orbax `CheckpointManager` folder with one numbered step
# directory per save. A state (any pytree: a flax.struct dataclass of params, optimizer
# state, rng key, ...) is stored as its flat list of leaves under index keys, beside a
# JSON list of each leaf's tree path, shape and dtype; a restore rebuilds the tree of the
# abstract state it is given after checking that list, so any pytree type round-trips
# exactly and a state that does not fit is an error naming the first differences.


def _leaf_table(tree) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  flat = {f'{i:06d}': v for i, (_, v) in enumerate(leaves)}
  meta = [{'path': jax.tree_util.keystr(p), 'shape': list(np.shape(v)),
           'dtype': str(np.dtype(v.dtype))} for p, v in leaves]
  return flat, meta


def _train_manager(directory: str, max_to_keep: int | None = None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def latest_step(directory: str) -> int | None:
  """The newest saved step under `directory`, or None (also when the folder is absent)."""
  if not os.path.isdir(directory):
    return None
  with quiet_orbax(), _train_manager(directory) as mngr:
    return mngr.latest_step()


def save_train_state(directory: str, step: int, state, max_to_keep: int | None = None) -> None:
  """Saves `state` as step `step` (synchronously); keeps the newest `max_to_keep` steps.

  Collective in a multi-process run (every process calls it): leaves sharded over other
  processes' devices are handed to orbax as global arrays, each process writing its
  shards; the rest are saved from a host copy."""
  def host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return x
    return np.asarray(jax.device_get(x))
  host = jax.tree_util.tree_map(host, state)
  flat, meta = _leaf_table(host)
  with quiet_orbax(), _train_manager(directory, max_to_keep) as mngr:
    mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                  leaves=ocp.args.JsonSave(meta)),
              force=True)
    mngr.wait_until_finished()


def restore_train_state(directory: str, abstract_state, step: int | None = None):
  """The state saved at `step` (default: the newest), as numpy leaves in the tree of
  `abstract_state` (a pytree of arrays or `jax.ShapeDtypeStruct`s)."""
  flat_abstract, meta = _leaf_table(abstract_state)
  with quiet_orbax(), _train_manager(directory) as mngr:
    step = mngr.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f'no training checkpoint under {directory}')
    saved = mngr.restore(step, args=ocp.args.Composite(leaves=ocp.args.JsonRestore()))['leaves']
    bad = [f'{a["path"]}: saved {b["shape"]} {b["dtype"]} != expected {a["shape"]} {a["dtype"]}'
           for a, b in zip(meta, saved) if a != b]
    if len(saved) != len(meta):
      bad.insert(0, f'{len(saved)} leaves saved, {len(meta)} expected')
    if bad:
      raise ValueError(f'{directory} step {step}: saved state does not fit:\n  '
                       + '\n  '.join(bad[:20]))
    target = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in flat_abstract.items()}
    restore_args = {k: ocp.ArrayRestoreArgs(restore_type=np.ndarray) for k in target}
    flat = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target, restore_args)))['state']
  leaves = [np.asarray(flat[k], target[k].dtype) for k in sorted(flat_abstract)]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_state), leaves)


def _loader_state_path(directory: str, step: int, process: int) -> str:
  # Inside orbax's folder of the step (named by the plain step number: the manager's
  # default), so it is pruned with the step; orbax ignores files it did not write.
  return os.path.join(os.path.abspath(directory), str(int(step)),
                      f'loader_state.process{int(process)}.json')


def save_loader_state(directory: str, step: int, process: int, state: dict) -> None:
  """Writes a data-loader iterator state (JSON) beside the training checkpoint of `step`
  (after `save_train_state` of that step); one file per process."""
  atomic.write_json(_loader_state_path(directory, step, process), state)


def load_loader_state(directory: str, step: int, process: int) -> dict | None:
  """The loader state saved with checkpoint `step` by `process`, or None if there is none."""
  path = _loader_state_path(directory, step, process)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- run state


def save_state(directory: str, tree, meta: dict[str, Any]) -> None:
  """Atomically replaces `directory` with `tree` (orbax) and `meta` (`meta.json`).

  Written into a sibling temporary folder and swapped in by rename, so `directory` is
  always either the previous complete state or the new one. Multi-process: every process
  calls this with the same (host) tree; orbax saves collectively and process 0 writes
  the files, the meta and the renames.
  """
  # A symlinked folder: its target is replaced (renaming the link itself would leave it
  # behind as the hidden `-old` entry, which rmtree refuses to follow).
  directory = os.path.realpath(directory)
  parent = os.path.dirname(directory)
  writer = sharding.is_writer()
  token = sharding.broadcast_int(uuid.uuid4().int % (1 << 48))   # one name on every process
  tmp = os.path.join(parent, f'.tmp-{os.path.basename(directory)}-{token:012x}')
  old = tmp + '-old'
  if writer:
    os.makedirs(parent, exist_ok=True)
    os.mkdir(tmp)
  sharding.barrier('tiled_ldm_jax.save_state.mkdir')
  try:
    with quiet_orbax(), ocp.PyTreeCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, 'state'), jax.tree_util.tree_map(np.asarray, tree))
    if writer:
      with open(os.path.join(tmp, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
      if os.path.exists(directory):
        os.replace(directory, old)
      os.replace(tmp, directory)
  finally:
    if writer:
      shutil.rmtree(tmp, ignore_errors=True)
      shutil.rmtree(old, ignore_errors=True)
  sharding.barrier('tiled_ldm_jax.save_state.done')


def load_state_meta(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, 'meta.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no saved run state in {directory}')
  return json_files.read_object(path, 'saved run state')


def load_state(directory: str, abstract):
  """The tree saved by `save_state`, restored against `abstract` (numpy leaves)."""
  return _restore_tree(os.path.join(directory, 'state'), abstract,
                       f'{directory}: saved state does not fit this run')
