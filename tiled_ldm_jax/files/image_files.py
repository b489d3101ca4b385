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

import numpy as np
from PIL import Image

LABEL_FORMATS = ('PNG',)                 # label maps (masks) are PNGs of ids
PICTURE_FORMATS = ('PNG', 'JPEG', 'TIFF')   # training images, samples to score / preview
MAX_PIXELS = 1 << 31                     # a declared size above this is refused unread


def _printable(path) -> str:
  text = os.fspath(path)
  return text if text.isprintable() else repr(text)


PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def check_png_chunks(path, what: str = 'PNG') -> None:
  """Every chunk of a PNG inside the file and matching its CRC (Pillow does not check
  the CRCs of image data chunks, so a flipped byte could decode to other labels)."""
  name = _printable(path)
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
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


def open_image(path, formats=LABEL_FORMATS, *, what: str = 'image',
               max_pixels: int = MAX_PIXELS) -> Image.Image:
  """The decoded image (pixels loaded, file closed) of `path`, one of `formats`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: another format (named by its signature, whatever the file's name), a
      declared size over `max_pixels`, or a truncated / corrupt file.
  """
  name = _printable(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} not found: {name}')
  with open(path, 'rb') as f:
    if f.read(8) == PNG_SIGNATURE and 'PNG' in formats:
      check_png_chunks(path, what)
  limit = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = None   # ours decides below, from the declared size
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      with Image.open(path, formats=list(formats)) as img:
        w, h = img.size
        if w * h > max_pixels:
          raise ValueError(f'{name}: {what} declares {w} x {h} pixels; at most '
                           f'{max_pixels} are read')
        img.load()
        return img
  except ValueError:
    raise
  except Image.UnidentifiedImageError:
    raise ValueError(f'{name}: not a {" / ".join(formats)} file (the {what} formats read)'
                     ) from None
  except (OSError, SyntaxError, EOFError, Image.DecompressionBombError,
          MemoryError) as e:
    raise ValueError(f'{name}: cannot read the {what} ({type(e).__name__}: '
                     f'{" ".join(str(e).split())[:200]})') from None
  finally:
    Image.MAX_IMAGE_PIXELS = limit


def read_rgb(path, formats=PICTURE_FORMATS, *, what: str = 'image') -> np.ndarray:
  """uint8 [H, W, 3] of an image file (converted to RGB)."""
  return np.asarray(open_image(path, formats, what=what).convert('RGB'))
