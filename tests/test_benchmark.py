"""Benchmark and comparison helpers: the counts they rely on and the seam probe."""

import numpy as np
import pytest

from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax import demo
from tiled_ldm_jax import pipeline
from tiled_ldm_jax import request
from tiled_ldm_jax.evaluation import benchmark
from tiled_ldm_jax.evaluation import compare



@pytest.fixture(scope='module')
def demo_unet():
  _, config, params = checkpoint.load_model(demo.model_path('image_unet'), expect='image_unet')
  return config, params


@pytest.mark.parametrize('schedule,k', [('random', 1), ('random', 2), ('grid', 3)])
def test_count_work_equals_the_real_run(demo_unet, schedule, k):
  """The zero-model count (used for FLOP estimates of models too big to run here) visits
  the same patches and makes the same U-Net samples as the real model."""
  config, params = demo_unet
  kw = dict(image_size=256, patch_size=128, sampling_steps=2, cond_scale=3.0, patches_per_step=k,
            seed=4, schedule=schedule)
  real = benchmark.run_sampler_benchmark(config, params, repeats=1, time_denoiser=False,
                                         **kw)
  counted = benchmark.count_work(config, params, **kw)
  for field in ('patch_iterations', 'denoiser_evaluations', 'coverage'):
    assert counted[field] == real[field], field
  assert counted['denoiser_gflop'] == pytest.approx(
      real['denoiser_evaluations'] * counted['gflop_per_forward'])
  assert real['denoiser_gflop'] == pytest.approx(counted['denoiser_gflop'])


@pytest.mark.parametrize('cells,expected', [(256, 256), (257, 129), (300, 150), (513, 171),
                                            (40, 40)])
def test_grid_batches_split_a_level_evenly(cells, expected):
  """Auto K for the grid: the fewest calls per level under the memory cap (256 windows of
  16^2 latent pixels), then the fewest idle slots: 257 windows -> 2 calls of 129, not
  256 + 1."""
  patch = 16
  assert request.GRID_BATCH_PIXELS // patch ** 2 == 256
  width = cells * patch - patch + 1      # a 1 x cells grid (grid_cells rounds up)
  k = lambda o: request.window_fields(o, patch, 1, (1, width))['patches_per_step']
  assert k(request.Options(schedule='grid', grid_margin=0)) == expected
  assert k(request.Options(schedule='random', grid_margin=0)) == 1


def test_grid_seam_ratio_finds_borders_of_a_shifted_grid():
  rng = np.random.default_rng(0)
  img = rng.integers(100, 140, (96, 128, 3)).astype(np.float64)
  tile, r0, c0 = 16, 5, 11
  img[r0::tile] += 60        # a step at every row border ...
  img[:, c0::tile] += 60     # ... and column border of the grid
  seamy = np.clip(img, 0, 255).astype(np.uint8)
  assert compare.grid_seam_ratio(seamy, tile, r0, c0) > 2.0
  assert compare.grid_seam_ratio(seamy, tile, r0 + 7, c0 + 3) < 1.3   # another grid: none
  clean = rng.integers(100, 140, (96, 128, 3)).astype(np.uint8)
  assert 0.8 < compare.grid_seam_ratio(clean, tile, r0, c0) < 1.2
