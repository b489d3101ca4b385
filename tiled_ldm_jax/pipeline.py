"""The in-memory library API: label maps -> latents -> images, as numpy / jax arrays.

    import tiled_ldm_jax
    pipe = tiled_ldm_jax.Pipeline.from_pretrained()          # the bundled demo models
    result = pipe(label=1, image_size=512, seed=0)           # mask model, image model, decode
    result.images      # [N, H, W, 3] uint8;  result.labels: [N, H, W] label ids

or stage by stage (the same bytes for the same request):

    labels = pipe.sample_labels(label=1, image_size=512, seed=0)   # [N, H, W]
    latents = pipe.sample_latents(labels, seed=0)                  # [N, H/f, W/f, C]
    images = pipe.decode(latents)                                  # [N, H, W, 3] uint8

Randomness (SPEC 5): image n of a request uses `fold_in(key(seed), n)` (`indices` picks
other n, so a batch can continue a run), the mask stage `fold_in(., 0)` of it and the
image stage `fold_in(., 1)`: an image does not depend on the batch it is sampled in.

Every request is resolved and checked once (`request.py`: `ValueError` with one line)
before any compute; the stages run in `stages.py`. The command
`scripts/sample_large_image.py` and its file outputs (`generate/`) are a layer over
this module; its defaults are `Options`'.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np

from tiled_ldm_jax import decode as decode_lib
from tiled_ldm_jax import demo
from tiled_ldm_jax import encode as encode_lib
from tiled_ldm_jax import geometry
from tiled_ldm_jax import request as request_lib
from tiled_ldm_jax import sharding
from tiled_ldm_jax import stages as stages_lib
from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax.models import vae as vae_lib
from tiled_ldm_jax.sampling import loop as loop_lib

# The request layer's names, where users of this module have found them.
Options = request_lib.Options
DEFAULT_PATCH_SIZE = request_lib.DEFAULT_PATCH_SIZE
image_hw = request_lib.image_hw


class Model(NamedTuple):
  """A loaded model: its typed config, params and, for U-Nets, what it predicts."""
  config: Any
  params: Any
  objective: str = 'eps'   # eps | v | flow (checkpoint.read_objective)


class Result(NamedTuple):
  images: np.ndarray     # [N, H, W, 3] uint8
  labels: np.ndarray     # [N, H, W] int32 label ids the images were sampled for
  stats: dict            # per stage: patch iterations, denoiser evaluations


def _load(path: str, kind: str, what: str) -> Model:
  try:
    _, config, params = checkpoint.load_model(path, expect=kind)
    objective = 'eps' if kind == 'vae' else checkpoint.read_objective(path)
    return Model(config, params, objective)
  except (OSError, ValueError) as e:
    raise ValueError(f'{what}: cannot load {path}: {e}') from None


class Pipeline:
  """Loaded models, their stage runner (`stages`) and the compiled samplers and decoders
  they need (cached per shape). The user's face: build with `from_pretrained`, then call
  it, or `sample_labels` / `sample_latents` / `decode` (`encode`, `iter_decode` for
  large images). Immutable apart from its caches of compiled programs.
  """

  def __init__(self, unet: Model, vae: Model, mask_unet: Model | None = None, *,
               default_patch_size: int = DEFAULT_PATCH_SIZE, devices: int = 0,
               paths: dict[str, str] | None = None):
    if unet.config.kind != 'image' or (mask_unet and mask_unet.config.kind != 'mask'):
      raise ValueError('unet must be an image model and mask_unet a mask model')
    if unet.config.channels != vae.config.latent_channels:
      raise ValueError(f'the image model has {unet.config.channels} latent channels, the '
                       f'VAE {vae.config.latent_channels}')
    self.unet, self.vae, self.mask_unet = unet, vae, mask_unet
    self.geometry = geometry.LatentGeometry.of_vae(vae.config)
    self.default_patch_size = default_patch_size
    self.devices = devices
    self.paths = dict(paths or {})
    self.stages = stages_lib.Stages(unet, vae, mask_unet, self.geometry, devices)

  @classmethod
  def from_pretrained(cls, unet: str | None = None, vae: str | None = None,
                      mask_unet: str | None = None, *, devices: int = 0) -> 'Pipeline':
    """Loads converted model folders; with none given, the bundled demo models.

    `mask_unet` may be None when label maps are always given. `devices`: shard over at
    most this many devices (0: all JAX sees).
    """
    use_demo = not (unet or vae or mask_unet)
    if use_demo:
      if not demo.available():
        raise ValueError(f'no model folders given and the demo models are missing from '
                         f'{demo.DEMO_DIR}')
      unet, vae, mask_unet = (demo.model_path(k) for k in ('image_unet', 'vae', 'mask_unet'))
    elif not (unet and vae):
      raise ValueError('give unet and vae (and mask_unet, or label maps), or no model '
                       'folder at all to use the bundled demo models')
    paths = {'unet': unet, 'vae': vae}
    models = {'unet': _load(unet, 'image_unet', 'unet'), 'vae': _load(vae, 'vae', 'vae')}
    if mask_unet:
      paths['mask_unet'] = mask_unet
      models['mask_unet'] = _load(mask_unet, 'mask_unet', 'mask_unet')
    return cls(**models, devices=devices, paths=paths,
               default_patch_size=demo.PATCH_SIZE if use_demo else DEFAULT_PATCH_SIZE)

  # ------------------------------------------------------------------------- requests

  def resolve(self, options: Options | None = None, **overrides) -> Options:
    """`options` with `overrides`, and the model-dependent patch sizes and eta filled in."""
    return request_lib.resolve(options, self.default_patch_size, **overrides)

  def request(self, image_size, n_batch: int = 1, options: Options | None = None, *,
              label: int | None = None, image: bool = True, whole_images: int = 0,
              label_source_pixels: int = 0, init: str | None = None,
              init_whole: bool = False, **overrides) -> request_lib.Request:
    """The checked `request.Request` for a batch of `n_batch` images of `image_size`
    with these models (`request.build`: `label` plans the mask stage for that class;
    the memory terms as there). ValueError (one line) for what the models cannot take."""
    return request_lib.build(self, image_size, self.resolve(options, **overrides),
                             n_batch=n_batch, label=label, image=image,
                             whole_images=whole_images,
                             label_source_pixels=label_source_pixels, init=init,
                             init_whole=init_whole)

  # ------------------------------------------------------------------------- stages

  def sample_labels(self, label: int = 1, image_size=1024, n_images: int = 1,
                    seed: int = 0, *, indices=None, options: Options | None = None,
                    **overrides) -> np.ndarray:
    """[N, H, W] int32 label maps from the mask model for class `label`; `image_size`:
    N (square) or (H, W).

    `overrides`: `Options` fields (sampling_steps, mask_patch_size, ...).
    """
    indices = _indices(indices, n_images)
    req = self.request(image_size, len(indices), options, label=label, image=False,
                       **overrides)
    return self.stages.run_mask(req, label, indices, seed)[0]

  def sample_latents(self, labels, seed: int = 0, *, indices=None, init_latents=None,
                     strength: float = 1.0, keep=None, options: Options | None = None,
                     **overrides) -> jax.Array:
    """[N, H/f, W/f, C] diffusion latents for pixel label maps `labels` [N, H, W];
    `init_latents` [N, H/f, W/f, C] (e.g. `encode(images)`) with `strength` in (0, 1]:
    start from them noised to the level where the last round(strength * S) steps begin;
    `keep` [N, H, W] (non-zero = keep): those pixels follow the init at every level
    (inpainting: the rest is generated to join them)."""
    o = self.resolve(options, **overrides)
    loop_lib.check_start(o.sampling_steps, strength, init=init_latents is not None,
                         keep=keep is not None)
    labels = stages_lib.check_labels(labels, self.unet.config.num_classes)
    req = request_lib.build(self, labels.shape[1:3], o, n_batch=len(labels))
    return self.stages.run_image(req, labels, _indices(indices, len(labels)), seed,
                                 init=init_latents, strength=strength, keep=keep)[0]

  def encode(self, images, *, options: Options | None = None, halo_px: int | None = None,
             **overrides) -> np.ndarray:
    """[N, H, W, 3] RGB images (uint8, or float in [0, 1]) -> [N, H/f, W/f, C] diffusion
    latents, tile by tile (`encode.py`; tiles of `patch_size`, a halo of patch/2: on
    the demo VAE, 256 x 384 px, 128 px tiles, the largest latent differs from the whole
    encode's by 3.8% of the latents' range with it, 7% with patch/4, 39% with none).
    `images` may also be one row source (`files/large_images.py`: a TIFF or OME-Zarr
    slide), read band by band: [1, H/f, W/f, C]."""
    o = self.resolve(options, **overrides)
    if hasattr(images, 'read_rows'):
      encode_lib.check_size(images.shape, self.geometry.factor)
      images = [images]
    else:
      images = encode_lib.check_images(images, self.geometry.factor)
    return self._encode_checked(images, o, halo_px)

  def _encode_checked(self, images, o: Options, halo_px: int | None = None) -> np.ndarray:
    """`encode` of images already checked (`encode.check_images`) or row sources."""
    fn = vae_lib.encode_fn(dataclasses.replace(self.vae.config, dtype=o.dtype))
    halo = o.patch_size // 2 if halo_px is None else halo_px
    return np.stack([encode_lib.encode_image(
        fn, self.vae.params, im, factor=self.geometry.factor, scale=self.geometry.scale,
        tile_px=o.patch_size, halo_px=halo, tile_batch=o.tile_batch) for im in images])

  # ------------------------------------------------------------------------- decode

  def iter_decode(self, latent, *, bands: tuple[int, int] | None = None,
                  options: Options | None = None, **overrides
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """One latent [h, w, C] -> `(row_start, uint8 rows [r, W, 3])` bands (bounded memory);
    `bands=(first, stop)`: only those (`decode.band_layout`; same pixels as the whole
    decode)."""
    o = self.resolve(options, **overrides)
    return decode_lib.iter_decode_bands(self.stages.decoder(o.dtype), self.vae.params,
                                        latent, self._decode_settings(o), uint8=True,
                                        bands=bands)

  def band_source(self, latent, *, options: Options | None = None, **overrides):
    """One latent [h, w, C] as a `output.shared_writer.BandSource`: its pixel size, band
    layout and a decode of any band range (what the shared writers take: they write,
    this decodes)."""
    from tiled_ldm_jax.output import shared_writer  # pylint: disable=g-import-not-at-top
    o = self.resolve(options, **overrides)
    band_rows, n_bands = decode_lib.band_layout(latent.shape, self._decode_settings(o))
    f = self.geometry.factor
    return shared_writer.BandSource(
        shape=(latent.shape[-3] * f, latent.shape[-2] * f), band_rows=band_rows,
        n_bands=n_bands, decode=lambda bands: self.iter_decode(latent, bands=bands, options=o))

  def decode(self, latents, *, options: Options | None = None, **overrides) -> np.ndarray:
    """[N, h, w, C] diffusion latents -> [N, H, W, 3] uint8 images (Hann-blended tiles)."""
    o = self.resolve(options, **overrides)
    latents = sharding.to_host(latents)
    if latents.ndim != 4:
      raise ValueError(f'latents must be [N, h, w, C], got shape {latents.shape}')
    return np.stack([decode_lib.decode_image(self.stages.decoder(o.dtype), self.vae.params,
                                             z, self._decode_settings(o), uint8=True)
                     for z in latents])

  def _decode_settings(self, o: Options) -> decode_lib.TiledDecodeSettings:
    return request_lib.decode_settings(self.geometry, o, o.patch_size)

  # ------------------------------------------------------------------------- all stages

  def __call__(self, label: int = 1, labels=None, image_size=1024,
               n_images: int = 1, seed: int = 0, *, indices=None, init_image=None,
               strength: float = 1.0, keep=None, options: Options | None = None,
               **overrides) -> Result:
    """Images for label maps `labels` [N, H, W], or for mask-model layouts of class `label`
    (`image_size`: N for square or (H, W); `n_images` of them). Same bytes as the staged
    calls. `init_image` [N, H, W, 3] (or [H, W, 3] for all) with `strength` in (0, 1]:
    regenerate those images (`encode`, then `sample_latents(init_latents=...)`); `keep`
    [H, W] or [N, H, W] (non-zero = keep, needs init_image): inpaint the rest."""
    o = self.resolve(options, **overrides)
    loop_lib.check_start(o.sampling_steps, strength, init=init_image is not None,
                         keep=keep is not None)
    stats = {}
    init = None
    if init_image is not None:
      init = encode_lib.check_images(init_image, self.geometry.factor)
      want = (request_lib.image_hw(image_size) if labels is None
              else tuple(np.shape(labels)[1:3]))
      if init.shape[1:3] != tuple(want):
        raise ValueError(f'init_image is {init.shape[1]}x{init.shape[2]}, the images are '
                         f'{want[0]}x{want[1]}')
    init_memory = {} if init is None else dict(
        init='keep' if keep is not None else 'strength', init_whole=True)
    if labels is None:   # checked (mask stage and image stage) before the mask stage runs
      indices = _indices(indices, n_images)
      req = request_lib.build(self, image_size, o, n_batch=n_images, label=label,
                              whole_images=n_images, **init_memory)
      req.check_memory()
      labels, stats['mask_stage'] = self.stages.run_mask(req, label, indices, seed)
      labels = stages_lib.check_labels(labels, self.unet.config.num_classes)
    else:   # given label maps are already in memory: checked first, then their request
      labels = stages_lib.check_labels(labels, self.unet.config.num_classes)
      req = request_lib.build(self, labels.shape[1:3], o, n_batch=len(labels),
                              whole_images=len(labels), label_source_pixels=labels[0].size,
                              **init_memory)
      req.check_memory()
    if init is not None:   # one image for all is encoded once
      init = np.broadcast_to(self._encode_checked(init, o), (len(labels),) + (
          init.shape[1] // self.geometry.factor, init.shape[2] // self.geometry.factor,
          self.unet.config.channels))
    latents, stats['image_stage'] = self.stages.run_image(
        req, labels, _indices(indices, len(labels)), seed, init=init, strength=strength,
        keep=None if keep is None else np.broadcast_to(keep, labels.shape))
    return Result(self.decode(latents, options=o), labels, stats)


def _indices(indices, n: int) -> np.ndarray:
  if indices is None:
    if n < 1:
      raise ValueError(f'n_images must be >= 1, got {n}')
    return np.arange(n)
  return np.asarray(indices)


