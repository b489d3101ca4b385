"""The bundled demo models: tiny image U-Net, mask U-Net and VAE trained on one real image.

They live in `tiled_ldm_jax/demo/` (converted-model folders, see `models/checkpoint.py`), with a
demo label mask and the adherence classifier fit for them, and are what
`sample_large_image.py` uses when no checkpoint flag is given. They were trained by
`scripts/train.py` with `configs/demo_train_*.py` on scikit-image's 512 px
immunohistochemistry image and its label map (`tools/make_demo_data.py`, docs/demo.md):
labels 1 epithelium (DAB), 2 stroma, 3 lumen/background (0 and 4 unused). One image:
they show the sampler, not a pathology model.
"""

from __future__ import annotations

import os

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
MODELS = ('image_unet', 'mask_unet', 'vae')
# A flow-matching image U-Net (configs/demo_train_flow.py) for the 'sample your own
# model' example (examples/own_model.py); not part of the DiffInfinite demo pipeline.
# It was trained on the earlier synthetic demo data, on the latents of the earlier demo
# VAE, kept beside it as flow_vae (its latents are not the tissue VAE's).
EXTRA_MODELS = ('flow_unet', 'flow_vae')
# The demo U-Nets were trained on 128 px crops: sample and decode with that patch.
PATCH_SIZE = 128
MASK_PATCH_SIZE = 128


def model_path(kind: str) -> str:
  if kind not in MODELS + EXTRA_MODELS:
    raise ValueError(f'no demo model {kind!r}; have {MODELS + EXTRA_MODELS}')
  return os.path.join(DEMO_DIR, kind)


def mask_path() -> str:
  """The demo label map: the real image's (tools/make_demo_data.py; PNG of ids 1..3)."""
  return os.path.join(DEMO_DIR, 'mask.png')


def classifier_path() -> str:
  """The demo models' adherence classifier (`evaluation.adherence.load_classifier`)."""
  return os.path.join(DEMO_DIR, 'adherence.json')


def available() -> bool:
  return all(os.path.isfile(os.path.join(model_path(k), 'model.json')) for k in MODELS)
