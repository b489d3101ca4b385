"""Times the ORIGINAL PyTorch DiffInfinite random-patch sampler on the benchmark's work.

The original code is imported at run time from a checkout whose path the user gives
(`--original_repo`, e.g. a clone of github.com/marcoaversa/diffinfinite); none of its code
is copied into or shipped with this repository. This file holds only our harness:
stand-in modules for the original's training-only dependencies (so that `import dm` and
`import random_diffusion` succeed without torchvision, ema_pytorch, accelerate, diffusers
or its dataset module), loading the EMA weights of a `model-N.pt`, call counting and
timing. The sampling code paths (`RandomDiffusion.__call__`, `sample_one`,
`GaussianDiffusion.ddim_multimask`, `Unet.forward`) run unmodified.

  python tools/original_sampler.py --original_repo=/path/to/diffinfinite \
      --checkpoint=model-1.pt --config_json=config.json --image_size=256 \
      --patch_size=128 --sampling_steps=20 --cond_scale=3 --seed=0

Note: the original loop stops once every latent pixel has reached step S-1, so it runs
S-1 of the S DDIM steps; the result reports the time as measured plus per-step figures.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import sys
import time
import types

import numpy as np

# Modules the original imports at module top that are not needed for sampling.
_STUBBED = ('torchvision', 'torchvision.transforms', 'torchvision.utils', 'ema_pytorch',
            'accelerate', 'diffusers', 'dataset')


def _unavailable(name: str):
  """A stand-in class that fails loudly if the sampling path ever uses it."""

  def __init__(self, *args, **kwargs):
    del self, args, kwargs
    raise NotImplementedError(f'{name} is stubbed by original_sampler.py (not needed '
                              'for sampling)')

  return type(name.rsplit('.', 1)[-1], (), {'__init__': __init__})


class _Lambda:
  """Stand-in for torchvision.transforms.Lambda: wraps a function, applies it."""

  def __init__(self, lambd):
    self.lambd = lambd

  def __call__(self, x):
    return self.lambd(x)


def _install_stubs() -> list[str]:
  """Puts stand-ins for the original's unneeded dependencies into sys.modules.

  A name already in sys.modules (a real install imported earlier) is left alone.
  Returns the names that were stubbed.
  """
  def module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__file__ = f'<stub from {__file__}>'
    return mod

  transforms = module('torchvision.transforms', Lambda=_Lambda,
                      Compose=_unavailable('torchvision.transforms.Compose'),
                      ToPILImage=_unavailable('torchvision.transforms.ToPILImage'),
                      ToTensor=_unavailable('torchvision.transforms.ToTensor'))
  tv_utils = module('torchvision.utils')
  stubs = {
      'torchvision': module('torchvision', transforms=transforms, utils=tv_utils),
      'torchvision.transforms': transforms,
      'torchvision.utils': tv_utils,
      'ema_pytorch': module('ema_pytorch', EMA=_unavailable('ema_pytorch.EMA')),
      'accelerate': module('accelerate',
                           Accelerator=_unavailable('accelerate.Accelerator')),
      'diffusers': module('diffusers',
                          DiffusionPipeline=_unavailable('diffusers.DiffusionPipeline')),
      'dataset': module('dataset',
                        import_dataset=_unavailable('dataset.import_dataset'),
                        ComposeState=_unavailable('dataset.ComposeState'),
                        RandomRotate90=_unavailable('dataset.RandomRotate90')),
  }
  installed = []
  for name in _STUBBED:
    if name not in sys.modules:
      sys.modules[name] = stubs[name]
      installed.append(name)
  return installed


def _import_original(original_repo: str):
  """Imports the original's `dm` and `random_diffusion` from `original_repo`.

  Returns (dm, random_diffusion, stubbed names).
  """
  import importlib  # pylint: disable=g-import-not-at-top

  repo = os.path.abspath(original_repo)
  for name in ('dm.py', 'random_diffusion.py', os.path.join('utils', 'modules.py')):
    if not os.path.isfile(os.path.join(repo, name)):
      raise FileNotFoundError(f'{repo} is not a DiffInfinite checkout: no {name}')
  stubbed = _install_stubs()
  if repo not in sys.path:
    sys.path.insert(0, repo)
  dm = importlib.import_module('dm')
  random_diffusion = importlib.import_module('random_diffusion')
  for mod in (dm, random_diffusion, sys.modules.get('utils.modules')):
    path = os.path.abspath(getattr(mod, '__file__', '') or '')
    if not path.startswith(repo + os.sep):
      raise ImportError(f'{getattr(mod, "__name__", mod)} came from {path!r}, not from '
                        f'{repo}; a module of that name was already imported')
  return dm, random_diffusion, stubbed


def _load_ema_unet(dm, checkpoint_pt: str, unet_config: dict):
  """The original `dm.Unet` with the EMA weights of a DiffInfinite `model-N.pt`."""
  import torch  # pylint: disable=g-import-not-at-top

  ckpt = torch.load(checkpoint_pt, map_location='cpu', weights_only=False)
  prefix = 'ema_model.model.'
  state = {k[len(prefix):]: v for k, v in ckpt['ema'].items() if k.startswith(prefix)}
  if not state:
    raise KeyError(f'{checkpoint_pt}: no {prefix}* keys under "ema"')
  unet = dm.Unet(**unet_config)
  unet.load_state_dict(state, strict=True)
  return unet.eval()


def _time_unet_call(forward, channels: int, patch: int, calls: int = 50,
                    repeats: int = 3) -> float:
  """Seconds per isolated batch-1 U-Net call on a [patch, patch] latent, best of repeats.

  Mirrors `tiled_ldm_jax.benchmark.time_denoiser_calls` (t = 500, all-ones labels).
  """
  import torch  # pylint: disable=g-import-not-at-top

  x = torch.randn(1, channels, patch, patch)
  t = torch.full((1,), 500, dtype=torch.long)
  classes = torch.ones(1, 1, patch, patch)
  best = float('inf')
  with torch.no_grad():
    forward(x, t, classes)
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(calls):
        forward(x, t, classes)
      best = min(best, (time.perf_counter() - start) / calls)
  return best


class _NoVae:
  """Stands in for the trainer's VAE; `RandomDiffusion.__call__` never decodes."""

  def to(self, device):
    del device
    return self


def time_original(original_repo: str, checkpoint_pt: str, config_json: str,
                  labels: np.ndarray, patch_size: int, sampling_steps: int, cond_scale: float,
                  seed: int, repeats: int = 1, num_threads: int = 2) -> dict:
  """Times the original `RandomDiffusion.__call__` on one [H, W] int label map.

  Args:
    original_repo: a DiffInfinite checkout (holds dm.py, random_diffusion.py, utils/).
    checkpoint_pt: a DiffInfinite image `model-N.pt` (its 'ema' state dict is used).
    config_json: JSON with a 'unet' dict of `dm.Unet` keyword arguments.
    labels: [H, W] int label map in pixels (H == W, as the original assumes).
    patch_size: patch side in pixels, as the original's `patch_size`.
    sampling_steps: DDIM sampling steps S (the original runs S-1 of them, see the module doc).
    cond_scale: guidance weight w; the original uses w+1 internally.
    seed: `torch.manual_seed` before each timed run.
    repeats: timed runs; seconds is their median, and every run must make the same calls.
    num_threads: `torch.set_num_threads` (2: the benchmark machine's cores).

  Returns:
    A dict of 'original_*' figures: seconds, denoiser evaluations (samples through the
    U-Net), calls (U-Net forward calls), patch iterations (`sample_one` calls), loop
    iterations, steps completed and per-step figures, denoiser seconds (isolated U-Net
    calls, best per-call time times the calls) and the overhead ratio seconds /
    denoiser seconds as in `tiled_ldm_jax.benchmark`, plus 'torch_version' and the
    1-minute load average before and after (other processes on the CPUs inflate the time).
  """
  import torch  # pylint: disable=g-import-not-at-top

  labels = np.asarray(labels)
  if labels.ndim != 2 or labels.shape[0] != labels.shape[1]:
    raise ValueError(f'labels must be a square [H, W] map, got {labels.shape}')
  dm, random_diffusion, stubbed = _import_original(original_repo)
  with open(config_json) as f:
    config = json.load(f)
  torch.set_num_threads(num_threads)

  unet = _load_ema_unet(dm, checkpoint_pt, config['unet'])
  counts = {'calls': 0, 'samples': 0, 'patches': 0, 'loop': 0, 'steps_done': 0}
  unet_forward = unet.forward

  def counted_forward(x, *args, **kwargs):
    counts['calls'] += 1
    counts['samples'] += int(x.shape[0])
    return unet_forward(x, *args, **kwargs)

  # An instance attribute: nn.Module.__call__ and forward_with_cond_scale both use it.
  unet.forward = counted_forward
  diffusion = dm.GaussianDiffusion(unet, image_size=labels.shape[0] // 8, timesteps=1000,
                                   sampling_timesteps=sampling_steps).eval()
  trainer = types.SimpleNamespace(vae=_NoVae(),
                                  ema=types.SimpleNamespace(ema_model=diffusion))
  rd = random_diffusion.RandomDiffusion(trainer, patch_size=patch_size,
                                        sampling_steps=sampling_steps, cond_scale=cond_scale,
                                        device='cpu')
  sample_one = rd.sample_one
  value_coordinates = rd.get_value_coordinates

  def counted_sample_one(x_t, x_stack, masks, times):
    counts['patches'] += 1
    counts['steps_done'] = max(counts['steps_done'], int(times.min()) + 1)
    return sample_one(x_t, x_stack, masks, times)

  def counted_value_coordinates(tensor):
    counts['loop'] += 1
    return value_coordinates(tensor)

  rd.sample_one = counted_sample_one
  rd.get_value_coordinates = counted_value_coordinates

  masks = torch.from_numpy(labels)[None, None].float()
  load_before = os.getloadavg()
  runs, cpu_runs, run_counts, progress = [], [], [], ''
  for _ in range(repeats):
    for k in counts:
      counts[k] = 0
    captured = io.StringIO()
    torch.manual_seed(seed)
    with torch.no_grad(), contextlib.redirect_stdout(captured):
      start, cpu_start = time.perf_counter(), time.process_time()
      out = rd(masks)
      runs.append(time.perf_counter() - start)
      cpu_runs.append(time.process_time() - cpu_start)
    if not torch.isfinite(out).all():
      raise FloatingPointError('original sampler returned non-finite latents')
    run_counts.append(dict(counts))
    progress = captured.getvalue().rsplit('\r', 1)[-1].strip()
  if any(c != run_counts[0] for c in run_counts):
    raise RuntimeError(f'runs made different calls: {run_counts}')

  seconds = float(statistics.median(runs))
  done = counts['steps_done']
  patch = patch_size // 8
  per_call = _time_unet_call(unet_forward, diffusion.channels, patch)
  denoiser_seconds = per_call * counts['calls']
  return {
      'original_seconds': seconds,
      'original_seconds_runs': runs,
      'original_cpu_seconds_runs': cpu_runs,
      'original_denoiser_evaluations': counts['samples'],
      'original_denoiser_calls': counts['calls'],
      'original_patch_iterations': counts['patches'],
      'original_loop_iterations': counts['loop'],
      'original_steps_completed': done,
      'original_seconds_per_step': seconds / max(done, 1),
      'original_evaluations_per_step': counts['samples'] / max(done, 1),
      'original_patch_iterations_per_step': counts['patches'] / max(done, 1),
      'original_seconds_per_evaluation': seconds / max(counts['samples'], 1),
      'original_seconds_all_steps_estimate': seconds * sampling_steps / max(done, 1),
      'original_denoiser_seconds': denoiser_seconds,
      'original_overhead_ratio': seconds / denoiser_seconds,
      'original_last_progress_line': progress,
      'original_stubbed_modules': stubbed,
      'torch_version': torch.__version__,
      'torch_threads': torch.get_num_threads(),
      'cpu_count': os.cpu_count(),
      'load_average_1m_before_after': [load_before[0], os.getloadavg()[0]],
  }


def main(argv):
  """Builds the benchmark label map, times the original, prints one JSON line."""
  del argv
  from tiled_ldm_jax.evaluation.benchmark import benchmark_label_map  # pylint: disable=g-import-not-at-top

  with open(_CONFIG.value) as f:
    num_classes = json.load(f)['unet']['num_classes']
  labels = benchmark_label_map(_SIZE.value, _SIZE.value, num_classes)
  result = {'image_size': _SIZE.value, 'patch_size': _PATCH.value, 'sampling_steps': _STEPS.value,
            'cond_scale': _W.value, 'seed': _SEED.value, 'repeats': _REPEATS.value}
  start = time.perf_counter()
  result.update(time_original(_REPO.value, _CKPT.value, _CONFIG.value, labels,
                              _PATCH.value, _STEPS.value, _W.value, _SEED.value,
                              repeats=_REPEATS.value, num_threads=_THREADS.value))
  result['wall_seconds_incl_import_and_load'] = time.perf_counter() - start
  print(json.dumps(result))


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  _REPO = flags.DEFINE_string('original_repo', None, 'A DiffInfinite checkout.')
  _CKPT = flags.DEFINE_string('checkpoint', None, 'DiffInfinite image model-N.pt.')
  _CONFIG = flags.DEFINE_string('config_json', None, "JSON with the 'unet' kwargs.")
  _SIZE = flags.DEFINE_integer('image_size', 256, 'Image side in pixels.')
  _PATCH = flags.DEFINE_integer('patch_size', 128, 'Patch side in pixels.')
  _STEPS = flags.DEFINE_integer('sampling_steps', 20, 'DDIM sampling steps.')
  _W = flags.DEFINE_float('cond_scale', 3.0, 'Guidance weight w (original uses w+1).')
  _SEED = flags.DEFINE_integer('seed', 0, 'torch.manual_seed before each timed run.')
  _REPEATS = flags.DEFINE_integer('repeats', 1, 'Timed runs; seconds is their median.')
  _THREADS = flags.DEFINE_integer('num_threads', 2, 'torch.set_num_threads.')
  flags.mark_flags_as_required(['original_repo', 'checkpoint', 'config_json'])
  app.run(main)
