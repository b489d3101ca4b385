"""Reading image files safely: the format from the file's signature, among the formats a
caller documents (never every format Pillow knows: EPS/PostScript would be handed to
Ghostscript), the declared size checked before any pixel is decoded, and every failure
one `ValueError` line naming the file.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from typing import NamedTuple

import numpy as np
from PIL import Image

from tiled_ldm_jax.files import reading

LABEL_FORMATS = ('PNG',)                 # label maps (masks) are PNGs of ids
PICTURE_FORMATS = ('PNG', 'JPEG', 'TIFF')   # training images, samples to score / preview
MAX_PIXELS = 1 << 31                     # a declared size above this is refused unread


def _printable(path) -> str:
  return reading.printable(path)


PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def check_png_chunks(path, what: str = 'PNG') -> None:
  """Every chunk of a PNG inside the file and matching its CRC (Pillow does not check
  the CRCs of image data chunks, so a flipped byte could decode to other labels)."""
  name = _printable(path)
  with reading.open_regular(path, what) as f:
    size = os.fstat(f.fileno()).st_size
    if f.read(8) != PNG_SIGNATURE:
      raise ValueError(f'{name}: not a PNG file (the {what} format read)')
    pos = 8
    while True:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f'{name}: truncated {what} (no IEND chunk)')
      length, kind = struct.unpack('>I4s', head)
      if pos + 12 + length > size:
        raise ValueError(f'{name}: truncated {what} (chunk {kind!r} runs past the end)')
      crc = zlib.crc32(kind)
      left = length
      while left:
        block = f.read(min(left, 1 << 20))
        crc = zlib.crc32(block, crc)
        left -= len(block)
      (stored,) = struct.unpack('>I', f.read(4))
      if stored != crc:
        raise ValueError(f'{name}: corrupt {what} (chunk {kind!r} fails its CRC)')
      pos += 12 + length
      if kind == b'IEND':
        return


# Bytes per pixel Pillow holds for a decoded image of each mode (unlisted modes: 4).
_MODE_BYTES = {'1': 1, 'L': 1, 'P': 1, 'LA': 2, 'PA': 2, 'RGB': 3, 'YCbCr': 3, 'LAB': 3,
               'HSV': 3, 'RGBA': 4, 'RGBX': 4, 'CMYK': 4, 'I;16': 2, 'I;16L': 2,
               'I;16B': 2, 'I;16N': 2}


class Declared(NamedTuple):
  """What a file's header says, before any pixel is decoded."""
  format: str
  height: int
  width: int
  mode: str
  bits: int     # bits per sample (PNG: from IHDR; else 8 or 16 from the mode)


def _open(path, f, formats, what):
  """Pillow's lazy image of the open file `f` (header read only)."""
  name = _printable(path)
  try:
    return Image.open(f, formats=list(formats))
  except Image.UnidentifiedImageError:
    raise ValueError(f'{name}: not a {" / ".join(formats)} file (the {what} formats read)'
                     ) from None
  except (OSError, SyntaxError, EOFError, ValueError, struct.error) as e:
    raise ValueError(f'{name}: cannot read the {what} header ({type(e).__name__}: '
                     f'{" ".join(str(e).split())[:200]})') from None


def _declared(img: Image.Image, head: bytes) -> Declared:
  bits = 16 if img.mode.startswith('I;16') or img.mode == 'I' else 8
  if head[:8] == PNG_SIGNATURE and head[12:16] == b'IHDR':
    bits = head[24]
  w, h = img.size
  return Declared(img.format or '', h, w, img.mode, bits)


def declared(path, formats=PICTURE_FORMATS, *, what: str = 'image') -> Declared:
  """The format, size and mode a file's header declares; nothing decoded."""
  with reading.open_regular(path, what) as f:
    head = f.read(32)
    f.seek(0)
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
      try:
        with _open(path, f, formats, what) as img:
          return _declared(img, head)
      finally:
        Image.MAX_IMAGE_PIXELS = limit


def open_image(path, formats=LABEL_FORMATS, *, what: str = 'image',
               max_pixels: int = MAX_PIXELS, copies: int = 2,
               budget: int | None = None) -> Image.Image:
  """The decoded image (pixels loaded, file closed) of `path`, one of `formats`.

  The declared size is checked before any pixel is decoded: at most `max_pixels`, and
  the decoded image times `copies` (the caller's conversions) within `budget` bytes
  (`reading.memory_budget()` by default).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a regular file, another format (named by its signature, whatever the
      file's name), a declared size over the budgets, or a truncated / corrupt file.
  """
  name = _printable(path)
  reading.kind(path, what, allow=('file',))
  with reading.open_regular(path, what) as f:
    head = f.read(32)
  if head[:8] == PNG_SIGNATURE and 'PNG' in formats:
    check_png_chunks(path, what)
  limit = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = None   # ours decides below, from the declared size
  try:
    with warnings.catch_warnings(), reading.open_regular(path, what) as f:
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      with _open(path, f, formats, what) as img:
        w, h = img.size
        if w * h > max_pixels:
          raise ValueError(f'{name}: {what} declares {w} x {h} pixels; at most '
                           f'{max_pixels} are read')
        reading.check_bytes(name, f'{what} ({w} x {h}, mode {img.mode})',
                            w * h * _MODE_BYTES.get(img.mode, 4) * copies, budget)
        img.load()
        return img
  except ValueError:
    raise
  except (OSError, SyntaxError, EOFError, Image.DecompressionBombError,
          MemoryError, struct.error) as e:
    raise ValueError(f'{name}: cannot read the {what} ({type(e).__name__}: '
                     f'{" ".join(str(e).split())[:200]})') from None
  finally:
    Image.MAX_IMAGE_PIXELS = limit


def read_rgb(path, formats=PICTURE_FORMATS, *, what: str = 'image',
             eight_bit: bool = False) -> np.ndarray:
  """uint8 [H, W, 3] of an image file (converted to RGB). 16-bit gray is scaled to 8
  bits (Pillow's convert would clip it), or refused with `eight_bit` (as is a 16-bit
  PNG of any colour type: the init image reader takes 8-bit files only, as from TIFF)."""
  img = open_image(path, formats, what=what, copies=3)
  if eight_bit:
    with reading.open_regular(path, what) as f:
      head = f.read(32)
    bits = _declared(img, head).bits
    if bits > 8:
      raise ValueError(f'{_printable(path)}: an {what} must be 8-bit, the {img.format} '
                       f'holds {bits}-bit samples (mode {img.mode}); convert it to 8-bit')
  if img.mode.startswith('I;16') or img.mode == 'I':
    gray = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  return np.asarray(img.convert('RGB'))
