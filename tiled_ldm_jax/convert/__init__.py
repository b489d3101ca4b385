"""PyTorch checkpoints to Flax model folders, without torch: `rules` (the strict,
declarative key and layout mapping), `torch_zip` / `safetensors_file` (safe readers:
nothing in a file is run) and `torch_zip_write` (writes test checkpoints)."""

from tiled_ldm_jax.convert.rules import ConversionError
from tiled_ldm_jax.convert.rules import convert_checkpoint
from tiled_ldm_jax.convert.rules import convert_state_dict
from tiled_ldm_jax.convert.rules import convert_unet
from tiled_ldm_jax.convert.rules import convert_vae
from tiled_ldm_jax.convert.rules import converted_leaves
from tiled_ldm_jax.convert.rules import DIFFINFINITE_PREFIX
from tiled_ldm_jax.convert.rules import read_diffinfinite_checkpoint
from tiled_ldm_jax.convert.rules import read_diffusers_folder
from tiled_ldm_jax.convert.rules import read_json
from tiled_ldm_jax.convert.rules import torch_key
