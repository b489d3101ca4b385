"""The readers of whole-slide inputs, hostile: GeoJSON, TIFF and OME-Zarr
labels, init images, keep masks, resume state -- through the one reading layer
(`files/reading.py`).

Each probe of the hostile-reader audit is a regression test here (FIFOs, symlink loops, JSON of the
wrong shape or depth, declared-size and decompression bombs, 16-bit PNGs, strings as
coordinates, holes outside their shell, a resume behind the samples on disk), and
`test_fuzz_hostile_readers` mutates one valid file of each kind (truncations, byte
flips, field type swaps, depth and size bombs): every case is read correctly or refused
with one line, within a time and a memory bound.
"""

import json
import os
import random
import resource
import struct
import threading
import time
import tracemalloc
import types
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import script_path
from tiled_ldm_jax import generate
from tiled_ldm_jax.generate import inputs as generate_inputs
from tiled_ldm_jax import resume
from tiled_ldm_jax.files import geojson_labels as gj
from tiled_ldm_jax.files import image_files
from tiled_ldm_jax.files import json_files
from tiled_ldm_jax.files import label_files
from tiled_ldm_jax.files import large_images
from tiled_ldm_jax.files import ome_zarr
from tiled_ldm_jax.files import reading
from tiled_ldm_jax.files import tiff_rows
from tiled_ldm_jax.files import label_maps

REFUSED = (ValueError, FileNotFoundError)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, 'tiled_ldm_jax', 'demo')


def _one_line(e: BaseException) -> str:
  text = str(e)
  assert text and '\n' not in text, text
  return text


def _refused(fn, match: str) -> str:
  with pytest.raises(REFUSED, match=match) as e:
    fn()
  return _one_line(e.value)


def _no_hang(fn, seconds: float = 10.0):
  """fn() in a thread: a blocked open fails the test instead of hanging the suite."""
  out = {}

  def body():
    try:
      out['value'] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      out['error'] = e
  t = threading.Thread(target=body, daemon=True)
  t.start()
  t.join(seconds)
  assert not t.is_alive(), f'{fn} blocked for {seconds} s'
  if 'error' in out:
    raise out['error']
  return out.get('value')


# ------------------------------------------------------------------ files: builders


def _png(path, array, **kw):
  Image.fromarray(array).save(path, format='PNG', **kw)
  return path


def _set_png_size(raw: bytes, w: int, h: int) -> bytes:
  """The PNG with its IHDR declaring w x h (CRC fixed: only the declared size lies)."""
  b = bytearray(raw)
  struct.pack_into('>II', b, 16, w, h)
  struct.pack_into('>I', b, 29, zlib.crc32(bytes(b[12:29])))
  return bytes(b)


def _tiff(tags, data: bytes = b'') -> bytes:
  """A little-endian classic TIFF: header, `data` (offsets from 8), one IFD of `tags`
  [(tag, 3 SHORT | 4 LONG, values)]."""
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


def _label_tiff(h, w, tile, payloads, bits=8, compression=8):
  """A tiled one-channel TIFF whose tiles hold `payloads` (bytes, b'' = sparse)."""
  data, offsets, counts = b'', [], []
  for p in payloads:
    offsets.append(8 + len(data) if p else 0)
    counts.append(len(p))
    data += p
  return _tiff([(256, 4, [w]), (257, 4, [h]), (258, 3, [bits]), (259, 3, [compression]),
                (262, 3, [1]), (277, 3, [1]), (322, 4, [tile]), (323, 4, [tile]),
                (324, 4, offsets), (325, 4, counts), (339, 3, [1])], data)


def _zarr_labels(root, labels: np.ndarray, chunks=(32, 32), zattrs=None, zarray=None):
  """A minimal OME-Zarr store with labels/<name>/0 (uncompressed Zarr v2 chunks)."""
  group = root / 'labels' / 'cells'
  arr = group / '0'
  arr.mkdir(parents=True)
  (root / 'labels' / '.zattrs').write_text(json.dumps(
      zattrs if zattrs is not None else {'labels': ['cells']}))
  (group / '.zattrs').write_text(json.dumps(
      {'multiscales': [{'datasets': [{'path': '0'}], 'axes': ['y', 'x']}]}))
  meta = {'zarr_format': 2, 'shape': list(labels.shape), 'chunks': list(chunks),
          'dtype': '|u1', 'compressor': None, 'fill_value': 0, 'order': 'C',
          'filters': None}
  meta.update(zarray or {})
  (arr / '.zarray').write_text(json.dumps(meta))
  for i in range(0, labels.shape[0], chunks[0]):
    for j in range(0, labels.shape[1], chunks[1]):
      block = np.zeros(chunks, np.uint8)
      part = labels[i:i + chunks[0], j:j + chunks[1]]
      block[:part.shape[0], :part.shape[1]] = part
      (arr / f'{i // chunks[0]}.{j // chunks[1]}').write_bytes(block.tobytes())
  return root


def _feature(name, coords, kind='Polygon'):
  return {'type': 'Feature', 'geometry': {'type': kind, 'coordinates': coords},
          'properties': {'classification': {'name': name}}}


def _geojson(path, features):
  path.write_text(json.dumps({'type': 'FeatureCollection', 'features': features}))
  return path


# ------------------------------------------------------------ the reading layer


def test_fifos_devices_and_loops_are_refused_unopened(tmp_path):
  fifo = tmp_path / 'pipe'
  os.mkfifo(fifo)
  loop = tmp_path / 'loop'
  os.symlink(loop, loop)
  dangling = tmp_path / 'dangling'
  os.symlink(tmp_path / 'nowhere', dangling)
  readers = [
      lambda p: reading.kind(p), lambda p: image_files.open_image(p),
      lambda p: image_files.declared(p), lambda p: label_files.open_label_source(p),
      lambda p: large_images.open_rgb_source(p), lambda p: json_files.read_object(p),
      lambda p: gj.looks_like_json(p), lambda p: gj.read_geojson(p, {'a': 1}, (8, 8)),
      lambda p: tiff_rows.TiffRows(p)]
  for read in readers:
    _no_hang(lambda: _refused(lambda: read(fifo), 'FIFO'))   # pylint: disable=cell-var-from-loop
    _refused(lambda: read(loop), 'symlink loop')              # pylint: disable=cell-var-from-loop
    _refused(lambda: read(dangling), 'symlink to nothing')    # pylint: disable=cell-var-from-loop
  _refused(lambda: reading.kind('/dev/null'), 'character device')
  # A FIFO inside an OME-Zarr store (a chunk): refused before tensorstore reads it.
  store = _zarr_labels(tmp_path / 's.zarr', np.ones((64, 64), np.uint8))
  os.remove(store / 'labels' / 'cells' / '0' / '1.1')
  os.mkfifo(store / 'labels' / 'cells' / '0' / '1.1')
  _no_hang(lambda: _refused(lambda: label_files.open_label_source(store), 'FIFO'))


def test_json_budgets_before_parsing(tmp_path):
  deep = tmp_path / 'deep.json'
  deep.write_text('[' * 100000 + ']' * 100000)
  _refused(lambda: reading.read_json(deep, 'x', max_bytes=1 << 20), 'nests 100000 levels')
  # nested empty arrays: ~50x their bytes as Python objects; the scan's estimate
  # refuses them under a budget the file's bytes alone would pass
  bomb = tmp_path / 'bomb.json'
  bomb.write_text('[' + ','.join(['[]'] * 200000) + ']')
  size = bomb.stat().st_size
  _refused(lambda: reading.read_json(bomb, 'x', max_bytes=1 << 20, budget=10 * size),
           'parsed')
  assert len(reading.read_json(bomb, 'x', max_bytes=1 << 20)) == 200000
  utf16 = tmp_path / 'u16.geojson'
  utf16.write_bytes(json.dumps({'type': 'FeatureCollection', 'features': []}
                               ).encode('utf-16'))
  _refused(lambda: gj.read_geojson(utf16, {'a': 1}, (8, 8)), 'UTF-16 text')
  assert gj.looks_like_json(utf16)     # so --mask names the encoding, not --mask_classes
  big = tmp_path / 'big.json'
  big.write_text('{"a": "' + 'x' * 5000 + '"}')
  _refused(lambda: reading.read_json(big, 'x', max_bytes=4096), 'more than the 4,096')


def test_field_names_the_field():
  doc = {'multiscales': [{'datasets': [{'path': ['0']}]}]}
  _refused(lambda: reading.field(doc, 'multiscales[0].datasets[0].path', str, 'f'),
           r'f: multiscales\[0\].datasets\[0\].path must be a string, got an array')
  _refused(lambda: reading.field([], 'multiscales[0]', list, 'f'),
           'the top level must be an object, got an array')
  _refused(lambda: reading.field({'a': []}, 'a[0].b', str, 'f'), r'a\[0\] is missing')
  _refused(lambda: reading.field({'n': True}, 'n', int, 'f'), 'got true or false')
  assert reading.field({'a': {}}, 'a.b', list, 'f', default=[]) == []


# ------------------------------------------------------------------------ OME-Zarr


@pytest.mark.parametrize('where,text,match', [
    ('labels/.zattrs', '[1, 2]', 'top level must be an object, got an array'),
    ('labels/.zattrs', '{"labels": "cells"}', 'labels must be an array, got a string'),
    ('labels/.zattrs', '[' * 5000 + ']' * 5000, 'nests 5000 levels'),
    ('labels/cells/.zattrs', '{"multiscales": {"datasets": []}}',
     'multiscales.*must be an array, got an object'),
    ('labels/cells/.zattrs', '{"multiscales": [{"datasets": [{"path": "../../x"}]}]}',
     'not a folder name'),
    ('labels/cells/0/.zarray', '{"zarr_format": 2, "shape": [64, "64"], "chunks": [32, 32],'
     ' "dtype": "|u1"}', r'shape: \[1\] must be an integer, got a string'),
    ('labels/cells/0/.zarray', '{"zarr_format": 2, "shape": [64, 64], "chunks": [32, 32],'
     ' "dtype": [["a", "|u1"]]}', 'dtype must be a string'),
    ('labels/cells/0/.zarray', '{"zarr_format": 2, "shape": [64, 64], "chunks": [32, 32],'
     ' "dtype": "|O"}', 'not a plain number type'),
    ('labels/cells/0/.zarray', '{"zarr_format": 2, "shape": [4000000000, 4000000000],'
     ' "chunks": [32, 32], "dtype": "|u1"}', 'GiB; at most'),
    ('labels/cells/0/.zarray', '{"zarr_format": 2, "shape": [64, 64], "chunks": '
     '[2000000000, 64], "dtype": "|u1"}', 'chunk'),
])
def test_bad_zarr_metadata_names_the_field(tmp_path, where, text, match):
  store = _zarr_labels(tmp_path / 's.zarr', np.ones((64, 64), np.uint8))
  (store / where).write_text(text)
  _refused(lambda: label_files.open_label_source(store), match)


def test_zarr_v3_and_bad_init_stores_are_named(tmp_path):
  store = _zarr_labels(tmp_path / 's.zarr', np.ones((64, 64), np.uint8))
  arr = store / 'labels' / 'cells' / '0'
  os.remove(arr / '.zarray')
  (arr / 'zarr.json').write_text('{"zarr_format": 3}')
  _refused(lambda: label_files.open_label_source(store), 'Zarr v3 array')
  v3 = tmp_path / 'v3.zarr'
  v3.mkdir()
  (v3 / 'zarr.json').write_text('{"zarr_format": 3, "node_type": "group"}')
  _refused(lambda: large_images.open_rgb_source(v3), 'Zarr v3 group')
  bad = tmp_path / 'bad.zarr'
  bad.mkdir()
  (bad / '.zattrs').write_text('[]')
  _refused(lambda: large_images.open_rgb_source(bad), 'top level must be an object')
  (bad / '.zattrs').write_text('{"multiscales": [{"datasets": [{"path": 0}]}]}')
  _refused(lambda: large_images.open_rgb_source(bad), r'datasets\[0\].path must be a string')
  plain = tmp_path / 'folder'
  plain.mkdir()
  _refused(lambda: large_images.open_rgb_source(plain), 'not an OME-Zarr image')


def test_zarr_huge_shape_without_chunks_is_fast(tmp_path):
  """A declared 100000 x 100000 label array with no chunk files: within the budget, its
  chunk rows are known to be fill value without reading them (it hung before); one
  past the budget is refused from its .zarray."""
  store = _zarr_labels(tmp_path / 's.zarr', np.zeros((0, 0), np.uint8), chunks=(4096, 4096),
                       zarray={'shape': [100000, 100000], 'fill_value': 3})
  start = time.perf_counter()
  src = label_files.open_label_source(store)
  assert src.ids == [3] and src.shape == (100000, 100000)
  assert time.perf_counter() - start < 5
  huge = _zarr_labels(tmp_path / 'h.zarr', np.zeros((0, 0), np.uint8), chunks=(4096, 4096),
                      zarray={'shape': [200000, 200000]})
  _refused(lambda: label_files.open_label_source(huge), 'pixels is not read')


# ---------------------------------------------------------------------------- TIFF


def test_tiff_decompression_bomb_tile_is_refused(tmp_path):
  """A 64 x 64 tile whose deflate stream inflates to 64 MiB: refused when its band is
  read, without inflating past the tile's 4 KiB."""
  bomb = zlib.compress(b'\0' * (64 << 20), 9)
  good = zlib.compress(np.ones((64, 64), np.uint8).tobytes())
  p = tmp_path / 'bomb.tif'
  p.write_bytes(_label_tiff(128, 64, 64, [good, bomb]))
  assert p.stat().st_size < 200_000
  tracemalloc.start()
  try:
    _refused(lambda: label_files.open_label_source(p), 'decompression bomb')
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 16 << 20, peak


def test_tiff_declared_size_bombs(tmp_path):
  # 4 KB sparse TIFFs declaring wide uint32 pages: refused from the header, or read as
  # the zeros they are without decoding (memory: one band)
  wide = tmp_path / 'wide.tif'
  wide.write_bytes(_tiff([(256, 4, [1 << 24]), (257, 4, [1 << 10]), (258, 3, [32]),
                          (259, 3, [8]), (262, 3, [1]), (273, 4, [0]), (277, 3, [1]),
                          (278, 4, [1 << 10]), (279, 4, [0]), (339, 3, [1])]))
  assert wide.stat().st_size < 4096
  _refused(lambda: label_files.open_label_source(wide), 'MiB per row of segments')
  raw = tmp_path / 'raw.tif'     # uncompressed, one strip of 100000 x 100000 uint32
  raw.write_bytes(_tiff([(256, 4, [100000]), (257, 4, [100000]), (258, 3, [32]),
                         (259, 3, [1]), (262, 3, [1]), (273, 4, [0]), (277, 3, [1]),
                         (278, 4, [100000]), (279, 4, [0]), (339, 3, [1])]))
  tracemalloc.start()
  try:
    _refused(lambda: label_files.open_label_source(raw), 'cannot decode|truncated')
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 200 << 20, peak
  sparse = tmp_path / 'sparse.tif'   # 4096 x 4096 tiles of 64, all sparse: zeros
  sparse.write_bytes(_label_tiff(4096, 4096, 64, [b''] * (64 * 64)))
  assert label_files.open_label_source(sparse).ids == [0]


# ---------------------------------------------------------------- images (PNG, JPEG)


def test_png_size_checked_before_decoding(tmp_path):
  small = _png(tmp_path / 'small.png', np.zeros((8, 8, 3), np.uint8))
  huge = tmp_path / 'huge.png'
  huge.write_bytes(_set_png_size(small.read_bytes(), 20000, 20000))
  tracemalloc.start()
  try:
    src = large_images.open_rgb_source(huge)       # the header only
    assert src.shape == (20000, 20000, 3)
    _refused(lambda: image_files.open_image(huge, budget=1 << 30), 'MiB decoded')
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 8 << 20, peak
  d = image_files.declared(huge)
  assert (d.height, d.width, d.format) == (20000, 20000, 'PNG')


def test_sixteen_bit_png_init_is_refused_and_gray_is_scaled(tmp_path):
  gray16 = np.full((16, 16), 0x8040, np.uint16)
  p = _png(tmp_path / 'g16.png', gray16)
  _refused(lambda: large_images.open_rgb_source(p), 'must be 8-bit.*16-bit')
  rgb = image_files.read_rgb(p)         # elsewhere: scaled, not clipped to 255
  assert rgb.shape == (16, 16, 3) and (rgb == 0x80).all()
  raw = tmp_path / 'rgb16.png'          # a 16-bit RGB PNG (IHDR bit depth 16)
  body = (np.full((4, 4, 3), 0x1234, '>u2')).tobytes()
  rows = b''.join(b'\0' + body[i * 24:(i + 1) * 24] for i in range(4))

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack(
        '>I', zlib.crc32(kind + data))
  raw.write_bytes(image_files.PNG_SIGNATURE + chunk(b'IHDR', struct.pack(
      '>IIBBBBB', 4, 4, 16, 2, 0, 0, 0)) + chunk(b'IDAT', zlib.compress(rows))
                  + chunk(b'IEND', b''))
  _refused(lambda: large_images.open_rgb_source(raw), '16-bit')


# ------------------------------------------------------------------------- GeoJSON


def test_geojson_is_strict(tmp_path):
  sq = [[1, 1], [20, 1], [20, 20], [1, 20], [1, 1]]
  cases = {
      'strings': ([_feature('T', [[['1', '1'], [20, 1], [20, 20]]])], 'numbers'),
      'booleans': ([_feature('T', [[[True, 1], [20, 1], [20, 20]]])], 'numbers'),
      'null': ([_feature('T', [[None, [20, 1], [20, 20]]])], 'numbers'),
      'degenerate': ([_feature('T', [[[1, 1], [5, 5], [1, 1]]])], '2 distinct corners'),
      'hole outside': ([_feature('T', [sq, [[40, 40], [50, 40], [50, 50]]])],
                       r'hole \(ring 1\) is not inside its shell'),
      'multi hole outside': ([_feature('T', [[sq, [[40, 40], [50, 40], [50, 50]]]],
                                       'MultiPolygon')], 'polygon 0: hole'),
  }
  for name, (features, match) in cases.items():
    p = _geojson(tmp_path / f'{name}.geojson', features)
    _refused(lambda: gj.read_geojson(p, {'T': 1}, (64, 64)), match)   # pylint: disable=cell-var-from-loop
  # A hole inside (touching the shell) and an unclosed ring are read; unclosed = closed.
  p = _geojson(tmp_path / 'ok.geojson', [
      _feature('T', [sq, [[1, 5], [10, 5], [10, 10]]]), _feature('T', [sq[:-1]])])
  m = gj.read_geojson(p, {'T': 1}, (64, 64))
  closed = _geojson(tmp_path / 'closed.geojson', [_feature('T', [sq])])
  np.testing.assert_array_equal(np.asarray(m), np.asarray(
      gj.read_geojson(closed, {'T': 1}, (64, 64))))


def test_mask_classes_can_name_any_class(tmp_path):
  assert gj.parse_classes('{"Tumor, grade 2": 1, "a=b": 2, " x ": 0}') == {
      'Tumor, grade 2': 1, 'a=b': 2, ' x ': 0}
  for bad, match in (('{"a": true}', 'not an integer'), ('{"a": -1}', 'not an integer'),
                     ('{"a": 1, "a": 2}', 'twice'), ('{}', 'empty'), ('{"a": ', 'JSON')):
    _refused(lambda: gj.parse_classes(bad), match)   # pylint: disable=cell-var-from-loop
  p = _geojson(tmp_path / 'c.geojson', [_feature('Tumor, grade 2', [[[1, 1], [9, 1], [9, 9]]])])
  text = _refused(lambda: gj.read_geojson(p, gj.parse_classes('Tumor=1'), (16, 16)),
                  'not in --mask_classes')
  assert '"Tumor, grade 2"' in text and 'JSON object' in text
  m = gj.read_geojson(p, gj.parse_classes('{"Tumor, grade 2": 1}'), (16, 16))
  assert m.present() == [0, 1]


def test_rasterization_memory_follows_the_output(tmp_path):
  """A 200-byte GeoJSON over a 32768 px canvas: its latent map (4096^2 uint8, 16 MiB)
  plus bounded blocks, not arrays over the polygon's bounding box (~400 MiB before)."""
  p = _geojson(tmp_path / 'big.geojson',
               [_feature('T', [[[0, 0], [32768, 0], [32768, 32768], [0, 32768]]])])
  m = gj.read_geojson(p, {'T': 1}, (32768, 32768))
  tracemalloc.start()
  try:
    lat = m.latent(8)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert lat.shape == (4096, 4096) and lat.min() == 1
  assert peak < lat.nbytes + (64 << 20), peak


# -------------------------------------------------------------------------- resume


def test_resume_refused_when_samples_disagree(tmp_path):
  cfg = types.SimpleNamespace(imgs_path=str(tmp_path), n_images=4, output_format='png')
  meta = {'first_sample': 0, 'batch_start': 2}
  for n in (0, 1):
    (tmp_path / f'sample{n:04d}.json').write_text('{}')
  generate_inputs._check_resume_samples(cfg, meta)   # pylint: disable=protected-access  # agrees
  (tmp_path / 'sample0002.png').write_bytes(b'finished')
  text = _refused(lambda: generate_inputs._check_resume_samples(cfg, meta),  # pylint: disable=protected-access
                  'sample0002 already exist')
  assert 'nothing was written' in text
  assert (tmp_path / 'sample0002.png').read_bytes() == b'finished'
  os.remove(tmp_path / 'sample0002.png')
  os.remove(tmp_path / 'sample0001.json')
  _refused(lambda: generate_inputs._check_resume_samples(cfg, meta), 'sample0001 are missing')  # pylint: disable=protected-access


def test_resume_meta_bad_extra_names_the_field(tmp_path):
  cfg = types.SimpleNamespace(mask=None, n_images=2, batch_size=1)
  meta = {'stage': 'image', 'batch_start': 0, 'first_sample': 0, 'flags': {},
          'checkpoint_sha256': {}, 'iterations': 0, 'has_labels': False,
          'extra': {'seconds': 'soon'}}
  _refused(lambda: resume._check_meta(str(tmp_path), meta, cfg), 'extra.seconds')  # pylint: disable=protected-access
  meta['extra'] = {'mask_stats': [1]}
  _refused(lambda: resume._check_meta(str(tmp_path), meta, cfg), 'extra.mask_stats')  # pylint: disable=protected-access
  meta['extra'], meta['first_sample'] = {}, 2 ** 70
  _refused(lambda: resume._check_meta(str(tmp_path), meta, cfg), "'first_sample' is")  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- fuzz

FUZZ_CASES = 60


def _mutants(raw: bytes, rng: random.Random, n: int):
  out = []
  for i in range(n):
    b = bytearray(raw)
    kind = i % 4
    if kind == 0:
      out.append(bytes(b[:rng.randrange(len(b))]))
      continue
    if kind == 1:
      b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 2:
      pos = rng.randrange(len(b))
      for j in range(pos, min(len(b), pos + rng.randrange(1, 16))):
        b[j] = rng.randrange(256)
    else:
      b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    out.append(bytes(b))
  return out


_SWAPS = ('x', 1, -1, 2 ** 40, 1.5, True, None, [], {}, [[[[]]]])


def _swapped_docs(doc, rng: random.Random, n: int, numbers: list | None = None):
  """`n` copies of `doc` with one value (at any depth) swapped for another type, or
  for a depth bomb. `numbers`: gets, per copy, whether a number was put in (which may
  make another valid document)."""
  paths = []

  def walk(v, path):
    paths.append(path)
    if isinstance(v, dict):
      for k, x in v.items():
        walk(x, path + (k,))
    elif isinstance(v, list):
      for k, x in enumerate(v):
        walk(x, path + (k,))
  walk(doc, ())
  out = []
  for i in range(n):
    d = json.loads(json.dumps(doc))
    path = rng.choice(paths[1:])
    parent = d
    for k in path[:-1]:
      parent = parent[k]
    value = rng.choice(_SWAPS) if i % 5 else json.loads('[' * 200 + ']' * 200)
    parent[path[-1]] = value
    if numbers is not None:
      numbers.append(type(value) in (int, float))   # pylint: disable=unidiomatic-typecheck
    out.append(json.dumps(d).encode())
  return out


def _outcome(read, path, expected, equal):
  try:
    got = read(path)
  except REFUSED as e:
    _one_line(e)
    return 'refused'
  assert equal(got, expected), f'{path}: read back a wrong result'
  return 'read'


def test_fuzz_hostile_readers(tmp_path):
  """FUZZ_CASES byte mutants and FUZZ_CASES field swaps (depth bombs among them) of each
  reader's valid file: GeoJSON, OME-Zarr metadata, label TIFF, PNG init image and keep
  mask, plus declared-size bombs of the PNG and TIFF headers. Bounded: a few seconds,
  and the process's peak RSS grows < 256 MiB."""
  rng = random.Random(40)
  start, rss0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  counts = {}

  def run(kind, raws, name, read, expected, equal):
    outcomes = []
    for i, raw in enumerate(raws):
      p = tmp_path / f'{kind}{i}{name}'
      p.write_bytes(raw)
      outcomes.append(_outcome(read, p, expected, equal))
      p.unlink()
    counts[kind] = len(outcomes)
    assert 'refused' in outcomes, kind

  # GeoJSON
  doc = {'type': 'FeatureCollection', 'features': [
      _feature('T', [[[2, 2], [30, 2], [30, 30], [2, 30], [2, 2]],
                     [[8, 8], [16, 8], [16, 16], [8, 8]]]),
      _feature('S', [[[[1, 40], [20, 40], [20, 60]]]], 'MultiPolygon')]}
  good = tmp_path / 'g.geojson'
  good.write_text(json.dumps(doc))
  classes = {'T': 1, 'S': 2}

  def read_gj(p):
    return np.asarray(gj.read_geojson(p, classes, (64, 64), num_classes=3))
  expect = read_gj(good)
  run('geojson_bytes', _mutants(good.read_bytes(), rng, FUZZ_CASES), '.geojson', read_gj,
      expect, np.array_equal)
  numbers = []
  swapped = _swapped_docs(doc, rng, FUZZ_CASES, numbers)
  outcomes = []
  for i, (raw, number) in enumerate(zip(swapped, numbers)):
    p = tmp_path / f'swap{i}.geojson'
    p.write_bytes(raw)
    # a number in place of a number is another valid polygon: read, of the right shape;
    # anything else (strings, booleans, null, lists, depth bombs) the same map or refused
    outcomes.append(_outcome(read_gj, p, expect, lambda got, want, n=number: (
        got.shape == want.shape if n else np.array_equal(got, want))))
  counts['geojson_fields'] = len(outcomes)
  assert 'refused' in outcomes

  # OME-Zarr label metadata (.zattrs of the image group, .zarray), through the reader.
  # Mutated metadata may declare another valid array (a smaller shape, order 'F'): what
  # must hold is a refusal in one line or rows of the shape it declares.
  labels = (np.arange(64 * 64).reshape(64, 64) % 3).astype(np.uint8)
  store = _zarr_labels(tmp_path / 'z.zarr', labels)

  def read_zarr(p):
    src = label_files.open_label_source(p)
    rows = label_maps.LabelMap(src, src.shape).rows(0, min(src.shape[0], 64))
    assert rows.shape == (min(src.shape[0], 64), src.shape[1])
    return rows if src.shape == (64, 64) else None
  for rel in ('labels/cells/.zattrs', 'labels/cells/0/.zarray'):
    meta_file = store / rel
    original = meta_file.read_bytes()
    outcomes = []
    for raw in (_mutants(original, rng, FUZZ_CASES // 2)
                + _swapped_docs(json.loads(original), rng, FUZZ_CASES // 2)):
      meta_file.write_bytes(raw)
      changed = rel.endswith('.zarray') and raw != original
      outcomes.append(_outcome(read_zarr, store, labels, lambda got, want, c=changed:
                               (c and (got is None or got.shape == want.shape))
                               or np.array_equal(got, want)))
    meta_file.write_bytes(original)
    counts['zarr ' + rel] = len(outcomes)
    assert 'refused' in outcomes

  # label TIFF (deflate tiles), byte mutants and declared sizes
  tiles = [zlib.compress(labels[i:i + 32, j:j + 32].tobytes())
           for i in (0, 32) for j in (0, 32)]
  tif = _label_tiff(64, 64, 32, tiles)

  def read_tiff(p):
    src = label_files.open_label_source(p)
    if src is None:
      raise ValueError('not a TIFF (signature)')   # what --mask then reads as a PNG
    rows = src.read_rows(0, min(64, src.shape[0]))
    assert rows.shape == (min(64, src.shape[0]), src.shape[1]) and min(src.shape) > 0
    return rows

  def same_or_declared_other(got, want):   # a flipped size tag declares another page
    return got.shape != want.shape or np.array_equal(got, want)
  run('tiff_bytes', _mutants(tif, rng, FUZZ_CASES), '.tif', read_tiff, labels,
      same_or_declared_other)
  sizes = [_label_tiff(h, w, 32, tiles, bits=b) for h, w, b in
           ((1 << 31, 1 << 31, 8), (64, 1 << 31, 32), (1 << 20, 1 << 20, 16))]
  run('tiff_sizes', sizes, '.tif', read_tiff, labels, np.array_equal)

  # PNG init image and keep mask: byte mutants and declared-size bombs
  rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  png = _png(tmp_path / 'i.png', rgb).read_bytes()

  def read_init(p):
    src = large_images.open_rgb_source(p)
    if src.shape[0] * src.shape[1] > 1 << 20:
      raise ValueError('larger than this test reads')   # what prepare refuses by size
    return src.read_rows(0, src.shape[0])
  bombs = [_set_png_size(png, w, h) for w, h in ((20000, 20000), (1 << 31 - 1, 1), (0, 5))]
  run('png_init', _mutants(png, rng, FUZZ_CASES) + bombs, '.png', read_init, rgb,
      np.array_equal)
  keep = _png(tmp_path / 'k.png', (labels > 0).astype(np.uint8)).read_bytes()
  run('png_keep', _mutants(keep, rng, FUZZ_CASES) + [_set_png_size(keep, 1 << 16, 1 << 16)],
      '.png', lambda p: np.asarray(image_files.open_image(p, budget=64 << 20)),
      (labels > 0).astype(np.uint8), np.array_equal)

  seconds = time.perf_counter() - start
  grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0   # KiB on Linux
  total = sum(counts.values())
  print(f'fuzz: {total} cases in {seconds:.1f} s, peak RSS +{grown / 1024:.0f} MiB: '
        f'{counts}')
  assert total >= 7 * FUZZ_CASES
  assert seconds < 60 and grown < 256 * 1024


# ------------------------------------------------------- probes through the command


def _probe_args(**flags):
  args = {'unet_ckpt': os.path.join(DEMO, 'image_unet'),
          'vae_ckpt': os.path.join(DEMO, 'vae'), 'patch_size': 128, 'sampling_steps': 2}
  args.update(flags)
  return [f'--{k}={v}' for k, v in args.items()]


def test_command_probes_are_one_error_line(tmp_path, script_server):
  """The audit's probes through `sample_large_image.py`: one `error:` line each,
  nothing written."""
  fifo = tmp_path / 'fifo'
  os.mkfifo(fifo)
  loop = tmp_path / 'loop'
  os.symlink(loop, loop)
  png = _png(tmp_path / 'i.png', np.zeros((512, 512, 3), np.uint8))   # the demo mask's
  u16 = _png(tmp_path / 'u16.png', np.full((256, 256), 40000, np.uint16))
  keep_big = tmp_path / 'keep.png'
  keep_big.write_bytes(_set_png_size(_png(tmp_path / 'k.png', np.ones((8, 8), np.uint8)
                                          ).read_bytes(), 20000, 20000))
  gj_u16 = tmp_path / 'u16.geojson'
  gj_u16.write_bytes(json.dumps({'type': 'FeatureCollection', 'features': []}
                                ).encode('utf-16'))
  v3 = tmp_path / 'v3.zarr'
  v3.mkdir()
  (v3 / 'zarr.json').write_text('{"zarr_format": 3}')
  gj_comma = _geojson(tmp_path / 'c.geojson', [_feature('Tumor, grade 2',
                                                          [[[1, 1], [90, 1], [90, 90]]])])
  out = tmp_path / 'out'
  cases = [
      (dict(mask=fifo, image_size=256), 'FIFO'),
      (dict(init_image=fifo, mask='demo'), 'FIFO'),
      (dict(init_image=png, keep_mask=fifo, mask='demo'), 'FIFO'),
      (dict(init_image=png, keep_mask=keep_big, mask='demo'), '20000x20000, the output is 512x512'),
      (dict(init_image=u16, mask='demo'), '16-bit'),
      (dict(mask=v3, image_size=256), 'Zarr v3'),
      (dict(init_image=v3, mask='demo'), 'Zarr v3'),
      (dict(mask=gj_u16, image_size=256, mask_classes='T=1'), 'UTF-16'),
      (dict(mask=gj_comma, image_size=256, mask_classes='Tumor=1'), 'JSON object'),
      (dict(mask='demo', imgs_path=loop / 'x'), 'symlink'),
  ]
  for flags, match in cases:
    flags.setdefault('imgs_path', out)
    r = script_server.run(str(script_path('sample_large_image')), *_probe_args(**flags))
    errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
    assert r.returncode != 0 and len(errors) == 1 and 'Traceback' not in r.stderr, (
        flags, r.stderr[-2000:])
    assert match in errors[0], (flags, errors[0])
    assert not out.exists()


def test_symlinked_checkpoint_folder_is_saved_through(tmp_path):
  """A run's checkpoint folder that is a symlink: saved into its target twice (the swap
  renames the target, not the link), no hidden `.tmp-...-old` entry left, and removed
  with its link at the end."""
  from tiled_ldm_jax.models import checkpoint  # pylint: disable=g-import-not-at-top
  target = tmp_path / 'elsewhere' / 'state'
  target.mkdir(parents=True)
  run = tmp_path / 'run'
  run.mkdir()
  os.symlink(target, run / resume.FOLDER)
  ckpt = resume.RunCheckpoint(str(run))
  for i in range(2):
    checkpoint.save_state(ckpt.path, {'x': np.full((2,), i, np.float32)}, {'i': i})
  assert os.path.islink(ckpt.path) and ckpt.meta() == {'i': 1}
  assert [p.name for p in run.iterdir()] == [resume.FOLDER]
  assert [p.name for p in target.parent.iterdir()] == ['state']
  ckpt.remove()
  assert not os.path.lexists(ckpt.path) and not target.exists()


def test_jpeg_tile_declaring_more_than_its_tile_is_refused(tmp_path):
  """Whatever codec library decodes JPEG tiles: a tile whose own frame header declares
  more pixels than the TIFF tile is refused before decoding."""
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(np.zeros((600, 800), np.uint8)).save(buf, format='JPEG')
  assert tiff_rows._jpeg_size(buf.getvalue()) == (600, 800)   # pylint: disable=protected-access
  p = tmp_path / 'jpeg.tif'
  p.write_bytes(_label_tiff(64, 64, 64, [buf.getvalue()], compression=7))
  _refused(lambda: label_files.open_label_source(p), 'decompression bomb')
