"""Rows of a TIFF's first page (full resolution), read segment by segment.

Used by the lazy label maps (`label_files.TiffLabels`) and the init images
(`large_images.TiffImage`): tiled and striped pages, any codec tifffile decodes, samples
interleaved (planar configuration 1). Opening reads only the page's header (of a regular
file: `reading.open_regular`) and checks, before any pixel is decoded, that every
segment lies inside the file and the budgets: the page's decoded bytes in total
(MAX_TOTAL_BYTES), a row of segments decoded at once (SEGMENT_ROW_BYTES, and a share of
the host's memory). `read_rows` decodes the segments a band of rows needs, each checked
first against its declared size whatever codec library decodes it: deflate and LZMA
are inflated with a cap (a 3 MB tile cannot become gigabytes), a JPEG tile's own header
must not declare more than the tile, and other codecs are bounded by their worst
expansion of the compressed bytes. JPEG segments (the command's own TIFF output, and
YCbCr, grayscale or marked RGB JPEG from other tools) are decoded with Pillow when
tifffile has no JPEG codec (it needs imagecodecs), so a default install reads them; any
other codec tifffile lacks is refused on opening, naming the package.
"""

from __future__ import annotations

import io
import lzma
import os
import struct
import zlib

import numpy as np

from tiled_ldm_jax.files import image_files
from tiled_ldm_jax.files import reading


MAX_SEGMENT_ROW_BYTES = 1 << 30   # a row of compressed segments decoded at once, at most
MAX_TOTAL_BYTES = 1 << 36         # the page decoded (64 GiB: a 150k px RGB slide)
MAX_LABEL_PIXELS = image_files.MAX_PIXELS * 8   # a label page (or Zarr labels) at most
_DEFLATE, _LZMA, _JPEG, _NONE = (8, 32946), 34925, (6, 7), 1
# Worst expansion of the compressed bytes for codecs not inflated with a cap here.
_WORST_RATIO = {32773: 128, 5: 4096}
_UNKNOWN_RATIO = 1 << 15
_OTHER_CODEC_FLOOR = 64 << 20     # a segment of such a codec may always take this much


def _jpeg_size(data: bytes):
  """(height, width) of a JPEG stream's frame header (SOFn), or None if it has none."""
  pos = 2 if data[:2] == b'\xff\xd8' else 0
  while pos + 4 <= len(data):
    if data[pos] != 0xFF:
      return None
    marker = data[pos + 1]
    if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
      pos += 2
      continue
    (length,) = struct.unpack('>H', data[pos + 2:pos + 4])
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
      if pos + 9 > len(data):
        return None
      return struct.unpack('>HH', data[pos + 5:pos + 9])
    if marker == 0xDA:
      return None
    pos += 2 + length
  return None


class TiffRows:
  """`.shape` ([H, W] or [H, W, S]), `.dtype`, `.read_rows(r0, r1)`."""

  def __init__(self, path):
    self.path = os.fspath(path)
    self.name = image_files._printable(path)  # pylint: disable=protected-access
    try:
      import tifffile  # pylint: disable=g-import-not-at-top  # only for TIFF input
    except ImportError:
      raise ValueError(f'{self.name}: reading TIFF needs tifffile (a dependency: pip '
                       f'install tifffile)') from None
    reading.kind(self.path, 'TIFF', allow=('file',))
    try:
      with reading.open_regular(self.path, 'TIFF') as fh, tifffile.TiffFile(fh, name=os.path.basename(self.path)) as tf:
        page = tf.pages[0]
        shape, dtype = tuple(page.shape), np.dtype(page.dtype)
        # int(): a damaged tag may hold several values (a tuple)
        self._segment = tuple(int(v) for v in ((page.tilelength, page.tilewidth)
                                               if page.is_tiled else
                                               (page.rowsperstrip, page.imagewidth)))
        samples, planar = int(page.samplesperpixel), int(page.planarconfig)
        ends = [int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts)]
        self._counts = [int(n) for n in page.databytecounts]
        # Uncompressed strips are read by byte ranges (a TIFF written without options
        # is one strip of the whole image: decoding it would hold the image).
        self._raw = (not page.is_tiled and int(page.compression) == 1
                     and int(page.predictor or 1) == 1 and np.dtype(page.dtype).itemsize
                     * 8 == int(page.bitspersample) and int(page.fillorder) == 1)
        self._byteorder = tf.byteorder
        self._compression = int(page.compression)
        compression, photometric = int(page.compression), int(page.photometric)
        decodable = _decodable(tifffile, compression)
        try:
          codec = tifffile.COMPRESSION(compression).name
        except ValueError:
          codec = str(compression)
    except Exception as e:  # pylint: disable=broad-except  # any parse failure: one line
      raise ValueError(f'{self.name}: not a readable TIFF ({str(e)[:120]})') from None
    # tifffile's JPEG decoder is imagecodecs; Pillow (libjpeg) stands in where libjpeg
    # infers the colour model right: YCbCr, grayscale, and RGB marked as such (checked per
    # segment: unmarked RGB JPEG, e.g. Aperio's, would be taken for YCbCr).
    self._pillow_jpeg = (not decodable and compression == 7 and photometric in (1, 2, 6)
                         and samples in (1, 3))
    self._photometric = photometric
    if not decodable and not self._pillow_jpeg:
      raise ValueError(f'{self.name}: its {codec} compression needs imagecodecs '
                       f'(pip install imagecodecs)')
    if samples > 1 and planar != 1:
      raise ValueError(f'{self.name}: samples stored as separate planes are not read '
                       f'(planar configuration {planar}); save it with interleaved samples')
    if len(shape) < 2 or min(shape) < 1 or shape[0] * shape[1] > MAX_LABEL_PIXELS:
      raise ValueError(f'{self.name}: a first page of shape {list(shape)} is not read')
    total = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if total > MAX_TOTAL_BYTES:
      raise ValueError(f'{self.name}: its first page {list(shape)} of {dtype} declares '
                       f'{total / 2 ** 30:,.0f} GiB decoded; at most '
                       f'{MAX_TOTAL_BYTES >> 30} GiB are read')
    size = os.path.getsize(self.path)
    if not ends or max(ends) > size:
      raise ValueError(f'{self.name}: truncated TIFF (image data runs past the end of the '
                       f'file)')
    self.shape, self.dtype = shape, dtype
    self._cache = {}
    self._samples = int(np.prod(shape[2:], dtype=int))
    th, tw = self._segment
    if th < 1 or tw < 1:
      raise ValueError(f'{self.name}: segments of {th} x {tw} pixels')
    # one segment decoded: its declared bytes (a stripe spans the width)
    self._tile_bytes = th * tw * self._samples * dtype.itemsize
    segment_bytes = th * (-(-shape[1] // tw) * tw) * self._samples * dtype.itemsize
    budget = min(MAX_SEGMENT_ROW_BYTES, reading.memory_budget(0.125))
    if not self._raw and segment_bytes > budget:
      raise ValueError(f'{self.name}: its compressed segments are {th} rows tall '
                       f'({segment_bytes / 2**20:,.0f} MiB per row of segments, decoded '
                       f'whole; at most {budget / 2 ** 20:,.0f} MiB here); save it with '
                       'tiles (e.g. 512 x 512)')

  def _segment_row(self, tf, ti: int) -> np.ndarray:
    """Segment row ti decoded, [rows, W, S] (cached until a band starts below it:
    bands of overlapping windows read each segment row several times)."""
    if ti in self._cache:
      return self._cache[ti]
    th, tw = self._segment
    h, w = self.shape[:2]
    page, fh = tf.pages[0], tf.filehandle
    rows = min(th, h - ti * th)
    out = np.zeros((rows, w, self._samples), self.dtype)
    per_row = -(-w // tw)
    for tj in range(per_row):
      index = ti * per_row + tj
      if not page.databytecounts[index]:      # a sparse segment: zeros, as tifffile
        continue
      fh.seek(page.dataoffsets[index])
      data = fh.read(page.databytecounts[index])
      self._check_segment(data, index)
      if self._pillow_jpeg:
        seg = _pillow_jpeg(data, page.jpegtables, self._segment, self._photometric == 2)
      else:
        seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
      seg = np.asarray(seg).reshape(seg.shape[-3], seg.shape[-2], seg.shape[-1])
      x0 = tj * tw
      out[:, x0:min(x0 + tw, w)] = seg[:rows, :min(tw, w - x0)]
    self._cache[ti] = out
    return out

  def segment_row_empty(self, ti: int) -> bool:
    """Whether every segment of segment row ti is sparse (no bytes: zeros)."""
    per_row = -(-self.shape[1] // self._segment[1])
    return not any(self._counts[ti * per_row:(ti + 1) * per_row])

  def _check_segment(self, data: bytes, index: int) -> None:
    """ValueError if segment `index` would decode to more than its declared bytes
    (module doc), before the codec allocates anything."""
    cap, comp = self._tile_bytes, self._compression
    over = None
    try:
      if comp in _DEFLATE:
        over = len(zlib.decompressobj().decompress(data, cap + 1)) > cap
      elif comp == _LZMA:
        over = len(lzma.LZMADecompressor().decompress(data, cap + 1)) > cap
    except (zlib.error, lzma.LZMAError, EOFError):
      return                   # damaged: the codec's own error says so
    if comp in _JPEG:
      size = _jpeg_size(data)
      over = size is not None and (size[0] > self._segment[0] or size[1] > self._segment[1])
    elif over is None and comp != _NONE:
      ratio = _WORST_RATIO.get(comp, _UNKNOWN_RATIO)
      over = len(data) * ratio > max(4 * cap, _OTHER_CODEC_FLOOR)
    if over:
      raise ValueError(f'segment {index} decodes to more than its declared '
                       f'{cap:,} bytes (a decompression bomb)')

  def _raw_rows(self, tf, r0: int, r1: int, out: np.ndarray) -> None:
    """Rows [r0, r1) of uncompressed strips by byte ranges into out [r1 - r0, W, S]."""
    th = self._segment[0]
    page, fh = tf.pages[0], tf.filehandle
    row_bytes = self.shape[1] * self._samples * self.dtype.itemsize
    dtype = self.dtype.newbyteorder(self._byteorder)
    for si in range(r0 // th, -(-r1 // th)):
      a, b = max(r0, si * th), min(r1, (si + 1) * th)
      fh.seek(page.dataoffsets[si] + (a - si * th) * row_bytes)
      data = fh.read((b - a) * row_bytes)
      if len(data) != (b - a) * row_bytes:
        raise ValueError('a strip is shorter than its rows')
      out[a - r0:b - r0] = np.frombuffer(data, dtype).reshape(b - a, *out.shape[1:])

  def read_rows(self, r0: int, r1: int) -> np.ndarray:
    """The rows [r0, r1) of the page, shape [r1 - r0, W] + the samples axis if any."""
    import tifffile  # pylint: disable=g-import-not-at-top
    th = self._segment[0]
    w = self.shape[1]
    out = np.zeros((r1 - r0, w, self._samples), self.dtype)
    first, last = r0 // th, -(-r1 // th)
    # Only this band's segment rows stay: memory is a band plus a segment row.
    self._cache = {k: v for k, v in self._cache.items() if first <= k < last}
    try:
      with reading.open_regular(self.path, 'TIFF') as fh, tifffile.TiffFile(fh, name=os.path.basename(self.path)) as tf:
        if self._raw:
          self._raw_rows(tf, r0, r1, out)
        else:
          for ti in range(first, last):
            seg = self._segment_row(tf, ti)
            y0 = ti * th
            a, b = max(r0, y0), min(r1, y0 + seg.shape[0])
            out[a - r0:b - r0] = seg[a - y0:b - y0]
    except Exception as e:  # pylint: disable=broad-except  # codecs raise their own types
      raise ValueError(f'{self.name}: cannot decode the rows {r0}-{r1} ({str(e)[:120]})'
                       ) from None
    return out.reshape((r1 - r0,) + tuple(self.shape[1:]))

  def release(self) -> None:
    """Drops the cached segment rows (after the last band)."""
    self._cache = {}


def _decodable(tifffile, compression: int) -> bool:
  """Whether tifffile has a decoder for `compression` (JPEG, LZW, ... need imagecodecs)."""
  return compression in tifffile.TIFF.DECOMPRESSORS


def _pillow_jpeg(data: bytes, tables: bytes | None, segment: tuple[int, int],
                 rgb: bool) -> np.ndarray:
  """A TIFF JPEG segment decoded by Pillow, [h, w, S] uint8 (libjpeg converts YCbCr);
  a frame larger than the `segment` (rows, columns), or RGB-coded (`rgb`: photometric
  RGB) with nothing that tells libjpeg so, is refused before decoding."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if tables:   # an abbreviated stream: the shared tables (SOI..EOI) go before its frame
    data = bytes(tables[:-2]) + bytes(data[2:])
  with Image.open(io.BytesIO(data)) as im:
    if im.format != 'JPEG':
      raise ValueError('a JPEG tile is not JPEG')
    if im.size[0] > segment[1] or im.size[1] > segment[0]:
      raise ValueError(f'a JPEG tile of {im.size[0]} x {im.size[1]} pixels in segments of '
                       f'{segment[1]} x {segment[0]}')
    # libjpeg takes 3 components for RGB after an Adobe marker or with the component
    # ids 'R', 'G', 'B' (what libtiff writes); otherwise for YCbCr.
    ids = ''.join(chr(c) if isinstance(c, int) else str(c) for c, *_ in im.layer)
    if rgb and 'adobe' not in im.info and ids != 'RGB':
      raise ValueError('RGB-coded JPEG that libjpeg would take for YCbCr needs imagecodecs '
                       '(pip install imagecodecs)')
    seg = np.asarray(im)
  return seg[..., None] if seg.ndim == 2 else seg
