"""Every check a run can fail, before any compute (`prepare` -> `Plan`), and the dry run's
report of a plan (`dry_run`). Raises ValueError with one line (the command prints it as
`error: ...`) or OSError; nothing is written."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from typing import Any

import jax
import numpy as np

from tiled_ldm_jax import demo
from tiled_ldm_jax import encode as encode_lib
from tiled_ldm_jax import estimate
from tiled_ldm_jax import masks as masks_lib
from tiled_ldm_jax import pipeline as pipeline_lib
from tiled_ldm_jax import request as request_lib
from tiled_ldm_jax import resume
from tiled_ldm_jax import stages as stages_lib
from tiled_ldm_jax.files import geojson_labels
from tiled_ldm_jax.files import image_files
from tiled_ldm_jax.files import label_files
from tiled_ldm_jax.files import label_maps
from tiled_ldm_jax.files import large_images
from tiled_ldm_jax.files import reading
from tiled_ldm_jax.generate import config as config_lib
from tiled_ldm_jax.generate.config import GenerationConfig
from tiled_ldm_jax.output import writers
from tiled_ldm_jax.sampling import loop as loop_lib


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `prepare` checked and loaded; `run` only computes and writes."""
  cfg: GenerationConfig             # with demo paths and patch sizes resolved
  pipe: pipeline_lib.Pipeline
  request: request_lib.Request      # one batch, resolved and checked (request.py)
  mask: label_maps.LabelMap | None   # [H, W] the given label map (resized lazily)
  hashes: dict[str, str]            # sha256 of each model folder used
  resume_meta: dict[str, Any] | None
  work: dict[str, Any]              # `estimate.plan` of the request (in every record)
  refused: tuple[str, ...] = ()     # dry run: why the run would be refused (memory, disk)
  init_image: Any = None                 # a row source (files/large_images.py)
  keep: np.ndarray | None = None         # [H/f, W/f] bool, latent pixels (--keep_mask)
  init_offset: tuple[int, int] = (0, 0)  # (y, x) pixels of the init on the canvas

  @property
  def options(self) -> request_lib.Options:
    return self.request.options


def _hash_folder(path: str) -> str:
  """sha256 over the files of a converted model folder (names and bytes), or of a file's
  bytes."""
  h = hashlib.sha256()
  if os.path.isfile(path):
    with open(path, 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 20), b''):
        h.update(chunk)
    return h.hexdigest()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      h.update(os.path.relpath(full, path).encode())
      with open(full, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
          h.update(chunk)
  return h.hexdigest()


def _check_writable(path: str) -> None:
  """The folder exists and is writable, or could be created (nothing is created here)."""
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    if os.path.islink(probe):
      raise ValueError(f'output folder {path}: {probe} is a symlink that resolves to '
                       'nothing (a loop or a dangling link)')
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f'output folder {path} is not writable ({probe} is not a writable '
                     f'folder)')


def _load_pipeline(cfg: GenerationConfig) -> pipeline_lib.Pipeline:
  paths = (cfg.unet_ckpt, cfg.vae_ckpt, None if cfg.mask else cfg.mask_unet_ckpt)
  for flag, path in zip(('unet_ckpt', 'vae_ckpt', 'mask_unet_ckpt'), paths):
    if path and not os.path.isdir(path):
      raise ValueError(f'--{flag}: checkpoint folder not found: {path}')
  if any(paths[:2]) and not cfg.mask and not cfg.mask_unet_ckpt:
    raise ValueError('give --mask_unet_ckpt or --mask')
  try:
    return pipeline_lib.Pipeline.from_pretrained(*paths, devices=cfg.devices)
  except ValueError as e:
    if any((cfg.unet_ckpt, cfg.vae_ckpt, cfg.mask_unet_ckpt)):
      raise
    raise ValueError(f'{e} (no checkpoint flags given)') from None


def prepare(cfg: GenerationConfig) -> Plan:
  """Every check that can fail, before any compute: flags, models, mask file, output
  folder, resume. Raises ValueError (one line) or OSError. In order: the flags alone;
  the models; the input files (opened by their contents, sizes read); the request
  (sizes, windows, memory); then what is read whole, the output folder and resume."""
  _check_flags(cfg)
  pipe = _load_pipeline(cfg)
  labels, init_image = _open_inputs(cfg)
  cfg = _resolved(cfg, pipe, labels, init_image)
  size, f = cfg.size, pipe.geometry.factor
  offset = _check_init_placement(cfg, init_image, f)
  init_memory = {} if init_image is None else dict(
      init='keep' if cfg.keep_mask is not None or cfg.init_offset is not None
      else 'strength',
      init_whole=isinstance(init_image, large_images.ArrayImage))
  req = pipe.request(size, cfg.batch_size, cfg.options,
                     whole_images=int(cfg.output_format in ('png', 'jpg')),
                     label=None if cfg.mask else cfg.label,
                     label_source_pixels=labels.host_pixels if labels else 0, **init_memory)
  _keep_mask_flags(cfg, init_image, size)
  refused = []

  def resource_check(fn):   # a dry run reports these with the rest of the plan
    try:
      fn()
    except ValueError as e:
      if not cfg.dry_run:
        raise
      refused.append(str(e))
  resource_check(req.check_memory)
  # Held whole (a PNG / JPEG init image, the latent keep map): only once the memory
  # check passed (a dry run that it refused reports that instead).
  keep = None
  if not refused:
    if hasattr(init_image, 'load'):
      _file_errors('init_image', cfg.init_image, init_image.load)
    keep = _keep_mask(cfg, init_image, offset, size, f)
  mask = labels.label_map(cfg, size, pipe.unet.config.num_classes) if labels else None
  _check_writable(cfg.imgs_path)
  hashes = _hashes(cfg, pipe, mask is None)
  _check_name_length(cfg)
  resource_check(lambda: _check_free_space(cfg))
  meta = _resume_meta(cfg, hashes)
  work = estimate.plan(pipe, req, n_images=cfg.n_images, labels=mask,
                       strength=cfg.strength, keep=keep)
  return Plan(cfg, pipe, req, mask, hashes, meta, work, tuple(refused), init_image, keep,
              offset)


def _check_flags(cfg: GenerationConfig) -> None:
  """The checks of the flags alone (nothing opened but the --preview folder)."""
  config_lib.output_format(cfg.output_format)
  if cfg.n_images < 1 or cfg.batch_size < 1 or cfg.n_images % cfg.batch_size:
    raise ValueError(f'n_images ({cfg.n_images}) must be a positive multiple of batch_size '
                     f'({cfg.batch_size})')
  if cfg.tiff_compression not in writers.TIFF_COMPRESSIONS:
    raise ValueError(f'tiff_compression must be one of {writers.TIFF_COMPRESSIONS}, got '
                     f'{cfg.tiff_compression!r}')
  if not 1 <= cfg.jpeg_quality <= 100:
    raise ValueError(f'jpeg_quality must be in [1, 100], got {cfg.jpeg_quality}')
  if cfg.mpp is not None and not (math.isfinite(cfg.mpp) and cfg.mpp > 0):
    raise ValueError(f'mpp must be a positive finite number, got {cfg.mpp}')
  if not (math.isfinite(cfg.live_preview_minutes) and cfg.live_preview_minutes >= 0):
    raise ValueError(f'live_preview_minutes must be >= 0, got {cfg.live_preview_minutes}')
  if cfg.live_preview_minutes and jax.process_count() > 1:
    raise ValueError('--live_preview_minutes is for single-process runs (the preview reads '
                     'the whole latent, which one process of several does not hold)')
  if cfg.checkpoint_every < 0:
    raise ValueError(f'checkpoint_every must be >= 0, got {cfg.checkpoint_every}')
  if cfg.devices < 0:
    raise ValueError(f'devices must be >= 0, got {cfg.devices}')
  if cfg.devices > jax.device_count():
    raise ValueError(f'--devices: asked for {cfg.devices} devices, JAX sees '
                     f'{jax.device_count()}')
  if cfg.preview is not None:
    if not cfg.dry_run:
      raise ValueError('--preview is for --dry_run (a run writes sampleNNNN_overview.jpg)')
    if os.path.splitext(cfg.preview)[1].lower() != '.png' or os.path.isdir(cfg.preview):
      raise ValueError(f'--preview must be a .png file path, got {cfg.preview!r}')
    _check_writable(os.path.dirname(os.path.abspath(cfg.preview)))


@dataclasses.dataclass(frozen=True)
class _LabelSource:
  """The --mask file, opened by its contents: a row source (tiled TIFF / OME-Zarr labels,
  read by bands), GeoJSON annotations (rasterized by bands) or a PNG held whole."""
  path: str
  rows: Any = None           # a row source: .shape, .ids
  annotations: bool = False  # QuPath GeoJSON (no size of its own)
  png: Any = None            # [h, w] label ids of a PNG

  @property
  def shape(self):
    source = self.rows if self.rows is not None else self.png
    return None if source is None else tuple(source.shape)

  @property
  def host_pixels(self) -> int:
    """Pixels of it held on the host (the memory plan): a PNG's, none for the others."""
    return 0 if self.png is None else int(self.png.size)

  def label_map(self, cfg: GenerationConfig, size, num_classes: int) -> label_maps.LabelMap:
    """The checked [H, W] map of the output size (resized lazily, nearest)."""
    if self.annotations:
      classes = geojson_labels.parse_classes(cfg.mask_classes)
      return _file_errors('mask', self.path, lambda: geojson_labels.read_geojson(
          self.path, classes, size, num_classes))
    if self.rows is not None:
      bad = [v for v in self.rows.ids if not 0 <= v < num_classes]
      if bad:
        shown = ', '.join(str(v) for v in bad[:20]) + (', ...' if len(bad) > 20 else '')
        raise ValueError(f'--mask {self.path}: label values out of range [0, '
                         f'{num_classes}): {shown}')
      return label_maps.LabelMap(self.rows, size)
    # Checked at the file's resolution and kept there: the map is resized (nearest) by
    # rows on demand, never held whole at the image's (label_maps.LabelMap).
    return _file_errors('mask', self.path, lambda: label_maps.LabelMap(
        stages_lib.check_labels(self.png[None], num_classes)[0], size))


def _open_inputs(cfg: GenerationConfig):
  """(the --mask `_LabelSource` or None, the --init_image row source or None): each file
  refused unopened if it is not a regular file or folder, then read by its contents."""
  mask = demo.mask_path() if cfg.mask == 'demo' else cfg.mask
  for flag, path in (('mask', mask), ('init_image', cfg.init_image),
                     ('keep_mask', cfg.keep_mask)):   # FIFOs, devices: refused unopened
    if path and not os.path.lexists(path):
      raise ValueError(f'--{flag} {path}: no such file or folder')
    if path:
      _file_errors(flag, path, lambda: reading.kind(path))   # pylint: disable=cell-var-from-loop
  labels = None
  if mask:
    path = mask
    # The reader is chosen by the contents: an OME-Zarr folder, a TIFF, JSON, else PNG.
    rows = _file_errors('mask', path, lambda: label_files.open_label_source(path))
    annotations = rows is None and _file_errors(
        'mask', path, lambda: geojson_labels.looks_like_json(path))
    png = None if rows is not None or annotations else _file_errors(
        'mask', path, lambda: label_maps.read_label_png(path))
    labels = _LabelSource(path, rows, annotations, png)
  if cfg.mask_classes and not (labels and labels.annotations):
    raise ValueError(f'--mask_classes is only for a GeoJSON --mask; {cfg.mask} is not '
                     'JSON (it does not start with { or [)' if cfg.mask else
                     '--mask_classes is only for a GeoJSON --mask')
  if labels and labels.annotations:
    if not cfg.mask_classes:
      raise ValueError(f'--mask {cfg.mask} is GeoJSON: give --mask_classes=NAME=ID,...')
    if cfg.image_size is None:
      raise ValueError(f'--mask {cfg.mask} is GeoJSON, which has no size: give '
                       '--image_size=HxW (the annotations\' pixel grid)')
  return labels, _read_init_image(cfg)


def _resolved(cfg: GenerationConfig, pipe, labels, init_image) -> GenerationConfig:
  """`cfg` resolved once: one spelling of the format and the size, the model paths and
  the options the pipeline fills in (patch sizes, eta), the demo mask's path, and the
  image size from the --mask or --init_image file when not given."""
  size = cfg.image_size
  if size is None and labels is not None and labels.shape is not None:
    size = '{}x{}'.format(*labels.shape)
  if init_image is not None:
    _file_errors('init_image', cfg.init_image, lambda: encode_lib.check_size(
        init_image.shape, pipe.geometry.factor))
    if size is None:
      if cfg.init_offset is not None:
        raise ValueError('--init_offset needs --image_size (or --mask): the canvas the '
                         'init image lies on')
      size = '{}x{}'.format(*init_image.shape[:2])
  h, w = request_lib.image_hw(config_lib.DEFAULT_IMAGE_SIZE if size is None else size)
  return dataclasses.replace(
      cfg, output_format=config_lib.output_format(cfg.output_format),
      options=pipe.resolve(cfg.options), unet_ckpt=pipe.paths['unet'],
      vae_ckpt=pipe.paths['vae'], mask_unet_ckpt=pipe.paths.get('mask_unet'),
      mask=labels.path if labels else None, image_size=f'{h}x{w}')


def _check_init_placement(cfg: GenerationConfig, init_image, factor: int):
  """The init image's (y, x) offset on the canvas, checked against the output size."""
  offset = _init_offset(cfg, init_image, factor)
  if init_image is not None:
    size = cfg.size
    ih, iw = init_image.shape[:2]
    if cfg.init_offset is None and (ih, iw) != tuple(size):
      raise ValueError(f'--init_image {cfg.init_image} is {ih}x{iw}, the output is '
                       f'{size[0]}x{size[1]} (give --image_size, resize it, or place it '
                       f'with --init_offset)')
    if offset[0] + ih > size[0] or offset[1] + iw > size[1]:
      raise ValueError(f'--init_offset {offset[0]},{offset[1]}: the {ih}x{iw} init image '
                       f'does not fit on the {size[0]}x{size[1]} canvas')
  return offset


def _hashes(cfg: GenerationConfig, pipe, mask_model: bool) -> dict[str, str]:
  """sha256 of each model folder used and, for a checkpointed run, of each input file
  (a resumed run must read the same inputs)."""
  used = {k: v for k, v in pipe.paths.items() if k != 'mask_unet' or mask_model}
  hashes = {name: _hash_folder(path) for name, path in used.items()}
  if cfg.checkpoint_every or cfg.resume:
    for flag in ('mask', 'init_image', 'keep_mask'):
      path = getattr(cfg, flag)
      if path is not None and os.path.exists(path):
        hashes[resume.INPUT_PREFIX + flag] = _hash_folder(path)
  return hashes


def _resume_meta(cfg: GenerationConfig, hashes) -> dict | None:
  """The saved run's metadata with --resume (checked against the flags, inputs and the
  samples on disk); a saved run without --resume is refused."""
  run_ckpt = resume.RunCheckpoint(cfg.imgs_path)
  if cfg.resume:
    if not run_ckpt.exists():
      raise ValueError(f'--resume: no saved run in {run_ckpt.path}')
    meta = run_ckpt.check(cfg, hashes)
    _check_resume_samples(cfg, meta)
    return meta
  if run_ckpt.exists():
    raise ValueError(f'{cfg.imgs_path} holds an unfinished run ({run_ckpt.path}); pass '
                     f'--resume with the same flags to continue it, or remove that folder')
  return None


def _check_resume_samples(cfg: GenerationConfig, meta: dict) -> None:
  """The saved state and the samples on disk agree: the samples before the saved batch
  are there (their records), none of those the resume writes is (a resume never
  replaces a finished sample). Else one line naming the files."""
  first, b0 = meta['first_sample'], meta['batch_start']
  ahead = [n for n in range(first + b0, first + cfg.n_images)
           if any(os.path.lexists(p) for p in config_lib.sample_files(cfg, n)[1:])
           or os.path.lexists(config_lib.sample_files(cfg, n)[0] + '.json')]
  missing = [n for n in range(first, first + b0)
             if not os.path.lexists(config_lib.sample_files(cfg, n)[0] + '.json')]
  for found, what in ((ahead, 'already exist, but the saved run would write them again'),
                      (missing, 'are missing, but the saved run has finished them')):
    if found:
      names = ', '.join(f'sample{n:04d}' for n in found[:5]) + (', ...' if len(found) > 5
                                                                  else '')
      raise ValueError(f'cannot resume {os.path.join(cfg.imgs_path, resume.FOLDER)}: its '
                       f'state (batch at image {b0}, numbering from sample{first:04d}) '
                       f'does not match the samples in {cfg.imgs_path}: {names} {what}; '
                       'nothing was written')


def _init_offset(cfg: GenerationConfig, init_image, factor: int) -> tuple[int, int]:
  """--init_offset as (y, x) pixels ((0, 0) without it), checked."""
  if cfg.init_offset is None:
    return (0, 0)
  if init_image is None:
    raise ValueError('--init_offset needs --init_image: the image to place on the canvas')
  m = re.fullmatch(r'\s*(\d+)\s*,\s*(\d+)\s*', cfg.init_offset)
  if not m:
    raise ValueError(f'--init_offset must be "y,x" (pixels >= 0), got {cfg.init_offset!r}')
  y, x = int(m.group(1)), int(m.group(2))
  if y % factor or x % factor:
    raise ValueError(f'--init_offset {y},{x}: both must be multiples of the VAE factor '
                     f'{factor}')
  if cfg.strength != 1.0:
    raise ValueError('--init_offset needs --strength 1: the canvas around the init image '
                     'has nothing to start from')
  return (y, x)


def _keep_mask_flags(cfg: GenerationConfig, init_image, size) -> None:
  """--keep_mask's flags and a PNG's size from its header (nothing decoded)."""
  if cfg.keep_mask is None:
    return
  if init_image is None:
    raise ValueError('--keep_mask needs --init_image: the image the kept pixels follow')
  if reading.kind(cfg.keep_mask) == 'file' and not label_files.is_tiff(cfg.keep_mask):
    d = _file_errors('keep_mask', cfg.keep_mask, lambda: image_files.declared(
        cfg.keep_mask, image_files.LABEL_FORMATS, what='keep mask'))
    if (d.height, d.width) != tuple(size):
      raise ValueError(f'--keep_mask {cfg.keep_mask} is {d.height}x{d.width}, the output '
                       f'is {size[0]}x{size[1]}')


def _keep_mask(cfg: GenerationConfig, init_image, offset, size, factor: int):
  """[H/f, W/f] bool latent keep mask: --keep_mask's (a map of the output size, read at
  latent resolution), else the init image's area with --init_offset; None."""
  keep = None
  if cfg.keep_mask is not None:
    # A TIFF or an OME-Zarr labels group is read lazily at latent resolution, a PNG whole.
    source = _file_errors('keep_mask', cfg.keep_mask,
                          lambda: label_files.open_label_source(cfg.keep_mask))
    if source is None:
      source = _file_errors('keep_mask', cfg.keep_mask,
                            lambda: label_maps.read_label_png(cfg.keep_mask))
    if tuple(source.shape) != tuple(size):
      raise ValueError(f'--keep_mask {cfg.keep_mask} is {source.shape[0]}x'
                       f'{source.shape[1]}, the output is {size[0]}x{size[1]}')
    keep = _file_errors('keep_mask', cfg.keep_mask,
                        lambda: label_maps.LabelMap(source, size).latent(factor)) != 0
  if cfg.init_offset is None:
    return keep
  (y, x), (ih, iw) = offset, init_image.shape[:2]
  inside = np.zeros((size[0] // factor, size[1] // factor), bool)
  inside[y // factor:(y + ih) // factor, x // factor:(x + iw) // factor] = True
  if keep is None:
    return inside
  if (keep & ~inside).any():
    raise ValueError(f'--keep_mask {cfg.keep_mask} keeps pixels outside the init image '
                     f'placed at --init_offset {y},{x}: there is nothing to keep there')
  return keep


def _read_init_image(cfg: GenerationConfig):
  """The --init_image as a row source (`large_images.open_rgb_source`, with --strength
  checked); None without one."""
  try:
    loop_lib.start_level(cfg.options.sampling_steps, cfg.strength)
  except ValueError as e:
    raise ValueError(f'--{e}') from None
  if cfg.init_image is None:
    if cfg.strength != 1.0:
      raise ValueError('--strength needs --init_image')
    return None
  return _file_errors('init_image', cfg.init_image,
                      lambda: large_images.open_rgb_source(cfg.init_image))


def dry_run(plan: Plan) -> dict:
  """The plan with seconds estimated from timed calls (`estimate.timed`); nothing is
  sampled or written. `refused`: why the run itself would be refused (memory, disk)."""
  out = estimate.timed(plan.pipe, plan.work, plan.options)
  out['refused'] = list(plan.refused)
  if plan.mask is not None:
    out['labels'], small = label_report(plan.mask)
    if plan.cfg.preview:
      writers.write_image(plan.cfg.preview, masks_lib.colour_labels(small))
      out['labels']['preview'] = plan.cfg.preview
  return out


REPORT_SIDE = 1024   # px: the label map is sampled on this grid for its report and preview


def label_report(labels) -> tuple[dict, np.ndarray]:
  """How a label map was read: the share of the image each id covers (from the map
  sampled every k-th pixel, k = longer side / REPORT_SIDE, rounded up) and, for GeoJSON
  annotations, each class's name, polygons and holes. Returns (report, sampled map)."""
  h, w = labels.shape
  k = max(1, -(-max(h, w) // REPORT_SIDE))
  if hasattr(labels, 'sample'):                     # annotations: only the grid's pixels
    small = labels.sample(np.arange(0, h, k) + 0.5, np.arange(0, w, k) + 0.5)
  else:
    small = np.concatenate([np.asarray(labels[r:r + 1])[:, ::k] for r in range(0, h, k)])
  ids, n = np.unique(small, return_counts=True)
  share = {int(i): round(float(c) / small.size, 4) for i, c in zip(ids, n)}
  report = {'sampled_every_px': k, 'share': share}
  source = getattr(labels, 'source', labels)
  counts = getattr(labels, 'counts', None) or getattr(source, 'counts', None)
  if counts:
    report['classes'] = {name: dict(c, share=share.get(c['id'], 0.0))
                         for name, c in counts.items()}
  return report, small


def label_summary(report: dict) -> str:
  """The lines of `label_report` for a person."""
  lines = [f"  label map (sampled every {report['sampled_every_px']} px):"]
  named = {c['id']: name for name, c in report.get('classes', {}).items()}
  for i, share in report['share'].items():
    name = named.get(i, 'unannotated' if i == 0 and named else '')
    c = report.get('classes', {}).get(name, {})
    extra = (f", {c['polygons']} polygon(s), {c['holes']} hole(s)" if c else '')
    lines.append(f"    id {i}{' ' + name if name else ''}: {100 * share:.1f}% of the image"
                 + extra)
  for name, c in report.get('classes', {}).items():
    if c['id'] not in report['share']:
      lines.append(f"    id {c['id']} {name}: not seen at this sampling ({c['polygons']} "
                   f"polygon(s), {c['holes']} hole(s))")
  if 'preview' in report:
    lines.append(f"    coloured map written to {report['preview']}")
  return '\n'.join(lines)


def _file_errors(flag: str, path: str, fn):
  """`fn()` (reads or checks the file `path` given to `--flag`), its errors as one
  `--flag` ValueError naming the file."""
  try:
    return fn()
  except (OSError, ValueError) as e:
    # the readers' messages usually start with the path already
    message = str(e) if path in str(e) else f'{path}: {e}'
    raise ValueError(f'--{flag} {message}') from None


def _check_name_length(cfg: GenerationConfig) -> None:
  """Refuses, before sampling, a run whose last sample's file names the file system
  cannot hold (a file in the folder may push the numbering that far)."""
  last = config_lib.next_index(cfg.imgs_path) + cfg.n_images - 1
  base, image_path, mask_file = config_lib.sample_files(cfg, last)
  folder = cfg.imgs_path if os.path.isdir(cfg.imgs_path) else os.path.dirname(
      os.path.abspath(cfg.imgs_path)) or '.'
  try:
    limit = os.pathconf(folder, 'PC_NAME_MAX')
  except (OSError, ValueError):
    limit = 255
  longest = max(len(os.path.basename(p)) for p in (base + '.json', image_path, mask_file))
  if 2 * longest + 48 > limit:   # a writer may nest its temporary name in ours
    raise ValueError(f'the next sample would be sample{last:04d}, whose file names '
                     f'({longest} characters, plus temporary suffixes) exceed the file '
                     f'system limit of {limit}: write to another --imgs_path')


# Smallest bytes per pixel a sample's files take (image + mask + record), by format: a
# floor, not an estimate (JPEG of smooth tissue compresses ~20x; PNG/TIFF less).
_MIN_BYTES_PER_PIXEL = {'png': 0.5, 'jpg': 0.15, 'tiff': 0.15, 'zarr': 0.15}


def _check_free_space(cfg: GenerationConfig) -> None:
  """Refuses, before sampling, a run that cannot fit the output folder's free space even
  at the best compression its format reaches (a full disk fails before the work)."""
  probe = os.path.abspath(cfg.imgs_path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  try:
    stat = os.statvfs(probe)
  except OSError:
    return
  free = stat.f_bavail * stat.f_frsize
  need = int(cfg.n_images * math.prod(cfg.size) *
             _MIN_BYTES_PER_PIXEL.get(cfg.output_format, 0.15))
  if need > free:
    raise ValueError(f'{cfg.n_images} image(s) of {cfg.image_size} px need at least '
                     f'{need / 2 ** 20:.0f} MiB in {probe}, which has {free / 2 ** 20:.0f} MiB '
                     'free')
