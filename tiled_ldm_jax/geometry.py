"""Latent geometry: the one place that knows pixels per latent pixel and the latent scale.

A latent diffusion model samples a *diffusion latent* `z`; the VAE decodes the *VAE
latent* `z * scale` to an image `factor` times larger on each side. Both numbers belong to
the VAE checkpoint (`VAEConfig.latent_scale`, `VAEConfig.downsample_factor`, stored in
its `model.json`); everything else asks a `LatentGeometry` built from it.

DiffInfinite's latents are the Stable Diffusion 2 VAE's divided by 50 (SPEC 4): its
converted VAE stores `latent_scale = 50`, and its VAE downsamples by 8.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# DiffInfinite: diffusion latent = SD2 VAE latent / 50 (the converter stores this).
DIFFINFINITE_LATENT_SCALE = 50.0
# The Stable Diffusion VAE (four resolution levels) downsamples by 8.
SD_VAE_FACTOR = 8


@dataclasses.dataclass(frozen=True)
class LatentGeometry:
  """Pixels <-> latent pixels, and diffusion latents <-> VAE latents."""
  factor: int = SD_VAE_FACTOR                 # pixels per latent pixel along a side
  scale: float = DIFFINFINITE_LATENT_SCALE    # VAE latent = diffusion latent * scale

  def __post_init__(self):
    if int(self.factor) < 1:
      raise ValueError(f'latent factor must be >= 1, got {self.factor}')
    if not np.isfinite(self.scale) or self.scale <= 0:
      raise ValueError(f'latent scale must be a positive finite number, got {self.scale}')

  @classmethod
  def of_vae(cls, vae_config) -> 'LatentGeometry':
    """From a `VAEConfig` (its `downsample_factor` and stored `latent_scale`)."""
    return cls(factor=vae_config.downsample_factor, scale=float(vae_config.latent_scale))

  def latent_size(self, pixels: int, what: str = 'size') -> int:
    """Latent side for `pixels`; ValueError unless a positive multiple of the factor."""
    if pixels <= 0 or pixels % self.factor:
      raise ValueError(f'{what} must be a positive multiple of {self.factor}, got {pixels}')
    return pixels // self.factor

  def to_diffusion_latent(self, z):
    """VAE latent (the encoder's output) -> diffusion latent."""
    return z / self.scale
