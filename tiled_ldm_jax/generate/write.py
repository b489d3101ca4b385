"""A sample's files: the decoded image in the run's format, its label map, its record.

The decode decodes (the `Pipeline`'s `decode`, `iter_decode`, `band_source`); this
module writes what it yields: whole for PNG/JPEG, band by band for TIFF / OME-Zarr, with
an overview JPEG of a slide and its labels as QuPath GeoJSON beside a TIFF. Every file is
written under a temporary name and renamed when complete (`files/atomic.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from absl import logging
import jax
import numpy as np

from tiled_ldm_jax import masks as masks_lib
from tiled_ldm_jax import progress
from tiled_ldm_jax import sharding
from tiled_ldm_jax.files import atomic
from tiled_ldm_jax.files import geojson_labels
from tiled_ldm_jax.files import label_maps
from tiled_ldm_jax.generate import config as config_lib
from tiled_ldm_jax.generate.config import GenerationConfig
from tiled_ldm_jax.generate.inputs import Plan
from tiled_ldm_jax.output import geojson as geojson_out
from tiled_ldm_jax.output import ome_zarr
from tiled_ldm_jax.output import shared_writer
from tiled_ldm_jax.output import writers


def shares_decode(cfg: GenerationConfig, batch: int) -> bool:
  """Whether all processes decode and write each image of a batch together
  (`output/shared_writer.py`): TIFF / OME-Zarr batches smaller than the process count."""
  return batch < jax.process_count() and cfg.output_format in ('tiff', 'zarr')


def write_sample(plan: Plan, number: int, z, labels: label_maps.LabelMap, record: dict,
                  mine: bool = True, shared: bool = False) -> dict:
  """Decodes one latent (bands for TIFF/Zarr, whole otherwise), writes image, mask, JSON.

  Multi-process: image j of a batch is decoded and written by process j % P (`mine`); no
  collective runs then, so the processes stay in step whatever each one writes. With
  `shared` (`shares_decode`) every process decodes its share of the bands of this image
  and process 0 writes what is not per process (mask, JSON).
  """
  cfg = plan.cfg
  base, image_path, mask_file = config_lib.sample_files(cfg, number)
  record['files'] = {'image': os.path.basename(image_path),
                     'mask': os.path.relpath(mask_file, cfg.imgs_path)}
  # A slide is too large to glance at: a small JPEG of it beside its labels.
  overview = base + '_overview.jpg' if cfg.output_format in ('tiff', 'zarr') and not shared \
      else None
  if overview:
    record['files']['overview'] = os.path.basename(overview)
  if cfg.live_preview_minutes:
    record['files']['live_preview'] = os.path.basename(base + '_live.png')
  start = time.perf_counter()
  if shared:
    _write_shared(plan, z, labels, image_path)
    mine = sharding.is_writer()
  if not mine:
    return record
  annotations = _annotations_path(cfg, image_path, record, labels)
  if shared or cfg.output_format == 'zarr':
    if not shared:   # the store is renamed into place by its writer; mask inside it
      _write_image(plan, z, labels, image_path, overview)
    if cfg.output_format != 'zarr':
      writers.write_labels(mask_file, labels)
      _write_annotations(cfg, annotations, labels)
    record['seconds']['decode_and_write'] = time.perf_counter() - start
    with atomic.atomic_path(base + '.json') as tmp:   # last: marks a complete sample
      _dump_record(tmp, record)
    return record
  # Image, mask and JSON are all written under temporary names first and renamed only
  # once all three are whole (the JSON last): a failure (a full disk, a kill) leaves
  # none of a sample's files, never an image without its mask or record.
  with atomic.atomic_path(base + '.json') as tmp_json, \
      atomic.atomic_path(mask_file) as tmp_mask, atomic.atomic_path(image_path) as tmp_image, \
      (atomic.atomic_path(overview) if overview else contextlib.nullcontext()) as tmp_view, \
      (atomic.atomic_path(annotations) if annotations else contextlib.nullcontext()) as tmp_geo:
    _write_image(plan, z, labels, tmp_image, tmp_view)
    writers.write_labels(tmp_mask, labels)
    _write_annotations(cfg, tmp_geo, labels, atomic_write=False)
    record['seconds']['decode_and_write'] = time.perf_counter() - start
    _dump_record(tmp_json, record)
  return record


def _annotations_path(cfg: GenerationConfig, image_path: str, record: dict,
                      labels) -> str | None:
  """A TIFF slide's labels as QuPath GeoJSON beside it (`output/geojson.py`): the slide
  opens in QuPath with its annotations, and is training data (docs/training.md). A map
  too large to trace is skipped with a warning, not a failed sample."""
  if cfg.output_format != 'tiff':
    return None
  if not geojson_out.traceable(labels):
    logging.warning('%s: the label map is too large to write as GeoJSON; skipped',
                    os.path.basename(image_path))
    return None
  path = geojson_out.geojson_path(image_path)
  record['files']['annotations'] = os.path.basename(path)
  return path


def _write_annotations(cfg: GenerationConfig, path: str | None, labels, **kw) -> None:
  if path:
    classes = geojson_labels.parse_classes(cfg.mask_classes) if cfg.mask_classes else None
    geojson_out.write_geojson(path, labels, classes, **kw)


def _dump_record(path: str, record: dict) -> None:
  with open(path, 'w') as f:
    json.dump(record, f, indent=1, default=str)


OVERVIEW_SIDE = 1024   # px, the longer side of each half of `sampleNNNN_overview.jpg`


class _Overview:
  """Every k-th row and column of the image as its bands stream by (a slide is never
  held whole), written with the labels' colours beside it (`masks.preview`)."""

  def __init__(self, h: int, w: int):
    self.k = max(1, -(-max(h, w) // OVERVIEW_SIDE))
    self.parts = []

  def tap(self, bands):
    for row0, rows in bands:
      self.parts.append(np.array(rows[(-row0) % self.k::self.k, ::self.k]))
      yield row0, rows

  def write(self, path: str, labels) -> None:
    image = writers.as_uint8(np.concatenate(self.parts))
    lab = np.concatenate([np.asarray(labels[r:r + 1])[:, ::self.k]
                          for r in range(0, labels.shape[0], self.k)])
    writers.write_image(path, masks_lib.preview(image, lab, 2 * image.shape[1] + 8),
                        quality=85)


def _write_image(plan: Plan, z, labels: label_maps.LabelMap, image_path: str,
                 overview_path: str | None = None) -> None:
  """One process: this image in the run's format (bands for TIFF/Zarr, whole otherwise),
  and its overview JPEG (TIFF/Zarr) if `overview_path`."""
  cfg = plan.cfg
  h, w = labels.shape
  view = _Overview(h, w) if overview_path else None
  log = progress.Progress('decode and write', 'rows', total=h) if cfg.options.progress_every \
      else None
  if log:
    log.start(f'{h}x{w} px, {cfg.output_format}')
  def bands():
    out = plan.pipe.iter_decode(z, options=plan.options)
    out = log.rows(out, h) if log else out
    return view.tap(out) if view else out
  if cfg.output_format == 'zarr':
    ome_zarr.write_ome_zarr(image_path, bands(), (h, w, 3), labels=labels, mpp=cfg.mpp)
  elif cfg.output_format == 'tiff':
    writers.write_tiff(image_path, bands(), (h, w, 3), compression=cfg.tiff_compression,
                       jpeg_quality=cfg.jpeg_quality, mpp=cfg.mpp)
  else:    # decoded whole (PNG / JPEG hold the image anyway): start and end lines only
    writers.write_image(image_path, plan.pipe.decode(z[None], options=plan.options)[0],
                        quality=cfg.jpeg_quality)
  if view:
    view.write(overview_path, labels)
  if log:
    log.finish(h)


def _write_shared(plan: Plan, z, labels: label_maps.LabelMap, image_path: str) -> None:
  """All processes: this image's TIFF or OME-Zarr, each decoding its share of bands."""
  cfg, where = plan.cfg, dict(process_index=jax.process_index(),
                              process_count=jax.process_count())
  image = plan.pipe.band_source(z, options=plan.options)
  if cfg.output_format == 'zarr':
    shared_writer.write_zarr(image, labels, image_path, mpp=cfg.mpp,
                             barrier=sharding.barrier, **where)
  else:
    shared_writer.write_tiff(image, image_path, allgather=sharding.allgather,
                             compression=cfg.tiff_compression,
                             jpeg_quality=cfg.jpeg_quality, mpp=cfg.mpp, **where)
