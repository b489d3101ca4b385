"""Mask adherence: does a generated image show, in each region, the texture its label asks for?

A small nearest-centroid classifier on per-patch colour and texture statistics, applied
to the patches of a generated image whose mask label is pure; the adherence is the
fraction of those patches whose predicted label equals the mask's. Two fits:

- the bundled demo models' (`tiled_ldm_jax/demo/adherence.json`, `load_classifier`): fit
  on the real tissue image the demo models were trained on, passed through the demo VAE
  (`tools/fit_demo_adherence.py`), for its classes 1 epithelium, 2 stroma,
  3 lumen/background;
- `fit_texture_classifier`: fit on the synthetic textures of `training/data.py`
  (optionally through a function, e.g. a VAE round trip, so that it sees what a decoder
  can reproduce), for models trained on synthetic data.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from tiled_ldm_jax.training import data as data_lib
from tiled_ldm_jax.files import image_files
from tiled_ldm_jax.files import label_maps

N_FEATURES = 11


def _patches(a: np.ndarray, patch: int) -> np.ndarray:
  """[H, W, ...] -> [n_rows * n_cols, patch, patch, ...] (the bottom/right remainder dropped)."""
  h, w = a.shape[0] // patch * patch, a.shape[1] // patch * patch
  a = a[:h, :w]
  r, c = h // patch, w // patch
  a = a.reshape((r, patch, c, patch) + a.shape[2:])
  return np.moveaxis(a, 2, 1).reshape((r * c, patch, patch) + a.shape[4:])


def patch_features(img: np.ndarray, patch: int) -> np.ndarray:
  """[H, W, 3] float in [0, 1] -> [n, 11]: per-patch mean and std of RGB, mean absolute
  gradient of grey along x and y, mean absolute Laplacian of grey, fraction of dark and
  of pale pixels."""
  p = _patches(np.asarray(img, np.float32), patch)                     # [n, P, P, 3]
  grey = p.mean(-1)                                                     # [n, P, P]
  gx = np.abs(np.diff(grey, axis=2)).mean((1, 2))
  gy = np.abs(np.diff(grey, axis=1)).mean((1, 2))
  lap = np.abs(4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1]
               - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]).mean((1, 2))
  dark = (grey < 0.45).mean((1, 2))
  pale = (grey > 0.8).mean((1, 2))
  return np.concatenate([p.mean((1, 2)), p.std((1, 2)),
                         np.stack([gx, gy, lap, dark, pale], -1)], -1)


def pure_patch_labels(labels: np.ndarray, patch: int, purity: float = 0.9):
  """(majority label [n], pure [n] bool): a patch is pure if >= `purity` of it is one label."""
  p = _patches(np.asarray(labels), patch).reshape(-1, patch * patch)
  majority = np.array([np.bincount(row).argmax() for row in p])
  share = (p == majority[:, None]).mean(1)
  return majority, share >= purity


@dataclasses.dataclass(frozen=True)
class TextureClassifier:
  """Nearest centroid in standardized feature space."""
  centroids: np.ndarray   # [L, F]; rows of labels never seen are NaN
  mean: np.ndarray        # [F]
  scale: np.ndarray       # [F]
  patch: int              # patch side in pixels
  features: tuple[int, ...] | None = None   # columns of `patch_features` used (None: all)

  def predict(self, feats: np.ndarray) -> np.ndarray:
    if self.features is not None:
      feats = feats[:, list(self.features)]
    z = (feats - self.mean) / self.scale
    c = (self.centroids - self.mean) / self.scale
    d = ((z[:, None, :] - c[None]) ** 2).sum(-1)
    return np.nanargmin(np.where(np.isnan(d), np.inf, d), axis=1)


def fit_texture_classifier(num_labels: int, *, patch: int = 16, n_images: int = 24,
                           size: int = 256, seed: int = 1234,
                           transform: Callable[[np.ndarray], np.ndarray] | None = None,
                           features: tuple[int, ...] | None = None
                           ) -> TextureClassifier:
  """Fits centroids on pure patches of synthetic images (through `transform` if given),
  on the `patch_features` columns `features` (None: all)."""
  spec = data_lib.SynthSpec(num_classes=num_labels)
  examples = ((ex.image, ex.labels) for ex in
              (data_lib.synth_example(seed + i, size, spec) for i in range(n_images)))
  return fit_on_examples(examples, num_labels, patch=patch, transform=transform,
                         features=features)


def fit_on_examples(examples, num_labels: int, *, patch: int = 16,
                    transform: Callable[[np.ndarray], np.ndarray] | None = None,
                    features: tuple[int, ...] | None = None,
                    skip_labels: tuple[int, ...] = ()) -> TextureClassifier:
  """Fits centroids on the pure patches of (image [H, W, 3] in [0, 1], labels [H, W])
  pairs (each image through `transform` if given), on the `patch_features` columns
  `features` (None: all); labels in `skip_labels` get no centroid."""
  feats, labs = [], []
  for image, labels in examples:
    img = transform(image) if transform else image
    lab, pure = pure_patch_labels(labels, patch)
    pure &= ~np.isin(lab, skip_labels)
    f = patch_features(img, patch)
    feats.append((f if features is None else f[:, list(features)])[pure])
    labs.append(lab[pure])
  feats, labs = np.concatenate(feats), np.concatenate(labs)
  if not labs.size:
    raise ValueError('no pure patches to fit on')
  centroids = np.full((num_labels, feats.shape[1]), np.nan, np.float32)
  for l in range(num_labels):
    if (labs == l).any():
      centroids[l] = feats[labs == l].mean(0)
  return TextureClassifier(centroids, feats.mean(0), feats.std(0) + 1e-6, patch,
                          None if features is None else tuple(features))


def classifier_to_json(clf: TextureClassifier) -> dict:
  """A JSON-able dict of `clf` (NaN centroid rows -- labels never seen -- as null)."""
  return {'patch': int(clf.patch),
          'features': None if clf.features is None else list(clf.features),
          'centroids': [None if np.isnan(r).any() else [float(v) for v in r]
                        for r in clf.centroids],
          'mean': [float(v) for v in clf.mean], 'scale': [float(v) for v in clf.scale]}


def classifier_from_json(d: dict) -> TextureClassifier:
  n = len(d['mean'])
  rows = [np.full(n, np.nan) if r is None else np.asarray(r) for r in d['centroids']]
  return TextureClassifier(np.asarray(rows, np.float32), np.asarray(d['mean'], np.float32),
                           np.asarray(d['scale'], np.float32), int(d['patch']),
                           None if d.get('features') is None else tuple(d['features']))


def save_classifier(path: str, clf: TextureClassifier, **info) -> None:
  """Writes `clf` as JSON (with `info`, e.g. what it was fit on, under "info")."""
  from tiled_ldm_jax.files import atomic
  atomic.write_json(path, {'classifier': classifier_to_json(clf), 'info': info}, indent=1)


def load_classifier(path: str) -> TextureClassifier:
  import json
  with open(path) as f:
    return classifier_from_json(json.load(f)['classifier'])


def shift_labels(labels: np.ndarray, ids=(1, 2, 3)) -> np.ndarray:
  """The wrong-mask control: each label in `ids` replaced by the next one (cyclically);
  other labels kept. An image that follows `labels` should score near 0 against this."""
  labels = np.asarray(labels)
  out = labels.copy()
  for a, b in zip(ids, ids[1:] + ids[:1]):
    out[labels == a] = b
  return out


COLOUR_FEATURES = (0, 1, 2)   # mean R, G, B of a patch


def fit_colour_classifier(num_labels: int, *, transform=None) -> TextureClassifier:
  """A second, held-out measure: mean colour only, 32 px patches, fit on other synthetic
  images than `fit_texture_classifier`'s (seeds 9000+). It agrees with the texture
  measure on what is right, but not on its mistakes."""
  return fit_texture_classifier(num_labels, patch=32, n_images=12, seed=9000,
                                transform=transform, features=COLOUR_FEATURES)


def mask_adherence(img: np.ndarray, labels: np.ndarray, classifier: TextureClassifier,
                   purity: float = 0.9, skip_labels: tuple[int, ...] = (0,)) -> dict:
  """Fraction of pure patches of `img` [H, W, 3] whose predicted texture is their mask label.

  Label 0 is skipped by default: the sampler gives label-0 ("unknown") pixels the
  unconditional output (SPEC 2), so no texture is asked for there.
  Returns `{"adherence", "patches", "per_label": {label: [agree, total]}}`; adherence is
  NaN when no patch is pure.
  """
  img = np.asarray(img)
  if img.dtype == np.uint8:
    img = img.astype(np.float32) / 255
  lab, pure = pure_patch_labels(labels, classifier.patch, purity)
  pure &= ~np.isin(lab, skip_labels)
  pred = classifier.predict(patch_features(img, classifier.patch)[pure])
  lab = lab[pure]
  per_label = {int(l): [int((pred[lab == l] == l).sum()), int((lab == l).sum())]
               for l in np.unique(lab)}
  return {'adherence': float((pred == lab).mean()) if lab.size else float('nan'),
          'patches': int(lab.size), 'per_label': per_label}


def vae_round_trip(vae_config, vae_params) -> Callable[[np.ndarray], np.ndarray]:
  """`[H, W, 3]` in [0, 1] -> the VAE's reconstruction (posterior mean), clipped to [0, 1].

  Fitting the classifier through this shows it what the decoder can reproduce: the
  tiny demo VAE smooths the finest texture, so a classifier fit on raw synthetic images
  misreads even perfect reconstructions (measured 0.46-0.70 agreement on VAE round trips
  of synthetic images, against 0.98-0.99 when fit through the round trip)."""
  import jax                                      # numpy-only users need no JAX here
  import jax.numpy as jnp
  from tiled_ldm_jax.models import vae as vae_lib
  enc, dec = jax.jit(vae_lib.encode_fn(vae_config)), jax.jit(vae_lib.decode_fn(vae_config))

  def transform(img):
    mean, _ = enc(vae_params, jnp.asarray(img, jnp.float32)[None])
    return np.clip(np.asarray(dec(vae_params, mean))[0], 0.0, 1.0)
  return transform


def score_sample(img: np.ndarray, labels: np.ndarray, classifier: TextureClassifier,
                 tile: int) -> dict:
  """Mask adherence (see `mask_adherence`), the decode's seam ratio at `tile` px and the
  line score (`seams.line_score`: lines anywhere, e.g. the sampler's window borders;
  None for an image too small for it)."""
  from tiled_ldm_jax.evaluation import seams  # pylint: disable=g-import-not-at-top
  img = np.asarray(img)             # uint8 or [0, 1] float: both measures take either
  if img.shape[:2] != labels.shape:
    raise ValueError(f'image {img.shape[:2]} and mask {labels.shape} differ in size')
  out = mask_adherence(img, labels, classifier)
  out['seam_ratio'] = float(seams.seam_ratio(img, tile))
  try:
    out['line_score'] = seams.line_score(img)
  except ValueError:     # smaller than a segment and its neighbours
    out['line_score'] = None
  return out


def demo_classifier_for(vae_dir: str) -> str | None:
  """The bundled demo classifier's path if `vae_dir` is the bundled demo VAE (the
  classifier was fit through it), else None."""
  import os
  from tiled_ldm_jax import demo
  path = demo.classifier_path()
  try:
    same = os.path.samefile(vae_dir, demo.model_path('vae'))
  except OSError:
    return None
  return path if same and os.path.isfile(path) else None


def score_files(image_path: str, *, mask_path: str | None = None, vae_dir: str | None = None,
                tile: int | None = None, num_labels: int | None = None,
                n_fit_images: int = 24, classifier_path: str | None = None) -> dict:
  """Scores a sample written by `sample_large_image.py`: adherence and seam ratio.

  Defaults come from the sample's JSON (`sampleNNNN.json` beside the image): the mask
  `sampleNNNN_mask.png`, the VAE the sample was decoded with, the decode tile
  (`patch_size`) and the image model's label count. The classifier: `classifier_path`
  (a `save_classifier` JSON) if given; else the bundled demo classifier when the VAE is
  the bundled demo VAE (fit on the real image through it); else one fit on synthetic
  images through the VAE's round trip. Raises FileNotFoundError / ValueError naming
  what is missing or inconsistent.
  """
  import json
  import os
  from tiled_ldm_jax.models import checkpoint
  stem = os.path.splitext(image_path)[0]
  meta = {}
  if os.path.isfile(stem + '.json'):
    with open(stem + '.json') as f:
      meta = json.load(f).get('config', {})
  mask_path = mask_path or stem + '_mask.png'
  vae_dir = vae_dir or meta.get('vae_ckpt')
  tile = tile or meta.get('patch_size')
  for what, value in (('vae_dir', vae_dir), ('tile', tile)):
    if not value:
      raise ValueError(f'{what} not given and no {stem}.json to read it from')
  if num_labels is None:
    if not meta.get('unet_ckpt'):
      raise ValueError(f'num_labels not given and no {stem}.json to read it from')
    num_labels = checkpoint.read_model_json(meta["unet_ckpt"])[1].num_classes
  for p in (image_path, mask_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(p)
  img = image_files.read_rgb(image_path, what='sample image')
  labels = label_maps.read_label_png(mask_path)
  classifier_path = classifier_path or demo_classifier_for(vae_dir)
  if classifier_path:
    clf = load_classifier(classifier_path)
  else:
    _, vae_cfg, vae_params = checkpoint.load_model(vae_dir, expect='vae')
    clf = fit_texture_classifier(num_labels, n_images=n_fit_images,
                                 transform=vae_round_trip(vae_cfg, vae_params))
  return {'image': image_path, 'mask': mask_path, 'tile': int(tile),
          'classifier': classifier_path or 'synthetic textures',
          **score_sample(img, labels, clf, int(tile))}
