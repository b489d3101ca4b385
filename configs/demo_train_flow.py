"""A tiny flow-matching image U-Net for the 'sample your own model' example (2-core CPU:
15 min 28 s measured, README).

  python scripts/train.py --config=configs/demo_train_flow.py --workdir=runs/demo/flow_unet

The demo image U-Net's shapes and data (configs/demo_train_image.py: 128 px synthetic
crops, latents of the bundled demo VAE), trained with objective `flow`: t ~ U[0, 1),
x_t = (1 - t) z + t noise, target noise - z, the U-Net told t * 1000. Sampled with
`sampling.sample(..., prediction='flow')` in scripts/sample_own_model.py.
"""

import importlib.util
import os

_HERE = os.path.dirname(__file__)


def get_config():
  spec = importlib.util.spec_from_file_location(
      'demo_train_image', os.path.join(_HERE, 'demo_train_image.py'))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  config = base.get_config()             # every other field: configs/demo_train_image.py
  config.objective = 'flow'              # predict the velocity noise - x0 (see above)
  config.steps = 1000                    # optimizer steps (see the README for the time)
  config.vae = os.path.join(_HERE, '..', 'tiled_ldm_jax', 'demo', 'vae')  # bundled VAE
  return config
