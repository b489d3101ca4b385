"""Training data: synthetic histology-like images with label maps, and a folder reader.

Everything here is numpy (plus Pillow for files) and deterministic: an example is a pure
function of integer seeds, and a batch a pure function of `(seed, step)`, so a training
run that resumes from a checkpoint sees exactly the batches it would have seen.

Synthetic examples (`synth_example`):
- the label map is a Voronoi partition on a jittered grid of `region_size` pixels,
  evaluated at coordinates displaced by smooth multi-octave noise, so the borders are
  irregular; neighbouring cells with the same label merge into larger regions. Each
  cell's label is drawn with weights that depend on the example's *layout class* (the
  mask model's class): layout class c favours the labels l >= 1 with
  `(l - 1) % num_layout_classes == c`.
- each label has its own texture: 0 background (pale, smooth), 1 cell-like purple nuclei
  on pink, 2 oriented pink fibrous streaks, 3 dense small dark dots, 4 dark coarse grain;
  labels >= 5 take a texture from a parametrised family (colour, streak angle/period and
  dot spacing drawn from a generator seeded by the label id, so a label always looks the
  same kind of way). Each image gets a per-channel stain jitter and slight pixel noise.
Images are float32 `[H, W, 3]` in [0, 1]; labels int32 `[H, W]` in [0, num_classes).

Folder datasets use the original's layout: any folder tree holding `name.jpg` (or
.jpeg/.png/.tif) beside `name_mask.png` (label ids, read with `label_maps.read_label_png`).
`write_synthetic_dataset` writes synthetic examples in that layout (in `class_<c>/`
subfolders, c the layout class), and `FolderSource` reads it back with random crops,
flips and 90-degree rotations applied identically to the image and its mask.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Sequence

import numpy as np
from PIL import Image

from tiled_ldm_jax.files import image_files
from tiled_ldm_jax import masks as masks_lib
from tiled_ldm_jax.files import label_maps

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.tif', '.tiff')
MASK_SUFFIX = '_mask.png'
_CLASS_DIR = re.compile(r'^class_(\d+)$')

# H&E-like palette (RGB in [0, 1]).
_WHITE = np.array([0.95, 0.93, 0.95], np.float32)
_PINK = np.array([0.93, 0.64, 0.77], np.float32)
_PINK_LIGHT = np.array([0.97, 0.78, 0.86], np.float32)
_PINK_DEEP = np.array([0.83, 0.40, 0.60], np.float32)
_PURPLE = np.array([0.36, 0.20, 0.52], np.float32)
_LILAC = np.array([0.80, 0.68, 0.86], np.float32)
_DARK = np.array([0.42, 0.26, 0.36], np.float32)


@dataclasses.dataclass(frozen=True)
class SynthSpec:
  """How synthetic examples look."""
  num_classes: int = 5            # label ids 0..num_classes-1 (0 = background)
  num_layout_classes: int = 2     # layout classes (the mask model's classes)
  region_size: float = 48.0       # Voronoi grid spacing in pixels (mean region side)
  region_size_max: float = 0.0    # > region_size: per example, log-uniform in between
  border_jitter: float = 0.35     # border displacement amplitude, fraction of region_size
  colour_jitter: float = 0.04     # std of the per-image per-channel stain gain
  pixel_noise: float = 0.01       # std of the per-pixel Gaussian noise

  def __post_init__(self):
    if self.num_classes < 2:
      raise ValueError(f'num_classes must be >= 2, got {self.num_classes}')
    if self.num_layout_classes < 1:
      raise ValueError(f'num_layout_classes must be >= 1, got {self.num_layout_classes}')
    if self.region_size < 2:
      raise ValueError(f'region_size must be >= 2 pixels, got {self.region_size}')
    if self.region_size_max and self.region_size_max < self.region_size:
      raise ValueError(f'region_size_max {self.region_size_max} < region_size '
                       f'{self.region_size}')


@dataclasses.dataclass
class Example:
  image: np.ndarray | None   # float32 [H, W, 3] in [0, 1] (None: labels only)
  labels: np.ndarray         # int32 [H, W]
  layout_class: int          # the example's layout class (mask model class)


def _rng(seed) -> np.random.Generator:
  if isinstance(seed, np.random.Generator):
    return seed
  return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- noise


def _smoothstep(t):
  return t * t * (3.0 - 2.0 * t)


def value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
  """Smooth noise in [-1, 1] of feature size `cell` pixels: a random lattice, interpolated."""
  cell = max(float(cell), 1.0)
  gh, gw = int(math.ceil(h / cell)) + 2, int(math.ceil(w / cell)) + 2
  grid = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
  oy, ox = rng.uniform(0.0, 1.0, 2)
  y = np.arange(h, dtype=np.float32) / cell + oy
  x = np.arange(w, dtype=np.float32) / cell + ox
  y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
  fy, fx = _smoothstep(y - y0)[:, None], _smoothstep(x - x0)[None, :]
  top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
  bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
  return (top * (1 - fy) + bottom * fy).astype(np.float32)


def fbm(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3) -> np.ndarray:
  """Sum of `octaves` value noises, each half the size and amplitude of the previous."""
  out = np.zeros((h, w), np.float32)
  amp, total = 1.0, 0.0
  for _ in range(octaves):
    out += amp * value_noise(rng, h, w, cell)
    total += amp
    amp, cell = amp * 0.5, cell * 0.5
  return out / total


def worley(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, spacing: float,
           jitter: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """Distance to, and id of, the nearest feature point (one per `spacing` grid cell).

  Args:
    yy, xx: pixel coordinates (any equal shapes, may be displaced).
    spacing: grid cell side in pixels.
    jitter: 0 puts each point at its cell's corner, 1 anywhere in its cell.

  Returns:
    (distance float32, point id int64), shaped like `yy`. Ids index a flat lattice of
    `(ceil(max y / spacing) + 4) * (ceil(max x / spacing) + 4)` points.
  """
  ymin, xmin = float(np.floor(yy.min())), float(np.floor(xx.min()))
  gy = ((yy - ymin) * np.float32(1.0 / spacing) + 2.0).astype(np.float32)
  gx = ((xx - xmin) * np.float32(1.0 / spacing) + 2.0).astype(np.float32)
  gh, gw = int(np.ceil(gy.max())) + 3, int(np.ceil(gx.max())) + 3
  pts = rng.uniform(0.0, jitter, (gh, gw, 2)).astype(np.float32)
  # Feature point of lattice cell (i, j), relative to the pixel's cell corner.
  py = (pts[..., 0] + np.arange(gh, dtype=np.float32)[:, None]).ravel()
  px = (pts[..., 1] + np.arange(gw, dtype=np.float32)[None, :]).ravel()
  cy, cx = np.floor(gy).astype(np.int32), np.floor(gx).astype(np.int32)
  base = cy * gw + cx
  offsets = np.array([dy * gw + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)], np.int32)
  cand = base[None] + offsets.reshape((9,) + (1,) * base.ndim)       # [9, ...] lattice ids
  d = np.square(py[cand] - gy) + np.square(px[cand] - gx)            # [9, ...]
  k = np.argmin(d, axis=0)[None]
  best = np.take_along_axis(d, k, 0)[0]
  best_id = np.take_along_axis(cand, k, 0)[0].astype(np.int64)
  return np.sqrt(best) * np.float32(spacing), best_id


def _grid(h: int, w: int):
  return np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                     indexing='ij')


# ----------------------------------------------------------------------------- label maps


def layout_weights(layout_class: int, num_classes: int, num_layout_classes: int) -> np.ndarray:
  """Label probabilities of a layout class: background 1, favoured labels 4, others 1."""
  if not 0 <= layout_class < num_layout_classes:
    raise ValueError(f'layout_class must be in [0, {num_layout_classes}), got {layout_class}')
  w = np.ones(num_classes, np.float64)
  ids = np.arange(1, num_classes)
  w[1:] = np.where((ids - 1) % num_layout_classes == layout_class, 4.0, 1.0)
  return w / w.sum()


def synth_labels(rng, size: int | Sequence[int], spec: SynthSpec,
                 layout_class: int) -> np.ndarray:
  """Irregular label regions: int32 [H, W] in [0, num_classes)."""
  rng = _rng(rng)
  h, w = masks_lib._size_hw(size)  # pylint: disable=protected-access
  yy, xx = _grid(h, w)
  amp = spec.border_jitter * spec.region_size
  dy = amp * fbm(rng, h, w, spec.region_size * 0.75, octaves=4)
  dx = amp * fbm(rng, h, w, spec.region_size * 0.75, octaves=4)
  _, ids = worley(rng, yy + dy, xx + dx, spec.region_size)
  probs = layout_weights(layout_class, spec.num_classes, spec.num_layout_classes)
  cell_labels = rng.choice(spec.num_classes, size=int(ids.max()) + 1, p=probs)
  return cell_labels[ids].astype(np.int32)


def render_mask_image(labels: np.ndarray, num_labels: int) -> np.ndarray:
  """A label map as the mask model's grey image: `labels / (num_labels - 1)` on 3 channels.

  Args:
    labels: int `[..., H, W]`.
  Returns:
    float32 `[..., H, W, 3]` in [0, 1].
  """
  if num_labels < 2:
    raise ValueError(f'num_labels must be >= 2, got {num_labels}')
  g = np.asarray(labels, np.float32) / np.float32(num_labels - 1)
  return np.repeat(g[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------- textures


def _lerp(a, b, t):
  t = np.asarray(t, np.float32)[..., None]
  return a * (1.0 - t) + b * t


def _nuclei(rng, yy, xx, spacing, radius, softness=0.8):
  """Coverage in [0, 1] of round blobs of random radius (about `radius`) on a jittered grid."""
  d, ids = worley(rng, yy, xx, spacing, jitter=0.8)
  radii = radius * rng.uniform(0.7, 1.3, int(ids.max()) + 1).astype(np.float32)
  return np.clip((radii[ids] - d) / softness + 0.5, 0.0, 1.0)


def _streaks(rng, h, w, angle, period, warp):
  yy, xx = _grid(h, w)
  phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period)
  phase = phase + warp * fbm(rng, h, w, period * 3, octaves=2)
  return ((0.5 + 0.5 * np.sin(phase)) ** 3).astype(np.float32)


def _texture_background(rng, h, w):
  return _WHITE + 0.02 * fbm(rng, h, w, 24.0)[..., None]


def _texture_cells(rng, h, w):
  yy, xx = _grid(h, w)
  base = _lerp(_PINK, _PINK_LIGHT, 0.5 + 0.5 * fbm(rng, h, w, 12.0))
  nuc = _nuclei(rng, yy, xx, spacing=10.0, radius=3.3)
  return _lerp(base, _PURPLE, 0.9 * nuc)


def _texture_fibres(rng, h, w):
  angle = rng.uniform(0, math.pi)
  s = _streaks(rng, h, w, angle, period=rng.uniform(5.0, 8.0), warp=6.0)
  return _lerp(_PINK_LIGHT, _PINK_DEEP, 0.85 * s)


def _texture_dots(rng, h, w):
  yy, xx = _grid(h, w)
  dots = _nuclei(rng, yy, xx, spacing=4.5, radius=1.3, softness=0.6)
  return _lerp(_LILAC, _PURPLE * 0.8, 0.9 * dots)


def _texture_grain(rng, h, w):
  grain = value_noise(rng, h, w, 2.5) * 0.7 + fbm(rng, h, w, 16.0) * 0.3
  return _DARK * (1.0 + 0.45 * grain[..., None])


def _texture_family(label: int, rng, h, w):
  """Labels >= 5: parameters fixed by the label id, noise by the image."""
  p = np.random.default_rng([7919, label])
  base = np.array([p.uniform(0.55, 0.95), p.uniform(0.3, 0.8), p.uniform(0.55, 0.9)],
                  np.float32)
  ink = base * p.uniform(0.3, 0.6)
  angle, period = p.uniform(0, math.pi), p.uniform(4.0, 14.0)
  spacing = p.uniform(4.0, 16.0)
  streak_w, dot_w = p.uniform(0.0, 0.8), p.uniform(0.0, 0.8)
  yy, xx = _grid(h, w)
  s = _streaks(rng, h, w, angle, period, warp=p.uniform(0.0, 8.0))
  dots = _nuclei(rng, yy, xx, spacing, radius=spacing * p.uniform(0.15, 0.35))
  return _lerp(base, ink, np.clip(streak_w * s + dot_w * dots, 0.0, 1.0))


_TEXTURES = (_texture_background, _texture_cells, _texture_fibres, _texture_dots,
             _texture_grain)


def texture(label: int, rng, h: int, w: int) -> np.ndarray:
  """float32 [h, w, 3] texture of `label` (unclipped, before the per-image jitter)."""
  rng = _rng(rng)
  if label < len(_TEXTURES):
    return _TEXTURES[label](rng, h, w).astype(np.float32)
  return _texture_family(label, rng, h, w).astype(np.float32)


def synth_image(rng, labels: np.ndarray, spec: SynthSpec) -> np.ndarray:
  """Paints each label's texture where it occurs, then per-image stain jitter and noise."""
  rng = _rng(rng)
  h, w = labels.shape
  img = np.zeros((h, w, 3), np.float32)
  for label in range(spec.num_classes):
    sub = np.random.default_rng(rng.integers(1 << 62))  # same stream whatever is present
    where = labels == label
    if where.any():
      img = np.where(where[..., None], texture(label, sub, h, w), img)
  gain = 1.0 + spec.colour_jitter * rng.standard_normal(3).astype(np.float32)
  shift = 0.5 * spec.colour_jitter * rng.standard_normal(3).astype(np.float32)
  img = img * gain + shift
  img = img + spec.pixel_noise * rng.standard_normal(img.shape).astype(np.float32)
  return np.clip(img, 0.0, 1.0).astype(np.float32)


def synth_example(seed, size: int | Sequence[int], spec: SynthSpec = SynthSpec(), *,
                  layout_class: int | None = None, with_image: bool = True) -> Example:
  """One synthetic example, a pure function of `seed` (int, sequence of ints, or Generator)."""
  rng = _rng(seed)
  if spec.region_size_max:          # drawn only then, so fixed-size streams are unchanged
    lo, hi = np.log(spec.region_size), np.log(spec.region_size_max)
    spec = dataclasses.replace(spec, region_size=float(np.exp(rng.uniform(lo, hi))),
                               region_size_max=0.0)
  c = int(rng.integers(spec.num_layout_classes)) if layout_class is None else int(layout_class)
  labels = synth_labels(rng, size, spec, c)
  image = synth_image(rng, labels, spec) if with_image else None
  return Example(image=image, labels=labels, layout_class=c)


# ----------------------------------------------------------------------------- augmentation


def augment(image: np.ndarray | None, labels: np.ndarray, rng) -> tuple[np.ndarray | None,
                                                                        np.ndarray]:
  """The same random flips and 90-degree rotation for an image [H, W, C] and its labels [H, W]."""
  rng = _rng(rng)
  k, flip_v, flip_h = int(rng.integers(4)), bool(rng.integers(2)), bool(rng.integers(2))

  def apply(a):
    if a is None:
      return None
    a = np.rot90(a, k, axes=(0, 1))
    if flip_v:
      a = a[::-1]
    if flip_h:
      a = a[:, ::-1]
    return np.ascontiguousarray(a)
  return apply(image), apply(labels)


def random_crop(image, labels, size: int, rng):
  """A `size` x `size` window at a random position (identical for image and labels)."""
  h, w = labels.shape
  if h < size or w < size:
    raise ValueError(f'example of {h}x{w} is smaller than the crop size {size}')
  y, x = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
  crop = lambda a: None if a is None else a[y:y + size, x:x + size]
  return crop(image), crop(labels)


# ----------------------------------------------------------------------------- sources


class SyntheticSource:
  """Batches of synthetic examples; `batch(step)` is a pure function of (seed, step).

  With `downscale` d > 1 the label maps are made directly at 1/d scale (regions d times
  smaller), like a mask downscaled by d -- what the mask model trains on.
  """

  def __init__(self, spec: SynthSpec, size: int, batch_size: int, seed: int, *,
               with_images: bool = True, downscale: int = 1, stream: int = 0):
    self.spec = dataclasses.replace(spec, region_size=spec.region_size / downscale,
                                    region_size_max=spec.region_size_max / downscale)
    self.size, self.batch_size, self.seed = size, batch_size, seed
    self.with_images, self.stream = with_images, stream

  def step_example(self, step: int, i: int) -> Example:
    """Example `i` of batch `step` (a pure function of (seed, stream, step, i))."""
    return synth_example([self.seed, self.stream, step, i], self.size, self.spec,
                         with_image=self.with_images)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    return _stack([self.step_example(step, i) for i in range(self.batch_size)],
                  self.with_images)


def record(ex: Example, with_images: bool) -> dict[str, np.ndarray]:
  """One example as arrays: labels int32 [H, W], layout_class int32 [], image float32
  [H, W, 3] (with_images). Stacking records gives exactly `_stack`'s batch."""
  out = {'labels': np.asarray(ex.labels, np.int32),
         'layout_class': np.asarray(ex.layout_class, np.int32)}
  if with_images:
    out['image'] = np.asarray(ex.image, np.float32)
  return out


def _stack(exs: list[Example], with_images: bool) -> dict[str, np.ndarray]:
  out = {'labels': np.stack([e.labels for e in exs]).astype(np.int32),
         'layout_class': np.array([e.layout_class for e in exs], np.int32)}
  if with_images:
    out['image'] = np.stack([e.image for e in exs]).astype(np.float32)
  return out


def find_pairs(root: str) -> list[tuple[str, str]]:
  """Sorted (image path, mask path) pairs under `root` (any depth): `name.jpg` + `name_mask.png`."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'dataset folder not found: {root}')
  pairs = []
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    names = set(files)
    for f in sorted(files):
      stem, ext = os.path.splitext(f)
      if ext.lower() in IMAGE_EXTENSIONS and not stem.endswith('_mask'):
        mask = stem + MASK_SUFFIX
        if mask in names:
          pairs.append((os.path.join(folder, f), os.path.join(folder, mask)))
  if not pairs:
    raise ValueError(f'no image/mask pairs (name.jpg + name{MASK_SUFFIX}) under {root}')
  return pairs


def read_image(path: str) -> np.ndarray:
  """float32 [H, W, 3] in [0, 1]."""
  return image_files.read_rgb(path, what='training image').astype(np.float32) / 255.0


def check_pairs(pairs, num_classes: int | None, with_images: bool, crop: int,
                downscale: int = 1) -> None:
  """One pass over a folder dataset before any training (and before a workdir exists):
  every mask a label PNG of known labels, every image decodable in a documented format
  and of its mask's size, every mask (downscaled by `downscale`) at least a `crop`
  square. ValueError naming the first bad file."""
  for img_path, mask_path in pairs:
    labels = label_maps.read_label_png(mask_path)
    h, w = labels.shape
    if h // downscale < crop or w // downscale < crop:
      raise ValueError(f'{mask_path}: {h} x {w} is smaller than the crop of {crop} px'
                       + (f' (x{downscale})' if downscale > 1 else ''))
    if num_classes is not None:
      try:
        masks_lib.validate_labels(labels, num_classes)
      except ValueError as e:
        raise ValueError(f'{mask_path}: {e}') from None
    if with_images:
      with image_files.open_image(img_path, image_files.PICTURE_FORMATS,
                                  what='training image') as img:
        size = img.size[::-1]
      if tuple(size) != labels.shape:
        raise ValueError(f'{img_path} is {size[0]} x {size[1]} but its mask is '
                         f'{labels.shape[0]} x {labels.shape[1]}')
    del labels


def folder_layout_class(mask_path: str, labels: np.ndarray) -> int:
  """The layout class of a folder example: `c` of a `class_<c>` parent folder, else the
  most frequent non-zero label (0 if there is none)."""
  m = _CLASS_DIR.match(os.path.basename(os.path.dirname(mask_path)))
  if m:
    return int(m.group(1))
  counts = np.bincount(labels.ravel(), minlength=2)[1:]
  return int(np.argmax(counts)) + 1 if counts.sum() else 0


class FolderSource:
  """Batches from a folder dataset: crops of `size`, random flips and rotations.

  Example order: epoch e visits the pairs in the permutation drawn from (seed, e); batch
  `step` holds the examples `step*B .. step*B+B-1` of that endless sequence. Crops and
  augmentations are drawn from (seed, step, i). With `downscale` d > 1 the mask is
  resized by 1/d (nearest) before cropping and the image is not read (mask-model data).
  """

  def __init__(self, root: str, size: int, batch_size: int, seed: int, *,
               with_images: bool = True, downscale: int = 1, augment_data: bool = True,
               num_classes: int | None = None, stream: int = 0):
    self.pairs = find_pairs(root)
    self.size, self.batch_size, self.seed = size, batch_size, seed
    self.with_images = with_images and downscale == 1
    check_pairs(self.pairs, num_classes, self.with_images, size, max(downscale, 1))
    self.downscale, self.augment, self.num_classes = downscale, augment_data, num_classes
    self.stream = stream

  def _index(self, g: int) -> int:
    n = len(self.pairs)
    perm = np.random.default_rng([self.seed, self.stream, 1, g // n]).permutation(n)
    return int(perm[g % n])

  def example(self, index: int, rng) -> Example:
    img_path, mask_path = self.pairs[index]
    labels = label_maps.read_label_png(mask_path)
    if self.num_classes is not None:
      try:
        masks_lib.validate_labels(labels, self.num_classes)
      except ValueError as e:
        raise ValueError(f'{mask_path}: {e}') from e
    image = None
    if self.with_images:
      image = read_image(img_path)
      if image.shape[:2] != labels.shape:
        raise ValueError(f'{img_path} is {image.shape[:2]} but its mask is {labels.shape}')
    layout = folder_layout_class(mask_path, labels)
    if self.downscale > 1:
      h, w = labels.shape
      labels = masks_lib.resize_labels(labels, (h // self.downscale, w // self.downscale))
    image, labels = random_crop(image, labels, self.size, rng)
    if self.augment:
      image, labels = augment(image, labels, rng)
    return Example(image=image, labels=labels, layout_class=layout)

  def step_example(self, step: int, i: int) -> Example:
    """Example `i` of batch `step` (a pure function of (seed, stream, step, i))."""
    rng = np.random.default_rng([self.seed, self.stream, 2, step, i])
    return self.example(self._index(step * self.batch_size + i), rng)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    return _stack([self.step_example(step, i) for i in range(self.batch_size)],
                  self.with_images)


def write_synthetic_dataset(root: str, n: int, size: int, seed: int,
                            spec: SynthSpec = SynthSpec(), quality: int = 95) -> list[str]:
  """Writes n synthetic examples as `root/class_<c>/synth_NNNNN.jpg` + `..._mask.png`.

  Example i is `synth_example([seed, i])` with layout class `i % num_layout_classes`.
  Returns the image paths.
  """
  paths = []
  for i in range(n):
    c = i % spec.num_layout_classes
    ex = synth_example([seed, i], size, spec, layout_class=c)
    folder = os.path.join(root, f'class_{c}')
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'synth_{i:05d}.jpg')
    Image.fromarray(np.round(ex.image * 255).astype(np.uint8)).save(path, quality=quality)
    label_maps.write_label_png(os.path.join(folder, f'synth_{i:05d}{MASK_SUFFIX}'), ex.labels)
    paths.append(path)
  return paths
