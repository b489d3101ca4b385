"""The model-agnostic large-image sampler: one face over private parts.

    from tiled_ldm_jax import sampling
    x = sampling.sample(denoise, params, cond, keys=sampling.image_keys(0, [0, 1]),
                        latent_shape=(256, 256, 4), patch=64, sampling_steps=50,
                        process=sampling.Diffusion('v', 'scaled_linear'),
                        windows=sampling.Grid(margin=2))

Parts (one concern each): `api` (`sample` and its checks), `loop` (the compiled
`Sampler` and its `SamplerState`), `windows` (where each iteration's windows go:
random or grid), `guidance` (denoiser wrappers: CFG, multi-label, trained U-Nets),
`processes` (how a prediction becomes a step: DDIM or flow Euler, or DPM-Solver++(2M)) and `diffusion` (the
noise-schedule maths, SPEC 2).
"""

from tiled_ldm_jax.sampling.api import classifier_free_guidance
from tiled_ldm_jax.sampling.api import DDIM
from tiled_ldm_jax.sampling.api import Diffusion
from tiled_ldm_jax.sampling.api import DPMSolver2M
from tiled_ldm_jax.sampling.api import Flow
from tiled_ldm_jax.sampling.api import Grid
from tiled_ldm_jax.sampling.api import Random
from tiled_ldm_jax.sampling.api import image_keys
from tiled_ldm_jax.sampling.api import multilabel_guidance
from tiled_ldm_jax.sampling.api import noise_schedule
from tiled_ldm_jax.sampling.api import NOISE_SCHEDULES
from tiled_ldm_jax.sampling.api import PREDICTIONS
from tiled_ldm_jax.sampling.api import sample
from tiled_ldm_jax.sampling.api import Spatial
from tiled_ldm_jax.sampling.api import spatial
