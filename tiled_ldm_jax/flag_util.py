"""absl flags from a dataclass's fields, so a command never restates a default."""

from __future__ import annotations

import dataclasses
import typing

from absl import flags

_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
           bool: flags.DEFINE_bool}


def _base_type(hint):
  """`int | None` -> int; `float` -> float."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  return args[0] if args else hint


def define_dataclass_flags(cls, **cli_defaults) -> list[str]:
  """Defines `--<field>` for every field of dataclass `cls` (help from the field's
  `metadata['help']`); `cli_defaults` override a default for the command only.
  Returns the field names."""
  hints = typing.get_type_hints(cls)
  names = []
  for f in dataclasses.fields(cls):
    kind = _base_type(hints[f.name])
    default = cli_defaults.get(f.name, f.default)
    _DEFINE[kind](f.name, default, f.metadata.get('help', f.name))
    names.append(f.name)
  return names


def default_cache_dir() -> str:
  """`$XDG_CACHE_HOME/tiled_ldm_jax/xla` (default `~/.cache/...`)."""
  import os  # pylint: disable=g-import-not-at-top
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'tiled_ldm_jax', 'xla')


def define_compilation_cache_flag():
  return flags.DEFINE_string(
      'compilation_cache_dir', default_cache_dir(),
      'Persistent XLA compilation cache folder (a second identical run skips most '
      'compiling); empty string: off.')


def use_compilation_cache(path: str | None) -> None:
  """Turns JAX's persistent compilation cache on at `path` (None or '': leave it off).

  Every compiled program is cached, however fast it compiled: the sampler and decode
  programs are few and each is worth keeping."""
  if not path:
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
