"""Training the three networks (image U-Net, mask U-Net, VAE) with optax and orbax.

  config  TrainConfig, its ConfigDict defaults, loading a run's config files
  tasks   what each network trains on and its loss
  step    optimizer, EMA, train state, the jitted step
  export  the finished run as a model folder (VAE: latent normalisation and scale)
  parallel  the 'data' mesh, state and batch shardings (data-parallel, FSDP option)
  loop    workdir, resume, metrics.jsonl, checkpoints: `train` and `run`
"""

from tiled_ldm_jax.training.config import TASKS
from tiled_ldm_jax.training.config import TrainConfig
from tiled_ldm_jax.training.config import WorkdirError
from tiled_ldm_jax.training.config import default_config
from tiled_ldm_jax.training.config import from_config
from tiled_ldm_jax.training.config import load_config
from tiled_ldm_jax.training.config import OBJECTIVES
from tiled_ldm_jax.training.export import clipped_fraction
from tiled_ldm_jax.training.export import export as export_model
from tiled_ldm_jax.training.export import clipped_share
from tiled_ldm_jax.training.export import held_out_latents
from tiled_ldm_jax.training.export import normalize_vae_latents
from tiled_ldm_jax.training.loader import GrainMissingError
from tiled_ldm_jax.training.loop import run
from tiled_ldm_jax.training.loop import train
from tiled_ldm_jax.training.step import TrainState
from tiled_ldm_jax.training.step import abstract_state
from tiled_ldm_jax.training.step import compiled_step
from tiled_ldm_jax.training.step import ema_update
from tiled_ldm_jax.training.step import init_state
from tiled_ldm_jax.training.step import make_optimizer
from tiled_ldm_jax.training.step import rng_key
from tiled_ldm_jax.training.tasks import Task
from tiled_ldm_jax.training.tasks import make_task
from tiled_ldm_jax.training.tasks import pick_label_cond
