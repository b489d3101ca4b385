"""tiled_ldm_jax: seamless large-image latent diffusion (DiffInfinite) in JAX/Flax.

    import tiled_ldm_jax
    pipe = tiled_ldm_jax.Pipeline.from_pretrained()    # bundled demo models
    result = pipe(label=1, image_size=512)              # .images [N, H, W, 3] uint8

See `pipeline.py` for the staged calls (`sample_labels`, `sample_latents`, `decode`).
"""

__version__ = '0.1.0'

# Names resolved on first use, so `import tiled_ldm_jax` stays cheap (no JAX import).
_LAZY = {'Pipeline': 'pipeline', 'Options': 'request', 'Result': 'pipeline',
         'LatentGeometry': 'geometry'}
__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(f'tiled_ldm_jax.{_LAZY[name]}'), name)
  raise AttributeError(f'module tiled_ldm_jax has no attribute {name!r}')
