"""Runs every parity case found in a reference folder; one JSON line per case.

  python tools/check_reference.py --reference_dir=../shared/reference

Exit status 0 only if at least one case ran and every case passed.
"""

import json
import sys
import tempfile

from absl import flags

from tiled_ldm_jax import flag_util
from tiled_ldm_jax.evaluation import reference_check

_REF = flags.DEFINE_string('reference_dir', None, 'Folder laid out like shared/reference.')
_OUT = flags.DEFINE_string('output_dir', None,
                           'Where converted models go (default: a temporary folder).')
flags.mark_flag_as_required('reference_dir')
_CACHE = flag_util.define_compilation_cache_flag()


def main(argv):
  del argv
  flag_util.use_compilation_cache(_CACHE.value)
  with tempfile.TemporaryDirectory() as tmp:
    passed = failed = 0
    for result in reference_check.run_cases(_REF.value, _OUT.value or tmp):
      print(json.dumps(result), flush=True)
      passed += result['ok']
      failed += not result['ok']
  print(f'{passed} passed, {failed} failed')
  sys.exit(0 if passed and not failed else 1)


if __name__ == '__main__':
  flag_util.run(main, {'reference_dir': 'dir'})
