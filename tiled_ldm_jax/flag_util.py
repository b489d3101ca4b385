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
