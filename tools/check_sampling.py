"""Prints the table of `sampling.sample` checks with analytic denoisers (markdown).

  python tools/check_sampling.py            # every prediction x schedule x noise schedule

Columns: max |small patches - one whole-latent patch| of a pixel-local denoiser (eta 0,
x0 clipped to [-1, 1]), and max |sample - target| of an oracle denoiser (eta 0); see
tiled_ldm_jax/evaluation/sampling_check.py for why these must be ~0.
"""

from absl import flags

from tiled_ldm_jax import flag_util
from tiled_ldm_jax.evaluation import sampling_check

_FAST = flags.DEFINE_bool('fast_compile', True, 'jax_disable_most_optimizations (the '
                          'programs are tiny; compiling dominates).')


def main(argv):
  del argv
  if _FAST.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_disable_most_optimizations', True)
  rows = sampling_check.table()
  print(sampling_check.format_table(rows))
  worst = max(max(r['patch_error'], r['oracle_error']) for r in rows)
  print(f'worst {worst:.2e} ({"OK" if worst < 1e-5 else "FAIL"}: bound 1e-5)')
  return 0 if worst < 1e-5 else 1


if __name__ == '__main__':
  flag_util.run(main, {})
