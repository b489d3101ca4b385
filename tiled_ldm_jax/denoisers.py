"""Denoisers for the sampler, built from a model's eps function (the sampler imports none).

A denoiser is `(params, x [B, P, P, C], t [B], labels [B, P, P]) -> (eps [B, P, P, C],
samples evaluated)`; `labels` are the patch's label ids at latent resolution.
"""

from __future__ import annotations

from tiled_ldm_jax import diffusion


def image_denoiser(eps_fn, num_classes: int, cond_scale: float):
  """The image model's multi-label guided step (L+1 passes; SPEC 2)."""
  def denoise(params, x, t, labels):
    return diffusion.multilabel_eps(eps_fn, params, x, t, labels, num_classes=num_classes,
                                    w=cond_scale)
  return denoise


def mask_denoiser(eps_fn, cond_scale: float):
  """The mask model's class-conditioned step; the class is read from the label map."""
  def denoise(params, x, t, labels):
    return diffusion.class_eps(eps_fn, params, x, t, labels[:, 0, 0], w=cond_scale)
  return denoise
