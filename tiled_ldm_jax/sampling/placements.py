"""What each window placement does inside the compiled loop (`loop.Sampler`).

`sampling/windows.py` holds the placements' public face (`Random`, `Grid`: what a user
picks, and the `SamplerSettings` fields they resolve to) and their geometry (the random
draw over block counts, the grid's cells); this file holds their work in the loop. A
placement object owns

- its carry in the sampler state (`SamplerState.windows`: `RandomCarry` or `GridCarry`),
- the choice of an iteration's windows and of their noise (`choose`),
- which of the two latent buffers a window reads, which pixels it writes and where the
  result goes (`model_input`, `write_mask`, `commit`),
- how far the current level is (`within_level`) and the end of the run (`finish`).

The loop's step (`Sampler._step_patch`) is one skeleton for every placement: choose,
crop, denoise, keep known pixels, resample, commit. It never asks which placement it
runs; `for_settings` resolves the settings' name to its object once, at construction.

Shapes: N images, K slots (windows) per image and iteration, latent h x w with C
channels, window side P (all latent pixels).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from tiled_ldm_jax.sampling import windows as windows_lib


@flax.struct.dataclass
class RandomCarry:
  """The random placement's part of the sampler state."""
  remaining: jax.Array     # [N] int32: pixels still at the image's lowest level
  counts: jax.Array        # [N, bh, bw] int32: lowest-level pixels per P x P block
                           # (`windows.block_sizes` layout)
  super_counts: jax.Array  # [N, bh / g, bw / g] int32: their sums over g x g blocks
                           # (`windows.super_sums`; the draw's first level)


@flax.struct.dataclass
class GridCarry:
  """The grid placement's part of the sampler state."""
  batch: jax.Array         # [N] int32: window batches of the current level already done


class Windows(NamedTuple):
  """An iteration's windows (traced values inside the step)."""
  corners: jax.Array       # [N, K, 2] int32: top-left corners of the P x P windows
  valid: jax.Array         # [N, K] bool: slots that advance a window
  noise: jax.Array         # [N, K, P, P, C] float32: the step's noise per window
  slot_keys: jax.Array     # [N, K] keys: the keep-mask resampling passes' noise
  rects: jax.Array | None  # grid: [N, K, 4] the written cell (y0, y1, x0, x1); random: None


class Crops(NamedTuple):
  """The windows' crops of the state's buffers, taken before any write of the step."""
  x: jax.Array             # [N, K, P, P, C]
  x_low: jax.Array         # [N, K, P, P, C]
  times: jax.Array         # [N, K, P, P] int32


def crop(a, corner, patch):  # [h, w, ...] -> [P, P, ...]
  start = (corner[0], corner[1]) + (0,) * (a.ndim - 2)
  return jax.lax.dynamic_slice(a, start, (patch, patch) + a.shape[2:])


def paste(a, corner, value):
  start = (corner[0], corner[1]) + (0,) * (a.ndim - 2)
  return jax.lax.dynamic_update_slice(a, value, start)


def paste_all(a, values, corners, masks, *, patch: int):
  """Writes patch k of `values` [K, P, P, ...] at corners[k] where masks[k] (broadcast
  to the patch; e.g. [K, 1, 1] per slot or [K, P, P] per pixel).

  No two slots' masks share a pixel, but their windows may overlap (an idle slot's, or
  grid windows with a margin), so each writes back what is there now elsewhere, not its
  stale crop. A `fori_loop`, so the program does not grow with K (unrolled, the demo
  image stage at 2048 px, K = 200, took 86 s and 2.13 GiB peak RSS for 2 steps, mostly
  compiling; with the loop 14 s and 0.65 GiB)."""
  def body(k, a):
    keep = crop(a, corners[k], patch)
    m = jnp.reshape(masks[k], masks[k].shape + (1,) * (keep.ndim - masks[k].ndim))
    return paste(a, corners[k], jnp.where(m, values[k], keep))
  if corners.shape[0] == 1:
    return body(0, a)
  return jax.lax.fori_loop(0, corners.shape[0], body, a)


def crop_slots(a, corners, patch: int):
  """[N, h, w, ...] at corners [N, K, 2] -> [N, K, P, P, ...]."""
  return jax.vmap(jax.vmap(functools.partial(crop, patch=patch), (None, 0)), (0, 0))(
      a, corners)


def _slot_paste(patch: int):
  return jax.vmap(functools.partial(paste_all, patch=patch))


class RandomPlacement:
  """The original's placement (SPEC 3): K non-overlapping windows per image, centred
  uniformly among the pixels at the image's lowest level. `x` holds every pixel's
  current value, `x_low` its value one level lower (read for pixels already ahead, so a
  window is denoised at one noise level); a window writes only its lowest-level pixels
  (and with `grid_margin` only those that far from its sides but the latent's edge)."""

  name = 'random'

  def __init__(self, settings):
    self.s = settings

  def carry(self, n: int, h: int, w: int) -> RandomCarry:
    sizes = windows_lib.block_sizes(h, w, self.s.patch)
    supers = windows_lib.super_sums(sizes, windows_lib.super_side(h, w, self.s.patch))
    return RandomCarry(remaining=jnp.full((n,), h * w, jnp.int32),
                       counts=jnp.broadcast_to(sizes, (n,) + sizes.shape).copy(),
                       super_counts=jnp.broadcast_to(supers, (n,) + supers.shape).copy())

  def choose(self, state, own_buffers, channels: int) -> Windows:
    """Random schedule keys: iteration i of an image draws from
    `fold_in(fold_in(key, 1), i)`, slot j's noise from `fold_in(that, K + j)`."""
    p, k_slots = self.s.patch, self.s.patches_per_step
    c = state.windows
    active = state.level < self.s.sampling_steps
    it_keys = jax.vmap(lambda k, i: jax.random.fold_in(jax.random.fold_in(k, 1), i))(
        state.keys, state.image_iters)
    corners, _, valid = jax.vmap(functools.partial(
        windows_lib.choose_random, patch=p, k_slots=k_slots))(
            state.times, c.counts, c.super_counts, state.level, it_keys)
    corners, valid = own_buffers((corners, valid & active[:, None]))
    noise = jax.vmap(lambda key: jax.vmap(
        lambda j: jax.random.normal(jax.random.fold_in(key, k_slots + j), (p, p, channels)))(
            jnp.arange(k_slots)))(it_keys)
    slot_keys = jax.vmap(lambda key, i: jax.vmap(lambda j: jax.random.fold_in(
        jax.random.fold_in(jax.random.fold_in(key, 5), i), j))(jnp.arange(k_slots)))(
            state.keys, state.image_iters)
    return Windows(corners, valid, noise, slot_keys, None)

  def _behind(self, state, crops: Crops):
    return crops.times == state.level[:, None, None, None]    # [N, K, P, P] lowest level

  def model_input(self, state, crops: Crops, win: Windows):
    del win
    return jnp.where(self._behind(state, crops)[..., None], crops.x, crops.x_low)

  def write_mask(self, state, crops: Crops, win: Windows):
    h, w = state.times.shape[1:]
    return (self._behind(state, crops) & win.valid[:, :, None, None]
            & self._interior(win.corners, h, w))

  def _interior(self, corners, h: int, w: int):
    """[N, K, P, P] bool: the pixels of windows at `corners` [N, K, 2] that are written:
    all (margin 0, the original's), or those at least `grid_margin` from a window side
    that is not the latent's edge (the U-Net's zero padding spoils the predictions along
    a window's sides; with K = 1 the draw's law is unchanged, and the drawn centre is
    always inside, so every iteration still advances)."""
    m, p = self.s.grid_margin, self.s.patch
    if not m:
      return jnp.ones(corners.shape[:2] + (p, p), bool)
    idx = jnp.arange(p)

    def axis(c, size):   # [N, K] -> [N, K, P]
      lo = jnp.where(c == 0, 0, m)
      hi = jnp.where(c + p >= size, p, p - m)
      return (idx >= lo[..., None]) & (idx < hi[..., None])
    return axis(corners[..., 0], h)[..., :, None] & axis(corners[..., 1], w)[..., None, :]

  def commit(self, state, new, crops: Crops, win: Windows, write) -> dict:
    """The state fields after writing `new` [N, K, P, P, C] where `write`: written
    pixels move one level up (their old value becomes the lower copy); a level ends
    when no pixel is left at it (then the block counts are reset)."""
    p = self.s.patch
    n, h, w = state.times.shape
    c = state.windows
    level = state.level
    active = level < self.s.sampling_steps
    paste = _slot_paste(p)
    counts, supers = jax.vmap(functools.partial(windows_lib.update_counts, patch=p))(
        c.counts, c.super_counts, win.corners, write)
    remaining = c.remaining - write.sum(axis=(1, 2, 3)).astype(jnp.int32)
    next_level = active & (remaining == 0)     # every pixel is now one level up

    def reset(counts, supers):   # O(blocks): run only in the iterations that end a level
      sizes = windows_lib.block_sizes(h, w, p)
      sums = windows_lib.super_sums(sizes, windows_lib.super_side(h, w, p))
      return (jnp.where(next_level[:, None, None], sizes, counts),
              jnp.where(next_level[:, None, None], sums, supers))
    counts, supers = jax.lax.cond(next_level.any(), reset, lambda c_, u: (c_, u),
                                  counts, supers)
    slot = win.valid[:, :, None, None]
    return dict(
        x=paste(state.x, jnp.where(write[..., None], new, crops.x), win.corners, slot),
        x_low=paste(state.x_low, jnp.where(write[..., None], crops.x, crops.x_low),
                    win.corners, slot),
        times=paste(state.times, crops.times + write.astype(jnp.int32), win.corners, slot),
        level=level + next_level.astype(jnp.int32),
        windows=RandomCarry(remaining=jnp.where(next_level, h * w, remaining),
                            counts=counts, super_counts=supers))

  def within_level(self, state):
    """[N] share of the current level done."""
    h, w = state.times.shape[1:]
    return 1.0 - state.windows.remaining / (h * w)

  def finish(self, state):
    return state


class GridPlacement:
  """Shifted grid windows (`windows.Grid`): every cell once per level, its window the
  cell widened by the level's margin. Levels alternate their buffers: even levels read
  `x` and write `x_low`, odd levels the reverse, so every window of a level reads the
  values of the level's start (the result does not depend on K, the order or the
  device count)."""

  name = 'grid'

  def __init__(self, settings):
    self.s = settings

  def carry(self, n: int, h: int, w: int) -> GridCarry:
    del h, w
    return GridCarry(batch=jnp.zeros((n,), jnp.int32))

  def shape(self, h: int, w: int, margin: int | None = None) -> tuple[int, int]:
    """(cells per level, iterations per level) on an h x w latent, for the levels with
    `margin` (default the settings' margin)."""
    m = self.s.grid_margin if margin is None else margin
    n_r, n_c = windows_lib.grid_cells(h, w, self.s.patch - 2 * m)
    return n_r * n_c, -(-(n_r * n_c) // self.s.patches_per_step)

  def margin_at(self, level):
    """[N] int32: the margin of each image's current level (`grid_margin_levels`,
    `grid_margin_first_levels`; `windows.margin_on`)."""
    s = self.s
    if s.grid_margin_levels is None or not s.grid_margin:
      return jnp.full(jnp.shape(level), s.grid_margin, jnp.int32)
    on = windows_lib.margin_on(level, s.sampling_steps, s.grid_margin_levels,
                               s.grid_margin_first_levels)
    return jnp.where(on, s.grid_margin, 0).astype(jnp.int32)

  def _level_shape(self, h: int, w: int, margin):
    """(cells, iterations per level, cells per row) for traced margins [N] that take
    the values 0 or the settings' margin (both static shapes, chosen per image)."""
    m = self.s.grid_margin
    with_m, without = self.shape(h, w, m), self.shape(h, w, 0)
    cols = (windows_lib.grid_cells(h, w, self.s.patch - 2 * m)[1],
            windows_lib.grid_cells(h, w, self.s.patch)[1])
    pick = lambda a, b: jnp.where(margin == m, a, b).astype(jnp.int32)
    return pick(with_m[0], without[0]), pick(with_m[1], without[1]), pick(*cols)

  def choose(self, state, own_buffers, channels: int) -> Windows:
    """Grid keys: the offset of level L from `fold_in(fold_in(key, 2), L)`, the noise of
    window j from `fold_in(fold_in(fold_in(key, 3), L), j)`."""
    del own_buffers   # the windows are a function of counters, not of the latent
    s = self.s
    p, k_slots = s.patch, s.patches_per_step
    n, h, w = state.times.shape
    level, batch = state.level, state.windows.batch                    # [N] each
    m = self.margin_at(level)                                           # [N]
    n_cells, _, n_cols = self._level_shape(h, w, m)                     # [N] each
    active = level < s.sampling_steps
    offsets = jax.vmap(windows_lib.grid_offset)(state.keys, level, p - 2 * m)   # [N, 2]
    index = batch[:, None] * k_slots + jnp.arange(k_slots)[None, :]     # [N, K]
    corners, rects = jax.vmap(functools.partial(
        windows_lib.grid_windows, h=h, w=w, patch=p))(index, offsets, margin=m,
                                                      n_cols=n_cols)
    valid = ((index < n_cells[:, None]) & (rects[..., 0] < rects[..., 1])
             & (rects[..., 2] < rects[..., 3]) & active[:, None])
    noise = jax.vmap(lambda key, lv, idx: jax.vmap(lambda j: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 3), lv), j),
        (p, p, channels)))(idx))(state.keys, level, index)
    slot_keys = jax.vmap(lambda key, lv, idx: jax.vmap(lambda j: jax.random.fold_in(
        jax.random.fold_in(jax.random.fold_in(key, 5), lv), j))(idx))(
            state.keys, level, index)
    return Windows(corners, valid, noise, slot_keys, rects)

  @staticmethod
  def _odd(state):
    return (state.level % 2 == 1)[:, None, None, None]                 # [N, 1, 1, 1]

  def model_input(self, state, crops: Crops, win: Windows):
    del win
    return jnp.where(self._odd(state)[..., None], crops.x_low, crops.x)

  def write_mask(self, state, crops: Crops, win: Windows):
    del state, crops
    p = self.s.patch
    rows = win.corners[..., 0, None] + jnp.arange(p)                    # [N, K, P]
    cols = win.corners[..., 1, None] + jnp.arange(p)
    inside = lambda v, lo, hi: (v >= lo[..., None]) & (v < hi[..., None])
    return (inside(rows, win.rects[..., 0], win.rects[..., 1])[..., :, None]
            & inside(cols, win.rects[..., 2], win.rects[..., 3])[..., None, :]
            & win.valid[..., None, None])                               # [N, K, P, P]

  def commit(self, state, new, crops: Crops, win: Windows, write) -> dict:
    """Writes the cells into the level's output buffer; the level ends after its last
    window batch."""
    n, h, w = state.times.shape
    level, batch = state.level, state.windows.batch
    active = level < self.s.sampling_steps
    per_level = self._level_shape(h, w, self.margin_at(level))[1]
    paste = _slot_paste(self.s.patch)
    odd = self._odd(state)
    done = active & (batch + 1 == per_level)
    return dict(
        x=paste(state.x, new, win.corners, write & odd),
        x_low=paste(state.x_low, new, win.corners, write & ~odd),
        times=paste(state.times, crops.times + 1, win.corners, write),
        level=level + done.astype(jnp.int32),
        windows=GridCarry(batch=jnp.where(done, 0, batch + active.astype(jnp.int32))))

  def within_level(self, state):
    """[N] share of the current level done."""
    h, w = state.times.shape[1:]
    return state.windows.batch / self._level_shape(h, w, self.margin_at(state.level))[1]

  def finish(self, state):
    """With an odd step count the last level (S - 1, even) wrote x_low: x becomes the
    result of the images that are done."""
    if self.s.sampling_steps % 2 == 0:
      return state
    done = (state.level >= self.s.sampling_steps)[:, None, None, None]
    return state.replace(x=jnp.where(done, state.x_low, state.x))


PLACEMENTS = {p.name: p for p in (RandomPlacement, GridPlacement)}


def for_settings(settings):
  """The placement object of `SamplerSettings` (its `schedule` names it)."""
  try:
    return PLACEMENTS[settings.schedule](settings)
  except KeyError:
    raise ValueError(f'schedule must be one of {tuple(PLACEMENTS)}, got '
                     f'{settings.schedule!r}') from None
