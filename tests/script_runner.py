"""One interpreter that runs many script invocations, each as `python SCRIPT ARGS` would:
the script executed as `__main__` with fresh flags, what it writes to file descriptors
1 and 2 captured, an uncaught exception printed as Python prints it (traceback
included), `SystemExit` turned into the exit status Python would give.

    python tests/script_runner.py      # then one JSON line per request on stdin:
    ["path/to/script.py", ["--flag=value", ...]]
    -> one JSON line per answer on stdout: {"returncode", "stdout", "stderr"}

`ScriptServer` (conftest.py) drives it. Dozens of refused requests, or every check
that needs 8 emulated devices, then cost one interpreter and one JAX import instead of
one each; library modules stay imported between requests (that is the saving), flags
defined by a request are deleted before the next.
"""

import json
import os
import runpy
import sys
import tempfile
import traceback


def _exit_status(e: SystemExit) -> int:
  code = e.code
  if code is None:
    return 0
  if isinstance(code, int):
    return code
  print(code, file=sys.stderr)   # what Python does with sys.exit('message')
  return 1


def run_case(script: str, args: list[str], baseline_flags: set[str]) -> dict:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS
  for name in [n for n in fv if n not in baseline_flags]:
    delattr(fv, name)
  fv.unparse_flags()
  # app.run's one-time set-up (parse, then verbosity raised to INFO unless given) runs
  # again as in a new interpreter; on a rerun absl would only parse, and the scripts'
  # INFO lines would be lost.
  app._run_init.done = False   # pylint: disable=protected-access
  app._register_and_parse_flags_with_usage.done = False   # pylint: disable=protected-access
  saved = {fd: os.dup(fd) for fd in (1, 2)}
  files = {fd: tempfile.TemporaryFile(mode='w+b') for fd in (1, 2)}
  sys.stdout.flush()
  sys.stderr.flush()
  for fd, f in files.items():
    os.dup2(f.fileno(), fd)
  old_argv = sys.argv
  sys.argv = [script, *args]
  try:
    runpy.run_path(script, run_name='__main__')
    status = 0
  except SystemExit as e:
    status = _exit_status(e)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    status = 1
  finally:
    sys.argv = old_argv
    sys.stdout.flush()
    sys.stderr.flush()
    for fd in (1, 2):
      os.dup2(saved[fd], fd)
      os.close(saved[fd])
  out = {}
  for fd, name in ((1, 'stdout'), (2, 'stderr')):
    files[fd].seek(0)
    out[name] = files[fd].read().decode(errors='replace')
    files[fd].close()
  out['returncode'] = status
  return out


def main():
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,unused-import
  baseline = set(flags.FLAGS)   # absl's own flags stay; the scripts' are redefined per case
  for line in sys.stdin:
    script, args = json.loads(line)
    result = run_case(script, args, baseline)
    sys.stdout.write(json.dumps(result) + '\n')
    sys.stdout.flush()


if __name__ == '__main__':
  main()
