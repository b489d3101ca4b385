"""Reading small JSON files (configs, `model.json`, run state) from outside: bounded size,
UTF-8, no unbounded nesting, the top level an object; every failure one `ValueError`
line naming the file. Callers then type-check each field they use."""

from __future__ import annotations

import json
import os
from typing import Any

MAX_JSON_BYTES = 16 * 2 ** 20


def read_object(path: str, what: str = 'JSON file') -> dict[str, Any]:
  """The JSON object in `path`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: too large, not UTF-8, malformed, nested too deep, or not an object.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} not found: {path}')
  if os.path.getsize(path) > MAX_JSON_BYTES:
    raise ValueError(f'{what} {path}: larger than {MAX_JSON_BYTES} bytes')
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError
    raise ValueError(f'{what} {path}: not valid JSON ({type(e).__name__}: '
                     f'{" ".join(str(e).split())[:200]})') from None
  if not isinstance(value, dict):
    raise ValueError(f'{what} {path}: a JSON {type(value).__name__}, expected an object')
  return value
