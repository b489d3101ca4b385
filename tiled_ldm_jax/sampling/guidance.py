"""Denoisers for the sampler, built from a model's function (the sampler imports none).

A denoiser is `(params, x [B, P, P, C], t [B], cond_patch) -> pred [B, P, P, C]`, or
`(pred, samples evaluated)` so that the sampler's counters see guidance passes;
`cond_patch` is the conditioning pytree cropped to the patch (`loop.Spatial` leaves)
or taken from the patch's image (other leaves). Guidance is a wrapper around a
denoiser: `classifier_free_guidance` (one conditional and one unconditional pass) or
`multilabel_guidance` (the image model's L+1 passes; SPEC 2). Both use the project's
weight convention `null + (1 + w)(cond - null)` (w = 0: the conditional pass only).

The builders with hashable arguments are cached: the same model function and settings
give the same denoiser object, so the compiled-sampler cache (`loop.compiled`, keyed
by the denoiser) is hit by every Pipeline and call that asks for it again.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax import program_cache
from tiled_ldm_jax.sampling import processes


def counted(out, batch: int):
  """(prediction as float32, samples evaluated) of a denoiser's output."""
  pred, evals = out if isinstance(out, tuple) else (out, batch)
  return pred.astype(jnp.float32), evals


def classifier_free_guidance(denoise, w: float, null_cond):
  """`denoise` guided by weight w: conditional and unconditional passes as one batch 2B.

  null_cond: the unconditional conditioning, either a pytree like the cond patch whose
  leaves broadcast to it (e.g. `0` for a label map, a [D] null embedding for [B, D]), or
  a function `cond_patch -> null cond_patch`.
  """
  def guided(params, x, t, cond):
    b = x.shape[0]
    if w == 0.0:
      return counted(denoise(params, x, t, cond), b)
    if callable(null_cond):
      null = null_cond(cond)
    else:
      null = jax.tree_util.tree_map(
          lambda n, c: jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape), null_cond, cond)
    both = jax.tree_util.tree_map(lambda c, n: jnp.concatenate([c, n]), cond, null)
    out, evals = counted(denoise(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                                 both), 2 * b)
    c, n = jnp.split(out, 2)
    return diffusion.guide(n, c, w), evals
  if isinstance(null_cond, (int, float)):    # else no program key: traced every process
    program_cache.keyed(guided, 'cfg', denoise, w, null_cond)
  return guided


@functools.cache
def multilabel_guidance(denoise, num_classes: int, w: float):
  """The image model's multi-label guidance for a denoiser whose cond is a label map.

  `denoise(params, x, t, labels [B, P, P]) -> pred`; label l > 0 pixels take the pass
  with mask `(labels == l) * l`, guided by the all-zero-mask pass; label 0 pixels the
  unconditional pass (L+1 passes; `diffusion.multilabel_eps`).
  """
  def fn(params, x, t, labels, valid=None):
    return diffusion.multilabel_eps(lambda *a: counted(denoise(*a), x.shape[0])[0], params,
                                    x, t, labels, num_classes=num_classes, w=w, valid=valid)
  fn.skips_idle = True      # the sampler passes `valid`: idle slots cost no U-Net samples
  return program_cache.keyed(fn, 'multilabel', denoise, num_classes, w)


@functools.cache
def trained_unet(apply_fn, objective: str = 'eps'):
  """(network fn, its `processes` strategy) for a U-Net trained with `objective`
  (checkpoint.read_objective). eps: the original's DDIM with x0 clipped to [-1, 1];
  v: DDIM on the same cosine schedule, unclipped; flow: Euler, the network told
  t * FLOW_TIME_SCALE."""
  if objective == 'eps':
    return apply_fn, processes.Diffusion('eps', clip_x0=1.0)
  if objective == 'v':
    return apply_fn, processes.Diffusion('v')
  if objective == 'flow':
    def net(params, x, t, *cond):
      return apply_fn(params, x, t * diffusion.FLOW_TIME_SCALE, *cond)
    return program_cache.keyed(net, 'flow_net', apply_fn), processes.Flow()
  raise ValueError(f'objective must be eps, v or flow, got {objective!r}')


@functools.cache
def mask_denoiser(eps_fn, cond_scale: float):
  """The mask model's class-conditioned step; the class is read from the label map."""
  def denoise(params, x, t, labels):
    return diffusion.class_eps(eps_fn, params, x, t, labels[:, 0, 0], w=cond_scale)
  return program_cache.keyed(denoise, 'mask', eps_fn, cond_scale)
