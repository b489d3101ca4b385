"""Several processes decode and write ONE image together (multi-host runs whose batch is
smaller than the process count, e.g. one whole slide on many hosts).

Bands (`decode.band_layout`) are the unit of work; a process decodes bands `first ..
stop-1` with `iter_decode_bands(bands=...)`, which rebuilds the carry into `first` from
the band before it, so every pixel equals the single-process decode.

- OME-Zarr (`write_zarr`): each process takes one contiguous range of bands, split at
  multiples of the chunk side so no two processes write the same chunk, and writes level
  0 of its rows (image and labels) into the store process 0 created. After a barrier,
  process 0 builds the lower levels from level 0 and renames the store. Needs a file
  system all processes see (they write one store). Extra decode: one band per process.
- TIFF (`write_tiff`; one file, one writer): blocks of G consecutive bands go to the
  processes round-robin; each round every process decodes its block and an all-gather
  brings the P blocks to every process; process 0 writes them in order. Memory: P * G
  bands per process; extra decode: one band per block, so G is as large as
  `TIFF_BLOCK_ROWS` allows while still giving every process a block.

Every process must call these with the same arguments (they run collectives); the
collectives are passed in (`barrier(name)`, `allgather(array) -> [P, ...]`) so tests
can run the processes as threads. The writers write, they do not decode: the image comes
as a `BandSource` (its band layout and a function that yields the decoded rows of a band
range, e.g. `Pipeline.band_source`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import numpy as np

from tiled_ldm_jax.output import ome_zarr
from tiled_ldm_jax.output import writers

TIFF_BLOCK_ROWS = 2048   # target pixel rows per process block of the TIFF gather


@dataclasses.dataclass(frozen=True)
class BandSource:
  """A decoded image by bands: `decode((first, stop))` yields (row0, uint8 rows [r, W, 3])
  of bands first .. stop-1, each band `band_rows` pixel rows (the last may be shorter)."""
  shape: tuple[int, int]       # (H, W) pixels
  band_rows: int
  n_bands: int
  decode: Callable[[tuple[int, int]], Iterator[tuple[int, np.ndarray]]]


def split_ranges(n_bands: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
  """`parts` contiguous band ranges covering 0..n_bands, each starting at a multiple of
  `unit` bands, as even as whole units allow (trailing ranges may be empty)."""
  units = -(-n_bands // unit)
  bounds = [min(n_bands, (units * i // parts) * unit) for i in range(parts + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def write_zarr(image: BandSource, labels: np.ndarray, path: str, *, mpp=None,
               tile: int = writers.DEFAULT_TILE, process_index: int, process_count: int,
               barrier) -> None:
  """The OME-Zarr store of `image` and its label ids [H, W], written by all (`tile`: the
  chunk side)."""
  height, width = labels.shape
  band_rows, n_bands = image.band_rows, image.n_bands
  unit = math.lcm(band_rows, tile) // band_rows     # bands per chunk-aligned unit
  first, stop = split_ranges(n_bands, process_count, unit)[process_index]
  labels_dtype = np.uint8 if int(labels.max(initial=0)) < 256 else np.uint16
  if process_index == 0:
    ome_zarr.create_store(path, (height, width, 3), tile=tile, mpp=mpp,
                          labels_dtype=labels_dtype)
  barrier('tiled_ldm_jax.output.shared_writer.zarr_created')
  store = ome_zarr.temp_store_path(path)
  if first < stop:
    ome_zarr.write_bands(store, image.decode((first, stop)), levels=1)
    r0, r1 = first * band_rows, min(stop * band_rows, height)
    ome_zarr.write_bands(store, ((r, labels[r:min(r + tile, r1)])
                                 for r in range(r0, r1, tile)), array='labels', levels=1)
  barrier('tiled_ldm_jax.output.shared_writer.zarr_written')
  if process_index == 0:
    ome_zarr.build_levels(store, 0)
    ome_zarr.build_levels(store, 0, array='labels')
    ome_zarr.finalize(store, path)


def tiff_blocks(n_bands: int, band_rows: int, process_count: int) -> int:
  """G, the bands per block of the TIFF gather."""
  return max(1, min(-(-TIFF_BLOCK_ROWS // band_rows), -(-n_bands // process_count)))


def gathered_bands(image: BandSource, *, process_index: int, process_count: int,
                   allgather):
  """Every band of the image, in order, on every process; each decodes 1/P of them."""
  band_rows, n_bands = image.band_rows, image.n_bands
  height, width = image.shape
  g = tiff_blocks(n_bands, band_rows, process_count)
  n_blocks, block_rows = -(-n_bands // g), g * band_rows
  for r in range(-(-n_blocks // process_count)):
    mine = r * process_count + process_index
    local = np.zeros((block_rows, width, 3), np.uint8)     # the same shape everywhere
    if mine < n_blocks:
      bands = (mine * g, min(n_bands, (mine + 1) * g))
      for row0, rows in image.decode(bands):
        local[row0 - mine * block_rows:][:rows.shape[0]] = rows
    every = np.asarray(allgather(local))                    # [P, block_rows, W, 3]
    for p in range(process_count):
      j = r * process_count + p
      row0 = j * block_rows
      if j < n_blocks and row0 < height:
        yield row0, every[p][:height - row0]


def write_tiff(image: BandSource, path: str, *, process_index: int, process_count: int,
               allgather, **tiff_kw) -> None:
  """The pyramidal TIFF of `image`: all decode, process 0 writes."""
  bands = gathered_bands(image, process_index=process_index, process_count=process_count,
                         allgather=allgather)
  if process_index == 0:
    writers.write_tiff(path, bands, image.shape + (3,), **tiff_kw)
  else:
    for _ in bands:     # the same collectives as the writer
      pass
