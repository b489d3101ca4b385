"""Reading latents saved as `.npy` (the only latent format read): the file's signature,
not its name, decides; the header is checked before any data is read (no pickles, a
plain float dtype, [h, w, C] or [1, h, w, C] with the channels the VAE takes, the data
exactly as long as the header says, a size within a budget), and every value must be
finite. Each failure is one `ValueError` line naming the file.
"""

from __future__ import annotations

import os

import numpy as np

NPY_MAGIC = b'\x93NUMPY'
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
MAX_LATENT_BYTES = 32 * 2 ** 30     # a 65536 x 65536 px image's float32 latent is 1 GiB


def _header(path: str, f):
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version in ((2, 0), (3, 0)):
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f'latent {path}: unsupported .npy version {version}')


def read_latent(path: str, channels: int, *, max_bytes: int | None = None) -> np.ndarray:
  """float32 [h, w, channels] from a `.npy` file (see the module docstring).

  `max_bytes`: the largest float32 latent read (default MAX_LATENT_BYTES, or a quarter
  of the available host memory if that is less: the decode needs a few copies)."""
  if max_bytes is None:
    from tiled_ldm_jax import memory  # pylint: disable=g-import-not-at-top
    avail = memory.host_available()
    max_bytes = MAX_LATENT_BYTES if avail is None else min(MAX_LATENT_BYTES, avail // 4)
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'latent not found: {path}')
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(len(NPY_MAGIC))
    if head != NPY_MAGIC:
      what = ('a .npz / zip archive' if head[:2] == b'PK' else f'starts with {head!r}')
      raise ValueError(f'latent {path}: not a .npy array ({what}); save one array with '
                       'numpy.save')
    f.seek(0)
    try:
      shape, fortran, dtype = _header(path, f)
    except ValueError as e:
      raise ValueError(f'latent {path}: bad .npy header ({" ".join(str(e).split())[:200]})'
                       ) from None
    offset = f.tell()
  if dtype.hasobject or dtype.fields is not None or dtype not in FLOAT_DTYPES:
    raise ValueError(f'latent {path}: dtype {dtype} is not a latent (float16/32/64)')
  if len(shape) == 4 and shape[0] == 1:
    shape = shape[1:]
  if len(shape) != 3 or shape[0] < 1 or shape[1] < 1:
    raise ValueError(f'latent {path}: shape {shape} is not [h, w, C] or [1, h, w, C]')
  if shape[2] != channels:
    raise ValueError(f'latent {path}: {shape[2]} channels, the VAE takes {channels}')
  nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
  if int(np.prod(shape, dtype=object)) * 4 > max_bytes:
    raise ValueError(f'latent {path}: declares {nbytes / 2 ** 30:.1f} GiB; at most '
                     f'{max_bytes / 2 ** 30:.1f} GiB (as float32) are read here')
  if size - offset != nbytes:
    raise ValueError(f'latent {path}: holds {size - offset} data bytes, its header '
                     f'declares {nbytes} (truncated or padded file)')
  data = np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=tuple(shape),
                   order='F' if fortran else 'C')
  out = np.empty(shape, np.float32)
  rows = max(1, (64 * 2 ** 20) // max(1, shape[1] * shape[2] * dtype.itemsize))
  for r in range(0, shape[0], rows):        # chunked: the check never holds two copies
    out[r:r + rows] = data[r:r + rows]
  del data
  if not np.isfinite(out).all():
    raise ValueError(f'latent {path}: holds NaN or inf values')
  return out
