"""The random schedule's block-count draw (same distribution as a full-latent draw) and
the shifted-grid schedule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax.sampling import loop as loop_lib
from tiled_ldm_jax.sampling import windows as windows_lib

from test_sampler import A, full_image_ddim, local_eps, random_labels


def _counts(times, level, patch):
  """Brute-force lowest-level pixels per block, in `block_sizes` layout."""
  h, w = times.shape
  out = np.zeros(windows_lib.block_sizes(h, w, patch).shape, np.int64)
  for y in range(h):
    for x in range(w):
      if times[y, x] == level:
        out[y // patch, x // patch] += 1
  return out


@pytest.mark.parametrize('h,w,p', [(20, 28, 8), (16, 16, 16), (37, 23, 6)])
def test_exclusion_zone_matches_the_overlap_rule(h, w, p):
  """The centres whose clamped patch overlaps a patch at c: the rule the sampler used to
  evaluate on every pixel (|corner(y) - c| < P), as an interval."""
  for size in (h, w):
    starts = np.clip(np.arange(size) - p // 2, 0, size - p)
    for c in range(size - p + 1):
      want = np.flatnonzero(np.abs(starts - c) < p)
      lo, hi = windows_lib._exclusion(jnp.int32(c), size, p)  # pylint: disable=protected-access
      assert (int(lo), int(hi)) == (want.min(), want.max()), (size, c)


@pytest.mark.parametrize('k_slots', [1, 2])
def test_centre_draws_are_uniform_over_eligible_pixels(k_slots):
  """Chi-square test of 40000 draws against the uniform law over the lowest-level pixels
  (and, for the second slot, those outside the first slot's exclusion zone)."""
  h, w, p = 22, 26, 8
  rng = np.random.RandomState(0)
  times = (rng.rand(h, w) < 0.35).astype(np.int32)        # level 0 where 0
  times[:8, :] = 1                                         # a band with no eligible pixel
  counts = jnp.asarray(_counts(times, 0, p), jnp.int32)
  supers = windows_lib.super_sums(counts, windows_lib.super_side(h, w, p))
  draws = 40000
  keys = jax.random.split(jax.random.key(1), draws)
  choose = jax.jit(jax.vmap(functools.partial(windows_lib.choose_random, patch=p,
                                              k_slots=k_slots),
                            (None, None, None, None, 0)))
  corners, centres, valid = choose(jnp.asarray(times), counts, supers, jnp.int32(0), keys)
  corners, centres, valid = map(np.asarray, (corners, centres, valid))
  assert valid[:, 0].all()
  eligible = times == 0
  hist = np.zeros((h, w))
  np.add.at(hist, (centres[:, 0, 0], centres[:, 0, 1]), 1)
  assert hist[~eligible].sum() == 0
  expected = draws / eligible.sum()
  chi2 = ((hist[eligible] - expected) ** 2 / expected).sum()
  dof = eligible.sum() - 1
  assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)    # ~5 sigma
  if k_slots == 2:
    starts_y = np.clip(np.arange(h) - p // 2, 0, h - p)
    starts_x = np.clip(np.arange(w) - p // 2, 0, w - p)
    # Condition on one first-slot corner; the second centre must be uniform over the
    # eligible pixels whose patch does not overlap it.
    cy, cx = 8, 10
    sel = (corners[:, 0, 0] == cy) & (corners[:, 0, 1] == cx) & valid[:, 1]
    allowed = eligible & ~((np.abs(starts_y - cy) < p)[:, None]
                           & (np.abs(starts_x - cx) < p)[None, :])
    second = np.zeros((h, w))
    np.add.at(second, (centres[sel, 1, 0], centres[sel, 1, 1]), 1)
    assert second[~allowed].sum() == 0
    exp2 = sel.sum() / allowed.sum()
    chi2 = ((second[allowed] - exp2) ** 2 / exp2).sum()
    dof = allowed.sum() - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof, sel.sum())
    # Second patches never overlap first ones.
    both = valid.all(axis=1)
    d = np.abs(corners[both, 0] - corners[both, 1])
    assert ((d[:, 0] >= p) | (d[:, 1] >= p)).all()


def test_counters_track_the_latent_exactly():
  """level, remaining and per-block counts equal recounts of `times` after every step."""
  steps, p, k = 3, 8, 3
  labels = random_labels(2, 20, 28)
  smp = loop_lib.Sampler(local_eps, loop_lib.SamplerSettings(sampling_steps=steps, patch=p,
                                                           patches_per_step=k))
  state = smp.init(loop_lib.image_keys(4, [0, 1]), labels.shape)
  for _ in range(2000):
    times = np.asarray(state.times)
    if times.min() >= steps:
      break
    for n in range(2):
      level = times[n].min()
      assert int(state.level[n]) == level
      assert int(state.windows.remaining[n]) == (times[n] == level).sum()
      np.testing.assert_array_equal(np.asarray(state.windows.counts[n]), _counts(times[n], level, p))
      np.testing.assert_array_equal(np.asarray(state.windows.super_counts[n]), windows_lib.super_sums(
          _counts(times[n], level, p), windows_lib.super_side(20, 28, p)))
    state = smp.step_patch(A, state, loop_lib.spatial(labels))
  assert (np.asarray(state.times) == steps).all()
  assert (np.asarray(state.level) == steps).all()


def grid(steps, p, k, margin=0, eta=0.0, margin_levels=None):
  return loop_lib.Sampler(local_eps, loop_lib.SamplerSettings(
      sampling_steps=steps, patch=p, patches_per_step=k, eta=eta, schedule='grid',
      grid_margin=margin, grid_margin_levels=margin_levels))


@pytest.mark.parametrize('h,w,p,k,margin', [(16, 16, 8, 1, 0), (24, 40, 8, 3, 2),
                                            (20, 12, 8, 9, 1), (13, 29, 6, 5, 0)])   # K=9: more slots than the 8 windows
def test_grid_equals_full_image_ddim_for_pixel_local_model(h, w, p, k, margin):
  for steps in (5, 6):   # odd and even: the result ends in either buffer
    keys = loop_lib.image_keys(0, [0, 1])
    labels = random_labels(2, h, w)
    smp = grid(steps, p, k, margin)
    state = smp.sample(A, keys, loop_lib.spatial(labels))
    assert (np.asarray(state.times) == steps).all()
    np.testing.assert_allclose(state.x, full_image_ddim(keys, labels, steps), atol=1e-5)
    cells, per_level = smp.placement.shape(h, w)
    assert int(state.iterations) == steps * per_level
    assert smp.compiles() == 1


def test_grid_does_not_depend_on_k_and_covers_each_pixel_once_per_level():
  """eta = 1 (noise per window): K = 1 and K = all windows give the same images; every
  level advances every pixel exactly once."""
  labels = random_labels(2, 12, 20)      # 2 x 4 = 8 windows of 6 written pixels
  keys = loop_lib.image_keys(9, [0, 1])
  one = grid(4, 8, 1, margin=1, eta=1.0)
  cells, _ = one.placement.shape(12, 20)
  a = one.sample(A, keys, loop_lib.spatial(labels))
  b = grid(4, 8, cells, margin=1, eta=1.0).sample(A, keys, loop_lib.spatial(labels))
  np.testing.assert_allclose(a.x, b.x, atol=1e-6)
  smp = grid(3, 8, 2, margin=1, eta=1.0)
  state = smp.init(keys, labels.shape)
  for level in range(3):
    for _ in range(smp.placement.shape(12, 20)[1]):
      state = smp.step_patch(A, state, loop_lib.spatial(labels))
    assert (np.asarray(state.times) == level + 1).all()


@pytest.mark.parametrize('margin_levels', [0, 1, 2])
def test_margin_in_the_last_levels_only(margin_levels):
  """`grid_margin_levels` L: levels before S - L use whole windows (margin 0; fewer
  cells), the last L the margin. Every level still advances every pixel once, the
  iterations are the per-level counts summed, K does not change the images, and with a
  pixel-local model the result is the full-image DDIM."""
  h, w, steps = 12, 20, 4
  labels = random_labels(2, h, w)
  keys = loop_lib.image_keys(5, [0, 1])
  smp = grid(steps, 8, 2, margin=1, eta=1.0, margin_levels=margin_levels)
  state = smp.init(keys, labels.shape)
  total = 0
  for level in range(steps):
    m = 1 if level >= steps - margin_levels else 0
    per_level = smp.placement.shape(h, w, m)[1]
    total += per_level
    for _ in range(per_level):
      state = smp.step_patch(A, state, loop_lib.spatial(labels))
    assert (np.asarray(state.times) == level + 1).all(), (level, m)
  assert int(state.iterations) == total
  cells = smp.placement.shape(h, w, 1)[0]
  a = smp.sample(A, keys, loop_lib.spatial(labels))
  b = grid(steps, 8, cells, margin=1, eta=1.0, margin_levels=margin_levels).sample(
      A, keys, loop_lib.spatial(labels))
  # Float error only (the test run's unoptimized XLA sums other batch sizes differently;
  # 3e-4 seen, bit-equal under the full optimizer); wrong windows or noise differ by O(1).
  np.testing.assert_allclose(a.x, b.x, atol=2e-3)
  det = grid(steps, 8, 3, margin=1, margin_levels=margin_levels).sample(
      A, keys, loop_lib.spatial(labels))
  np.testing.assert_allclose(det.x, full_image_ddim(keys, labels, steps), atol=1e-5)


def test_grid_offsets_differ_between_levels_and_images():
  labels = random_labels(2, 32, 32)
  smp = grid(2, 8, 1)
  state = smp.init(loop_lib.image_keys(2, [0, 1]), labels.shape)
  first = []
  for _ in range(2):   # the first window of level 0 and level 1
    before = np.asarray(state.times)
    state = smp.step_patch(A, state, loop_lib.spatial(labels))
    first.append(np.argwhere(np.asarray(state.times) != before))
    while int(state.windows.batch[0]) != 0:
      state = smp.step_patch(A, state, loop_lib.spatial(labels))
  assert first[0].size and first[1].size


def test_bad_grid_settings():
  with pytest.raises(ValueError, match='grid_margin'):
    loop_lib.SamplerSettings(sampling_steps=2, patch=8, schedule='grid', grid_margin=4)
  with pytest.raises(ValueError, match='schedule'):
    loop_lib.SamplerSettings(sampling_steps=2, patch=8, schedule='spiral')
