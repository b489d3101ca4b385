"""Throughput of the image writers alone: megapixels per second, file size, peak RSS.

  python scripts/benchmark_writers.py --sizes 4096,16384
  python scripts/benchmark_writers.py --sizes 2048 --writers tiff_jpeg --workers 1

Each (writer, size) runs in its own subprocess (so peak RSS is that writer's) on a
synthetic image made band by band: smooth colour noise (random colours on a 48 px grid,
bilinear) plus a fixed +-6 grain, uint8 RGB. The bands are generated inside the timed
loop but their generation time is measured and subtracted: `mpix_per_s` is the writer's
(pyramid levels, compression, file I/O). Prints one JSON list.
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

WRITERS = ('tiff_jpeg', 'tiff_zlib', 'tiff_none', 'zarr')


class SyntheticBands:
  """`(row_start, uint8 [n, W, 3])` bands of an H x W image, and the seconds spent
  making them (to subtract from the writer's time)."""

  def __init__(self, height: int, width: int, band: int, cell: int = 48, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.height, self.width, self.band, self.cell = height, width, band, cell
    coarse = rng.integers(0, 256, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
    x = np.arange(width, dtype=np.float32) / cell
    x0 = x.astype(np.int64)
    wx = (x - x0)[None, :, None]
    # Interpolated along x once (uint8, [H / cell + 2, W, 3]); bands interpolate along y.
    self.coarse_x = np.rint(coarse[:, x0] * (1 - wx) + coarse[:, x0 + 1] * wx).astype(np.int16)
    self.grain = np.tile(rng.integers(-6, 7, (band, 512, 3), dtype=np.int16),
                         (1, -(-width // 512), 1))[:, :width]
    self.seconds = 0.0

  def _make(self, r0: int, n: int) -> np.ndarray:
    y = np.arange(r0, r0 + n)
    y0, k = y // self.cell, (y % self.cell)[:, None, None].astype(np.int16)
    img = (self.coarse_x[y0] * (self.cell - k) + self.coarse_x[y0 + 1] * k) // self.cell
    img += self.grain[:n]
    return np.clip(img, 0, 255).astype(np.uint8)

  def __iter__(self):
    for r0 in range(0, self.height, self.band):
      t = time.perf_counter()
      rows = self._make(r0, min(self.band, self.height - r0))
      self.seconds += time.perf_counter() - t
      yield r0, rows


def run_one(writer: str, size: int, band: int, tile: int, workers: int | None,
            out_dir: str, jpeg_quality: int) -> dict:
  from tiled_ldm_jax import ome_zarr  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax import writers  # pylint: disable=g-import-not-at-top
  bands = SyntheticBands(size, size, band)
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
  total = time.perf_counter() - start
  seconds = total - bands.seconds
  return {'writer': writer, 'size': size, 'megapixels': size * size / 1e6,
          'writer_seconds': round(seconds, 3), 'band_generation_seconds':
          round(bands.seconds, 3), 'mpix_per_s': round(size * size / 1e6 / seconds, 2),
          'bytes': nbytes, 'bytes_per_megapixel': round(nbytes / (size * size / 1e6)),
          'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
          'workers': workers or writers.default_workers(), 'tile': tile, 'band': band}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='4096', help='comma-separated square image sides')
  p.add_argument('--writers', default=','.join(WRITERS))
  p.add_argument('--band', type=int, default=512, help='rows per band handed to a writer')
  p.add_argument('--tile', type=int, default=256)
  p.add_argument('--workers', type=int, default=None, help='compression threads')
  p.add_argument('--jpeg_quality', type=int, default=90)
  p.add_argument('--out_dir', default=None, help='where files go (default: a temp dir)')
  p.add_argument('--keep', action='store_true', help='keep the files written')
  p.add_argument('--_one', nargs=2, metavar=('WRITER', 'SIZE'), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  out_dir = args.out_dir or tempfile.mkdtemp(prefix='bench_writers.')
  os.makedirs(out_dir, exist_ok=True)
  if args._one:  # pylint: disable=protected-access
    writer, size = args._one  # pylint: disable=protected-access
    print(json.dumps(run_one(writer, int(size), args.band, args.tile, args.workers,
                             out_dir, args.jpeg_quality)))
    return
  results = []
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
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    if not args.keep and not args.out_dir:
      shutil.rmtree(out_dir, ignore_errors=True)
  print(json.dumps({'cpus': os.cpu_count(), 'results': results}, indent=1))


if __name__ == '__main__':
  main()
