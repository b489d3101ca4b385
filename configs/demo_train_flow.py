"""A tiny flow-matching image U-Net for the 'sample your own model' example (2-core CPU:
15 min 28 s measured, docs/own_model.md).

  python scripts/train.py --config=configs/demo_train_flow.py --workdir=runs/demo/flow_unet

The demo image U-Net's shapes (configs/demo_train_image.py) on the synthetic data
(`training/data.py`, 128 px crops, regions of 48-384 px) and the latents of
tiled_ldm_jax/demo/flow_vae (the VAE the demo used before it moved to the tissue image:
configs/demo_train_vae.py with `--config.data=synthetic --config.augment=True
--config.steps=1800`), trained with objective `flow`: t ~ U[0, 1), x_t = (1 - t) z +
t noise, target noise - z, the U-Net told t * 1000. Sampled with
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
  config.data = 'synthetic'              # training/data.py's textures, not the tissue
  config.augment = True
  config.region_size_max = 384.0         # region size log-uniform in [48, 384] per example
  config.vae = os.path.join(_HERE, '..', 'tiled_ldm_jax', 'demo', 'flow_vae')  # its VAE
  return config
