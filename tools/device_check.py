"""Measures this accelerator with the full-size model shapes; one JSON line per measurement.

  python tools/device_check.py            # on a GPU or TPU host (about 8 minutes)
  python tools/device_check.py --smoke    # the same code, demo models, toy sizes (CPU)

Needs only the project and ml_collections. See `tiled_ldm_jax.evaluation.device_check`.
"""

import json

from absl import flags

from tiled_ldm_jax import flag_util
from tiled_ldm_jax.evaluation import device_check

_SMOKE = flags.DEFINE_bool('smoke', False, 'Demo models at toy sizes (a CPU check).')
_CACHE = flag_util.define_compilation_cache_flag()


def main(argv):
  del argv
  flag_util.use_compilation_cache(_CACHE.value)
  device_check.run(smoke=_SMOKE.value, emit=lambda r: print(json.dumps(r), flush=True))


if __name__ == '__main__':
  flag_util.run(main, {})
