"""1 process (1 device) vs 2 processes (2 emulated CPU devices each, gloo) on this machine.

  python tools/compare_processes.py --out_dir=/tmp/mpm

Sampling (`sample_large_image.py --mask=demo --image_size=256 --patch_size=128
--sampling_steps=2 --seed=5`) for N=4 and N=2 (PNG, images shared round-robin) and N=1
(one OME-Zarr store / one TIFF written by both processes), then 8 steps of data-parallel
training of the demo image U-Net (global batch 8). Prints one JSON line per comparison:
max pixel difference, wall seconds, image-stage and decode seconds; losses and logged
steps/s. A correctness and overhead check (the processes share the machine's cores).
"""
import json, os, pathlib, socket, subprocess, sys, time, shutil

from absl import app
from absl import flags
import numpy as np

_OUT = flags.DEFINE_string('out_dir', '/tmp/compare_processes', 'Scratch folder (replaced).')
REPO = pathlib.Path(__file__).resolve().parents[1]
def port():
  with socket.socket() as s:
    s.bind(('localhost', 0)); return s.getsockname()[1]
def env(dev):
  e = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={dev}')
  e['PYTHONPATH'] = str(REPO); return e
def launch(cmd, procs):
  t = time.perf_counter()
  if procs == 1:
    ps = [subprocess.Popen(cmd, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
  else:
    p = port()
    ps = [subprocess.Popen(cmd + [f'--coordinator_address=localhost:{p}', '--num_processes=2', f'--process_id={i}'],
                           env=env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  logs = [q.communicate(timeout=900)[0].decode() for q in ps]
  assert all(q.returncode == 0 for q in ps), logs[0][-2000:] + logs[-1][-2000:]
  return time.perf_counter() - t, logs
def read(out, n, fmt):
  if fmt == 'png':
    from PIL import Image; return np.asarray(Image.open(out / f'sample{n:04d}.png'))
  if fmt == 'tiff':
    import tifffile; return tifffile.imread(out / f'sample{n:04d}.tif', level=0)
  import zarr; return np.asarray(zarr.open_group(str(out / f'sample{n:04d}.zarr'), mode='r')['0'][:]).transpose(1, 2, 0)


def main(argv):
  del argv
  global OUT, CACHE  # pylint: disable=global-statement
  OUT = pathlib.Path(_OUT.value)
  shutil.rmtree(OUT, ignore_errors=True)
  OUT.mkdir(parents=True)
  CACHE = OUT / 'cc'
  rows = []
  for n, fmt in ((4, 'png'), (2, 'png'), (1, 'zarr'), (1, 'tiff')):
    res = {}
    for procs in (1, 2):
      out = OUT / f'n{n}_{fmt}_{procs}'
      cmd = [sys.executable, str(REPO / 'scripts/sample_large_image.py'), f'--imgs_path={out}',
             '--image_size=256', '--patch_size=128', '--sampling_steps=2', '--seed=5', '--mask=demo',
             f'--n_images={n}', f'--batch_size={n}', f'--output_format={fmt}', f'--compilation_cache_dir={CACHE}']
      if fmt == 'tiff': cmd.append('--tiff_compression=zlib')
      wall, _ = launch(cmd, procs)
      recs = [json.load(open(out / f'sample{i:04d}.json')) for i in range(n)]
      res[procs] = dict(wall=wall, imgs=[read(out, i, fmt) for i in range(n)],
                        image_stage=recs[0]['seconds'].get('image_stage'),
                        decode=[r['seconds'].get('decode_and_write') for r in recs])
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(res[1]['imgs'], res[2]['imgs']))
    row = dict(n=n, fmt=fmt, diff=diff, **{f'wall_{p}': round(res[p]['wall'], 1) for p in (1, 2)},
               **{f'image_stage_{p}': round(res[p]['image_stage'], 1) for p in (1, 2)},
               **{f'decode_{p}': [round(d, 2) if d else None for d in res[p]['decode']] for p in (1, 2)})
    print(json.dumps(row), flush=True); rows.append(row)
  # training
  tr = {}
  for procs in (1, 2):
    wd = OUT / f'train_{procs}'
    cmd = [sys.executable, str(REPO / 'scripts/train.py'), f'--workdir={wd}', f'--compilation_cache_dir={CACHE}',
           f'--config={REPO}/configs/demo_train_image.py', '--config.steps=8', '--config.batch_size=8',
           '--config.image_size=64', '--config.log_every=1', '--config.save_every=8',
           f'--config.vae={REPO}/tiled_ldm_jax/demo/vae',
           '--config.data=synthetic']   # the demo config's tissue folder may not exist here
    wall, _ = launch(cmd, procs)
    m = [json.loads(l) for l in open(wd / 'metrics.jsonl') if 'loss' in l]
    tr[procs] = dict(wall=round(wall, 1), loss=[r['loss'] for r in m], steps=[r['step'] for r in m],
                     rate=[r.get('steps_per_s') for r in m])
    print(json.dumps({'train': procs, **tr[procs]}), flush=True)
  one, two = np.array(tr[1]['loss']), np.array(tr[2]['loss'])
  print(json.dumps({'train_max_rel_diff': float(np.max(np.abs(one - two) / np.abs(one)))}))


if __name__ == '__main__':
  app.run(main)
