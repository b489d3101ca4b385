"""The bundled demo models: tiny image U-Net, mask U-Net and VAE trained on synthetic data.

They live in `tiled_ldm_jax/demo/` (converted-model folders, see `models/checkpoint.py`), with a
demo label mask, and are what `sample_large_image.py` uses when no checkpoint flag is
given. They were trained by `scripts/train.py` with `configs/demo_train_*.py` (README).
"""

from __future__ import annotations

import os

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
MODELS = ('image_unet', 'mask_unet', 'vae')
# A flow-matching image U-Net (configs/demo_train_flow.py) for the 'sample your own
# model' example (examples/own_model.py); not part of the DiffInfinite demo pipeline.
EXTRA_MODELS = ('flow_unet',)
# The demo U-Nets were trained on 128 px crops: sample and decode with that patch.
PATCH_SIZE = 128
MASK_PATCH_SIZE = 128


def model_path(kind: str) -> str:
  if kind not in MODELS + EXTRA_MODELS:
    raise ValueError(f'no demo model {kind!r}; have {MODELS + EXTRA_MODELS}')
  return os.path.join(DEMO_DIR, kind)


def mask_path() -> str:
  """A demo label map (PNG of label ids 0..4)."""
  return os.path.join(DEMO_DIR, 'mask.png')


def available() -> bool:
  return all(os.path.isfile(os.path.join(model_path(k), 'model.json')) for k in MODELS)
