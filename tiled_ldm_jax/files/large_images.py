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

import os

import numpy as np

from tiled_ldm_jax.files import image_files
from tiled_ldm_jax.files import label_files
from tiled_ldm_jax.files import ome_zarr
from tiled_ldm_jax.files import reading
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
  """A folder with a `.zattrs` (or a Zarr v3 `zarr.json`): read as an OME-Zarr image
  (whose metadata errors are then named, not taken for another format)."""
  return os.path.isdir(path) and any(
      os.path.lexists(os.path.join(path, f)) for f in ('.zattrs', 'zarr.json'))


class ZarrImage:
  """Level 0 of an OME-Zarr image group, (.., c, y, x), by rows."""

  def __init__(self, path):
    self.name = image_files._printable(path)  # pylint: disable=protected-access
    array_path, axes = ome_zarr.level0(os.fspath(path), self.name)
    self._array, _ = ome_zarr.open_array(array_path, self.name)
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


class PillowImage(ArrayImage):
  """A PNG or JPEG: its header read when opened (`.shape`), its pixels decoded whole by
  `load()` (those formats have no random access to rows) -- after the caller's memory
  check, so a 20000 x 20000 PNG is refused from its header, never decoded."""

  def __init__(self, path, what: str):
    self.path, self.what = path, what
    self.name = image_files._printable(path)  # pylint: disable=protected-access
    d = image_files.declared(path, ('PNG', 'JPEG'), what=what)
    if d.bits > 8:
      raise ValueError(f'{self.name}: an {what} must be 8-bit, the {d.format} holds '
                       f'{d.bits}-bit samples (mode {d.mode}); convert it to 8-bit')
    self.shape = (d.height, d.width, 3)
    self._image = None

  def load(self) -> None:
    if self._image is None:
      image = image_files.read_rgb(self.path, formats=('PNG', 'JPEG'), what=self.what,
                                   eight_bit=True)
      if image.shape != self.shape:
        raise ValueError(f'{self.name}: decoded {list(image.shape)}, its header declares '
                         f'{list(self.shape)}')
      self._image = image

  def read_rows(self, r0: int, r1: int) -> np.ndarray:
    self.load()
    return self._image[r0:r1]

  def release(self) -> None:
    self._image = None


def open_rgb_source(path, *, what: str = 'init image'):
  """A row source for the image at `path` (module doc); ValueError / FileNotFoundError
  for what cannot be read. A PNG / JPEG is decoded on its first read (`load`)."""
  found = reading.kind(path, what)
  if found == 'folder':
    if is_ome_zarr_image(path):
      return ZarrImage(path)
    raise ValueError(f'{image_files._printable(path)}: a folder that is not an OME-Zarr '  # pylint: disable=protected-access
                     'image (no .zattrs)')
  if label_files.is_tiff(path):
    return TiffImage(path)
  return PillowImage(path, what)
