"""RGB images read by rows: the init image (`--init_image`) at any size.

A source has `.shape` (H, W, 3), `.name` and `.read_rows(r0, r1) -> uint8 [r1 - r0, W, 3]`;
the tiled encode (`encode.py`) reads one band of windows at a time from it, so a slide
is never whole in memory. `open_rgb_source` chooses the reader by the file's contents,
never its name:

- a TIFF signature: the first page (full resolution) through `tiff_rows.TiffRows`, tiled
  or striped, uint8 RGB or RGBA (alpha dropped) or gray (repeated);
- a folder with an OME-Zarr image group (`.zattrs` with `multiscales`): level 0 through
  tensorstore, axes (.., c, y, x) as this library writes them (leading axes of size 1),
  uint8 with 1, 3 or 4 channels;
- anything else: PNG or JPEG, decoded whole by `image_files.read_rgb` (those formats have
  no random access to rows) and served from memory.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tiled_ldm_jax.files import image_files
from tiled_ldm_jax.files import label_files
from tiled_ldm_jax.files import tiff_rows


def _as_rgb(block: np.ndarray, name: str) -> np.ndarray:
  """[rows, W] or [rows, W, 1|3|4] uint8 -> [rows, W, 3]."""
  if block.ndim == 2:
    block = block[..., None]
  if block.shape[-1] == 1:
    return np.repeat(block, 3, axis=-1)
  if block.shape[-1] in (3, 4):
    return block[..., :3]
  raise ValueError(f'{name}: {block.shape[-1]} channels; RGB, RGBA or gray is read')


def _check_channels(shape, name: str) -> None:
  if len(shape) == 3 and shape[2] not in (1, 3, 4):
    raise ValueError(f'{name}: {shape[2]} channels; RGB, RGBA or gray is read')


class ArrayImage:
  """An image already in memory, uint8 [H, W, 3]."""

  def __init__(self, image, name: str = 'image'):
    self._image = np.asarray(image)
    if self._image.ndim != 3 or self._image.shape[-1] != 3 or self._image.dtype != np.uint8:
      raise ValueError(f'{name}: expected uint8 [H, W, 3], got {self._image.dtype} '
                       f'{list(self._image.shape)}')
    self.shape, self.name = self._image.shape, name

  def read_rows(self, r0: int, r1: int) -> np.ndarray:
    return self._image[r0:r1]


class TiffImage:
  """The first page of an RGB (or RGBA, or gray) uint8 TIFF, by rows."""

  def __init__(self, path):
    self._rows = tiff_rows.TiffRows(path)
    self.name = self._rows.name
    shape = self._rows.shape
    if self._rows.dtype != np.uint8:
      raise ValueError(f'{self.name}: an init image must be 8-bit, the TIFF holds '
                       f'{self._rows.dtype}')
    if len(shape) not in (2, 3):
      raise ValueError(f'{self.name}: a first page of shape {list(shape)} is not an image')
    _check_channels(shape, self.name)
    self.shape = (shape[0], shape[1], 3)

  def read_rows(self, r0: int, r1: int) -> np.ndarray:
    return _as_rgb(self._rows.read_rows(r0, r1), self.name)

  def release(self) -> None:
    self._rows.release()


def is_ome_zarr_image(path) -> bool:
  if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, '.zattrs')):
    return False
  try:
    with open(os.path.join(path, '.zattrs')) as f:
      return 'multiscales' in json.load(f)
  except (OSError, ValueError):
    return False


class ZarrImage:
  """Level 0 of an OME-Zarr image group, (.., c, y, x), by rows."""

  def __init__(self, path):
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    self.name = image_files._printable(path)  # pylint: disable=protected-access
    try:
      with open(os.path.join(path, '.zattrs')) as f:
        multiscale = json.load(f)['multiscales'][0]
      level0 = multiscale['datasets'][0]['path']
      if not isinstance(level0, str) or '/' in level0 or level0 in ('', '.', '..'):
        raise ValueError(f'bad dataset path {str(level0)[:40]!r}')
      axes = [a.get('name') if isinstance(a, dict) else a
              for a in multiscale.get('axes', [])]
      self._array = ts.open({'driver': 'zarr', 'kvstore': {
          'driver': 'file', 'path': os.path.join(path, level0)}}, open=True).result()
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
      raise ValueError(f'{self.name}: not a readable OME-Zarr image ({str(e)[:120]})'
                       ) from None
    shape = tuple(self._array.shape)
    if len(shape) < 2:
      raise ValueError(f'{self.name}: an image of shape {list(shape)} has no y, x axes')
    if axes and axes[-2:] != ['y', 'x']:
      raise ValueError(f'{self.name}: axes {axes} do not end in y, x')
    if len(shape) == 2:
      channels, lead = 1, 0
    else:
      channels, lead = shape[-3], len(shape) - 3
      if axes and len(axes) == len(shape) and axes[-3] != 'c':
        raise ValueError(f'{self.name}: axes {axes}: expected (.., c, y, x)')
    if any(d != 1 for d in shape[:lead]):
      raise ValueError(f'{self.name}: image of shape {list(shape)}: leading axes must have '
                       f'size 1')
    dtype = np.dtype(self._array.dtype.numpy_dtype)
    if dtype != np.uint8:
      raise ValueError(f'{self.name}: an init image must be 8-bit, the store holds {dtype}')
    _check_channels((0, 0, channels), self.name)
    self._lead, self._planar = lead, len(shape) > 2
    self.shape = (shape[-2], shape[-1], 3)

  def read_rows(self, r0: int, r1: int) -> np.ndarray:
    index = (0,) * self._lead + ((slice(None),) if self._planar else ()) + (slice(r0, r1),)
    try:
      block = np.asarray(self._array[index].read().result())
    except Exception as e:  # pylint: disable=broad-except  # a damaged chunk: one line
      raise ValueError(f'{self.name}: cannot read the rows {r0}-{r1} ({str(e)[:120]})'
                       ) from None
    return _as_rgb(np.moveaxis(block, 0, -1) if self._planar else block, self.name)


def open_rgb_source(path, *, what: str = 'init image'):
  """A row source for the image at `path` (module doc); ValueError / FileNotFoundError
  for what cannot be read."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{image_files._printable(path)}: no such file or folder')  # pylint: disable=protected-access
  if label_files.is_tiff(path):
    return TiffImage(path)
  if is_ome_zarr_image(path):
    return ZarrImage(path)
  return ArrayImage(image_files.read_rgb(path, formats=('PNG', 'JPEG'), what=what),
                    image_files._printable(path))  # pylint: disable=protected-access
