"""Where the sampler puts its patches: the random schedule and the shifted grid.

Random (SPEC 3, the original's distribution). Each slot draws a centre uniformly among
the pixels at the image's lowest level whose clamped P x P patch does not overlap the
patches of earlier slots. Instead of scoring every latent pixel, it keeps `counts`, the
number of lowest-level pixels in each P x P block of the latent: a block is drawn with
probability count / total (one cumulative sum over the blocks), then a pixel uniformly
among the eligible pixels of that block (one P x P crop). Earlier slots' exclusion zones
(the centres whose patch would overlap them: a rectangle of at most ~3P x 3P) are
subtracted from the counts exactly, so the draw is uniform over the same set as the
full-latent argmax it replaces. Writing a patch subtracts its advanced pixels from the
(at most 2 x 2) blocks it covers; when no pixel is left at the lowest level, every pixel
is at the next one and the counts are reset to the block sizes. Per iteration this costs
O(K^2 P^2 + K sqrt(blocks)) with blocks = (h / P) (w / P), instead of O(K h w): the
block is drawn in two steps (a superblock of about sqrt(blocks) blocks by its sum, then a
block inside it), and the counts are reset only in the iteration that ends a level.

Grid (`schedule='grid'`; SpotDiffusion-like). At each level a grid of cells of side
G = P - 2m (m: `grid_margin`) with a random offset per image and level covers the latent;
the window of a cell is the cell widened by m on each side, clamped into the latent.
Every cell is advanced once per level, K windows per iteration; windows read the values
of the start of the level and write only their cell, so the result does not depend on K,
on the order, or on the device count. About one evaluation per pixel and step (x P^2/G^2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

PAD_BLOCKS = 3   # zero blocks past the bottom/right: exclusion windows span <= 4 blocks
# Grid schedule: default window batch = all windows of a level, capped at this many latent
# pixels per denoiser call (e.g. 256 demo windows of 16^2, 16 full-size windows of 64^2).
GRID_BATCH_PIXELS = 1 << 16
# Windows per latent pixel and step of the random placement (`tools/benchmark_sampler.py
# --count_only --schedule=random --patches_per_step=1 --image_size=4096 --patch_size=128`:
# coverage 2.134 at 50 steps, 2.135 at 4): what its cost plan assumes.
RANDOM_COVERAGE = 2.14


@dataclasses.dataclass(frozen=True)
class Random:
  """The original's placement: K non-overlapping windows per image per iteration, each
  centred uniformly among the pixels at the image's lowest level (K = 1: DiffInfinite's
  distribution). `margin` > 0 (latent pixels): a window writes only its pixels at least
  that far from its sides (but the latent's edge), where the model's zero padding does
  not reach; the draw is the same (0: the original's)."""
  patches_per_step: int = 1
  margin: int = 0
  name = 'random'

  def settings(self, hw, patch: int) -> dict:
    """The `SamplerSettings` fields of this placement."""
    del hw
    check_margin(self.margin, patch)
    return dict(schedule=self.name, patches_per_step=self.patches_per_step,
                grid_margin=self.margin)

  def count(self, hw, patch: int, steps: int, n: int, k: int) -> tuple[float, float]:
    """(iterations, windows) expected for `n` images over `steps` levels, `k` windows per
    image and iteration: `RANDOM_COVERAGE` windows per latent pixel and step."""
    windows = RANDOM_COVERAGE * hw[0] * hw[1] * steps / patch ** 2 * n
    return windows / (n * k), windows


@dataclasses.dataclass(frozen=True)
class Grid:
  """Shifted non-overlapping grid windows: every cell once per level, `margin` latent
  pixels of context each side of a window (read, not written) in the last
  `margin_levels` levels (None: in all) and in the first `first_levels` levels; the
  other levels use margin 0, so cells are whole windows; `patches_per_step` None: every
  window of a level, at most `GRID_BATCH_PIXELS` latent pixels per call."""
  margin: int = 0
  patches_per_step: int | None = None
  margin_levels: int | None = None
  first_levels: int = 0
  name = 'grid'

  def settings(self, hw, patch: int) -> dict:
    """The `SamplerSettings` fields of this placement."""
    check_margin(self.margin, patch)
    k = self.patches_per_step or grid_batch(hw, patch, self.margin)
    return dict(schedule=self.name, patches_per_step=k, grid_margin=self.margin,
                grid_margin_levels=self.margin_levels,
                grid_margin_first_levels=self.first_levels)

  def count(self, hw, patch: int, steps: int, n: int, k: int) -> tuple[float, float]:
    """(iterations, windows) of `n` images over `steps` levels with `k` windows per call:
    iterations exact, windows the expectation over the random offsets (a level's empty
    edge cells are skipped)."""
    h, w = hw
    with_m = steps if (self.margin_levels is None or not self.margin) else \
        margin_levels_count(steps, self.margin_levels, self.first_levels)
    iterations = windows = 0.0
    for margin, levels in ((self.margin, with_m), (0, steps - with_m)):
      if levels:
        n_r, n_c = grid_cells(h, w, patch - 2 * margin)
        iterations += levels * -(-(n_r * n_c) // k)
        windows += levels * n * _expected_cells(h, w, patch - 2 * margin)
    return iterations, windows


def _expected_cells(h: int, w: int, cell: int) -> float:
  """Expected non-empty cells of a shifted grid of `cell` on h x w (uniform offsets)."""
  rows = sum(-(-(h + o) // cell) for o in range(cell)) / cell
  cols = sum(-(-(w + o) // cell) for o in range(cell)) / cell
  return rows * cols


def margin_on(level, steps: int, last: int | None, first: int = 0):
  """Whether the grid margin applies at `level` (an int or a traced array) of `steps`:
  in the last `last` levels (None: every level) and in the first `first`. Where the
  margin matters (docs/generate.md): its absence in the last levels leaves thin lines
  at the window borders (the U-Net's zero padding), in the first levels cell-sized tone
  blocks that few later levels cannot mix away."""
  if last is None:
    return level >= 0
  return (level >= steps - last) | (level < first)


def margin_levels_count(steps: int, last: int | None, first: int = 0) -> int:
  """How many of `steps` levels use the margin (`margin_on`)."""
  return sum(bool(margin_on(lv, steps, last, first)) for lv in range(steps))


def check_margin(margin: int, patch: int) -> None:
  """The grid's margin must leave a cell: 0 <= margin < patch / 2 (latent pixels)."""
  if margin < 0 or 2 * margin >= patch:
    raise ValueError(f'grid_margin must be in [0, patch/2) = [0, {-(-patch // 2)}) '
                     f'latent pixels, got {margin}')


def super_side(h: int, w: int, patch: int) -> int:
  """Blocks per side of a superblock: about sqrt(blocks per side), so that a draw scans
  about as many superblocks as blocks inside one (two levels: O(sqrt(blocks)) each)."""
  nb = max(-(-h // patch), -(-w // patch)) + PAD_BLOCKS
  return max(1, int(round(nb ** 0.5)))


def block_sizes(h: int, w: int, patch: int):
  """[bh, bw] int32: pixels of each P x P block (edge blocks are partial), padded with
  empty blocks: at least PAD_BLOCKS past the bottom/right, up to whole superblocks."""
  g = super_side(h, w, patch)
  nbh = -(-(-(-h // patch) + PAD_BLOCKS) // g) * g
  nbw = -(-(-(-w // patch) + PAD_BLOCKS) // g) * g
  rows = jnp.clip(h - jnp.arange(nbh) * patch, 0, patch)
  cols = jnp.clip(w - jnp.arange(nbw) * patch, 0, patch)
  return (rows[:, None] * cols[None, :]).astype(jnp.int32)


def super_sums(counts, g: int):
  """[bh / g, bw / g]: the sums of g x g blocks of counts [bh, bw] (the coarse level)."""
  bh, bw = counts.shape
  return counts.reshape(bh // g, g, bw // g, g).sum(axis=(1, 3))


def _corner(c, size: int, patch: int):
  """Clamped patch start for centre c (the original's placement)."""
  return jnp.clip(c - patch // 2, 0, size - patch)


def _exclusion(c, size: int, patch: int):
  """[lo, hi]: the centres whose clamped patch overlaps a patch starting at c (one axis)."""
  lo = jnp.where(c - patch < 0, 0, c - patch + patch // 2 + 1)
  hi = jnp.where(c + patch > size - patch, size - 1, c + patch + patch // 2 - 1)
  return lo, hi


def _window(size: int, patch: int):
  """Static side of the crop used to count a zone: <= 4 blocks, at most the latent."""
  return min(4 * patch, size)


def _inside(rows, cols, rects):
  """[..., len(rows), len(cols)] bool: pixels inside each rectangle of rects [..., 4]
  (ylo, yhi, xlo, xhi, inclusive; an empty one, lo > hi, holds none)."""
  r = rects[..., None, None, :]
  return (((rows[:, None] >= r[..., 0]) & (rows[:, None] <= r[..., 1]))
          & ((cols[None, :] >= r[..., 2]) & (cols[None, :] <= r[..., 3])))


def _zone_counts(times, level, rect, earlier, patch: int):
  """Eligible pixels per block inside `rect` and outside the rectangles `earlier`.

  rect: [4] (ylo, yhi, xlo, xhi); earlier: [K, 4] of such (empty ones exclude nothing).
  Returns (counts [4, 4] for blocks starting at block (rect ylo // P, xlo // P), that
  block's index).
  """
  h, w = times.shape
  wh, ww = _window(h, patch), _window(w, patch)
  b0 = rect[0] // patch, rect[2] // patch
  s0 = jnp.minimum(b0[0] * patch, h - wh), jnp.minimum(b0[1] * patch, w - ww)
  rows, cols = s0[0] + jnp.arange(wh), s0[1] + jnp.arange(ww)
  mask = (_inside(rows, cols, rect) & (jax.lax.dynamic_slice(times, s0, (wh, ww)) == level)
          & ~_inside(rows, cols, earlier).any(axis=0))
  onehot_r = (rows // patch - b0[0])[:, None] == jnp.arange(4)[None, :]   # [wh, 4]
  onehot_c = (cols // patch - b0[1])[:, None] == jnp.arange(4)[None, :]
  counts = onehot_r.T.astype(jnp.int32) @ mask.astype(jnp.int32) @ onehot_c.astype(jnp.int32)
  return counts, b0


def _add_blocks(counts, supers, delta, b0):
  """Adds delta [d, d] to the blocks from b0, and to the superblocks that hold them."""
  g = counts.shape[0] // supers.shape[0]
  cur = jax.lax.dynamic_slice(counts, b0, delta.shape)
  counts = jax.lax.dynamic_update_slice(counts, cur + delta, b0)
  rows = (b0[0] + jnp.arange(delta.shape[0])) // g
  cols = (b0[1] + jnp.arange(delta.shape[1])) // g
  supers = supers.at[rows[:, None], cols[None, :]].add(delta, mode='drop')
  return counts, supers


_EMPTY = (1, 0, 1, 0)   # a rectangle that holds no pixel


def choose_random(times, counts, supers, level, key, patch: int, k_slots: int):
  """Corners [K, 2], centres [K, 2] and validity [K] of up to K non-overlapping patches.

  times: [h, w]; counts: lowest-level pixels per block (`block_sizes` layout); supers:
  their `super_sums`; level: []. A block is drawn with probability count / total in two
  steps, a superblock by its sum, then a block inside it by its count (the same law as
  one draw over all blocks, at O(sqrt(blocks)) per slot). The slots are drawn one after
  another in a `fori_loop` (the program does not grow with K); slot k excludes the zones
  of slots < k (later rows of `rects` are empty).
  """
  h, w = times.shape
  g = counts.shape[0] // supers.shape[0]
  n_sw = supers.shape[1]

  def draw(k, carry):
    avail, sup, rects, corners, centres, valid = carry
    kk = jax.random.fold_in(key, k)
    cum = jnp.cumsum(sup.reshape(-1))
    total = cum[-1]
    u = jax.random.randint(jax.random.fold_in(kk, 0), (), 0, jnp.maximum(total, 1))
    sb = jnp.minimum(jnp.searchsorted(cum, u, side='right'), cum.shape[0] - 1)
    u_in = u - (cum[sb] - sup.reshape(-1)[sb])                # rank inside the superblock
    s0 = (sb // n_sw) * g, (sb % n_sw) * g
    inner = jnp.cumsum(jax.lax.dynamic_slice(avail, s0, (g, g)).reshape(-1))
    b = jnp.minimum(jnp.searchsorted(inner, u_in, side='right'), g * g - 1)
    bi, bj = s0[0] + b // g, s0[1] + b % g
    r0, c0 = jnp.minimum(bi * patch, h - patch), jnp.minimum(bj * patch, w - patch)
    rows, cols = r0 + jnp.arange(patch), c0 + jnp.arange(patch)
    elig = (((rows // patch) == bi)[:, None] & ((cols // patch) == bj)[None, :]
            & (jax.lax.dynamic_slice(times, (r0, c0), (patch, patch)) == level)
            & ~_inside(rows, cols, rects).any(axis=0))
    score = jnp.where(elig, jax.random.uniform(jax.random.fold_in(kk, 1), (patch, patch)),
                      -1.0)
    idx = jnp.argmax(score)
    ok = (total > 0) & (score.reshape(-1)[idx] >= 0)
    cy, cx = rows[idx // patch], cols[idx % patch]
    corner = jnp.stack([_corner(cy, h, patch), _corner(cx, w, patch)])
    # Take this patch's exclusion zone out of the later draws (an invalid slot's is empty).
    rect = jnp.stack(_exclusion(corner[0], h, patch) + _exclusion(corner[1], w, patch))
    zone, z0 = _zone_counts(times, level, rect, rects, patch)
    avail, sup = _add_blocks(avail, sup, -jnp.where(ok, zone, 0), z0)
    rects = rects.at[k].set(jnp.where(ok, rect, jnp.array(_EMPTY)))
    return (avail, sup, rects, corners.at[k].set(corner),
            centres.at[k].set(jnp.stack([cy, cx])), valid.at[k].set(ok))

  init = (counts, supers, jnp.broadcast_to(jnp.array(_EMPTY, jnp.int32), (k_slots, 4)),
          jnp.zeros((k_slots, 2), jnp.int32), jnp.zeros((k_slots, 2), jnp.int32),
          jnp.zeros((k_slots,), bool))
  _, _, _, corners, centres, valid = jax.lax.fori_loop(0, k_slots, draw, init)
  return corners, centres, valid


def written_per_block(corner, write, patch: int):
  """Pixels a patch at `corner` advanced, per block: ([2, 2] counts, first block)."""
  b0 = corner[0] // patch, corner[1] // patch
  rows, cols = corner[0] + jnp.arange(patch), corner[1] + jnp.arange(patch)
  onehot_r = ((rows // patch - b0[0])[:, None] == jnp.arange(2)[None, :]).astype(jnp.int32)
  onehot_c = ((cols // patch - b0[1])[:, None] == jnp.arange(2)[None, :]).astype(jnp.int32)
  return onehot_r.T @ write.astype(jnp.int32) @ onehot_c, b0


def update_counts(counts, supers, corners, writes, patch: int):
  """Subtracts the pixels each patch advanced from both levels; (counts, supers).
  corners [K, 2], writes [K, P, P] bool."""
  def one(k, carry):     # a loop, not unrolled: the program does not grow with K
    delta, b0 = written_per_block(corners[k], writes[k], patch)
    return _add_blocks(*carry, -delta, b0)
  return jax.lax.fori_loop(0, corners.shape[0], one, (counts, supers))


# ----------------------------------------------------------------------------- grid


def grid_cells(h: int, w: int, cell: int) -> tuple[int, int]:
  """Cells per column and row of the shifted grid (some are empty for some offsets)."""
  return -(-(h + cell - 1) // cell), -(-(w + cell - 1) // cell)


def grid_batch(hw, patch: int, margin: int, max_pixels: int = GRID_BATCH_PIXELS) -> int:
  """The grid's K when not given: every window of a level up to `max_pixels` latent
  pixels per denoiser call, split evenly over the calls a level then needs (the random
  placement's default K is 1: `Random`)."""
  n_r, n_c = grid_cells(*hw, patch - 2 * margin)
  cap = max(1, max_pixels // patch ** 2)
  calls = -(-(n_r * n_c) // cap)
  return -(-(n_r * n_c) // calls)   # the fewest calls, then the fewest idle slots


def grid_windows(index, offset, h: int, w: int, patch: int, margin, n_cols=None):
  """Window corners [K, 2] and written cell rectangles [K, 4] (y0, y1, x0, x1: half-open)
  of cells `index` [K] (row-major) under a grid offset [2]. `margin` may be traced; then
  give `n_cols`, the cells per row (`grid_cells`) for that margin."""
  cell = patch - 2 * margin
  n_c = grid_cells(h, w, cell)[1] if n_cols is None else n_cols
  j, i = index // n_c, index % n_c
  y0, x0 = j * cell - offset[0], i * cell - offset[1]
  rect = jnp.stack([jnp.maximum(y0, 0), jnp.minimum(y0 + cell, h),
                    jnp.maximum(x0, 0), jnp.minimum(x0 + cell, w)], axis=-1)
  corner = jnp.stack([jnp.clip(y0 - margin, 0, h - patch),
                      jnp.clip(x0 - margin, 0, w - patch)], axis=-1)
  return corner, rect


def grid_offset(key, level, cell: int):
  """[2] int32: the grid's shift (rows, cols) at `level` of the image with `key`; cell
  borders lie at `k * cell - offset`."""
  return jax.random.randint(jax.random.fold_in(jax.random.fold_in(key, 2), level), (2,), 0,
                            cell)
