"""Throughput of the image writers alone: megapixels per second, file size, peak RSS.

  python tools/benchmark_writers.py --sizes 4096,16384
  python tools/benchmark_writers.py --sizes 2048 --writers tiff_jpeg --workers 1

Each (writer, size) runs in its own subprocess (so peak RSS is that writer's, plus the
Python/jax imports and the input pool) on a synthetic uint8 RGB image: smooth colour
noise (random colours on a 48 px grid, bilinear) plus a +-6 grain, handed over in bands
of `--band` rows cycling through two distinct bands made before the clock starts, so
`mpix_per_s` is the writer's alone (pyramid levels, compression, file I/O). Prints JSON.
`--input=x.npy` writes a decoded image instead (e.g. `decode_latent.py --output=x.npy`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from tiled_ldm_jax import flag_util

WRITERS = ('tiff_jpeg', 'tiff_zlib', 'tiff_none', 'zarr')


class SyntheticBands:
  """`(row_start, uint8 [n, W, 3])` bands of an H x W image, cycling through a pool of
  `pool` distinct bands made up front, so the writer's time holds no image making (and
  the compression threads do not overlap with it). The pool is in the peak RSS."""

  def __init__(self, height: int, width: int, band: int, cell: int = 48, seed: int = 0,
               pool: int = 2):
    rng = np.random.default_rng(seed)
    self.height, self.band = height, band
    rows = band * pool
    coarse = rng.integers(0, 256, (rows // cell + 2, width // cell + 2, 3)).astype(np.float32)
    x = np.arange(width, dtype=np.float32) / cell
    x0 = x.astype(np.int64)
    wx = (x - x0)[None, :, None]
    self.pool = np.empty((rows, width, 3), np.uint8)
    for r0 in range(0, rows, 32):          # 32 rows at a time: small temporaries
      y = np.arange(r0, min(r0 + 32, rows), dtype=np.float32) / cell
      y0 = y.astype(np.int64)
      wy = (y - y0)[:, None, None]
      c = coarse[y0] * (1 - wy) + coarse[y0 + 1] * wy                 # [n, W/cell+2, 3]
      img = c[:, x0] * (1 - wx) + c[:, x0 + 1] * wx
      img += rng.integers(-6, 7, img.shape).astype(np.float32)        # grain
      self.pool[r0:r0 + len(y)] = np.clip(np.rint(img), 0, 255)
    self.pool = self.pool.reshape(pool, band, width, 3)
    self.pool_mib = self.pool.nbytes / 2 ** 20

  def __iter__(self):
    for i, r0 in enumerate(range(0, self.height, self.band)):
      yield r0, self.pool[i % len(self.pool)][:self.height - r0]


class FileBands:
  """`(row_start, uint8 rows)` bands of a raw [H, W, 3] .npy image (memory-mapped: a
  decoded image, e.g. `decode_latent.py --output=x.npy`); read before the clock starts."""

  def __init__(self, path: str, band: int):
    self.image = np.load(path, mmap_mode='r')
    self.band = band
    self.pool_mib = 0.0
    for r0 in range(0, len(self.image), band):    # into the page cache: time no disk reads
      np.asarray(self.image[r0:r0 + band]).sum()

  def __iter__(self):
    for r0 in range(0, len(self.image), self.band):
      yield r0, np.asarray(self.image[r0:r0 + self.band])


def run_one(writer: str, size: int, band: int, tile: int, workers: int | None,
            out_dir: str, jpeg_quality: int, source: str | None = None) -> dict:
  from tiled_ldm_jax.output import ome_zarr  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax.output import writers  # pylint: disable=g-import-not-at-top
  bands = FileBands(source, band) if source else SyntheticBands(size, size, band)
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  shape = (size, size, 3)
  start = time.perf_counter()
  if writer == 'zarr':
    path = os.path.join(out_dir, 'bench.zarr')
    ome_zarr.write_ome_zarr(path, bands, shape, tile=tile, mpp=0.5, workers=workers)
    nbytes = sum(os.path.getsize(os.path.join(d, f))
                 for d, _, files in os.walk(path) for f in files)
  else:
    path = os.path.join(out_dir, f'bench_{writer}.tif')
    writers.write_tiff(path, bands, shape, tile=tile, compression=writer.split('_')[1],
                       jpeg_quality=jpeg_quality, mpp=0.5, workers=workers)
    nbytes = os.path.getsize(path)
  seconds = time.perf_counter() - start
  return {'writer': writer, 'size': size, 'megapixels': size * size / 1e6,
          'writer_seconds': round(seconds, 3), 'input_pool_mib': round(bands.pool_mib, 1),
          'mpix_per_s': round(size * size / 1e6 / seconds, 2),
          'bytes': nbytes, 'bytes_per_megapixel': round(nbytes / (size * size / 1e6)),
          'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
          'peak_rss_before_writing_mib': round(rss_before, 1),
          'workers': workers or writers.default_workers(), 'tile': tile, 'band': band}


def _check(args) -> None:
  """Every argument, before any work (one `error:` line otherwise)."""
  try:
    for name, rule in (('sizes', 'ints>0'), ('band', 'int>0'), ('tile', 'int>0'),
                       ('workers', 'int>0'), ('jpeg_quality', 'int>0')):
      flag_util.check_value(name, getattr(args, name), rule)
  except ValueError as e:
    flag_util.fail(e)
  if args.jpeg_quality > 100:
    flag_util.fail(f'--jpeg_quality must be 1..100, got {args.jpeg_quality}')
  unknown = [w for w in args.writers.split(',') if w not in WRITERS]
  if unknown:
    flag_util.fail(f'--writers: unknown {unknown}; choose from {list(WRITERS)}')


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='4096', help='comma-separated square image sides')
  p.add_argument('--input', default=None, help='a square uint8 [H, W, 3] .npy image to write '
                 'instead of synthetic ones (--sizes is then its side)')
  p.add_argument('--writers', default=','.join(WRITERS))
  p.add_argument('--band', type=int, default=512, help='rows per band handed to a writer')
  p.add_argument('--tile', type=int, default=256)
  p.add_argument('--workers', type=int, default=None, help='compression threads')
  p.add_argument('--jpeg_quality', type=int, default=90)
  p.add_argument('--out_dir', default=None, help='where files go (default: a temp dir)')
  p.add_argument('--keep', action='store_true', help='keep the files written')
  p.add_argument('--_one', nargs=2, metavar=('WRITER', 'SIZE'), help=argparse.SUPPRESS)
  p.error = flag_util.fail      # argparse's usage message -> one `error:` line
  args = p.parse_args(argv)
  _check(args)
  out_dir = args.out_dir or tempfile.mkdtemp(prefix='bench_writers.')
  os.makedirs(out_dir, exist_ok=True)
  if args._one:  # pylint: disable=protected-access
    writer, size = args._one  # pylint: disable=protected-access
    print(json.dumps(run_one(writer, int(size), args.band, args.tile, args.workers,
                             out_dir, args.jpeg_quality, args.input)))
    return
  results = []
  if args.input:
    side = np.load(args.input, mmap_mode='r').shape
    if len(side) != 3 or side[0] != side[1] or side[2] != 3:
      raise SystemExit(f'error: --input must be a square [H, W, 3] image, got {side}')
    args.sizes = str(side[0])
  try:
    for size in (int(s) for s in args.sizes.split(',')):
      for writer in args.writers.split(','):
        if writer not in WRITERS:
          raise SystemExit(f'unknown writer {writer!r}: {WRITERS}')
        cmd = [sys.executable, __file__, '--_one', writer, str(size), '--band',
               str(args.band), '--tile', str(args.tile), '--jpeg_quality',
               str(args.jpeg_quality), '--out_dir', out_dir]
        if args.workers:
          cmd += ['--workers', str(args.workers)]
        if args.input:
          cmd += ['--input', args.input]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    if not args.keep and not args.out_dir:
      shutil.rmtree(out_dir, ignore_errors=True)
  print(json.dumps({'cpus': os.cpu_count(), 'results': results}, indent=1))


if __name__ == '__main__':
  main()
