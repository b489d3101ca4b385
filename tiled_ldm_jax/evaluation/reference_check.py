"""Parity of this port against outputs of the original code (a folder like shared/reference).

Each model found in the folder is converted with the public converter into
`output_dir/<model>` and loaded back from there, so a pass covers conversion, the orbax
round trip and the forward pass. Cases are discovered from the files and array names
present; `run_cases` yields one result dict per case.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax import convert
from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax import geometry
from tiled_ldm_jax import masks as masks_lib

TOL = 1e-4   # float32 outputs of size ~1


def nhwc(a: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(np.moveaxis(a, 1, -1))


def max_err(ours, theirs_nchw: np.ndarray) -> float:
  ours = np.asarray(ours)
  if ours.ndim == 4:
    ours = np.moveaxis(ours, -1, 1)
  if ours.shape != theirs_nchw.shape:
    raise ValueError(f'shape {ours.shape} != reference {theirs_nchw.shape}')
  return float(np.abs(ours.astype(np.float64) - theirs_nchw).max())


class Context:
  """Lazily converts and loads each reference model once."""

  def __init__(self, reference_dir: str, output_dir: str):
    self.reference_dir = reference_dir
    self.output_dir = output_dir
    self._models = {}

  def path(self, *parts: str) -> str:
    return os.path.join(self.reference_dir, *parts)

  def npz(self, *parts: str):
    return np.load(self.path(*parts))

  def model(self, kind: str):
    """(config, params) of `kind` in image_unet | mask_unet | vae."""
    if kind not in self._models:
      out = os.path.join(self.output_dir, kind)
      if not os.path.exists(os.path.join(out, 'model.json')):
        src = self.path('vae') if kind == 'vae' else self.path(kind, 'model-1.pt')
        convert.convert_checkpoint(kind, src, out)
      _, config, params = checkpoint.load_model(out, expect=kind)
      self._models[kind] = (config, params)
    return self._models[kind]


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  run: Callable[[Context], float]   # -> max abs error
  tol: float = TOL


def _unet_cases(ctx: Context) -> Iterator[Case]:
  from tiled_ldm_jax.models import unet  # pylint: disable=g-import-not-at-top
  if os.path.isfile(ctx.path('image_unet', 'cases.npz')):
    d = ctx.npz('image_unet', 'cases.npz')

    def image_eps(ctx, key, w):
      config, params = ctx.model('image_unet')
      f = jax.jit(unet.eps_fn(config))
      x, t, m = nhwc(d['x']), jnp.asarray(d['t']), jnp.asarray(d['masks'][:, 0]).astype(jnp.int32)
      cond = f(params, x, t, m)
      out = cond if w is None else diffusion.guide(f(params, x, t, jnp.zeros_like(m)), cond, w)
      return max_err(out, d[key])

    if 'eps' in d:
      yield Case('image_unet/eps', lambda c: image_eps(c, 'eps', None))
    if 'eps_cfg4' in d:   # weight 4 = null + 4 (cond - null), i.e. w = 3
      yield Case('image_unet/eps_cfg4', lambda c: image_eps(c, 'eps_cfg4', 3.0))
    for key in d.files:
      m = re.fullmatch(r'ddim_(\d+)_(\d+)_cfg(\d+(?:\.\d+)?)', key)
      if m:
        t, t_next, weight = int(m[1]), int(m[2]), float(m[3])
        yield Case(f'ddim/{key}', lambda c, k=key, a=t, b=t_next, w=weight - 1: _ddim(c, d, k, a, b, w))

  if os.path.isfile(ctx.path('mask_unet', 'cases.npz')):
    dm = ctx.npz('mask_unet', 'cases.npz')

    def mask_eps(ctx, key, null):
      config, params = ctx.model('mask_unet')
      classes = jnp.asarray(dm['classes'])
      out = jax.jit(unet.eps_fn(config))(params, nhwc(dm['x']), jnp.asarray(dm['t']), classes,
                                         jnp.full(classes.shape, null))
      return max_err(out, dm[key])

    for key, null in (('eps_cond', False), ('eps_null', True)):
      if key in dm:
        yield Case(f'mask_unet/{key}', lambda c, k=key, n=null: mask_eps(c, k, n))


def _ddim(ctx: Context, d, key: str, t: int, t_next: int, w: float) -> float:
  from tiled_ldm_jax.models import unet  # pylint: disable=g-import-not-at-top
  config, params = ctx.model('image_unet')
  sched = diffusion.Schedule()
  eps_fn = unet.eps_fn(config)

  @jax.jit
  def step(params, x, labels, noise):
    b = x.shape[0]
    tt, tn = jnp.full((b,), t, jnp.int32), jnp.full((b,), t_next, jnp.int32)
    eps, _ = diffusion.multilabel_eps(eps_fn, params, x, tt, labels,
                                      num_classes=config.num_classes, w=w)
    return diffusion.ddim_step(sched, x, eps, tt, tn, noise)

  out = step(params, nhwc(d['x']), jnp.asarray(d['masks'][:, 0]).astype(jnp.int32),
             nhwc(d['noise']))
  return max_err(out, d[key])


def _vae_cases(ctx: Context) -> Iterator[Case]:
  if not os.path.isfile(ctx.path('vae', 'cases.npz')):
    return
  d = ctx.npz('vae', 'cases.npz')

  def decoded(ctx):
    from tiled_ldm_jax.models import vae  # pylint: disable=g-import-not-at-top
    config, params = ctx.model('vae')
    return max_err(jax.jit(vae.decode_fn(config))(params, nhwc(d['z'])), d['decoded'])

  if 'decoded' in d:
    yield Case('vae/decoded', decoded)


def _clean_mask_cases(ctx: Context) -> Iterator[Case]:
  if not os.path.isfile(ctx.path('clean_mask_cases.npz')):
    return
  d = ctx.npz('clean_mask_cases.npz')
  for key in d.files:
    m = re.fullmatch(r'in(\d+)', key)
    if m and f'out{m[1]}' in d:
      out = d[f'out{m[1]}']
      # The reference runs CleanMask(num_labels=5, ups_mask_size=out side).
      yield Case(f'clean_mask/{key}',
                 lambda c, i=d[key], o=out: float(np.abs(
                     masks_lib.clean_mask(i, 5, o.shape).astype(np.int64) - o).max()),
                 tol=0.0)


def _blend_cases(ctx: Context) -> Iterator[Case]:
  """`vae/blend_cases.npz`: the 15 Hann windows, the unshifted tiled decode, the blend."""
  if not os.path.isfile(ctx.path('vae', 'blend_cases.npz')):
    return
  from tiled_ldm_jax import decode  # pylint: disable=g-import-not-at-top
  d = ctx.npz('vae', 'blend_cases.npz')
  p = int(d['patch_size'])
  for key in d.files:
    if key.startswith('window_'):
      yield Case(f'blend/{key}', lambda c, k=key: float(np.abs(
          np.asarray(decode.hann_windows(p)[k[len('window_'):]], np.float64) - d[k]).max()))

  def tiled(ctx, key, blend):
    from tiled_ldm_jax.models import vae  # pylint: disable=g-import-not-at-top
    config, params = ctx.model('vae')
    # The reference z is already divided by 50; the decode multiplies by 50 and clips.
    out = decode.decode_image(vae.decode_fn(config), params, nhwc(d['z']), patch_size=p,
                              factor=config.downsample_factor, latent_scale=geometry.DIFFINFINITE_LATENT_SCALE,
                              clip=(0.0, 1.0), blend=blend)
    return max_err(out, d[key])

  for key, blend in (('tiled_no_blend', False), ('blended', True)):
    if key in d:
      yield Case(f'blend/{key}', lambda c, k=key, b=blend: tiled(c, k, b))


CASE_SOURCES = [_unet_cases, _vae_cases, _clean_mask_cases, _blend_cases]


def discover(ctx: Context) -> list[Case]:
  return [case for source in CASE_SOURCES for case in source(ctx)]


def run_cases(reference_dir: str, output_dir: str) -> Iterator[dict]:
  """Runs every case present; yields `{"case", "max_abs_err", "tol", "ok"}` (or "error")."""
  if not os.path.isdir(reference_dir):
    raise FileNotFoundError(f'reference folder not found: {reference_dir}')
  ctx = Context(reference_dir, output_dir)
  for case in discover(ctx):
    try:
      err = case.run(ctx)
      yield {'case': case.name, 'max_abs_err': err, 'tol': case.tol,
             'ok': bool(np.isfinite(err) and err <= case.tol)}
    except Exception as e:  # pylint: disable=broad-except
      yield {'case': case.name, 'max_abs_err': None, 'tol': case.tol, 'ok': False,
             'error': f'{type(e).__name__}: {e}'}
