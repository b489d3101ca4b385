"""Every script refuses a bad request before work: one `error:` line on stderr, a
non-zero exit, no traceback, nothing written.

All cases run in one interpreter (`script_runner.py`: each case is its script executed
as `__main__` with fresh flags, its file descriptors captured, an uncaught exception
printed as Python would), so they cost one JAX import, not one each. The first case of
every script also runs as a plain `python scripts/X.py` subprocess, which the runner's
answer must match: what a user sees.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import reference_path, script_path, subprocess_env

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
    ('benchmark_sampler', ['--unet_ckpt=' + UNET, '--sampling_steps=-3'], '--sampling_steps must be > 0'),
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


def _script(name: str) -> str:
  return str(script_path(name))


def _first_of_each_script() -> set[int]:
  seen, first = set(), set()
  for i, (script, _, _) in enumerate(CASES):
    if script not in seen:
      seen.add(script)
      first.add(i)
  return first


@pytest.fixture(scope='module')
def results(tmp_path_factory, inputs, script_server):
  """{case index: (output folder, CompletedProcess-like)} for every case, all in the
  session's script server; the first case of each script also as its own process."""
  root = tmp_path_factory.mktemp('bad_requests')
  got = {}
  for i, (script, argv, _) in enumerate(CASES):
    out = root / f'case{i}'
    out.mkdir()
    got[i] = (out, script_server.run(_script(script), *[a.format(out=out, **inputs)
                                                         for a in argv], timeout=300))
  for i in _first_of_each_script():   # the same case as a plain process
    out = root / f'plain{i}'
    out.mkdir()
    script, argv, _ = CASES[i]
    got[('plain', i)] = (out, subprocess.run(
        [sys.executable, _script(script), *[a.format(out=out, **inputs) for a in argv]],
        capture_output=True, text=True, env=subprocess_env(), timeout=300, check=False))
  return got


def _check_refused(out, p, fragment):
  errors = [l for l in p.stderr.splitlines() if l.startswith('error:')]
  assert p.returncode != 0, p.stderr
  assert 'Traceback' not in p.stderr + p.stdout, p.stderr
  assert len(errors) == 1, p.stderr
  assert fragment in errors[0], errors[0]
  assert not list(out.iterdir()), 'a refused request wrote files'
  return errors[0]


@pytest.mark.parametrize('index', range(len(CASES)),
                         ids=[f'{s}-{i}' for i, (s, _, _) in enumerate(CASES)])
def test_bad_request_is_one_error_line(index, results):
  script, argv, fragment = CASES[index]
  if 'make_fake' in script and not os.path.isfile(SHAPES) and SHAPES in ' '.join(argv):
    pytest.skip('full_size_shapes listing not on this machine')
  line = _check_refused(*results[index], fragment)
  if ('plain', index) in results:      # a real process says the same
    out, plain = results[('plain', index)]
    assert _check_refused(out, plain, fragment) == line.replace(
        str(results[index][0]), str(out))


def test_runner_reports_tracebacks(tmp_path, script_server):
  """The server is able to fail a case: an uncaught exception shows as a traceback and a
  non-zero status, and `sys.exit(message)` as the message and status 1, as in a plain
  process."""
  bad = tmp_path / 'boom.py'
  bad.write_text('raise RuntimeError("boom")\n')
  ok = tmp_path / 'ok.py'
  ok.write_text('import sys\nprint("hi")\nsys.exit("error: one line")\n')
  boom, fine = script_server.run(bad), script_server.run(ok, '--x')
  assert boom.returncode == 1 and 'Traceback' in boom.stderr
  assert 'RuntimeError: boom' in boom.stderr
  assert fine.returncode == 1 and fine.stdout == 'hi\n'
  assert fine.stderr == 'error: one line\n'
