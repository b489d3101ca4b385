"""Reading small JSON files (configs, `model.json`, run state) from outside: a regular
file of bounded size, UTF-8, no deep nesting, the top level an object
(`reading.read_json`); every failure one `ValueError` line naming the file. Callers then
type-check each field they use (`reading.field`)."""

from __future__ import annotations

from typing import Any

from tiled_ldm_jax.files import reading

MAX_JSON_BYTES = 16 * 2 ** 20


def read_object(path: str, what: str = 'JSON file') -> dict[str, Any]:
  """The JSON object in `path`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a regular file, too large, not UTF-8, malformed, nested too deep, or
      not an object.
  """
  value = reading.read_json(path, what, max_bytes=MAX_JSON_BYTES)
  if not isinstance(value, dict):
    raise ValueError(f'{reading.printable(path)}: the {what} is {reading.type_name(value)}'
                     ', expected an object')
  return value
