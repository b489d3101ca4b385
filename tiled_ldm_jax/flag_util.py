"""absl flags from a dataclass's fields (so a command never restates a default), and the
checks every script runs on its flags before any work."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import textwrap
import typing
from typing import Callable, NoReturn, Sequence

from absl import flags

_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
           bool: flags.DEFINE_bool}


def _base_type(hint):
  """`int | None` -> int; `float` -> float."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  return args[0] if args else hint


def define_dataclass_flags(cls, **cli_defaults) -> list[str]:
  """Defines `--<field>` for every field of dataclass `cls` (help from the field's
  `metadata['help']`), but those with `metadata['flag'] = False`; `cli_defaults`
  override a default for the command only. Returns the flag names."""
  hints = typing.get_type_hints(cls)
  names = []
  for f in dataclasses.fields(cls):
    if not f.metadata.get('flag', True):
      continue
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
  programs are few and each is worth keeping. The sampler loop's export is kept in
  `path/exported` (`program_cache`), so a second run does not trace it either."""
  if not path:
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  from tiled_ldm_jax import program_cache  # pylint: disable=g-import-not-at-top
  program_cache.use_dir(os.path.join(path, 'exported'))   # traced programs, too


# ----------------------------------------------------------------------------- validation
#
# Every script checks its flags before any work: a bad value is one `error:` line on
# stderr, exit status 1, no traceback and nothing written. Rules (a flag left None is not
# checked; `required` flags are absl's business):
#   'int>0' 'int>=0' 'float>0' 'float>=0' 'finite'   numbers (NaN and inf always refused)
#   'ints>0'   a list (or comma string) of positive integers
#   'hxw'      'N' or 'HxW', positive integers
#   'file'     an existing file          'dir'  an existing folder
#   'model'    a converted model folder (has model.json)
#   'path'     an existing file or folder
#   'out'      a path to write: not an existing folder, under a writable folder


def _number(name: str, value, kind: type) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f'--{name} must be a number, got {value!r}')
  if kind is int and not float(value).is_integer():
    raise ValueError(f'--{name} must be an integer, got {value!r}')
  if not math.isfinite(value):
    raise ValueError(f'--{name} must be a finite number, got {value}')
  return value


def _ints(name: str, value) -> list[int]:
  items = value.split(',') if isinstance(value, str) else list(value)
  try:
    out = [int(v) for v in items]
  except ValueError:
    raise ValueError(f'--{name} must be positive integers, got {value!r}') from None
  if not out or min(out) <= 0:
    raise ValueError(f'--{name} must be positive integers, got {value!r}')
  return out


def check_value(name: str, value, rule: str) -> None:
  """Raises ValueError (message names `--name`) if `value` breaks `rule` (see above)."""
  if value is None:
    return
  if rule in ('int>0', 'int>=0', 'float>0', 'float>=0', 'finite'):
    v = _number(name, value, int if rule.startswith('int') else float)
    if rule.endswith('>0') and v <= 0:
      raise ValueError(f'--{name} must be > 0, got {value}')
    if rule.endswith('>=0') and v < 0:
      raise ValueError(f'--{name} must be >= 0, got {value}')
  elif rule == 'ints>0':
    _ints(name, value)
  elif rule == 'hxw':
    parts = str(value).lower().split('x')
    if len(parts) > 2:
      raise ValueError(f'--{name} must be N or HxW, got {value!r}')
    _ints(name, parts)
  elif rule in ('file', 'dir', 'model', 'path'):
    exists = {'file': os.path.isfile, 'dir': os.path.isdir, 'path': os.path.exists,
              'model': lambda p: os.path.isfile(os.path.join(p, 'model.json'))}[rule]
    if not exists(value):
      what = {'file': 'file', 'dir': 'folder', 'path': 'path',
              'model': 'converted model folder (with model.json)'}[rule]
      raise ValueError(f'--{name}: {what} not found: {value}')
  elif rule == 'out':
    if os.path.isdir(value):
      raise ValueError(f'--{name} is an existing folder, expected a file path: {value}')
    parent = os.path.dirname(os.path.abspath(value))
    while not os.path.exists(parent):    # missing folders are made by the writer
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
      raise ValueError(f'--{name}: cannot write under {parent}')
  else:
    raise KeyError(f'unknown flag rule {rule!r}')


def fail(message) -> NoReturn:
  """Prints `error: message` (one line) on stderr and exits 1."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(1)


def check_flags(rules: dict[str, str]) -> None:
  """Checks absl flags `{name: rule}`; on the first bad one: `fail`."""
  try:
    for name, rule in rules.items():
      check_value(name, flags.FLAGS[name].value, rule)
  except ValueError as e:
    fail(e)


def checked_main(main: Callable, rules: dict[str, str]) -> Callable:
  """`main` for `app.run` that checks `rules` first, and turns the ValueError / OSError
  a library raises for a bad request into `fail` (one line, no traceback)."""
  def run(argv):
    check_flags(rules)
    try:
      return main(argv)
    except (ValueError, OSError) as e:
      fail(e)
  return run


# ----------------------------------------------------------------------------- help
#
# absl's --help lists the flags defined in the main module only: ours are mostly defined
# here (from dataclasses), so it showed 4 of 40, and --helpfull buries them among ~200
# absl, JAX and orbax flags. `--help` (and -h, -?, --helpshort) prints the command's own
# flags instead, in the groups it names; --helpfull stays absl's.

HELP_ARGS = ('--help', '-help', '--helpshort', '-helpshort', '-h', '-?', '--h')
_OWN_MODULES = (__name__,)   # flags defined here on a command's behalf


def own_flags(fv=None) -> list:
  """The command's flags: defined by its main module or by this module for it."""
  fv = fv or flags.FLAGS
  main = sys.argv[0] if sys.argv else ''
  out = {}
  for module, defined in fv.flags_by_module_dict().items():
    if module in _OWN_MODULES or module == main or module == '__main__':
      for f in defined:
        out.setdefault(f.name, f)
  return list(out.values())    # in the order they were defined


def _flag_line(f, width: int = 88) -> str:
  if f.boolean:
    head = f'  --[no]{f.name} (default: {"true" if f.default else "false"})'
  else:
    default = f.default_as_str if f.default is not None else None
    head = f'  --{f.name}' + (f'={default.strip(chr(39))}' if default not in (None, "''")
                             else '')
  values = getattr(f.parser, 'enum_values', None)
  text = ' '.join(str(f.help).split()) + (f' One of: {", ".join(values)}.' if values else '')
  body = textwrap.fill(text, width, initial_indent='      ',
                       subsequent_indent='      ')
  return head + '\n' + body


def help_text(doc: str | None, groups: Sequence[tuple[str, Sequence[str]]] = (),
              fv=None) -> str:
  """The module doc, then the command's own flags under `groups` ((title, names) pairs;
  flags in no group come last, under 'other'), each with its default."""
  own = {f.name: f for f in own_flags(fv)}
  lines = [textwrap.dedent(doc or '').strip(), '']
  placed = set()
  for title, names in list(groups) + [('other', list(own))]:
    names = [n for n in names if n in own and n not in placed]
    if not names:
      continue
    placed.update(names)
    lines += [f'{title}:' if groups else 'flags:'] + [_flag_line(own[n]) for n in names]
    lines.append('')
  lines.append('--helpfull: every flag, absl\'s and JAX\'s included.')
  return '\n'.join(lines)


def suggest(name: str, fv=None) -> list[str]:
  """Flags the unknown `name` may have meant: one of its words ('steps' ->
  sampling_steps), or a near spelling; --noX is matched as X."""
  own = [f.name for f in own_flags(fv)]
  base = name[2:] if name.startswith('no') and name[2:] else name
  words = [n for n in own if base in n.split('_') or (len(base) > 3 and base in n)]
  close = difflib.get_close_matches(base, own, n=3, cutoff=0.75)
  return list(dict.fromkeys(close + words))[:4]


def parse_flags(argv: list[str], parse: Callable | None = None,
                groups: Sequence[tuple[str, Sequence[str]]] = ()) -> list[str]:
  """absl's flag parsing (or `parse(argv)`, which may raise ValueError) with a malformed
  or missing flag as one `error:` line (an unknown one with the flags it may have
  meant); `--help` prints `help_text` and exits 0."""
  if any(a in HELP_ARGS for a in argv[1:]):
    main = sys.modules.get('__main__')
    print(help_text(getattr(main, '__doc__', None), groups))
    sys.exit(0)
  try:
    return (parse or flags.FLAGS)(argv)
  except flags.UnrecognizedFlagError as e:
    hint = suggest(e.flagname)
    fail(f'unknown flag --{e.flagname}' + (
        f' (did you mean {" or ".join("--" + n for n in hint)}?)' if hint else
        ' (--help lists the flags)'))
  except (flags.Error, ValueError) as e:
    fail(e)


class _NoTpuLibrary:
  """Drops JAX's INFO line "Unable to initialize backend 'tpu': ... Failed to open
  libtpu.so ..." (every run on a machine without a TPU library). Other failures of the
  TPU backend (a libtpu that is there and fails) and warnings and errors still show."""

  def filter(self, record) -> bool:
    msg = record.getMessage()
    return not (record.levelno <= 20 and msg.startswith("Unable to initialize backend 'tpu'")
                and 'libtpu.so' in msg and ('cannot open shared object' in msg
                                            or 'No such file' in msg))


def quiet_tpu_probe() -> None:
  """Installs `_NoTpuLibrary` on JAX's backend logger (once)."""
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  logger = py_logging.getLogger('jax._src.xla_bridge')
  if not any(isinstance(f, _NoTpuLibrary) for f in logger.filters):
    logger.addFilter(_NoTpuLibrary())


def run(main: Callable, rules: dict[str, str] | None = None,
        parse: Callable | None = None,
        groups: Sequence[tuple[str, Sequence[str]]] = ()) -> None:
  """`app.run(main)` with flags parsed by `parse_flags` and checked by `checked_main`:
  every command reports a bad request this one way. `groups`: the --help sections."""
  from absl import app  # pylint: disable=g-import-not-at-top
  quiet_tpu_probe()
  app.run(checked_main(main, rules or {}),
          flags_parser=lambda argv: parse_flags(argv, parse, groups))
