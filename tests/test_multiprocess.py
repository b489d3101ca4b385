"""Two real processes (2 emulated CPU devices each, gloo collectives) running
`scripts/sample_large_image.py` and `scripts/train.py` against one single-process run.

Image n uses the keys of index n whatever its batch, so one single-process run of 4
images is the reference for every multi-process run here (batch split N=4, patch split
N=2 over all 4 devices, N=1 which no device count divides, written as one OME-Zarr
store or one TIFF by both processes together, a resume after both processes are
killed); a run from an init image with a keep mask has its own single-process reference. A hang (unequal collectives) fails the test after TIMEOUT s.

The runs go to one pair of long-lived interpreters (`_Pair`, `script_runner.py`) that
join one multi-process run at their first request and then serve every test here, as
two hosts would run several commands; only the run that is killed mid-way gets
processes of its own. A pair saves, per command, two interpreter starts, JAX imports and
model loads, and process 1's compiles: JAX writes the persistent compilation cache from
process 0 only, so process 1's single-device programs are compiled again by every new
process.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ScriptServer, xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'scripts' / 'sample_large_image.py'
TIMEOUT = 300           # per launch; a hang at a collective fails here
COMMON = ['--image_size=256', '--patch_size=128', '--sampling_steps=2', '--seed=5',
          '--mask=demo']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int, cache: pathlib.Path) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='true',
             XLA_FLAGS=xla_flags(devices))
  env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')])
  return env


def _start(out: pathlib.Path, args, cache: pathlib.Path):
  """Two processes of their own running the sampling command (2 devices each)."""
  port = _free_port()
  base = [sys.executable, str(SCRIPT), f'--imgs_path={out}',
          f'--compilation_cache_dir={cache}'] + COMMON + list(args)
  return [subprocess.Popen(base + [f'--coordinator_address=localhost:{port}',
                                   '--num_processes=2', f'--process_id={i}'],
                           env=_env(2, cache), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
          for i in range(2)]


def _kill(procs):
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
  for p in procs:
    p.wait()


class _Pair:
  """Two `script_runner.py` interpreters (2 devices each) joined as processes 0 and 1 of
  one multi-process run: `run(script, args)` runs the script in both at once, with the
  multi-process flags, and returns both logs (stdout + stderr). A failed or hung request
  (past `timeout`) kills both and fails the test; the next request starts a new pair."""

  def __init__(self, cache: pathlib.Path):
    self.cache = cache
    self.servers = []

  def _start(self):
    self.port = _free_port()
    self.servers = [ScriptServer(_env(2, self.cache)) for _ in range(2)]

  def run(self, script: pathlib.Path, args, timeout: float = TIMEOUT) -> list[str]:
    if not self.servers or not all(s.alive() for s in self.servers):
      self.close()
      self._start()
    for i, server in enumerate(self.servers):
      server.send(script, *args, f'--coordinator_address=localhost:{self.port}',
                  '--num_processes=2', f'--process_id={i}')
    deadline = time.monotonic() + timeout
    answers = []
    try:
      for i, server in enumerate(self.servers):
        answers.append(server.receive(max(1.0, deadline - time.monotonic()),
                                      f'process {i}: {script.name} (hang at a collective?)'))
    finally:
      if len(answers) < 2 or any(a.returncode for a in answers):
        self.close()
    logs = [a.stdout + a.stderr for a in answers]
    for a, log in zip(answers, logs):
      assert a.returncode == 0, log[-3000:]
    return logs

  def close(self):
    """Kills both (a graceful exit would wait in JAX's distributed shutdown)."""
    for server in self.servers:
      server.kill()
    self.servers = []


@pytest.fixture(scope='session')
def cache():
  """This run's compilation cache (conftest), shared by every process launched here."""
  return pathlib.Path(os.environ['JAX_COMPILATION_CACHE_DIR'])


@pytest.fixture(scope='session')
def pair(cache):
  p = _Pair(cache)
  yield p
  p.close()


def _run(pair_, out, args):
  """The sampling command of COMMON + args, in both processes of the pair."""
  return pair_.run(SCRIPT, [f'--imgs_path={out}', f'--compilation_cache_dir={pair_.cache}']
                   + COMMON + list(args))


def _single_process(out: pathlib.Path, **kw) -> list[np.ndarray]:
  """The request of COMMON (+ kw) sampled in this test process on one device: the
  reference the multi-process runs must reproduce (no interpreter of its own)."""
  from tiled_ldm_jax import generate  # pylint: disable=g-import-not-at-top
  flags = dict(a[2:].split('=', 1) for a in COMMON)
  cfg = generate.GenerationConfig.from_flat(
      imgs_path=str(out), image_size=int(flags['image_size']),
      patch_size=int(flags['patch_size']), sampling_steps=int(flags['sampling_steps']),
      seed=int(flags['seed']), mask=flags['mask'], devices=1, progress_every=0, **kw)
  records = generate.generate(cfg)
  return [np.asarray(Image.open(out / f'sample{r["sample"]:04d}.png')) for r in records]


@pytest.fixture(scope='session')
def reference(tmp_path_factory):
  """4 images from one process on one device."""
  return _single_process(tmp_path_factory.mktemp('single'), n_images=4, batch_size=4)


@pytest.fixture(scope='session')
def reference_k2(tmp_path_factory):
  """2 images, 2 patches per iteration (K is part of the draw), one process."""
  return _single_process(tmp_path_factory.mktemp('single_k2'), n_images=2, batch_size=2,
                         patches_per_step=2)


def _close(a, b):
  assert a.shape == b.shape
  diff = np.abs(a.astype(int) - b.astype(int)).max()
  assert diff <= 1, diff


def test_batch_split_n4(tmp_path, pair, reference):
  logs = _run(pair, tmp_path, ['--n_images=4', '--batch_size=4'])
  assert 'wrote 4 image(s)' in logs[0]
  for n in range(4):
    _close(np.asarray(Image.open(tmp_path / f'sample{n:04d}.png')), reference[n])
    assert (tmp_path / f'sample{n:04d}.json').is_file()
  assert not (tmp_path / 'checkpoint').exists()


def test_patch_split_n2_tiff_uses_all_devices(tmp_path, pair, reference_k2):
  import tifffile  # pylint: disable=g-import-not-at-top
  logs = _run(pair, tmp_path, ['--n_images=2', '--batch_size=2', '--patches_per_step=2',
                               '--output_format=tiff', '--tiff_compression=zlib'])
  assert 'image stage' in logs[0]   # the logs are captured, so the next line can fail
  assert 'using 2 of 4' not in logs[0] + logs[1]   # 2 images x 2 patches over 4 devices
  for n in range(2):   # image 1 was decoded and written by process 1
    _close(tifffile.imread(tmp_path / f'sample{n:04d}.tif', level=0), reference_k2[n])


def test_n1_not_dividing_devices_shared_zarr(tmp_path, pair, reference):
  """One image, two processes: no device count divides N = 1, and both processes write
  the one OME-Zarr store (output/shared_writer.py; process 0 creates, builds levels, renames)."""
  import zarr  # pylint: disable=g-import-not-at-top
  _run(pair, tmp_path, ['--n_images=1', '--batch_size=1', '--output_format=zarr'])
  group = zarr.open_group(str(tmp_path / 'sample0000.zarr'), mode='r')
  _close(np.asarray(group['0'][:]).transpose(1, 2, 0), reference[0])
  assert int(np.asarray(group['labels/tissue/0'][:]).max()) > 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ['sample0000.json', 'sample0000.zarr']


def test_n1_shared_tiff_bands_gathered(tmp_path, pair, reference):
  """One image, two processes: each decodes one of its two bands, process 0 writes the
  TIFF from the all-gathered bands."""
  import tifffile  # pylint: disable=g-import-not-at-top
  _run(pair, tmp_path, ['--n_images=1', '--batch_size=1', '--output_format=tiff',
                        '--tiff_compression=zlib'])
  _close(tifffile.imread(tmp_path / 'sample0000.tif', level=0), reference[0])
  assert (tmp_path / 'sample0000.json').is_file()


def test_init_image_keep_mask_two_processes(tmp_path, pair, reference):
  """From an init image (a reference sample) with a keep mask, a strength and
  resampling: two processes equal one."""
  init, keep = tmp_path / 'init.png', tmp_path / 'keep.png'
  Image.fromarray(reference[1]).save(init)
  mask = np.zeros((256, 256), np.uint8)
  mask[:, :96] = 1
  Image.fromarray(mask).save(keep)
  args = dict(init_image=str(init), keep_mask=str(keep), strength=0.5, resample=1)
  one = _single_process(tmp_path / 'one', n_images=2, batch_size=2, **args)
  _run(pair, tmp_path / 'two', ['--n_images=2', '--batch_size=2'] +
       [f'--{k}={v}' for k, v in args.items()])
  for n in range(2):
    _close(np.asarray(Image.open(tmp_path / 'two' / f'sample{n:04d}.png')), one[n])


def test_resume_after_killing_both(tmp_path, cache, pair, reference):
  """Two processes of their own, killed once a checkpoint is saved; the pair resumes."""
  args = ['--n_images=2', '--batch_size=2', '--checkpoint_every=1']
  procs = _start(tmp_path, args, cache)
  meta = tmp_path / 'checkpoint' / 'meta.json'
  deadline = time.monotonic() + TIMEOUT
  try:
    while not meta.is_file():
      assert all(p.poll() is None for p in procs), 'a process ended before a checkpoint'
      assert time.monotonic() < deadline, 'no checkpoint written'
      time.sleep(0.05)
  finally:
    _kill(procs)
  assert not list(tmp_path.glob('sample*.png'))   # killed mid-sampling
  _run(pair, tmp_path, args + ['--resume'])
  for n in range(2):
    _close(np.asarray(Image.open(tmp_path / f'sample{n:04d}.png')), reference[n])
  assert not (tmp_path / 'checkpoint').exists()


# ----------------------------------------------------------------------------- training

TRAIN_ARGS = [f'--config={REPO / "configs" / "demo_train_image.py"}', '--config.steps=3',
              '--config.batch_size=4', '--config.image_size=64', '--config.log_every=1',
              '--config.save_every=3', f'--config.vae={REPO / "tiled_ldm_jax" / "demo" / "vae"}',
              f'--config.model={REPO / "tests" / "tiny_image_unet.py"}',
              # The demo config trains on tools/make_demo_data.py's folder, which CI does
              # not make: this test's data stay the synthetic ones.
              '--config.data=synthetic', '--config.augment=True']


def _train_in_this_process(workdir: pathlib.Path):
  """TRAIN_ARGS on this test process's one device (the 1-process reference)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from tiled_ldm_jax import training  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('demo_train_image', TRAIN_ARGS[0].split('=')[1])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for arg in TRAIN_ARGS[1:]:
    name, value = arg[len('--config.'):].split('=', 1)
    setattr(cfg, name, type(getattr(cfg, name))(value))
  training.run(cfg, str(workdir), devices=1)


def _losses(workdir: pathlib.Path):
  import json  # pylint: disable=g-import-not-at-top
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  rows = [r for r in rows if 'loss' in r]
  return [r['step'] for r in rows], np.array([r['loss'] for r in rows])


def test_training_two_processes_matches_one(tmp_path, pair):
  """Data-parallel training over 2 processes x 2 devices (batch sharded over 4 devices,
  checkpoint saved by both, export by process 0) logs the losses of 1 process on 1
  device for the same global batch."""
  _train_in_this_process(tmp_path / 'one')
  logs = pair.run(REPO / 'scripts' / 'train.py', [f'--workdir={tmp_path / "two"}',
                  f'--compilation_cache_dir={pair.cache}'] + TRAIN_ARGS, timeout=2 * TIMEOUT)
  steps_one, one = _losses(tmp_path / 'one')
  steps_two, two = _losses(tmp_path / 'two')
  assert steps_one == steps_two == [1, 2, 3]
  np.testing.assert_allclose(two, one, rtol=1e-4)
  assert 'over 4 devices' in logs[0], logs[0][-2000:]
  assert (tmp_path / 'two' / 'model' / 'model.json').is_file()
