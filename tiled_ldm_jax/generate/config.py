"""What a run of `scripts/sample_large_image.py` is asked for (`GenerationConfig`: every
field a flag) and where its files go (`sample_files`, `next_index`)."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from tiled_ldm_jax import request as request_lib
from tiled_ldm_jax.output import writers

FORMATS = ('png', 'jpg', 'tiff', 'zarr')
FORMAT_ALIASES = {'tif': 'tiff', 'jpeg': 'jpg', 'ome-zarr': 'zarr', 'ome_zarr': 'zarr'}
DEFAULT_IMAGE_SIZE = 1024     # without --image_size and --mask
_help = request_lib.field


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """A run of the command: what and where, plus how to sample (`options`).

  Every field of this class but `options`, and every field of `Options`, is a flag of
  `scripts/sample_large_image.py`; `from_flat` builds one from those flag values and
  `flat()` gives them back (the JSON record's `config`, what a resume compares).
  """
  options: request_lib.Options = dataclasses.field(
      default_factory=request_lib.Options, metadata={'flag': False})
  unet_ckpt: str | None = _help('Converted image model folder (none of the three: the demo '
                                'models).')
  vae_ckpt: str | None = _help('Converted VAE folder.')
  mask_unet_ckpt: str | None = _help('Converted mask model folder (unless --mask).')
  mask: str | None = _help('Label map replacing the mask model: a PNG of label ids (its '
                           'size is the default image size, else resized nearest to '
                           '--image_size), a tiled TIFF of label ids or an OME-Zarr store '
                           'with a labels group (both read lazily, band by band), a '
                           'QuPath GeoJSON of annotations (with --mask_classes and '
                           '--image_size; rasterized band by band), or "demo" for the '
                           'bundled PNG. The format is read from the file\'s contents.')
  mask_classes: str | None = _help('GeoJSON --mask: class name to label id, '
                                   '"Tumor=1,Stroma=2,..." or a JSON object '
                                   '\'{"Tumor, grade 2": 1}\' (names with "," or "="; '
                                   'unannotated pixels are 0).')
  init_image: str | None = _help('Start from this image (PNG, JPEG, an RGB TIFF or an '
                                 'OME-Zarr image store, read by its contents; TIFF and '
                                 'OME-Zarr band by band; of the output size unless '
                                 '--init_offset; without --image_size and --mask its size '
                                 'is the output\'s): encoded tile by tile and noised to '
                                 'where the last --strength of the steps begin.')
  init_offset: str | None = _help('With --init_image: outpaint. "y,x" pixels (multiples '
                                  'of the VAE factor, 8) where the init image\'s top-left '
                                  'corner lies on the larger --image_size canvas; its '
                                  'pixels are kept (or those of --keep_mask inside it) and '
                                  'the canvas around them is generated from noise '
                                  '(--strength 1).')
  strength: float = _help('With --init_image: the share of the sampling steps run, in '
                          '(0, 1] (1: from noise, the image unused).', 1.0)
  keep_mask: str | None = _help('With --init_image: a map of the output size (PNG, tiled '
                                'TIFF or OME-Zarr labels group, as --mask; the last two '
                                'read lazily) whose non-zero pixels keep the init image '
                                '(they follow it at every level); the others are '
                                'generated for the label map.')
  imgs_path: str = _help('Output folder.', './results/large')
  n_images: int = _help('Images to generate.', 1)
  batch_size: int = _help('Images sampled together (n_images must be a multiple).', 1)
  label: int = _help('Class the mask model lays out (ignored with --mask).', 1)
  image_size: str | None = _help(f'Image size in pixels, N (square) or HxW (multiples of the '
                                 f'VAE factor, 8); default: the --mask file\'s size, else '
                                 f'{DEFAULT_IMAGE_SIZE}.')
  seed: int = _help('Root PRNG seed; image n uses fold_in(seed, n).', 0)
  output_format: str = _help(f'Image file format: {" | ".join(FORMATS)} (tiff: pyramidal '
                             'BigTIFF that OpenSlide reads; zarr: OME-Zarr store with a '
                             'labels group; both streamed band by band).', 'png')
  tiff_compression: str = _help('TIFF tiles: jpeg | zlib | none (label masks stay '
                                'lossless).', 'jpeg')
  jpeg_quality: int = _help('JPEG quality (jpg output and JPEG TIFF tiles), 1-100.', 90)
  mpp: float | None = _help('Microns per pixel written as the TIFF resolution and OME-Zarr '
                            'scale (none: no resolution written).')
  live_preview_minutes: float = _help('Every this many minutes of the image stage, and '
                                      'when it ends, replace sampleNNNN_live.png: the '
                                      'canvas as it stands (latents mapped linearly to '
                                      'RGB, no decoder run) beside each pixel\'s steps '
                                      'taken (black: none, white: all), at most 512 px '
                                      'wide each (0: off).', 0.0)
  checkpoint_every: int = _help('Save the sampler state every N iterations under '
                                'imgs_path/checkpoint (0: off).', 0)
  resume: bool = _help('Continue the run saved under imgs_path/checkpoint (same flags '
                       'required).', False)
  devices: int = _help('Devices to shard the batch/patches over (0: all).', 0)
  dry_run: bool = _help('Check the request and print its plan (per stage: latent shape, '
                        'iterations, windows, U-Net samples and TFLOP, decoder tiles; host '
                        'and device bytes; seconds from short timed U-Net and decoder calls '
                        'on this device) as one JSON line and a summary; sample and write '
                        'nothing.', False)
  preview: str | None = _help('With --dry_run: write the label map the run would use '
                              '(--mask, rasterized annotations included) in colour to this '
                              'PNG, at most 1024 px on its longer side.')


  @classmethod
  def from_flat(cls, **values) -> 'GenerationConfig':
    """From flag values: `Options` fields go into `options`, the rest are this class's."""
    names = {f.name for f in dataclasses.fields(request_lib.Options)}
    options = request_lib.Options(**{k: v for k, v in values.items() if k in names})
    return cls(options=options, **{k: v for k, v in values.items() if k not in names})

  @property
  def size(self) -> tuple[int, int]:
    """(H, W) pixels (`prepare` resolves a missing `image_size`)."""
    return request_lib.image_hw(DEFAULT_IMAGE_SIZE if self.image_size is None
                                 else self.image_size)

  def flat(self) -> dict[str, Any]:
    """The flag values: the `Options` fields and this class's other fields, one level."""
    own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name != 'options'}
    return {**dataclasses.asdict(self.options), **own}


def output_format(name: str) -> str:
  """--output_format's value in its one spelling (tif: tiff, jpeg: jpg, ...)."""
  fmt = str(name).lower()
  fmt = FORMAT_ALIASES.get(fmt, fmt)
  if fmt not in FORMATS:
    raise ValueError(f'output_format must be one of {FORMATS} (or {", ".join(FORMAT_ALIASES)}'
                     f'), got {name!r}')
  return fmt


def next_index(path: str) -> int:
  """First free sample number: one past the largest `sampleNNNN*` in the folder."""
  if not os.path.isdir(path):
    return 0
  numbers = [int(m[1]) for name in os.listdir(path) if (m := re.match(r'sample(\d+)', name))]
  return max(numbers, default=-1) + 1


def sample_files(cfg, number: int) -> tuple[str, str, str]:
  """(base path, image file, mask file) of sample `number`."""
  base = os.path.join(cfg.imgs_path, f'sample{number:04d}')
  if cfg.output_format == 'zarr':   # labels go into the store's labels/ group
    return base, base + '.zarr', base + '.zarr/labels'
  image_path = base + f'.{cfg.output_format if cfg.output_format != "tiff" else "tif"}'
  return base, image_path, writers.mask_path(image_path)
