"""Seam visibility of tiled images (evaluation; used by tests, adherence and benchmarks).

Two measures:
- `line_score`: straight line segments anywhere in the image that are sharper than the
  lines beside them: window borders of the sampler wherever a level put them (they move
  from level to level), edge fragments of the random placement, decoder tile lines.
  What a person sees as a lattice. Compare it with the same image sampled untiled (one
  window over the whole latent: `patch_size` = the image), its floor.
- `seam_ratio`: gradients on given lines (a fixed tile grid) over their neighbours: the
  decoder's tile lines, where they are known. It cannot see the sampler's windows,
  whose borders move from level to level (a latticed 10-step image scored below a clean
  50-step one on it).
"""

from __future__ import annotations

import math

import numpy as np

# line_score defaults (demo models, 512 px, one label, 10-50 steps: docs/generate.md).
LINE_SCALE = 4        # px averaged per side first: the demo textures' dots vanish, a
                      # window border (a latent pixel = 8 px of decoder output) stays
LINE_LENGTH = 256     # px: the segment a line is judged over (two demo window sides:
                      # long enough that texture averages out, 128 px was ~3x noisier)
LINE_REACH = (2, 3)   # the parallel lines compared with, in LINE_SCALE px (not the
                      # adjacent one: a border that falls between two averaged lines)
LINE_THRESHOLD = 1.25   # a segment counts for (ratio - threshold)^2 above this
LINE_BORDER = 16      # px left out at the image edge (the decoder's frame, issue 39)


def _box_sum(a, n: int):
  """Sums of n consecutive rows of a [R, ...] -> [R - n + 1, ...]."""
  c = np.concatenate([np.zeros_like(a[:1]), np.cumsum(a, axis=0)], axis=0)
  return c[n:] - c[:-n]


def line_score(img, *, scale: int = LINE_SCALE, length: int = LINE_LENGTH,
               reach=LINE_REACH, threshold: float = LINE_THRESHOLD,
               border: int = LINE_BORDER) -> float:
  """How much the image holds straight horizontal or vertical lines: ~ its untiled
  floor when none shows, clearly above with a lattice or window edges.

  The image (mean of its channels) is averaged over scale x scale blocks. For every line
  between two columns (and rows) and every segment of length / scale pixels along it
  (a quarter segment apart), the ratio r = (summed gradient across that line) / (the
  mean of the same sums on the parallel lines at the `reach` distances). A seam makes r
  well above 1 over a whole segment; texture gives r near 1 (its own edges are short
  or not straight). The score is 1000 x mean(max(r - threshold, 0)^2) over all segments
  of both directions: segments only a little above the threshold count little, clear
  lines much.

  Args:
    img: [H, W] or [H, W, ch] (or [1, H, W, ch]), any numeric dtype; at least
      2 * border + scale * (length / scale + 2 max(reach) + 2) px per side.
  """
  x = np.asarray(img, np.float64)
  if x.ndim == 4 and x.shape[0] == 1:
    x = x[0]
  if x.ndim == 3:
    x = x.mean(axis=-1)
  if x.ndim != 2:
    raise ValueError(f'image must be [H, W] or [H, W, ch], got shape {np.shape(img)}')
  x = x[border:x.shape[0] - border, border:x.shape[1] - border]
  n = max(1, length // scale)
  far = max(reach)
  hs, ws = x.shape[0] // scale, x.shape[1] // scale
  if min(hs, ws) < n + 2 * far + 2:
    raise ValueError(f'image {np.shape(img)[:2]} is too small for line_score (need '
                     f'{2 * border + scale * (n + 2 * far + 2)} px per side)')
  x = x[:hs * scale, :ws * scale].reshape(hs, scale, ws, scale).mean(axis=(1, 3))
  ratios = []
  for a in (x, x.T):                      # lines between columns, then between rows
    d = np.abs(np.diff(a, axis=1))        # [rows, lines]
    pad = np.pad(d, ((0, 0), (far, far)), mode='reflect')
    offsets = [k for k in range(-far, far + 1) if abs(k) in reach]
    side = sum(pad[:, far + k: far + k + d.shape[1]] for k in offsets) / len(offsets)
    step = max(1, n // 4)
    num, den = _box_sum(d, n)[::step], _box_sum(side, n)[::step]
    ratios.append((num / np.maximum(den, 1e-12)).ravel())
  r = np.concatenate(ratios)
  return float(1000.0 * np.mean(np.maximum(r - threshold, 0.0) ** 2))


def seam_ratio(img, tile: int, offset: int = 0, neighbours: int | None = 4,
               axes=(0, 1)) -> float:
  """How visible tile boundaries are: ~1 for no seams, clearly > 1 for seams.

  A line is the border between two neighbouring pixel columns (or rows) j-1 and j; its
  gradient is `|img[:, j] - img[:, j-1]|` (rows: `|img[j] - img[j-1]|`), per pixel and
  channel. Boundary lines are those with `j = offset + k * tile`, k >= 1, j inside the
  image, in both directions. The ratio is

    mean gradient over all boundary lines / mean gradient over the reference lines,

  each mean pooled over both directions, positions along the line and channels. The
  reference lines are the non-boundary lines at distance <= `neighbours` from a
  boundary (of the same direction), or every non-boundary line when `neighbours` is
  None. The local default matters for tiled decoders: their output statistics vary
  smoothly with the position inside a tile (convolution zero padding at tile edges), so
  a global baseline reads that smooth variation as a seam (the blended reference
  decode scores ~1.15 globally, ~1.05 locally; the unblended one ~1.5 and ~1.7).

  Args:
    img: [H, W] or [H, W, ch] (or [1, H, W, ch]) image, any numeric dtype.
    tile: tile side in pixels.
    offset: where the grid starts (0 for the unshifted decode).
    neighbours: half-width of the local reference, or None for a global one.
    axes: 0 for the lines between rows, 1 between columns (default both).

  Returns:
    The ratio (nan when there is no boundary or no reference line).
  """
  x = np.asarray(img, np.float64)
  if x.ndim == 4 and x.shape[0] == 1:
    x = x[0]
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3:
    raise ValueError(f'image must be [H, W] or [H, W, ch], got shape {np.shape(img)}')
  seam_sum = seam_n = ref_sum = ref_n = 0.0
  for axis in axes:
    d = np.abs(np.diff(x, axis=axis))             # line j-1|j at index j-1 along axis
    per_line = d.sum(axis=tuple(a for a in range(3) if a != axis))      # [n_lines]
    count = d.size // d.shape[axis]               # values per line
    j = np.arange(1, d.shape[axis] + 1)           # the line's j
    rel = j - offset
    boundary = (rel >= tile) & (rel % tile == 0)
    if neighbours is None:
      ref = ~boundary
    else:
      near = np.zeros_like(boundary)
      for b in np.flatnonzero(boundary):
        near[max(0, b - neighbours):b + neighbours + 1] = True
      ref = near & ~boundary
    seam_sum += per_line[boundary].sum()
    seam_n += boundary.sum() * count
    ref_sum += per_line[ref].sum()
    ref_n += ref.sum() * count
  if seam_n == 0 or ref_n == 0:
    return math.nan
  base = ref_sum / ref_n
  return float((seam_sum / seam_n) / base) if base > 0 else math.inf
