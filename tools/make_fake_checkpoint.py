"""Writes a random full-size DiffInfinite checkpoint in torch's zip format, without torch.

For measuring conversion (time, peak memory) at the real sizes, which no file on this
machine has. The key -> shape listing comes from `full_size_shapes/*.json`; the layout
is DiffInfinite's `Trainer.save` (as in the reference `model-1.pt`):

  --layout=trainer  {step, loss, lr, model, opt, scheduler, ema, scaler}: the online model
                    (`model.*`), Adam state (exp_avg, exp_avg_sq per parameter) and the EMA
                    wrapper (`ema_model.model.*` and `online_model.model.*`): 5x the weights.
  --layout=ema      {step, ema} with `ema_model.model.*` and the schedule buffers only:
                    the weights once (what a released EMA checkpoint holds).

  python tools/make_fake_checkpoint.py \
      --shapes=../shared/reference/full_size_shapes/diffinfinite_image_unet_10class.json \
      --layout=ema --output=/tmp/full/model-1.pt     # also writes config.json beside it

Tensors are generated one at a time while they are written, so this needs little memory.
"""

import json
import os

from absl import flags
import numpy as np

from tiled_ldm_jax import flag_util
from tiled_ldm_jax.convert import torch_zip_write as tzw

_SHAPES = flags.DEFINE_string('shapes', None, 'A full_size_shapes/*.json listing.')
_LAYOUT = flags.DEFINE_enum('layout', 'ema', ['ema', 'trainer'], 'What the file holds.')
_OUTPUT = flags.DEFINE_string('output', None, 'The .pt file to write (config.json beside).')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')
flags.mark_flags_as_required(['shapes', 'output'])

# GaussianDiffusion's registered buffers (float32 [timesteps]) that sit beside `model.*`.
_BUFFERS = ('betas', 'alphas_cumprod', 'alphas_cumprod_prev', 'sqrt_alphas_cumprod',
            'sqrt_one_minus_alphas_cumprod', 'log_one_minus_alphas_cumprod',
            'sqrt_recip_alphas_cumprod', 'sqrt_recipm1_alphas_cumprod', 'posterior_variance',
            'posterior_log_variance_clipped', 'posterior_mean_coef1', 'posterior_mean_coef2',
            'p2_loss_weight')


def _random(shape, seed: int) -> tzw.Lazy:
  return tzw.Lazy(tuple(shape), np.float32,
                  lambda: np.random.default_rng(seed).random(shape, np.float32) - 0.5)


def _wrapper(prefix: str, shapes: dict, seed: int) -> dict:
  """`<prefix>model.*` weights and `<prefix><buffer>` schedule buffers of one
  GaussianDiffusion."""
  out = {f'{prefix}{b}': _random((1000,), seed + i) for i, b in enumerate(_BUFFERS)}
  for i, (k, s) in enumerate(shapes.items()):
    out[f'{prefix}model.{k}'] = _random(s, seed + 100 + i)
  return out


def _checkpoint(shapes: dict, layout: str, seed: int) -> dict:
  ema = tzw.OrderedDict(initted=np.ones(1, np.float32), step=np.array([1], np.int64))
  ema.update(_wrapper('ema_model.', shapes, seed))
  if layout == 'ema':
    return {'step': 1, 'ema': ema}
  ema.update(_wrapper('online_model.', shapes, seed + 10_000))
  opt_state = {i: {'step': np.array(1.0, np.float32), 'exp_avg': _random(s, seed + 20_000 + i),
                   'exp_avg_sq': _random(s, seed + 40_000 + i)}
               for i, s in enumerate(shapes.values())}
  group = {'lr': 4e-6, 'betas': (0.95, 0.99), 'eps': 1e-8, 'weight_decay': 0,
           'amsgrad': False, 'maximize': False, 'foreach': None, 'capturable': False,
           'differentiable': False, 'fused': None, 'initial_lr': 4e-6, 'max_lr': 1e-4,
           'min_lr': 4e-10, 'max_momentum': 0.95, 'base_momentum': 0.85,
           'params': list(range(len(shapes)))}
  return {'step': 1, 'loss': [0.5], 'lr': [1e-4],
          'model': tzw.OrderedDict(_wrapper('', shapes, seed + 60_000)),
          'opt': {'state': opt_state, 'param_groups': [group]},
          'scheduler': {'total_steps': 100, 'last_epoch': 0, 'base_lrs': [4e-6]},
          'ema': ema, 'scaler': None}


def main(argv):
  del argv
  with open(_SHAPES.value) as f:
    listing = json.load(f)
  out = os.path.abspath(_OUTPUT.value)
  if not {'state_dict', 'config', 'n_params'} <= set(listing):
    flag_util.fail(f'--shapes {_SHAPES.value}: not a full_size_shapes listing (needs '
                   '"state_dict", "config", "n_params")')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  obj = _checkpoint(listing['state_dict'], _LAYOUT.value, _SEED.value)
  tzw.save(out, obj, archive_name=os.path.splitext(os.path.basename(out))[0])
  with open(os.path.join(os.path.dirname(out), 'config.json'), 'w') as f:
    json.dump({'unet': listing['config'],
               'dm': {'timesteps': 1000, 'sampling_timesteps': 250, 'image_size': 64}}, f)
  n = listing['n_params']
  print(f'wrote {out}: {os.path.getsize(out) / 2**20:.1f} MiB, {n:,} weights '
        f'({4 * n / 2**20:.1f} MiB float32 converted)')


if __name__ == '__main__':
  flag_util.run(main, {'shapes': 'file', 'output': 'out', 'seed': 'int>=0'})
