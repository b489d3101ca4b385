"""Runs hostile input files through `scripts/sample_large_image.py` and prints
one table row per case: class, what, exit status, the error line, the peak RSS of the
command and its wall time.

  python tools/probe_readers.py [--work_dir=/tmp/probes] [--timeout=300] [--only=hang,message]
      [--repo=/path/to/another/checkout]     # the same probes, another version

Each case builds its file(s) under --work_dir (small: the bombs are declared sizes and
compressed streams) and runs the command with the bundled demo models, as a separate
process (its peak RSS from `wait4`); a case that runs past --timeout is killed and shown
as such (a hang, or a request that was accepted and is sampling). The regression tests
of the same probes are tests/test_hostile_readers.py.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib

from absl import app
from absl import flags
import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, 'tiled_ldm_jax', 'demo')

_WORK = flags.DEFINE_string('work_dir', None, 'Folder for the probe files (default: a '
                            'new temporary folder).')
_TIMEOUT = flags.DEFINE_integer('timeout', 300, 'Seconds before a case counts as a hang.')
_ONLY = flags.DEFINE_list('only', None, 'Run the cases whose class contains one of these.')
_REPO = flags.DEFINE_string('repo', REPO, 'The checkout whose sample_large_image.py runs '
                            '(another one to compare before / after; its own demo '
                            'models).')


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def _png_stream(path, h, w, channels=3, bits=8, value=0):
  """A real PNG of h x w constant pixels, written row by row (never held whole)."""
  color = {1: 0, 3: 2}[channels]
  row = b'\0' + bytes([value]) * (w * channels * bits // 8)
  z = zlib.compressobj(9)
  data = b''.join(z.compress(row) for _ in range(h)) + z.flush()
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, bits, color,
                                                             0, 0, 0))
            + _chunk(b'IDAT', data) + _chunk(b'IEND', b''))
  return path


def _tiff(tags, data: bytes = b'') -> bytes:
  """A little-endian classic TIFF: header, data (offsets from 8), one IFD of `tags`."""
  data = data + b'\0' * (len(data) % 2)
  ifd_at = 8 + len(data)
  entries, extra = b'', b''
  extra_at = ifd_at + 2 + 12 * len(tags) + 4
  for tag, kind, values in sorted(tags):
    raw = struct.pack(f'<{len(values)}{"H" if kind == 3 else "I"}', *values)
    if len(raw) <= 4:
      entries += struct.pack('<HHI', tag, kind, len(values)) + raw.ljust(4, b'\0')
    else:
      entries += struct.pack('<HHII', tag, kind, len(values), extra_at + len(extra))
      extra += raw
  return (b'II*\0' + struct.pack('<I', ifd_at) + data + struct.pack('<H', len(tags))
          + entries + b'\0\0\0\0' + extra)


def _label_tiff(h, w, tile, payload_of, bits=8):
  """A tiled deflate label TIFF; payload_of(index) -> compressed tile bytes."""
  n = -(-h // tile) * -(-w // tile)
  data, offsets, counts, cache = bytearray(), [], [], {}
  for i in range(n):
    p = payload_of(i)
    if p not in cache:            # identical tiles share their bytes (legal in TIFF)
      cache[p] = 8 + len(data)
      data += p
    offsets.append(cache[p])
    counts.append(len(p))
  return _tiff([(256, 4, [w]), (257, 4, [h]), (258, 3, [bits]), (259, 3, [8]),
                (262, 3, [1]), (277, 3, [1]), (322, 4, [tile]), (323, 4, [tile]),
                (324, 4, offsets), (325, 4, counts), (339, 3, [1])], bytes(data))


def _zarr_labels(root, zattrs=None, zarray=None, image=False):
  """An OME-Zarr store (labels/cells/0, or an image group with `image`) of 64 x 64."""
  group = root if image else os.path.join(root, 'labels', 'cells')
  arr = os.path.join(group, '0')
  os.makedirs(arr)
  if not image:
    with open(os.path.join(root, 'labels', '.zattrs'), 'w') as f:
      json.dump({'labels': ['cells']}, f)
  with open(os.path.join(group, '.zattrs'), 'w') as f:
    f.write(zattrs if zattrs is not None else json.dumps(
        {'multiscales': [{'datasets': [{'path': '0'}]}]}))
  meta = {'zarr_format': 2, 'shape': [3, 64, 64] if image else [64, 64],
          'chunks': [3, 32, 32] if image else [32, 32], 'dtype': '|u1', 'compressor': None,
          'fill_value': 0, 'order': 'C', 'filters': None}
  meta.update(zarray or {})
  with open(os.path.join(arr, '.zarray'), 'w') as f:
    json.dump(meta, f)
  return root


def _feature(name, coords):
  return {'type': 'Feature', 'geometry': {'type': 'Polygon', 'coordinates': coords},
          'properties': {'classification': {'name': name}}}


def _write(path, data):
  with open(path, 'wb' if isinstance(data, bytes) else 'w') as f:
    f.write(data)
  return path


def cases(d: str):
  """(class, what, flags) of every probe, its files built under d."""
  j = lambda *p: os.path.join(d, *p)   # pylint: disable=unnecessary-lambda-assignment
  fifo = j('fifo')
  os.mkfifo(fifo)
  os.symlink(j('loop'), j('loop'))
  init = _png_stream(j('init.png'), 512, 512)
  sq = [[0, 0], [512, 0], [512, 512], [0, 512], [0, 0]]
  bomb_tile = zlib.compress(b'\0' * (256 << 20), 9)
  ones = zlib.compress(np.ones((512, 512), np.uint8).tobytes(), 9)
  yield 'hang: FIFO', '--mask is a FIFO', dict(mask=fifo, image_size=256)
  yield 'hang: FIFO', '--init_image is a FIFO', dict(init_image=fifo, mask='demo')
  yield 'hang: FIFO', '--keep_mask is a FIFO', dict(init_image=init, mask='demo',
                                                    keep_mask=fifo)
  yield ('traceback: .zattrs shape', '--mask store, labels group .zattrs a list',
         dict(mask=_zarr_labels(j('list.zarr'), zattrs='[1, 2]'), image_size=256))
  yield ('traceback: .zattrs depth', '--mask store, .zattrs nested 100000 deep',
         dict(mask=_zarr_labels(j('deep.zarr'), zattrs='[' * 100000 + ']' * 100000),
              image_size=256))
  yield ('traceback: .zattrs shape', '--init_image store, .zattrs a list',
         dict(init_image=_zarr_labels(j('ilist.zarr'), zattrs='[]', image=True),
              mask='demo'))
  yield ('traceback: .zattrs depth', '--init_image store, .zattrs nested 100000 deep',
         dict(init_image=_zarr_labels(j('ideep.zarr'), zattrs='[' * 100000 + ']' * 100000,
                                      image=True), mask='demo'))
  yield ('traceback: keep map', 'dry run, outpainting on a 2097152 px canvas',
         dict(init_image=init, init_offset='0,0', image_size=2097152, dry_run=True,
              mask_unet_ckpt=os.path.join(DEMO, 'mask_unet')))
  yield ('hang: Zarr no chunks', '--mask labels 100000 x 100000 declared, no chunk files',
         dict(mask=_zarr_labels(j('nochunks.zarr'), zarray={'shape': [100000, 100000],
                                                            'chunks': [4096, 4096]}),
              image_size=512, dry_run=True))
  yield ('hang: Zarr no chunks', '--mask labels 1e6 x 1e6 declared, no chunk files',
         dict(mask=_zarr_labels(j('huge.zarr'), zarray={'shape': [1000000, 1000000],
                                                        'chunks': [4096, 4096]}),
              image_size=512))
  big = _write(j('big_labels.tif'), _label_tiff(40960, 40960, 512, lambda i: ones))
  yield ('memory: deflate TIFF', f'--mask label TIFF 40960^2 (1.6 GB decoded) of '
         f'{os.path.getsize(big) / 2 ** 10:.0f} KiB, dry run at 512 px',
         dict(mask=big, image_size=512, dry_run=True))
  yield ('memory: deflate TIFF', '--mask label TIFF, one 512^2 tile inflating to 256 MiB',
         dict(mask=_write(j('tile_bomb.tif'), _label_tiff(
             1024, 1024, 512, lambda i: bomb_tile if i == 3 else ones)), image_size=512))
  yield ('memory: sparse TIFF', '--mask 4 KB sparse uint32 TIFF, 2^24 px wide',
         dict(mask=_write(j('sparse.tif'), _tiff(
             [(256, 4, [1 << 24]), (257, 4, [1024]), (258, 3, [32]), (259, 3, [8]),
              (262, 3, [1]), (273, 4, [0]), (277, 3, [1]), (278, 4, [1024]),
              (279, 4, [0]), (339, 3, [1])])), image_size=512))
  big_init = _png_stream(j('init_20000.png'), 20000, 20000)
  yield ('memory: PNG before size', f'--init_image PNG 20000^2 '
         f'({os.path.getsize(big_init) / 2 ** 20:.1f} MiB), output 512',
         dict(init_image=big_init, image_size=512, mask='demo'))
  big_keep = _png_stream(j('keep_20000.png'), 20000, 20000, channels=1)
  yield ('memory: PNG before size', '--keep_mask PNG 20000^2, output 512',
         dict(init_image=init, keep_mask=big_keep, mask='demo'))
  nested = _write(j('nested.geojson'), '[' + ','.join(['[]'] * 2_000_000) + ']')
  yield ('memory: GeoJSON nesting', f'--mask GeoJSON of nested empty arrays '
         f'({os.path.getsize(nested) / 2 ** 20:.0f} MiB)',
         dict(mask=nested, mask_classes='T=1', image_size=512))
  yield ('memory: GeoJSON raster', 'dry run, a 200-byte GeoJSON on a 65536 px canvas',
         dict(mask=_write(j('big.geojson'), json.dumps({'type': 'FeatureCollection',
                                                        'features': [_feature('T', [[
                                                            [0, 0], [65536, 0],
                                                            [65536, 65536], [0, 65536]]])]})),
              mask_classes='T=1', image_size=65536, dry_run=True))
  yield ('wrong data: 16-bit PNG', '--init_image 16-bit gray PNG',
         dict(init_image=_png_stream(j('u16.png'), 512, 512, channels=1, bits=16, value=200),
              mask='demo'))
  for what, coords in (('strings', [[['0', '0'], [512, 0], [512, 512]]]),
                       ('booleans', [[[True, 0], [512, 0], [512, 512]]]),
                       ('hole outside', [sq, [[600, 600], [700, 600], [700, 700]]])):
    yield (f'wrong data: GeoJSON {what}', f'--mask GeoJSON, {what}',
           dict(mask=_write(j(f'{what}.geojson'), json.dumps(
               {'type': 'FeatureCollection', 'features': [_feature('T', coords)]})),
                mask_classes='T=1', image_size='1024'))
  v3 = j('v3.zarr')
  os.makedirs(v3)
  _write(os.path.join(v3, 'zarr.json'), '{"zarr_format": 3, "node_type": "group"}')
  yield 'message: Zarr v3', '--mask Zarr v3 store', dict(mask=v3, image_size=256)
  yield 'message: Zarr v3', '--init_image Zarr v3 store', dict(init_image=v3, mask='demo')
  yield ('message: init store', '--init_image store with bad .zattrs',
         dict(init_image=_zarr_labels(j('bad.zarr'), zattrs='{"multiscales": 3}',
                                      image=True), mask='demo'))
  yield 'message: output loop', '--imgs_path inside a symlink loop', dict(
      mask='demo', imgs_path=j('loop', 'x'))
  yield ('message: UTF-16 GeoJSON', '--mask GeoJSON in UTF-16', dict(
      mask=_write(j('u16.geojson'), json.dumps({'type': 'FeatureCollection', 'features': [
          _feature('T', [sq])]}).encode('utf-16')), mask_classes='T=1', image_size=512))
  comma = _write(j('comma.geojson'), json.dumps({'type': 'FeatureCollection', 'features': [
      _feature('Tumor, grade 2', [sq])]}))
  yield 'message: class names', 'class "Tumor, grade 2" as NAME=ID', dict(
      mask=comma, mask_classes='Tumor, grade 2=1', image_size=512)
  yield 'accepted: class names', 'the same, JSON --mask_classes, dry run', dict(
      mask=comma, mask_classes='{"Tumor, grade 2": 1}', image_size=512, dry_run=True)


def main(argv):
  del argv
  d = _WORK.value or tempfile.mkdtemp(prefix='probes-')
  os.makedirs(d, exist_ok=True)
  print('| class | case | exit | error line | peak RSS | wall |')
  print('|---|---|---|---|---|---|')
  for cls, what, flags_ in cases(d):
    if _ONLY.value and not any(o in cls for o in _ONLY.value):
      continue
    demo = os.path.join(_REPO.value, 'tiled_ldm_jax', 'demo')
    args = {'unet_ckpt': os.path.join(demo, 'image_unet'),
            'vae_ckpt': os.path.join(demo, 'vae'), 'imgs_path': os.path.join(d, 'out'),
            'patch_size': 128, 'sampling_steps': 2}
    args.update(flags_)
    argv_ = [f'--{k}' if v is True else f'--{k}={v}' for k, v in args.items()]
    # a fresh process per case, its own peak RSS from wait4 in a tiny wrapper (the
    # children's ru_maxrss here would be a maximum over the cases so far)
    wrapper = ('import os,resource,subprocess,sys,time;'
               't=time.perf_counter();p=subprocess.Popen(sys.argv[1:]);'
               '_,s,r=os.wait4(p.pid,0);'
               'sys.stderr.write("\\nRSS %d WALL %.2f\\n"%(r.ru_maxrss,time.perf_counter()-t));'
               'sys.exit(os.waitstatus_to_exitcode(s))')
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=_REPO.value)
    script = os.path.join(_REPO.value, 'scripts', 'sample_large_image.py')
    proc = subprocess.Popen([sys.executable, '-c', wrapper, sys.executable, script, *argv_],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    try:
      _, err = proc.communicate(timeout=_TIMEOUT.value)
      code = proc.returncode
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, 9)
      _, err = proc.communicate()
      code = f'killed at {_TIMEOUT.value} s'
    wall = time.perf_counter() - start
    rss = next((int(l.split()[1]) for l in err.splitlines() if l.startswith('RSS ')), 0)
    errors = [l for l in err.splitlines() if l.startswith('error:')]
    tracebacks = 'Traceback' in err
    line = (errors[0] if errors else ('TRACEBACK' if tracebacks else '(none)'))
    line = line.replace(d, '<d>').replace('|', '\\|')
    if len(line) > 160:
      line = line[:157] + '...'
    n_err = f' ({len(errors)} lines)' if len(errors) > 1 else ''
    print(f'| {cls} | {what} | {code} | {line}{n_err} | {rss / 1024:.0f} MiB | '
          f'{wall:.1f} s |', flush=True)
  written = os.path.join(d, 'out')
  print(f'\nfiles written to {written}: '
        f'{sorted(os.listdir(written)) if os.path.isdir(written) else "none"}')


if __name__ == '__main__':
  app.run(main)
