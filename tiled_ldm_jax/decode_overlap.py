"""Overlapping-tile decode: seamless at ~1.3 decoder passes per pixel (`blend_mode='overlap'`
and 'shared').

'shared' (`Overlap(shared_norm=True, margin=2)`) adds two things to 'overlap': every
GroupNorm of the decoder uses statistics of the whole image (`norm_stats`,
`decode_norm`), measured once per image on the latent subsampled to ~`norm_tiles`
tiles, so tiles agree in tone and with a whole-image decode; and the latent is
reflected by `margin` latent pixels on every side, so the image's border is decoded as
interior (no frame from the decoder's zero padding at the edge; `Overlap`).

The four-shift blend (`decode.py`, the original's, kept for parity) decodes every pixel
four times. Here tiles of P latent pixels advance by a stride S = P - o, so neighbouring
tiles share o latent pixels (L = o * f image pixels, f the decoder's factor); in a shared
strip the two decodes are cross-faded with complementary weights

  w_in(t) = sin^2(pi (t + 1/2) / (2L)),   w_out(t) = 1 - w_in(t),   t = 0 .. L-1,

separable across rows and columns (a tile's weight is wy(y) * wx(x), 1 in its interior,
1 on the image's outer borders where it has no neighbour). The weights of the tiles over
any pixel sum to 1, so the blend is a convex combination and stays in the clip range.
A tile's own border -- where the decoder's zero padding makes its output differ from a
whole-image decode -- carries weight <= sin^2(pi / (4L)) (0.0006 for L = 32 px), the
mirror image of the four-shift blend's Hann windows, at (P / S)^2 passes per pixel:
1.31 for the default o = P / 8 (64 px overlap on 512 px tiles).

Any size: a latent h x w is covered by n_r = max(1, ceil((h - o) / S)) tile rows and
n_c = max(1, ceil((w - o) / S)) tile columns, the latent reflect-padded (`pad_mode`)
at the bottom and right to (n_r - 1) S + P by (n_c - 1) S + P, and the image cropped.

Bounded memory, as the four-shift decode: `iter_bands` walks bands of k tile rows
(k S f pixel rows); ONE jitted program of fixed shape decodes a band's k * n_c tiles
(`lax.map` over batches of `tile_batch`), overlap-adds them into a canvas of
k S f + L rows and carries its bottom L rows (the next band's first tile row fades in
over them) on the device; when the tile rows end before the image does, one last band
only emits the carried rows (no decode). Cost grows with the image area through the tile count only;
device memory is params + one batch of decoder activations + a band canvas.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from tiled_ldm_jax import decode_base as base
from tiled_ldm_jax import decode_norm

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static tiling of one latent width (hashable: part of the jit key)."""
  P: int              # latent tile side
  S: int              # latent stride, P - o
  f: int              # decoder factor (pixels per latent pixel)
  n_c: int            # tile columns
  k: int              # tile rows per band
  tb: int             # tiles per decoder call
  nb: int             # decoder calls per band
  width: int          # output width in pixels (crop)
  out_scale: float
  out_offset: float
  clip: tuple[float, float] | None
  uint8: bool

  @property
  def L(self) -> int:
    """Pixels shared by neighbouring tiles."""
    return (self.P - self.S) * self.f


def overlap_of(settings: base.TiledDecodeSettings) -> int:
  """o, the latent pixels neighbouring tiles share (default P / 8, at least 1)."""
  P = settings.latent_patch
  return settings.overlap if settings.overlap is not None else max(1, P // 8)


def tile_grid(settings: base.TiledDecodeSettings, h: int, w: int) -> tuple[int, int]:
  """(n_r, n_c): tile rows and columns for a latent h x w."""
  P, o = settings.latent_patch, overlap_of(settings)
  S = P - o
  return max(1, -(-(h - o) // S)), max(1, -(-(w - o) // S))


def passes_per_pixel(settings: base.TiledDecodeSettings, h: int, w: int) -> float:
  """Decoder evaluations per output pixel (tiles * P^2 / (h w)), the cost of this mode."""
  n_r, n_c = tile_grid(settings, h, w)
  return n_r * n_c * settings.latent_patch ** 2 / (h * w)


def layout(settings: base.TiledDecodeSettings, h: int, w: int, uint8: bool) -> Layout:
  P, o = settings.latent_patch, overlap_of(settings)
  n_r, n_c = tile_grid(settings, h, w)
  tb = settings.tile_batch
  k = min(settings.band_tiles or _band_rows(n_r, n_c, tb), n_r)
  return Layout(P=P, S=P - o, f=settings.factor, n_c=n_c, k=k, tb=tb,
                nb=-(-(k * n_c) // tb), width=w * settings.factor,
                out_scale=float(settings.out_scale), out_offset=float(settings.out_offset),
                clip=None if settings.clip is None else tuple(map(float, settings.clip)),
                uint8=uint8)


def _band_rows(n_r: int, n_c: int, tb: int) -> int:
  """k: tile rows per band that waste the fewest decoder slots (zero tiles padding a
  band's last batch, and tile rows past the grid), among bands of at most 4x the rows
  that fill one batch (the band canvas is device memory); ties: fewer rows."""
  fill = max(1, -(-tb // n_c))
  slots = lambda k: -(-n_r // k) * -(-(k * n_c) // tb)
  return min(range(1, min(n_r, 4 * fill) + 1), key=lambda k: (slots(k), k))


def band_layout(settings: base.TiledDecodeSettings, h: int, w: int) -> tuple[int, int]:
  """(pixel rows per band, number of bands)."""
  g = layout(settings, h, w, False)
  return g.k * g.S * g.f, _n_bands(g, h)


def _n_bands(g: Layout, h: int) -> int:
  """Bands of k S latent rows that cover h; a last band past the tile rows only flushes
  the carry (the last tile row's bottom o rows)."""
  return -(-h // (g.k * g.S))


def _ramps(n: int, first: int, total: int, g: Layout) -> np.ndarray:
  """[n, P f] weights of tiles first .. first+n-1 along one axis of a `total`-tile grid:
  1 inside, w_in over the leading L pixels and w_out over the trailing L pixels, except
  on the grid's outer borders (1); 0 for tiles past the grid."""
  p, L = g.P * g.f, g.L
  w_in = np.sin(np.pi * (np.arange(L) + 0.5) / (2 * L)) ** 2
  out = np.zeros((n, p), np.float32)
  for r in range(n):
    i = first + r
    if i >= total:
      continue
    out[r] = 1.0
    if i > 0:
      out[r, :L] = w_in
    if i < total - 1:
      out[r, p - L:] = 1.0 - w_in
  return out


def _overlap_add(t: Array, S: int, L: int) -> Array:
  """[n, p, ...] tiles placed at stride S along axis 0+1 -> [n S + L, ...] (L <= S)."""
  n, p = t.shape[:2]
  rest = t.shape[2:]
  core = t[:, :S].reshape((n * S,) + rest)
  tail = jnp.pad(t[:, S:], [(0, 0), (0, S - (p - S))] + [(0, 0)] * len(rest))
  tail = tail.reshape((n * S,) + rest)
  pad = lambda x, lo, hi: jnp.pad(x, [(lo, hi)] + [(0, 0)] * len(rest))
  return pad(core, 0, L) + pad(tail, S, 0)[:n * S + L]


@functools.partial(jax.jit, static_argnames=('decode', 'g'))
def _band_program(params, tiles: Array, carry: Array, wy: Array, wx: Array, *,
                  decode, g: Layout) -> tuple[Array, Array]:
  """Decodes one band's tiles, weights and overlap-adds them.

  Args:
    params: decoder params.
    tiles: [nb, tb, P, P, C] decoder-input tiles, row-major over (tile row, column),
      zero tiles at the end.
    carry: [L, n_c S f + L, ch] the previous band's bottom canvas rows (zeros first).
    wy: [k, p] row weights of the band's tile rows; wx: [n_c, p] column weights.
    decode: the pure decoder (static); g: layout (static).

  Returns:
    (pixels [k S f, width, ch] float32 or uint8, new carry).
  """
  p, Sf, L = g.P * g.f, g.S * g.f, g.L

  def decode_batch(t):                                            # [tb, P, P, C]
    x = decode(params, t).astype(jnp.float32) * g.out_scale + g.out_offset
    return x if g.clip is None else jnp.clip(x, *g.clip)          # [tb, p, p, ch]

  dec = jax.lax.map(decode_batch, tiles)                          # [nb, tb, p, p, ch]
  ch = dec.shape[-1]
  dec = dec.reshape(-1, p, p, ch)[:g.k * g.n_c].reshape(g.k, g.n_c, p, p, ch)
  dec = dec * wy[:, None, :, None, None] * wx[None, :, None, :, None]
  cols = _overlap_add(dec.transpose(1, 3, 0, 2, 4), Sf, L)        # [Wc, k, p, ch]
  canvas = _overlap_add(cols.transpose(1, 2, 0, 3), Sf, L)        # [k Sf + L, Wc, ch]
  canvas = canvas.at[:L].add(carry)
  img = canvas[:g.k * Sf, :g.width]
  if g.uint8:
    img = base.to_uint8(img)
  return img, canvas[g.k * Sf:]


@functools.partial(jax.jit, static_argnames=('g',))
def _flush_program(carry: Array, *, g: Layout) -> tuple[Array, Array]:
  """A band with no tile row left: the carried rows, then zeros (cropped by the caller)."""
  canvas = jnp.pad(carry, ((0, g.k * g.S * g.f - g.L), (0, 0), (0, 0)))
  img = canvas[:, :g.width]
  return (base.to_uint8(img) if g.uint8 else img), jnp.zeros_like(carry)


def norm_stride(s: base.TiledDecodeSettings, h: int, w: int) -> int:
  """d, the latent stride of the statistics pass: the smallest that brings the latent
  h x w down to about `norm_tiles` tiles (1: the latent as it is)."""
  P = s.latent_patch
  return max(1, math.ceil(math.sqrt(h * w / (s.norm_tiles * P * P))))


def _norm_grid(s: base.TiledDecodeSettings, h: int, w: int) -> tuple[int, int, int]:
  """(d, rows, cols): the subsampled latent's tiles of the statistics pass."""
  d, P = norm_stride(s, h, w), s.latent_patch
  sub = lambda n: -(-(n - d // 2) // d)            # len(range(d // 2, n, d))
  return d, -(-sub(h) // P), -(-sub(w) // P)


def _norm_calls(s: base.TiledDecodeSettings, h: int, w: int) -> tuple[int, int]:
  """(calls, tiles per call) of the statistics pass: at most `tile_batch` per call."""
  _, rows, cols = _norm_grid(s, h, w)
  batch = min(s.tile_batch, rows * cols)
  return -(-(rows * cols) // batch), batch


@functools.partial(jax.jit, static_argnames=('decode',))
def _stats_program(params, tiles: Array, *, decode) -> decode_norm.Stats:
  """GroupNorm statistics of one batch of tiles [tb, P, P, C], pooled over the batch."""
  return decode_norm.measure(decode, params, tiles)


def norm_stats(decode, params, z: np.ndarray, s: base.TiledDecodeSettings
               ) -> decode_norm.Stats:
  """Whole-image GroupNorm statistics of the decoder input z [h, w, C], estimated on the
  whole latent at lower resolution: every d-th latent pixel in each direction
  (`norm_stride`), cut into non-overlapping tiles of P (reflect-padded), decoded
  up to `tile_batch` at a time with every GroupNorm pooled over the call's tiles, the
  calls' statistics averaged. A last call short of tiles repeats some (every call has
  one shape).

  Why subsampled: measured at 1024 px (PSNR of the 'shared' decode against the
  whole-image decode), on the demo VAE with the statistics of the whole-image decode
  35.7 dB, subsampled d = 2, 4, 8: 35.2, 34.6, 31.4 dB, average-pooled instead: 35.7,
  34.4, 31.1 dB, 8-16 tiles sampled at full resolution: 24-32 dB (depending on where
  they fell); on the random-weight reference VAE, whole-image statistics 13.4 dB,
  subsampled d = 2: 13.3 dB, average-pooled: 10.5 dB (pooling removes the latent's
  fine detail, whose energy its features carry)."""
  h, w, c = z.shape
  P, tb = s.latent_patch, s.tile_batch
  d, rows, cols = _norm_grid(s, h, w)
  sub = base.pad_latent(z[d // 2::d, d // 2::d], rows * P, cols * P, s.pad_mode)
  tiles = sub.reshape(rows, P, cols, P, c).transpose(0, 2, 1, 3, 4).reshape(-1, P, P, c)
  calls, tb = _norm_calls(s, h, w)
  idx = np.round(np.linspace(0, len(tiles) - 1, calls * tb)).astype(int)
  tiles = np.ascontiguousarray(tiles[idx], np.float32)            # [calls tb, P, P, C]
  parts = [_stats_program(params, jnp.asarray(tiles[i * tb:(i + 1) * tb]), decode=decode)
           for i in range(calls)]
  return decode_norm.combine(parts, [1.0] * calls)


def _reflect_margin(z: np.ndarray, m: int, rows: int, cols: int, mode: str) -> np.ndarray:
  """z [h, w, C] padded to rows x cols in one copy: m latent pixels reflected on every
  side and the grid's excess reflected at the bottom and right (edge-repeated where a
  side is too short to reflect); without a margin, `pad_mode` at the bottom and right
  as the other modes."""
  h, w, _ = z.shape
  if not m:
    return base.pad_latent(z, rows, cols, mode)
  return np.pad(z, ((m, rows - h - m), (m, cols - w - m), (0, 0)),
                mode='edge' if min(h, w) <= m else 'reflect')


@dataclasses.dataclass(frozen=True)
class Overlap:
  """Overlapping tiles, cross-faded ('overlap'); `shared_norm`: every GroupNorm of the
  decoder normalises with statistics of the whole image, measured once per image by
  `norm_stats` (`decode_norm`), so tiles agree in tone ('shared').

  `margin` (latent pixels, `settings.edge_margin` when set): the latent is reflected by
  that much on every side before tiling and the image cropped back, so the image's own
  border is decoded as interior. Without it the decoder's zero padding at the image
  edge -- in a whole-image decode too -- draws a frame: on the default 1024 px demo
  image the mean gradient across the outer 1-3 pixel lines is 1.5-2.7x the image's
  median, ~1.0x with a 2-pixel margin (docs/generate.md). Default: 2 for 'shared', 0
  for 'overlap' (unchanged).

  `min_tile` (pixels, `settings.min_tile` when set): the tile it decodes, at least. A
  tile's outer ~20 pixels differ from the whole-image decode even with shared
  statistics (the decoder's zero padding: on the demo VAE the mean error is 0.05 at the
  edge, 0.023 at 8 px, 0.017 at 16 px, 0.012 from 24 px in); with 128 px tiles the
  16 px cross-fade sits in that border and draws faint lines in flat regions, which
  512 px tiles (a 64 px cross-fade) do not. Default: 512 for 'shared', none for
  'overlap'."""
  shared_norm: bool = False
  margin: int = 0
  min_tile: int = 0

  def _m(self, s: base.TiledDecodeSettings) -> int:
    return self.margin if s.edge_margin is None else s.edge_margin

  def tiled(self, s: base.TiledDecodeSettings) -> base.TiledDecodeSettings:
    """`s` with the tile it decodes: at least `min_tile` pixels (`s.min_tile` when set),
    in multiples of 2 f."""
    t = self.min_tile if s.min_tile is None else s.min_tile
    if t <= s.patch_size:
      return s
    return dataclasses.replace(s, patch_size=-(-t // (2 * s.factor)) * 2 * s.factor)

  def tile_px(self, s: base.TiledDecodeSettings) -> int:
    return self.tiled(s).patch_size

  def passes_per_pixel(self, s: base.TiledDecodeSettings, h: int, w: int) -> float:
    s = self.tiled(s)
    m = self._m(s)
    n_r, n_c = tile_grid(s, h + 2 * m, w + 2 * m)
    extra = math.prod(_norm_calls(s, h, w)) if self.shared_norm else 0
    return (n_r * n_c + extra) * s.latent_patch ** 2 / (h * w)

  def band_layout(self, s: base.TiledDecodeSettings, h: int, w: int) -> tuple[int, int]:
    s = self.tiled(s)
    m = self._m(s)
    rows, _ = band_layout(s, h + 2 * m, w + 2 * m)
    return rows, -(-(h * s.factor) // rows)

  def seam_lines(self, s: base.TiledDecodeSettings) -> tuple[tuple[int, int], ...]:
    """Seams of overlapping tiles may sit anywhere in the L-pixel cross-fades: their
    start, middle and end (the grid starts `margin` latent pixels before the image)."""
    s = self.tiled(s)
    o, m = overlap_of(s), self._m(s)
    stride, fade = (s.latent_patch - o) * s.factor, o * s.factor
    # Offsets in (-stride, 0]: `seams.seam_ratio` counts lines at offset + k stride,
    # k >= 1, so the first tile border (before `stride` when there is a margin) counts.
    return tuple((stride, (off - m * s.factor) % stride - stride)
                 for off in (0, fade // 2, fade))

  def iter_bands(self, decode, params, z: np.ndarray, s: base.TiledDecodeSettings, *,
                 uint8: bool, bands: tuple[int, int] | None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """`decode.iter_decode_bands` for these modes; z [h, w, C] is already the decoder
    input (latent scaling applied). Yields (row_start, pixels [rows, f w, ch]).

    With a margin of m latent pixels the tiles cover the reflected latent, whose bands
    start m f pixel rows above the image's: image band b is the end of reflected band
    b and the first m f rows of band b + 1 (decoded in turn, one band held back)."""
    s = self.tiled(s)
    h, w, _ = z.shape
    m, f = self._m(s), s.factor
    rows, n_bands = self.band_layout(s, h, w)
    first, stop = base.band_range(bands, n_bands)
    if first == stop:
      return
    n_r, n_c = tile_grid(s, h + 2 * m, w + 2 * m)
    P, S = s.latent_patch, s.latent_patch - overlap_of(s)
    zm = _reflect_margin(z, m, (n_r - 1) * S + P, (n_c - 1) * S + P, s.pad_mode)
    if self.shared_norm:
      stats = norm_stats(decode, params, z, s)       # of the image's latent, no margin
      params, decode = (params, stats), decode_norm.fixed(decode)
    height, mf = h * f, m * f
    lo, hi = first * rows, min(stop * rows, height)   # image rows to yield
    # Reflected bands holding image rows lo .. hi (reflected rows lo + mf .. hi + mf).
    inner = _bands(decode, params, zm, s, uint8, lo + mf, hi + mf)
    buf, buf_row = [], lo
    for row0, img in inner:
      img = img[:, mf:mf + w * f]
      r0 = row0 - mf                                  # image row of img[0]
      a, b = max(lo - r0, 0), min(hi - r0, img.shape[0])
      if a < b:
        buf.append(img[a:b])
      held = sum(x.shape[0] for x in buf)
      while held and (held >= min(rows, hi - buf_row)):
        block = np.concatenate(buf) if len(buf) > 1 else buf[0]
        n = min(rows, hi - buf_row)
        yield buf_row, block[:n]
        buf, buf_row, held = ([block[n:]] if n < block.shape[0] else []), buf_row + n, \
            held - n


def _bands(decode, params, z: np.ndarray, s: base.TiledDecodeSettings, uint8: bool,
           lo: int, hi: int) -> Iterator[tuple[int, np.ndarray]]:
  """(row_start, pixels) of the overlap-tiled decode of z [h, w, C] (decoder input; its
  grid's padding already there, or added here), its bands from the one holding pixel
  row `lo` to the one holding row `hi - 1`."""
  h, w, c = z.shape
  g = layout(s, h, w, uint8)
  n_r, n_c = tile_grid(s, h, w)
  P, S = g.P, g.S
  zp = base.pad_latent(z, (n_r - 1) * S + P, (n_c - 1) * S + P, s.pad_mode)
  ch = base.check_tile_output(decode, params, (g.tb, P, P, c), g.f)
  windows = np.lib.stride_tricks.sliding_window_view(zp, (P, P, c))[::S, ::S, 0]
  rows_per_band = g.k * S * g.f
  first, stop = lo // rows_per_band, min(-(-hi // rows_per_band), _n_bands(g, h))
  wx = jnp.asarray(_ramps(n_c, 0, n_c, g))                        # [n_c, p]
  carry = jnp.zeros((g.L, n_c * S * g.f + g.L, ch), jnp.float32)
  height = h * g.f

  def dispatch(b, carry):
    i0 = b * g.k
    if i0 >= n_r:
      return _flush_program(carry, g=g)
    tiles = np.zeros((g.nb * g.tb, P, P, c), np.float32)
    real = windows[i0:i0 + g.k]                                   # [<=k, n_c, P, P, C]
    tiles[:real.shape[0] * n_c] = real.reshape(-1, P, P, c)
    wy = jnp.asarray(_ramps(g.k, i0, n_r, g))
    return _band_program(params, tiles.reshape(g.nb, g.tb, P, P, c), carry, wy, wx,
                         decode=decode, g=g)

  if first > 0:                              # the carry into `first` (pixels discarded)
    carry = dispatch(first - 1, carry)[1]
  pending = dispatch(first, carry)
  for b in range(first, stop):
    img, carry = pending
    if b + 1 < stop:                      # keep the device busy while the host consumes
      pending = dispatch(b + 1, carry)
    row0 = b * rows_per_band
    yield row0, np.asarray(img[:min(rows_per_band, height - row0)])
