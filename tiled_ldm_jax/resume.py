"""Resumable runs: the sampler state of the current batch and stage, saved every N iterations.

A run's checkpoint lives in `<imgs_path>/checkpoint/` (`checkpoint.save_state`: orbax tree
plus `meta.json`, swapped in atomically). It holds the stage ('mask' or 'image'), the
batch, the sample number of the run's first image, the flags that determine the result,
the model hashes, and the `SamplerState` (latent, lower-level copy, times, keys,
counters) plus, in the image stage, the label maps the mask stage produced. Because
`Sampler.run` in chunks equals one uninterrupted run, a resumed run writes exactly the
bytes an uninterrupted one would. The folder is removed when the run completes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax import sharding
from tiled_ldm_jax.sampling.loop import SamplerState

FOLDER = 'checkpoint'
FORMAT = 3   # 2: the random sampler's state holds super_counts; 3: the placement's
             # carry is its own subtree (`windows`)
INPUT_PREFIX = 'input:'   # hashes of input files (--mask, --init_image, --keep_mask), not models
# Flags (`GenerationConfig.flat()`) that cannot change what is generated.
NEUTRAL_FIELDS = ('imgs_path', 'progress_every', 'checkpoint_every', 'resume', 'dry_run',
                  'preview')


def result_flags(cfg) -> dict[str, Any]:
  return {k: v for k, v in cfg.flat().items() if k not in NEUTRAL_FIELDS}


_META_TYPES = {'stage': str, 'batch_start': int, 'first_sample': int, 'flags': dict,
               'checkpoint_sha256': dict, 'iterations': int, 'has_labels': bool,
               'extra': dict}


def _check_meta(path: str, meta: dict, cfg) -> None:
  """Every field of a saved run's meta.json has its type and fits this request, so a
  resume is refused before any work (and the saved run kept) rather than failing, or
  writing nothing and deleting it, after loading."""
  for name, kind in _META_TYPES.items():
    value = meta.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
      raise ValueError(f'{path}/meta.json: field {name!r} must be a {kind.__name__}, got '
                       f'{str(value)[:40]!r}')
  if meta['stage'] not in ('mask', 'image'):
    raise ValueError(f'{path}/meta.json: unknown stage {meta["stage"][:40]!r}')
  if meta['stage'] == 'mask' and cfg.mask is not None:
    raise ValueError(f'{path}/meta.json: saved in the mask stage, but this run gives --mask')
  b0 = meta['batch_start']
  if not (0 <= b0 < cfg.n_images and b0 % cfg.batch_size == 0):
    raise ValueError(f'{path}/meta.json: batch_start {b0} is not the start of a batch of '
                     f'this run (n_images {cfg.n_images}, batch_size {cfg.batch_size}); '
                     'the saved run is kept')
  for name, top in (('first_sample', 10 ** 9), ('iterations', 2 ** 31 - 1)):
    if not 0 <= meta[name] <= top:   # a huge int would fail later, naming nothing
      raise ValueError(f'{path}/meta.json: field {name!r} is {str(meta[name])[:40]}, not '
                       f'in [0, {top}]')
  if not all(isinstance(v, str) for v in meta['checkpoint_sha256'].values()):
    raise ValueError(f'{path}/meta.json: checkpoint_sha256 must map names to strings')
  extra = meta['extra']
  seconds = extra.get('seconds', {})
  if not isinstance(seconds, dict) or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in seconds.values()):
    raise ValueError(f'{path}/meta.json: field extra.seconds must map names to numbers, '
                     f'got {str(seconds)[:40]!r}')
  if not isinstance(extra.get('mask_stats'), (dict, type(None))):
    raise ValueError(f'{path}/meta.json: field extra.mask_stats must be an object or '
                     f'null, got {str(extra.get("mask_stats"))[:40]!r}')


def _fields(state) -> dict:
  """The state's arrays by field name, keys excepted (the placement's carry a dict)."""
  out = {}
  for f in dataclasses.fields(state):
    value = getattr(state, f.name)
    if f.name != 'keys':
      out[f.name] = (_fields(value) if dataclasses.is_dataclass(value) else value)
  return out


def _state_tree(state: SamplerState, labels) -> dict[str, np.ndarray]:
  tree = jax.tree_util.tree_map(sharding.to_host, _fields(state))
  tree['key_data'] = sharding.to_host(jax.random.key_data(state.keys))
  if labels is not None:   # a LabelMap is saved as its source (the mask's resolution)
    tree['labels'] = np.stack([np.asarray(getattr(m, 'source', m), np.int32) for m in labels])
  return tree


class RunCheckpoint:
  """Saves and restores one run's progress under `<imgs_path>/checkpoint`."""

  def __init__(self, imgs_path: str):
    self.path = os.path.join(imgs_path, FOLDER)

  def exists(self) -> bool:
    return os.path.isfile(os.path.join(self.path, 'meta.json'))

  def meta(self) -> dict[str, Any]:
    return checkpoint.load_state_meta(self.path)

  def check(self, cfg, hashes: dict[str, str]) -> dict[str, Any]:
    """The saved meta, if this run may continue it; else ValueError naming what differs."""
    meta = self.meta()
    if meta.get('format') != FORMAT:
      raise ValueError(f'{self.path}: unknown checkpoint format '
                       f'{str(meta.get("format"))[:40]!r}')
    _check_meta(self.path, meta, cfg)
    now = result_flags(cfg)
    changed = sorted(k for k in set(now) | set(meta['flags'])
                     if now.get(k) != meta['flags'].get(k))
    saved = meta['checkpoint_sha256']

    def what(name):
      if not name.startswith(INPUT_PREFIX):
        return f'{name} checkpoint (weights changed)'
      flag = name[len(INPUT_PREFIX):]
      return (f'--{flag} file (its contents changed)' if name in saved and name in hashes
              else f'--{flag} file (the saved run holds no hash of it)')
    changed += [what(name) for name in sorted(set(hashes) | set(saved))
                if saved.get(name) != hashes.get(name)]
    if changed:
      detail = '; '.join(f'{k}: saved {meta["flags"][k]!r}, now {now.get(k)!r}'
                         if k in meta['flags'] else k for k in changed)
      raise ValueError(f'cannot resume {self.path}: these settings differ from the saved run '
                       f'and would change the result: {detail}')
    return meta

  def save(self, *, cfg, hashes, stage: str, batch_start: int, first_sample: int,
           state: SamplerState, labels=None, extra: dict | None = None) -> None:
    meta = {'format': FORMAT, 'stage': stage, 'batch_start': int(batch_start),
            'first_sample': int(first_sample), 'flags': result_flags(cfg),
            'checkpoint_sha256': hashes, 'iterations': int(state.iterations),
            'has_labels': labels is not None, 'extra': extra or {}}
    tree = _state_tree(state, labels)    # every process takes part in the gather
    checkpoint.save_state(self.path, tree, meta)   # and in orbax's save (process 0 writes)

  def load(self, like: SamplerState, labels_shape=None) -> tuple[SamplerState, Any]:
    """(state, labels or None) restored against the shapes of `like`."""
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                      _state_tree(like, None))
    if labels_shape is not None:
      abstract['labels'] = jax.ShapeDtypeStruct(tuple(labels_shape), np.int32)
    tree = checkpoint.load_state(self.path, abstract)
    fields = {name: (type(like.windows)(**{k: jnp.asarray(v) for k, v in tree[name].items()})
                     if name == 'windows' else jnp.asarray(tree[name]))
              for name in _fields(like)}
    keys = jax.random.wrap_key_data(jnp.asarray(tree['key_data']),
                                    impl=jax.random.key_impl(like.keys))
    return SamplerState(keys=keys, **fields), tree.get('labels')

  def remove(self) -> None:
    # a symlinked folder: the saved state it points to, then the link
    shutil.rmtree(os.path.realpath(self.path), ignore_errors=True)
    if os.path.islink(self.path):
      os.unlink(self.path)
