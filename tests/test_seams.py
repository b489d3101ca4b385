"""The line score sees window borders wherever they are; the grid margin's levels; the
random placement's margin keeps every pixel's trajectory."""

import numpy as np
import pytest

from tiled_ldm_jax import sampling
from tiled_ldm_jax.evaluation import sampling_check as sc
from tiled_ldm_jax.evaluation import seams
from tiled_ldm_jax.sampling import windows as windows_lib


def _texture(seed, size=512):
  """Smooth random texture in [0, 255] with dots (like the demo's), no straight lines."""
  rng = np.random.RandomState(seed)
  x = rng.randn(size + 8, size + 8)
  k = np.ones(5) / 5
  for axis in (0, 1):
    x = np.apply_along_axis(lambda v: np.convolve(v, k, mode='same'), axis, x)
  x = x[4:-4, 4:-4]
  return np.clip(128 + 40 * x / x.std(), 0, 255)


def _lattice(img, period, phase, step):
  """Cells of their own tone (sd `step`) with a 2 px line of + `step` along their
  borders at phase + k period: what a window border leaves."""
  rng = np.random.RandomState(period + phase)
  rows = (np.arange(img.shape[0]) - phase) // period
  cols = (np.arange(img.shape[1]) - phase) // period
  tone = rng.randn(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) * step
  out = img + tone[rows - rows.min()][:, cols - cols.min()]
  on_line = lambda i: ((i - phase) % period) < 2
  out[on_line(np.arange(img.shape[0]))] += step
  out[:, on_line(np.arange(img.shape[1]))] += step
  return out


@pytest.mark.parametrize('period,phase', [(128, 0), (112, 37), (96, 70)])
def test_line_score_sees_a_lattice_at_any_period_and_phase(period, phase):
  clean = [seams.line_score(_texture(s)) for s in range(3)]
  latticed = [seams.line_score(_lattice(_texture(s), period, phase, 30.0)) for s in range(3)]
  assert max(clean) < 1.0, clean
  assert min(latticed) > 5 * max(clean), (latticed, clean)


def test_line_score_ignores_lines_that_are_not_straight_axis_lines():
  """Short edges and diagonal structure are texture, not seams."""
  img = _texture(0)
  yy, xx = np.mgrid[:512, :512]
  diagonal = img + 30.0 * (((yy + xx) // 100) % 2)
  assert seams.line_score(diagonal) < 1.0


def test_the_fixed_line_ratio_misses_moved_borders():
  """Why the line score exists: `seam_ratio` at the decoder's 128 px lines does not see
  a lattice whose borders lie elsewhere."""
  img = _lattice(_texture(1), 112, 37, 30.0)
  assert seams.seam_ratio(img, 112, 37 - 112) > 1.5      # the lattice is there
  assert seams.seam_ratio(img, 128) < 1.1                # not at the decoder's lines
  assert seams.line_score(img) > 20 * seams.line_score(_texture(1))


def test_line_score_refuses_small_images():
  with pytest.raises(ValueError, match='too small'):
    seams.line_score(np.zeros((200, 200, 3)))


def test_margin_levels_first_and_last():
  on = [bool(windows_lib.margin_on(lv, 10, 2, 1)) for lv in range(10)]
  assert on == [True] + [False] * 7 + [True, True]
  assert windows_lib.margin_levels_count(10, 2, 1) == 3
  assert windows_lib.margin_levels_count(10, None, 0) == 10
  assert windows_lib.margin_levels_count(2, 3, 3) == 2


@pytest.mark.parametrize('prediction', ['eps', 'flow'])
def test_random_margin_keeps_each_pixels_trajectory(prediction):
  """A per-pixel denoiser gives the whole-latent result with a random margin too: every
  pixel still takes each level exactly once (the margin only moves which window writes
  it), and the run ends."""
  err = sc.patch_equivalence(prediction, 'random', 'cosine',
                             windows=sampling.Random(patches_per_step=2, margin=2))
  assert err < 1e-5, err
