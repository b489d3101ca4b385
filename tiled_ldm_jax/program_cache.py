"""Programs traced once per machine: a jitted function's export kept on disk.

JAX's persistent compilation cache is looked up only after a program has been traced
in Python and lowered to StableHLO; for the sampler on the demo U-Net that is 1.3 s of
a 1.9 s warm start, so a second identical run still paid most of its start-up. A
`CachedJit` looks up before tracing: its programs are `jax.export` exports, stored under
a key made of everything that decides the program (the caller's key for the function
and its static settings, the argument tree and shapes, donation, this package's source,
the JAX version and the backend), and called through a small jit whose compile the
persistent cache serves.

Used only where it is safe and simple: a folder is set (`use_dir`, done by the commands'
`--compilation_cache_dir`), `flatbuffers` is installed, the function has a key (functions without one, e.g. a
user's own denoiser, are traced as usual), one process, and every argument on one
device. Anything else, or a file that does not read back as the program expected, falls
back to plain `jax.jit` (an unreadable file is logged and replaced). Exports are JAX's
own serialized StableHLO (flatbuffers), never Python objects: nothing is unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
from typing import Any, Callable, Sequence

from absl import logging
import jax
from jax import export as jax_export
import jaxlib

from tiled_ldm_jax.files import atomic

try:   # jax.export serializes with flatbuffers (a declared dependency; a host that
  import flatbuffers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  _SERIALIZABLE = True    # brings its own JAX stack without it just traces every run)
except ImportError:
  _SERIALIZABLE = False

_SUFFIX = '.jaxexport'
_dir: str | None = None


def use_dir(path: str | None) -> None:
  """Keep exported programs in `path` (None or '': off, the default)."""
  global _dir
  _dir = os.fspath(path) if path else None


def key_of(fn) -> Any:
  """A function's program key (set by `keyed`), or None when it has none."""
  return getattr(fn, 'program_key', None)


def keyed(fn: Callable, *parts) -> Callable:
  """Marks `fn` with a program key made of `parts` (reprs; keyed functions among them by
  their own keys). A part that is an unkeyed function leaves `fn` unkeyed."""
  key = []
  for p in parts:
    if callable(p) and not isinstance(p, type):
      p = key_of(p)
      if p is None:
        return fn
    key.append(p)
  fn.program_key = tuple(key)
  return fn


@functools.cache
def _source_digest() -> str:
  """sha256 of this package's Python sources: a code change invalidates every export."""
  h = hashlib.sha256()
  root = pathlib.Path(__file__).parent
  for path in sorted(root.rglob('*.py')):
    h.update(str(path.relative_to(root)).encode())
    h.update(path.read_bytes())
  return h.hexdigest()


def _is_key(leaf) -> bool:
  return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _on_one_device(leaves) -> bool:
  for leaf in leaves:
    if isinstance(leaf, jax.Array):
      if len(leaf.sharding.device_set) != 1:
        return False
    elif not hasattr(leaf, 'dtype') or not hasattr(leaf, 'shape'):
      return False     # a Python scalar: weak types are jit's business
  return True


class CachedJit:
  """`jax.jit(fn, donate_argnums)` whose programs are also exported to `use_dir`'s folder.

  `key`: what, beside the arguments, decides the program (None: plain jit always).
  `result_like`: the position of the argument whose tree the result has (e.g. a loop
  state in, a state out); an export stores no tree, so the caller names it.
  """

  def __init__(self, fn: Callable, key, *, donate_argnums: Sequence[int] = (),
               result_like: int):
    self._fn = fn
    self._key = key
    self._donate = tuple(donate_argnums)
    self._result_like = result_like
    self._jit = jax.jit(fn, donate_argnums=self._donate)
    self._programs: dict = {}

  def cache_size(self) -> int:
    """Programs made so far (plain jit ones and exported ones)."""
    return self._jit._cache_size() + len(self._programs)  # pylint: disable=protected-access

  def __call__(self, *args):
    if self._key is None or _dir is None or not _SERIALIZABLE or jax.process_count() > 1:
      return self._jit(*args)
    leaves, tree = jax.tree_util.tree_flatten(args)
    if not _on_one_device(leaves):
      return self._jit(*args)
    signature = (tree, tuple((l.shape, str(l.dtype), bool(getattr(l, 'weak_type', False)))
                             for l in leaves))
    program = self._programs.get(signature)
    if program is None:
      program = self._programs[signature] = self._program(args, leaves, tree)
    return program(*leaves)

  # ------------------------------------------------------------------------- internals

  def _program(self, args, leaves, tree):
    """The jitted call of this signature's export, read from disk or made and stored."""
    keys = [_is_key(l) for l in leaves]
    impls = [jax.random.key_impl(l) if k else None for l, k in zip(leaves, keys)]
    data = [jax.random.key_data(l) if k else l for l, k in zip(leaves, keys)]
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in data]
    out_leaves, out_tree = jax.tree_util.tree_flatten(args[self._result_like])
    out_keys = [_is_key(l) for l in out_leaves]
    out_impls = [jax.random.key_impl(l) if k else None for l, k in zip(out_leaves, out_keys)]

    # Which flat leaves are donated: those of the donated positional arguments.
    sizes = [len(jax.tree_util.tree_leaves(a)) for a in args]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    donated = tuple(j for i in self._donate for j in range(starts[i], starts[i] + sizes[i]))

    path = os.path.join(_dir, self._digest(tree, avals, keys, donated) + _SUFFIX)
    exported = self._read(path, avals)
    if exported is None:
      exported = self._export(tree, keys, impls, out_tree, avals)
      try:
        with atomic.atomic_path(path) as tmp, open(tmp, 'wb') as f:
          f.write(exported.serialize())
      except OSError as e:   # a read-only cache folder costs only the next start
        logging.warning('could not keep an exported program in %s: %s', path, e)

    def call(*flat):
      data = [jax.random.key_data(l) if k else l for l, k in zip(flat, keys)]
      out = exported.call(*data)
      out = [jax.random.wrap_key_data(o, impl=i) if k else o
             for o, k, i in zip(out, out_keys, out_impls)]
      return jax.tree_util.tree_unflatten(out_tree, out)
    return jax.jit(call, donate_argnums=donated)

  def _digest(self, tree, avals, keys, donated) -> str:
    device = jax.devices()[0]
    parts = (self._key, str(tree), [(a.shape, str(a.dtype)) for a in avals], keys, donated,
             _source_digest(), jax.__version__, jaxlib.__version__, device.platform, device.device_kind)
    return hashlib.sha256(repr(parts).encode()).hexdigest()

  @staticmethod
  def _read(path: str, avals):
    """The export at `path` if it reads back with the expected inputs; else None."""
    try:
      with open(path, 'rb') as f:
        blob = f.read()
    except FileNotFoundError:
      return None
    except OSError as e:
      logging.warning('could not read exported program %s: %s', path, e)
      return None
    try:
      exported = jax_export.deserialize(bytearray(blob))
      ok = [(tuple(a.shape), str(a.dtype)) for a in exported.in_avals] == \
           [(tuple(a.shape), str(a.dtype)) for a in avals]
    except Exception as e:  # pylint: disable=broad-except  # any damage: make it again
      logging.warning('exported program %s does not read back (%s); making it again',
                      path, str(e).splitlines()[0] if str(e) else type(e).__name__)
      return None
    if not ok:
      logging.warning('exported program %s has other inputs; making it again', path)
      return None
    return exported

  def _export(self, tree, keys, impls, out_tree, avals):
    fn = self._fn

    def flat(*data):
      leaves = [jax.random.wrap_key_data(d, impl=i) if k else d
                for d, k, i in zip(data, keys, impls)]
      out = fn(*jax.tree_util.tree_unflatten(tree, leaves))
      out_leaves, got = jax.tree_util.tree_flatten(out)
      if got != out_tree:
        raise TypeError(f'result tree {got} is not that of argument {self._result_like} '
                        f'({out_tree})')
      return [jax.random.key_data(o) if _is_key(o) else o for o in out_leaves]
    return jax_export.export(jax.jit(flat))(*avals)
