"""Every script refuses a bad request before work: one `error:` line on stderr, a
non-zero exit, no traceback, nothing written.

Each case runs the script as a subprocess (what a user sees); all fail in flag checks or
the first file checks, so none imports more than the script's own modules or runs JAX.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import reference_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, 'tiled_ldm_jax', 'demo')
VAE, UNET = os.path.join(DEMO, 'vae'), os.path.join(DEMO, 'image_unet')
SHAPES = str(reference_path() / 'full_size_shapes' / 'diffinfinite_mask_unet.json')

# (script, flags ({out}: a path under the test's empty output folder; {rgb}: a colour
# PNG; {rgba}: an RGBA PNG), a fragment of the expected error).
CASES = [
    ('decode_latent', ['--vae_ckpt=' + VAE, '--random_latent=8x8', '--output={out}/a.png',
                       '--patch_size=0'], '--patch_size must be > 0'),
    ('decode_latent', ['--vae_ckpt=' + VAE, '--random_latent=8x8', '--output={out}/a.png',
                       '--patch_size=nan'], "flag --patch_size=nan"),
    ('decode_latent', ['--vae_ckpt=' + VAE, '--random_latent=8x8', '--output={out}/a.png',
                       '--random_std=nan'], '--random_std must be a finite number'),
    ('decode_latent', ['--vae_ckpt=' + VAE, '--random_latent=8x-8', '--output={out}/a.png'],
     '--random_latent must be positive integers'),
    ('decode_latent', ['--vae_ckpt=' + VAE, '--random_latent=8x8', '--output={out}/a.png',
                       '--latent_scale=-1'], '--latent_scale must be > 0'),
    ('decode_latent', ['--vae_ckpt={out}/nope', '--random_latent=8x8', '--output={out}/a.png'],
     'converted model folder (with model.json) not found'),
    ('decode_latent', ['--vae_ckpt=' + VAE, '--latent={out}/nope.npy', '--output={out}/a.png'],
     '--latent: file not found'),
    ('decode_latent', ['--vae_ckpt=' + VAE, '--output={out}/a.png'],
     'exactly one of --latent, --random_latent'),
    ('decode_latent', ['--vae_ckpt=' + VAE, '--random_latent=8x8', '--output={out}/a.bmp'],
     '--output must end in'),
    ('decode_latent', ['--random_latent=8x8', '--output={out}/a.png'],
     'Flag --vae_ckpt must have a value'),
    ('benchmark_decode', ['--vae_ckpt=' + VAE, '--size=inf'], '--size must be positive'),
    ('benchmark_decode', ['--vae_ckpt=' + VAE, '--tile_batch=1,0'],
     '--tile_batch must be positive integers'),
    ('benchmark_decode', ['--vae_ckpt=' + VAE, '--size=100'], '--size must be a multiple of 8'),
    ('benchmark_sampler', ['--unet_ckpt=' + UNET, '--cond_scale=nan'],
     '--cond_scale must be a finite number'),
    ('benchmark_sampler', ['--unet_ckpt=' + UNET, '--steps=-3'], '--steps must be > 0'),
    ('benchmark_sampler', ['--unet_ckpt=' + UNET, '--repeats=0'], '--repeats must be > 0'),
    ('benchmark_sampler', ['--unet_ckpt=' + UNET, '--grid_margin=-1'],
     '--grid_margin must be >= 0'),
    ('benchmark_writers', ['--band=-1', '--out_dir={out}/w'], '--band must be > 0'),
    ('benchmark_writers', ['--sizes=4096,nan', '--out_dir={out}/w'],
     '--sizes must be positive integers'),
    ('benchmark_writers', ['--writers=tiff_lzw', '--out_dir={out}/w'], "unknown ['tiff_lzw']"),
    ('benchmark_writers', ['--jpeg_quality=101', '--out_dir={out}/w'], '--jpeg_quality must be'),
    ('convert_torch', ['--kind=image_unet', '--torch_checkpoint={out}/nope.pt',
                       '--output_dir={out}/o'], '--torch_checkpoint: path not found'),
    ('convert_torch', ['--kind=vae', '--torch_checkpoint=' + VAE, '--output_dir={out}/o',
                       '--latent_scale=nan'], '--latent_scale must be a positive finite'),
    ('preview_sample', ['--sample={out}/nope.png', '--output={out}/p.png'],
     '--sample: file not found'),
    ('preview_sample', ['--sample={rgb}', '--output={out}/p.png', '--width=-5'],
     '--width must be > 0'),
    ('preview_sample', ['--sample={rgb}', '--mask={rgb}', '--output={out}/p.png'],
     'channels differ'),
    ('score_sample', ['--sample={out}/nope.png'], '--sample: file not found'),
    ('score_sample', ['--sample={rgb}', '--tile=0'], '--tile must be > 0'),
    ('make_fake_checkpoint', ['--shapes={out}/nope.json', '--output={out}/m.pt'],
     '--shapes: file not found'),
    ('make_fake_checkpoint', ['--shapes=' + SHAPES, '--output={out}/m.pt', '--seed=-1'],
     '--seed must be >= 0'),
    ('sample_large_image', ['--unet_ckpt=' + UNET, '--vae_ckpt=' + VAE, '--imgs_path={out}/s',
                            '--image_size=256', '--patch_size=128', '--mask={rgb}'],
     'map each colour to its class id'),
    ('sample_large_image', ['--unet_ckpt=' + UNET, '--vae_ckpt=' + VAE, '--imgs_path={out}/s',
                            '--image_size=256', '--patch_size=128', '--mask={rgba}'],
     "mode 'RGBA' is not a label map"),
    ('sample_large_image', ['--unet_ckpt=' + UNET, '--vae_ckpt=' + VAE, '--imgs_path={out}/s',
                            '--image_size=256', '--patch_size=128', '--cond_scale=nan'],
     'cond_scale must be a finite number'),
    ('sample_large_image', ['--unet_ckpt=' + UNET, '--vae_ckpt=' + VAE, '--imgs_path={out}/s',
                            '--image_size=256', '--patch_size=128', '--eta=-1'], 'eta'),
    ('sample_large_image', ['--unet_ckpt=' + UNET, '--vae_ckpt=' + VAE, '--imgs_path={out}/s',
                            '--image_size=4000000', '--patch_size=128', '--mask=demo'],
     'GiB of host memory'),
]


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  folder = tmp_path_factory.mktemp('inputs')
  rgb = np.zeros((64, 64, 3), np.uint8)
  rgb[:32, :, 0] = 255
  Image.fromarray(rgb).save(folder / 'rgb.png')
  Image.fromarray(np.dstack([rgb, np.full((64, 64), 255, np.uint8)])).save(folder / 'rgba.png')
  return {'rgb': str(folder / 'rgb.png'), 'rgba': str(folder / 'rgba.png')}


def run_bad_request(script, argv, out_dir, inputs):
  argv = [a.format(out=out_dir, **inputs) for a in argv]
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, os.path.join(REPO, 'scripts', script + '.py'), *argv],
                        capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.mark.parametrize('script, argv, fragment', CASES,
                         ids=[f'{s}-{i}' for i, (s, _, _) in enumerate(CASES)])
def test_bad_request_is_one_error_line(script, argv, fragment, tmp_path, inputs):
  if 'make_fake' in script and not os.path.isfile(SHAPES) and SHAPES in ' '.join(argv):
    pytest.skip('full_size_shapes listing not on this machine')
  out = tmp_path / 'out'
  out.mkdir()
  p = run_bad_request(script, argv, str(out), inputs)
  errors = [l for l in p.stderr.splitlines() if l.startswith('error:')]
  assert p.returncode != 0, p.stderr
  assert 'Traceback' not in p.stderr + p.stdout, p.stderr
  assert len(errors) == 1, p.stderr
  assert fragment in errors[0], errors[0]
  assert not list(out.iterdir()), 'a refused request wrote files'
