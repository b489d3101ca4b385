"""tiled_ldm_jax: seamless large-image latent diffusion (DiffInfinite) in JAX/Flax."""

__version__ = '0.1.0'
