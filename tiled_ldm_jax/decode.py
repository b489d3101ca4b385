"""Seamless tiled decoding of latents of any size: the face, and DiffInfinite's four-shift
Hann blend.

The face (`iter_decode_bands`, `decode_image`, `passes_per_pixel`, `band_layout`) runs
the strategy of `settings.blend_mode` (`BLENDS`, `blend_of`): `FourShift` here
('original', 'partition'), `decode_overlap.Overlap` ('overlap', and 'shared', the
pipeline's default: overlapping tiles whose GroupNorms share whole-image statistics).
What follows is the four-shift strategy.

The original (`RandomDiffusion.hann_tile_overlap`, SPEC section 4) decodes a latent in
non-overlapping tiles of P = p / f latent pixels (p: pixel patch size, f: the decoder's
upsampling factor, 8) four times -- as is (A), cropped by P/2 latent columns each side
(V), by P/2 rows (H), and both (C) -- and blends, in this order and in place,

  img[:, p/2:-p/2]        = img * (1 - V) + img_v * V        V = `vertical` window
  img[p/2:-p/2, :]        = img * (1 - H) + img_h * H        H = `horizontal` window
  img[p/2:-p/2, p/2:-p/2] = img * (1 - C) + img_c * C        C = `center` window

with each window tiled over its decode's tile grid. Every tile is clipped to [0, 1]
before the blend (the original's `decode` clips), so the blend, a convex combination,
stays in range. This module computes exactly that (on the reference VAE it matches the
original's output to 9e-6, the VAE's own float error; tests/test_decode.py) with these
generalisations. (Kept for parity, a property of the original: the H blend brings in
img_h, whose vertical tile boundaries sit on A's, with weight up to w(1-w) <= 1/4, so
the blend attenuates vertical seams rather than removing them; `seam_ratio` measures
~1.05 on the blended reference decode against ~1.6 unblended.)

`blend_mode='partition'` (not the original's; opt-in) removes that residue: with v the
'vertical' window's weight (Hann across columns, 1 on A's vertical tile boundaries, 0
on V's) and h the 'horizontal' one (across rows), each pixel is
`A (1-v)(1-h) + V v (1-h) + H (1-v) h + C v h`, a convex combination in which every
decode has weight ~0 on its own tile boundaries (Hann with the original's `size - 1`
denominator: <= 1.5e-4 for p = 128). It costs the same four decodes; borders follow the
same rule (a shifted decode that has no tile there has weight 0).

Latent scaling. The decoder input is `z * latent_scale * latent_std + latent_mean`
(per channel; std/mean default to 1/0). DiffInfinite: `latent_scale=50` (its latents are
the SD2 VAE's divided by 50). Plain SD latents: `latent_scale=1/0.18215`. Latent spaces
with per-channel statistics (diffusers' `latents_mean/std` convention
`z_raw = z * std / scaling_factor + mean`): `latent_scale=1/scaling_factor`,
`latent_std=std`, `latent_mean=mean`. The decoder output is then mapped
`x * out_scale + out_offset` and clipped to `clip` per tile (`None`: no clip). The
defaults are DiffInfinite's (scale 50, identity output map, clip [0, 1]); a decoder
trained for [-1, 1] images would use `out_scale=out_offset=0.5`.

Any size. A latent of h x w (any positive integers; the image is 8h x 8w) is padded at
the bottom and right, with `pad_mode` (numpy.pad mode, default 'reflect'; an axis of
length 1 is edge-padded), up to `n_r = ceil(h / P)` by `n_c = ceil(w / P)` tiles. The
four-shift blend then runs on that padded latent exactly as the original runs on a
latent whose sides are multiples of P, and the image is cropped to its top-left
8h x 8w pixels. So when h and w are multiples of P nothing is padded and the result is
the original's, pixel for pixel. Otherwise, per pixel, the weights depend only on its
position in the (top-left anchored) tile grid, as in the original:
- interior pixels, `p/2 <= y < n_r*p - p/2` and likewise in x, receive all four decodes;
- the outer half-tile ring of the PADDED image (top/left p/2 rows/columns of the image,
  and bottom/right rows/columns beyond `n_r*p - p/2`, which exist in the output only
  when the side leaves more than half a tile past the last full tile) is not covered by
  the shifted grids in that direction: there the top/bottom rows receive A and V only,
  the left/right columns A and H only, the corners A alone -- the original's edge
  treatment. No tile boundary of any of the four grids lies inside that ring, so it
  has no seam; every seam of A is inside the interior and is blended.
The padded latent content influences real pixels only through tiles that straddle the
crop line (the decoder sees the whole tile), which is why it is reflected, not zeroed.

Bounded memory (banded decode). `iter_decode_bands` walks the image in horizontal bands
of `band_tiles` tile rows (p * band_tiles pixel rows). For a band it decodes, in ONE
jitted program of fixed shape (the same for every band, so it compiles once), its
A and V tiles and the H and C tiles of the shifted rows that start inside the band,
`lax.map` over batches of `tile_batch` tiles; the bottom p/2 rows of the shifted
decodes are carried to the next band on the device, so each tile is decoded exactly
once. Device memory is therefore params + `tile_batch` tiles of decoder activations +
about 6 canvases of `band_tiles * p x W` pixels, independent of the image height;
the host holds the latent and one band of pixels. Bands are dispatched one ahead of
the one being returned, so device work overlaps the consumer (e.g. a TIFF writer).
`decode_image` assembles the same bands into one array (the in-memory path), so the
two paths give identical pixels for the same settings. (Changing `tile_batch` or
`band_tiles` moves tiles to other batch positions, which on CPU changes results by a
few ulps, ~1e-7.)

Everything is NHWC. Windows and seam measure are below.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tiled_ldm_jax import decode_base as base
from tiled_ldm_jax import decode_overlap

Array = jax.Array
DecodeFn = base.DecodeFn

WINDOW_NAMES = ('up-left', 'up', 'up-right', 'left', 'center', 'right', 'down-left',
                'down', 'down-right', 'up-up', 'down-down', 'left-left', 'right-right',
                'vertical', 'horizontal')


# ----------------------------------------------------------------------------- windows


def _corners(ul: Array, ur: Array, dr: Array, dl: Array) -> Array:
  """Quadrants of four [n, n] windows: top-left of `ul`, top-right of `ur`, ..."""
  n = ul.shape[0]
  top = (jnp.arange(n) < n // 2)[:, None]                         # [n, 1]
  left = (jnp.arange(n) < n // 2)[None, :]                        # [1, n]
  return jnp.where(top, jnp.where(left, ul, ur), jnp.where(left, dl, dr))


def hann_windows(size: int) -> dict[str, Array]:
  """The original's 15 blending windows of side `size` (pixels), float32 [size, size].

  `w[i] = 0.5 (1 - cos(2 pi i / (size - 1)))`; 'center' = w[:, None] w; 'up' is w along
  x in the top half (rows < size/2) and the center window elsewhere (similarly 'down',
  'left', 'right', with strict inequalities as in the original, so row/column size/2 of
  'down'/'right' takes the center value); the corner and double windows are assembled
  quadrant-wise from those and all-ones; 'vertical' = quadrants (up, up, down, down),
  'horizontal' = (left, right, right, left). Only 'vertical', 'horizontal' and 'center'
  are used by the blend.
  """
  i = jnp.arange(size, dtype=jnp.float32)
  w = 0.5 * (1 - jnp.cos(2 * jnp.pi * i / (size - 1)))           # [n]
  row, col = jnp.arange(size)[:, None], jnp.arange(size)[None, :]
  center = w[:, None] * w                                         # [n, n]
  ones = jnp.ones_like(center)
  wx = jnp.broadcast_to(w[None, :], center.shape)                 # varies along x
  wy = jnp.broadcast_to(w[:, None], center.shape)                 # varies along y
  up = jnp.where(row < size // 2, wx, center)
  down = jnp.where(row > size // 2, wx, center)
  right = jnp.where(col > size // 2, wy, center)
  left = jnp.where(col < size // 2, wy, center)
  return {
      'up-left': _corners(ones, up, center, left),
      'up': up,
      'up-right': _corners(up, ones, right, center),
      'left': left,
      'center': center,
      'right': right,
      'down-left': _corners(left, center, down, ones),
      'down': down,
      'down-right': _corners(center, right, ones, down),
      'up-up': _corners(left, right, ones, ones),
      'down-down': _corners(ones, ones, right, left),
      'left-left': _corners(up, ones, ones, down),
      'right-right': _corners(ones, up, down, ones),
      'vertical': _corners(up, up, down, down),
      'horizontal': _corners(left, right, right, left),
  }


# ----------------------------------------------------------------------------- settings


TiledDecodeSettings = base.TiledDecodeSettings
BLEND_MODES = base.BLEND_MODES
to_uint8 = base.to_uint8


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static description of the band program (hashable: a jit static argument)."""
  p: int              # pixel tile side
  n_c: int            # tile columns of the padded latent (rows are not static: one
                      # program serves every image height of a given width)
  k: int              # tile rows per band
  tb: int             # tiles per decoder call
  nb: int             # decoder calls per band
  width: int          # output width in pixels (crop)
  blend: bool
  partition: bool     # FourShift(partition=True): the 'partition' weights
  out_scale: float
  out_offset: float
  clip: tuple[float, float] | None
  uint8: bool         # output uint8 = trunc(clip(x, 0, 1) * 255), else float32

  @property
  def counts(self) -> tuple[int, int, int, int]:
    """Tiles per band of A, V, H, C."""
    if not self.blend:
      return self.k * self.n_c, 0, 0, 0
    return (self.k * self.n_c, self.k * (self.n_c - 1), self.k * self.n_c,
            self.k * (self.n_c - 1))


def _geometry(settings: TiledDecodeSettings, h: int, w: int, uint8: bool,
              partition: bool = False) -> _Geometry:
  """Band program geometry for a latent h x w (h only bounds the band height)."""
  P = settings.latent_patch
  n_r, n_c = -(-h // P), -(-w // P)
  per_row = n_c if not settings.blend else 4 * n_c - 2
  k = settings.band_tiles or max(1, -(-settings.tile_batch // per_row))
  k = min(k, n_r)
  tb = settings.tile_batch
  nb = -(-(k * per_row) // tb)
  return _Geometry(p=settings.patch_size, n_c=n_c, k=k, tb=tb, nb=nb,
                   width=w * settings.factor, blend=settings.blend,
                   partition=partition,
                   out_scale=float(settings.out_scale), out_offset=float(settings.out_offset),
                   clip=None if settings.clip is None else tuple(map(float, settings.clip)),
                   uint8=uint8)


def _tiles(slab: np.ndarray, P: int) -> np.ndarray:
  """[kP, mP, C] -> [k*m, P, P, C], row-major over tiles."""
  kp, mp, c = slab.shape
  k, m = kp // P, mp // P
  return slab.reshape(k, P, m, P, c).transpose(0, 2, 1, 3, 4).reshape(k * m, P, P, c)


def _band_tiles_host(zp: np.ndarray, g: _Geometry, P: int, n_r: int, band: int
                     ) -> np.ndarray:
  """All tiles the band decodes, [nb * tb, P, P, C]: A, V, H, C tiles, then zero padding.

  A/V: unshifted tile rows band*k .. +k (rows past the latent are zero tiles, cropped
  away); H/C: shifted tile rows starting at the same indices, zero tiles where the
  shifted grid has no row (their weight is 0).
  """
  c = zp.shape[-1]
  i0, half = band * g.k, P // 2
  rows_avail = max(0, min(g.k, n_r - i0))                         # real unshifted rows
  srows_avail = max(0, min(g.k, n_r - 1 - i0))                    # real shifted rows
  out = np.zeros((g.nb * g.tb, P, P, c), np.float32)

  def put(start: int, slab: np.ndarray, n_rows_avail: int, m: int) -> int:
    if m > 0 and n_rows_avail > 0:
      t = _tiles(slab, P)
      out[start:start + t.shape[0]] = t
    return start + g.k * m

  r0 = i0 * P
  a_slab = zp[r0:r0 + rows_avail * P, :g.n_c * P]
  pos = put(0, a_slab, rows_avail, g.n_c)
  if g.blend:
    pos = put(pos, a_slab[:, half:half + (g.n_c - 1) * P], rows_avail, g.n_c - 1)
    s_slab = zp[r0 + half:r0 + half + srows_avail * P, :g.n_c * P]
    pos = put(pos, s_slab, srows_avail, g.n_c)
    put(pos, s_slab[:, half:half + (g.n_c - 1) * P], srows_avail, g.n_c - 1)
  return out


def _untile(t: Array, k: int, m: int) -> Array:
  """[k*m, p, p, 3] -> [k*p, m*p, 3]."""
  _, p, _, ch = t.shape
  return t.reshape(k, m, p, p, ch).transpose(0, 2, 1, 3, 4).reshape(k * p, m * p, ch)


@functools.partial(jax.jit, static_argnames=('decode', 'g'))
def _band_program(params, tiles: Array, carry: Array, band: Array, n_r: Array,
                  windows: Array, *,
                  decode: DecodeFn, g: _Geometry) -> tuple[Array, Array]:
  """Decodes one band's tiles and blends them.

  Args:
    params: decoder params.
    tiles: [nb, tb, P, P, C] decoder-input latent tiles (layout of `_band_tiles_host`).
    carry: [2, p/2, n_c*p, ch] the previous band's bottom p/2 rows of the H and C
      canvases (zeros for the first band; their weight is 0 there).
    band: [] int32 band index.
    n_r: [] int32 tile rows of the padded latent.
    windows: [3, p, p] the 'vertical', 'horizontal', 'center' windows.
    decode: the pure decoder (static).
    g: geometry (static).

  Returns:
    (pixels [k*p, width, ch] float32 or uint8 (rows past the image are garbage, cropped
    by the caller), new carry).
  """
  p, k, n_c = g.p, g.k, g.n_c
  half = p // 2

  def decode_batch(t):                                            # [tb, P, P, C]
    x = decode(params, t).astype(jnp.float32) * g.out_scale + g.out_offset
    return x if g.clip is None else jnp.clip(x, *g.clip)          # [tb, p, p, ch]

  dec = jax.lax.map(decode_batch, tiles)                          # [nb, tb, p, p, ch]
  ch = dec.shape[-1]
  dec = dec.reshape(-1, p, p, ch)                                 # [nb*tb, p, p, ch]
  na, nv, nh, nc = g.counts
  a = _untile(dec[:na], k, n_c)                                   # [kp, Wp, ch]
  if g.blend:
    cols = ((0, 0), (half, half), (0, 0))
    v = jnp.pad(_untile(dec[na:na + nv], k, n_c - 1), cols)       # [kp, Wp, ch]
    hs = _untile(dec[na + nv:na + nv + nh], k, n_c)               # [kp, Wp, ch] rows +p/2
    cs = jnp.pad(_untile(dec[na + nv + nh:na + nv + nh + nc], k, n_c - 1), cols)
    # Shifted canvases on the band's rows: carried p/2 rows, then the fresh ones.
    h_band = jnp.concatenate([carry[0], hs[:k * p - half]], axis=0)   # [kp, Wp, ch]
    c_band = jnp.concatenate([carry[1], cs[:k * p - half]], axis=0)   # [kp, Wp, ch]
    new_carry = jnp.stack([hs[k * p - half:], cs[k * p - half:]])     # [2, p/2, Wp, ch]

    # Weights on the band, 0 where a shifted grid has no tile (then x*(1-0) + y*0 = x).
    y = band * (k * p) + jnp.arange(k * p)                        # [kp] global rows
    row_ok = ((y >= half) & (y < n_r * p - half)).astype(jnp.float32)[:, None]
    roll = lambda win: jnp.roll(win, -half, axis=0)               # row r <- (r + p/2) % p
    wv = jnp.pad(jnp.tile(windows[0], (k, n_c - 1)), cols[:2])   # [kp, Wp]
    wh = jnp.tile(roll(windows[1]), (k, n_c)) * row_ok           # [kp, Wp]
    wc = jnp.pad(jnp.tile(roll(windows[2]), (k, n_c - 1)), cols[:2]) * row_ok
    wv, wh, wc = wv[..., None], wh[..., None], wc[..., None]      # [kp, Wp, 1]
    img = a * (1 - wv) + v * wv
    if g.partition:
      # Blend the shifted-row decodes across columns with the same weights as the
      # unshifted ones, then the two across rows: weights (1-v)(1-h), v(1-h), (1-v)h, vh.
      img = img * (1 - wh) + (h_band * (1 - wv) + c_band * wv) * wh
    else:
      img = img * (1 - wh) + h_band * wh
      img = img * (1 - wc) + c_band * wc                          # [kp, Wp, ch]
  else:
    img, new_carry = a, carry
  img = img[:, :g.width]                                          # [kp, width, ch]
  if g.uint8:
    img = to_uint8(img)
  return img, new_carry


def _as_hwc(z) -> np.ndarray:
  z = np.asarray(z)
  if z.ndim == 4:
    if z.shape[0] != 1:
      raise ValueError(f'one latent at a time: expected [h, w, C] or [1, h, w, C], '
                       f'got {z.shape} (decode_image takes a batch)')
    z = z[0]
  if z.ndim != 3 or z.shape[0] < 1 or z.shape[1] < 1:
    raise ValueError(f'latent must be NHWC [1, h, w, C] or [h, w, C], got shape {z.shape}')
  return z


def _resolve(settings: TiledDecodeSettings | None, overrides: dict) -> TiledDecodeSettings:
  settings = settings or TiledDecodeSettings()
  return dataclasses.replace(settings, **overrides) if overrides else settings


def output_shape(z_shape: Sequence[int], settings: TiledDecodeSettings | None = None,
                 channels: int = 3) -> tuple[int, int, int]:
  """Image [H, W, channels] for a latent [.., h, w, C]."""
  s = settings or TiledDecodeSettings()
  return int(z_shape[-3]) * s.factor, int(z_shape[-2]) * s.factor, channels


@dataclasses.dataclass(frozen=True)
class FourShift:
  """The original's four shifted tilings, band by band (the module docstring);
  `partition`: the 'partition' weights instead of the original's in-place blend. With
  `settings.blend` False, the unshifted tiling alone."""
  partition: bool = False

  def passes_per_pixel(self, s: TiledDecodeSettings, h: int, w: int) -> float:
    P = s.latent_patch
    n_r, n_c = -(-h // P), -(-w // P)
    tiles = n_r * n_c if not s.blend else (2 * n_r - 1) * (2 * n_c - 1)
    return tiles * P * P / (h * w)

  def band_layout(self, s: TiledDecodeSettings, h: int, w: int) -> tuple[int, int]:
    g = _geometry(s, h, w, False)
    n_r = -(-h // s.latent_patch)                                  # tile rows
    return g.k * g.p, -(-n_r // g.k)

  def seam_lines(self, s: TiledDecodeSettings) -> tuple[tuple[int, int], ...]:
    return ((s.patch_size, 0),)                   # the unshifted grid's tile borders

  def tile_px(self, s: TiledDecodeSettings) -> int:
    return s.patch_size

  def iter_bands(self, decode: DecodeFn, params, z: np.ndarray, s: TiledDecodeSettings, *,
                 uint8: bool, bands: tuple[int, int] | None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    h, w, c = z.shape
    g = _geometry(s, h, w, uint8, self.partition)
    P = s.latent_patch
    n_r = -(-h // P)
    height = h * s.factor
    zp = base.pad_latent(z, n_r * P, g.n_c * P, s.pad_mode)       # [n_r P, n_c P, C]
    ch = base.check_tile_output(decode, params, (g.tb, P, P, c), s.factor)
    win = hann_windows(g.p)
    windows = jnp.stack([win['vertical'], win['horizontal'], win['center']])
    carry = jnp.zeros((2, g.p // 2, g.n_c * g.p, ch), jnp.float32)
    first, stop = base.band_range(bands, -(-n_r // g.k))
    if first == stop:
      return

    def dispatch(b, carry):
      tiles = _band_tiles_host(zp, g, P, n_r, b).reshape(g.nb, g.tb, P, P, c)
      return _band_program(params, tiles, carry, jnp.int32(b), jnp.int32(n_r), windows,
                           decode=decode, g=g)

    if first > 0:                            # the carry into `first` (pixels discarded)
      carry = dispatch(first - 1, carry)[1]
    pending = dispatch(first, carry)
    for b in range(first, stop):
      img, carry = pending
      if b + 1 < stop:                    # keep the device busy while the host consumes
        pending = dispatch(b + 1, carry)
      row0 = b * g.k * g.p
      rows = min(g.k * g.p, height - row0)
      yield row0, np.asarray(img[:rows])


# The strategy of each `blend_mode` name (the names are `decode_base.BLEND_MODES`).
BLENDS: dict[str, base.Blend] = {
    'original': FourShift(),
    'partition': FourShift(partition=True),
    'overlap': decode_overlap.Overlap(),
    'shared': decode_overlap.Overlap(shared_norm=True, margin=2, min_tile=512),
}
assert tuple(BLENDS) == BLEND_MODES


def blend_of(settings: TiledDecodeSettings) -> base.Blend:
  """The strategy that decodes with `settings` (`blend=False`: the unshifted tiles)."""
  return BLENDS[settings.blend_mode] if settings.blend else BLENDS['original']


def tile_px(settings: TiledDecodeSettings | None = None, **overrides) -> int:
  """The side in pixels of the tiles the decoder gets (the decoder call's shape): the
  settings' `patch_size`, or more for 'shared' (`min_tile`)."""
  s = _resolve(settings, overrides)
  return blend_of(s).tile_px(s)


def passes_per_pixel(z_shape: Sequence[int], settings: TiledDecodeSettings | None = None,
                     **overrides) -> float:
  """Decoder evaluations per output pixel for a latent [.., h, w, C]: tiles decoded x P^2
  / (h w). The four-shift modes: ~4 (A, V, H and C tiles); 'overlap': ~(P / (P - o))^2
  (1.31 at o = P/8) plus the edge tiles; 'shared': that plus its statistics tiles;
  `blend=False`: ~1."""
  s = _resolve(settings, overrides)
  return blend_of(s).passes_per_pixel(s, int(z_shape[-3]), int(z_shape[-2]))


def band_layout(z_shape: Sequence[int], settings: TiledDecodeSettings | None = None,
                **overrides) -> tuple[int, int]:
  """(pixel rows per band, number of bands) of `iter_decode_bands` for a latent
  [.., h, w, C] (the last band may be cut at the image's bottom)."""
  s = _resolve(settings, overrides)
  return blend_of(s).band_layout(s, int(z_shape[-3]), int(z_shape[-2]))


def iter_decode_bands(decode: DecodeFn, params, z, settings: TiledDecodeSettings | None = None,
                      *, uint8: bool = False, bands: tuple[int, int] | None = None,
                      **overrides) -> Iterator[tuple[int, np.ndarray]]:
  """Decodes one latent band by band (bounded memory; see the module docstring).

  Args:
    decode: pure `(params, z [B, P, P, C]) -> image [B, p, p, ch]` (e.g.
      `models.vae.decode_fn(config)`); it is traced once for `[tile_batch, P, P, C]`.
    params: its params.
    z: latent NHWC `[1, h, w, C]` or `[h, w, C]`, any h, w >= 1 (before latent scaling).
    settings: `TiledDecodeSettings`; keyword `overrides` replace its fields.
    uint8: yield uint8 pixels (`to_uint8`) instead of float32.
    bands: `(first, stop)`: only bands first .. stop-1 (see `band_layout`), e.g. one
      host's share of an image. A band's blend needs the bottom rows of the previous
      band's decodes, which depend on that band's tiles alone: they are decoded
      again (one extra band, not yielded), so the pixels equal the whole decode's.
      ('shared' also runs its statistics pass on every host: the same tiles, so the
      same statistics.)

  Yields:
    `(row_start, pixels [rows, 8w, ch])`, consecutive bands covering rows `0 .. 8h`
    (or those of `bands`).
  """
  s = _resolve(settings, overrides)
  z = s.decoder_input(_as_hwc(z))                                  # [h, w, C]
  yield from blend_of(s).iter_bands(decode, params, z, s, uint8=uint8, bands=bands)


def decode_image(decode: DecodeFn, params, z, settings: TiledDecodeSettings | None = None,
                 *, uint8: bool = False, **overrides) -> np.ndarray:
  """The whole image in memory: `[h, w, C] -> [8h, 8w, ch]`, `[B, h, w, C] -> [B, 8h, 8w, ch]`.

  Assembled from `iter_decode_bands`, so identical to streaming it.
  """
  s = _resolve(settings, overrides)
  z = np.asarray(z)
  if z.ndim == 4 and z.shape[0] != 1:
    return np.stack([decode_image(decode, params, zi, s, uint8=uint8) for zi in z])
  out = None
  for row0, band in iter_decode_bands(decode, params, z, s, uint8=uint8):
    if out is None:
      out = np.empty((s.factor * _as_hwc(z).shape[0],) + band.shape[1:], band.dtype)
    out[row0:row0 + band.shape[0]] = band
  return out[None] if z.ndim == 4 else out
