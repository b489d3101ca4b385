"""Slide training data, measured (docs/training.md): tiles per second through the grain
loader from a pyramidal TIFF against the same tiles from a folder of PNGs, and the class
shares of drawn tiles against the annotated areas.

  python tools/benchmark_slides.py --out=/tmp/slides_bench [--side=8192] [--tiles=320]

The slide: a synthetic histology-like image (training/data.py) made at side / 4 and
upscaled 4x (bilinear; the labels nearest), on glass outside a disc, written by our own
TIFF writer (output/writers.py, JPEG tiles, mpp 0.5 recorded) with its GeoJSON
(output/geojson.py) -- sampling an 8192 px slide with the demo models takes hours on a
CPU, writing this one seconds. Prints one JSON line per measurement.
"""

import json
import os
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

try:   # the lazy label map's home (it moved from masks.py to files/label_maps.py)
  from tiled_ldm_jax.files import label_maps
except ImportError:
  from tiled_ldm_jax import masks as label_maps
from tiled_ldm_jax.output import geojson as geojson_out
from tiled_ldm_jax.output import writers
from tiled_ldm_jax.training import data
from tiled_ldm_jax.training import loader as loader_lib
from tiled_ldm_jax.training import slides

_OUT = flags.DEFINE_string('out', None, 'Working folder (slide, PNG tiles).')
_SIDE = flags.DEFINE_integer('side', 8192, 'Slide side in pixels (level 0, 0.5 um/px).')
_TILE = flags.DEFINE_integer('tile', 256, 'Tile side in pixels.')
_TILES = flags.DEFINE_integer('tiles', 320, 'Tiles read per throughput measurement.')
_DRAWS = flags.DEFINE_integer('draws', 10000, 'Tiles drawn for the class shares.')
_SHARE_TILE = flags.DEFINE_integer('share_tile', 64, 'Tile side of the class-share draws.')
_THREADS = flags.DEFINE_integer('threads', 2, 'grain loader worker threads.')
BATCH = 8


def make_slide(folder: str, side: int):
  small = side // 4
  ex = data.synth_example(7, small, data.SynthSpec(region_size=small / 24))
  img, lab = ex.image, ex.labels.astype(np.uint8)
  yy, xx = np.mgrid[0:small, 0:small]
  glass = (yy - small / 2) ** 2 + (xx - small / 2) ** 2 > (0.45 * small) ** 2
  img = np.where(glass[..., None], 0.96, img)
  lab = np.where(glass, 0, lab).astype(np.uint8)
  big = Image.fromarray((img * 255).astype(np.uint8))

  def bands(rows=256):
    for r in range(0, side, rows):
      band = big.resize((side, rows), Image.BILINEAR, box=(0, r / 4, small, (r + rows) / 4))
      yield r, np.asarray(band)
  path = os.path.join(folder, 'slide.tif')
  t = time.perf_counter()
  writers.write_tiff(path, bands(), (side, side, 3), mpp=0.5)
  labels = label_maps.LabelMap(lab, (side, side))
  geo = os.path.join(folder, 'slide_mask.geojson')
  t1 = time.perf_counter()
  geojson_out.write_geojson(geo, labels)
  print(json.dumps({'slide': path, 'side': side, 'tiff_s': round(t1 - t, 1),
                    'geojson_s': round(time.perf_counter() - t1, 1),
                    'tiff_mb': round(os.path.getsize(path) / 2 ** 20, 1),
                    'geojson_mb': round(os.path.getsize(geo) / 2 ** 20, 2)}))
  manifest = os.path.join(folder, 'slides.csv')
  with open(manifest, 'w') as f:
    f.write('slide,annotations\nslide.tif,slide_mask.geojson\n')
  return manifest, lab, glass


def rate(example, n: int) -> float:
  """Tiles per second through the grain loader (2 threads), first batch excluded."""
  steps = n // BATCH + 1
  it = loader_lib.Loader(example, BATCH, steps, process_index=0, process_count=1,
                         num_threads=_THREADS.value).iterator()
  next(it)
  t = time.perf_counter()
  for _ in range(steps - 1):
    next(it)
  return (steps - 1) * BATCH / (time.perf_counter() - t)


def main(argv):
  del argv
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  manifest, lab, glass = make_slide(out, _SIDE.value)
  entries = slides.read_manifest(manifest)
  tile = _TILE.value
  for mpp in (0.5, 1.0):
    src = slides.SlideSource(entries, tile, BATCH, 0, mpp=mpp, augment=False)
    example = lambda s, r, src=src: data.record(src.step_example(s, r), True)
    print(json.dumps({'what': 'slide tiles/s', 'mpp': mpp, 'tile': tile,
                      'threads': _THREADS.value, 'tiles_per_s': round(rate(example,
                                                                          _TILES.value), 1)}))
    # The same tiles as a folder of PNGs (name.png + name_mask.png), read whole.
    folder = os.path.join(out, f'png_{mpp}')
    os.makedirs(folder, exist_ok=True)
    n = (_TILES.value // BATCH + 1) * BATCH
    for k in range(n):
      ex = src.step_example(k // BATCH, k % BATCH)
      Image.fromarray(np.round(ex.image * 255).astype(np.uint8)).save(
          os.path.join(folder, f't{k:05d}.png'))
      label_maps.write_label_png(os.path.join(folder, f't{k:05d}_mask.png'), ex.labels)
    fsrc = data.FolderSource(folder, tile, BATCH, 0, augment_data=False)
    example = lambda s, r, fsrc=fsrc: data.record(fsrc.step_example(s, r), True)
    print(json.dumps({'what': 'PNG folder tiles/s', 'mpp': mpp, 'tile': tile,
                      'threads': _THREADS.value, 'tiles_per_s': round(rate(example,
                                                                          _TILES.value), 1)}))
  # Class shares: areas annotated on tissue vs the tiles drawn (labels only).
  tissue_lab = lab[~glass]
  ids = sorted(int(i) for i in np.unique(tissue_lab))
  area = {i: float((tissue_lab == i).mean()) for i in ids}
  for balance in (1.0, 0.0):
    src = slides.SlideSource(entries, _SHARE_TILE.value, BATCH, 0, mpp=1.0, downscale=1,
                             with_images=False, augment=False, class_balance=balance)
    drawn = np.zeros(max(ids) + 1)
    pixels = np.zeros(max(ids) + 1)
    t = time.perf_counter()
    for k in range(_DRAWS.value):
      ex = src.step_example(k // BATCH, k % BATCH)
      drawn[src.draw(k // BATCH, k % BATCH)[3]] += 1
      pixels += np.bincount(ex.labels.ravel(), minlength=len(pixels))[:len(pixels)]
    print(json.dumps({
        'what': 'class shares', 'class_balance': balance, 'draws': _DRAWS.value,
        'seconds': round(time.perf_counter() - t, 1),
        'annotated_tissue_area': {i: round(area[i], 3) for i in ids},
        'grid_candidate_area': {c: round(a / src.areas.sum(), 3)
                                for c, a in zip(src.classes, src.areas)},
        'centre_class': {i: round(drawn[i] / drawn.sum(), 3) for i in ids},
        'tile_pixels': {i: round(pixels[i] / pixels.sum(), 3) for i in ids}}))


if __name__ == '__main__':
  flags.mark_flag_as_required('out')
  app.run(main)
