"""A seeded fuzz test of every reader of outside files: truncations, byte flips, bombs
and type swaps of one valid file of each kind (torch zip checkpoint, safetensors,
model folder `model.json`, label PNG, latent `.npy`, saved run state, training pair).

Each mutated file must either read back the correct result or be refused with the
reader's one-line `ValueError` / `FileNotFoundError`: never another exception, a crash
or a hang (the whole test is bounded by the suite's time, about 5 s here).
"""

import json
import os
import random
import shutil
import struct
import types
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax.training import data
from tiled_ldm_jax import demo
from tiled_ldm_jax.files import image_files
from tiled_ldm_jax.files import latent_files
from tiled_ldm_jax import resume
from tiled_ldm_jax.convert import safetensors_file
from tiled_ldm_jax.convert import torch_zip
from tiled_ldm_jax.convert import torch_zip_write as tzw
from tiled_ldm_jax.files import label_maps

CASES_PER_KIND = 60
REFUSED = (ValueError, FileNotFoundError)


def _one_line(e: Exception) -> None:
  text = str(e)
  assert text and '\n' not in text or type(e).__name__ == 'ConversionError', text


def _mutations(raw: bytes, rng: random.Random, n: int, protect: int = 0):
  """`n` mutants of `raw`: truncations, single and burst byte flips, appended garbage."""
  out = []
  for i in range(n):
    b = bytearray(raw)
    kind = i % 4
    if kind == 0:
      out.append(bytes(b[:rng.randrange(len(b))]))
      continue
    if kind == 1:
      pos = rng.randrange(protect, len(b))
      b[pos] ^= 1 << rng.randrange(8)
    elif kind == 2:
      pos = rng.randrange(protect, len(b))
      for j in range(pos, min(len(b), pos + rng.randrange(1, 16))):
        b[j] = rng.randrange(256)
    else:
      b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    out.append(bytes(b))
  return out


def _check(read, path, expected, equal):
  """`read(path)` is the expected result or a one-line refusal."""
  try:
    got = read(path)
  except REFUSED as e:
    _one_line(e)
    return 'refused'
  assert equal(got, expected), f'{path}: read back a wrong result'
  return 'read'


# ----------------------------------------------------------------------------- torch zip


def _read_torch(path):
  sd = torch_zip.load(path)
  return {k: np.asarray(v) for k, v in torch_zip.tensors_of(sd, path).items()}


def _same_arrays(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_torch_zip_fuzz(tmp_path):
  rng = random.Random(0)
  tensors = {'w': np.arange(24, dtype=np.float32).reshape(4, 6),
             'b': np.linspace(-1, 1, 7).astype(np.float32)}
  good = tmp_path / 'good.pt'
  tzw.save(str(good), dict(tensors))
  assert _same_arrays(_read_torch(str(good)), tensors)
  outcomes = set()
  for i, raw in enumerate(_mutations(good.read_bytes(), rng, CASES_PER_KIND)):
    p = tmp_path / f'm{i}.pt'
    p.write_bytes(raw)
    outcomes.add(_check(_read_torch, str(p), tensors, _same_arrays))
  assert 'refused' in outcomes


def _zip_with(path, entries, compress=zipfile.ZIP_DEFLATED):
  with zipfile.ZipFile(path, 'w', compression=compress) as zf:
    for name, payload in entries:
      zf.writestr(name, payload)


def test_torch_zip_bombs_and_archive_tricks(tmp_path):
  """Bombs, duplicate entries, unknown methods, encryption flags and a truncated last
  storage: each one line, and the bomb refused before inflating."""
  pkl, _ = tzw.pickle_bytes({'a': 1})
  bomb = tmp_path / 'bomb.pt'
  _zip_with(bomb, [('archive/data.pkl', pkl + b'\0' * (200 * 2 ** 20))])
  assert bomb.stat().st_size < 2 ** 20
  with pytest.raises(torch_zip.CheckpointError, match='zip bomb|at most'):
    torch_zip.load(str(bomb))

  dup = tmp_path / 'dup.pt'
  with pytest.warns(UserWarning):   # zipfile warns about the duplicate name it writes
    _zip_with(dup, [('archive/data.pkl', pkl), ('archive/data.pkl', pkl)])
  with pytest.raises(torch_zip.CheckpointError, match='more than once'):
    torch_zip.load(str(dup))

  good = tmp_path / 'good.pt'
  tzw.save(str(good), {'w': np.ones((64,), np.float32)})
  raw = good.read_bytes()
  cd = _central_entry(raw, 'archive/data.pkl')
  for name, offset, value in (('method', 10, 99), ('encrypted', 8, 1)):
    b = bytearray(raw)
    struct.pack_into('<H', b, cd + offset, value)
    p = tmp_path / f'{name}.pt'
    p.write_bytes(bytes(b))
    with pytest.raises(torch_zip.CheckpointError, match=name[:6]) as e:
      torch_zip.load(str(p))
    _one_line(e.value)

  # The last storage cut short, the central directory right after it: CRC / bounds.
  with zipfile.ZipFile(good) as zf:
    info = zf.getinfo('archive/data/0')
  b = bytearray(good.read_bytes())
  start = info.header_offset + 30 + len(info.filename) + len(info.extra)
  b[start + 100:start + 128] = b'\x00' * 28
  p = tmp_path / 'flipped.pt'
  p.write_bytes(bytes(b))
  with pytest.raises(torch_zip.CheckpointError, match='CRC'):
    _read_torch(str(p))


def _central_entry(raw: bytes, name: str) -> int:
  """Offset of `name`'s central directory record in a zip file's bytes."""
  pos = raw.find(b'PK\x01\x02')
  while pos >= 0:
    n = struct.unpack_from('<H', raw, pos + 28)[0]
    if raw[pos + 46:pos + 46 + n] == name.encode():
      return pos
    pos = raw.find(b'PK\x01\x02', pos + 4)
  raise KeyError(name)


def test_deeply_nested_pickle_is_refused_not_a_crash(tmp_path):
  deep = b'\x80\x02}' + b')' + b'\x85' * 1_000_000 + b'K\x01s.'
  p = tmp_path / 'deep.pt'
  tzw.save(str(p), {}, pickle_data=deep)
  with pytest.raises(torch_zip.CheckpointError, match='more than 64 deep'):
    torch_zip.load(str(p))


# ----------------------------------------------------------------------------- safetensors


def _write_safetensors(path, tensors, header_edit=None):
  header, blobs, pos = {}, [], 0
  for name, a in tensors.items():
    raw = np.ascontiguousarray(a).tobytes()
    header[name] = {'dtype': {'float32': 'F32', 'int64': 'I64'}[str(a.dtype)],
                    'shape': list(a.shape), 'data_offsets': [pos, pos + len(raw)]}
    blobs.append(raw)
    pos += len(raw)
  if header_edit:
    header_edit(header)
  text = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(text)) + text + b''.join(blobs))


def _read_st(path):
  f = safetensors_file.load(path)
  return {k: f[k] for k in f}


def test_safetensors_fuzz(tmp_path):
  rng = random.Random(1)
  tensors = {'a': np.arange(12, dtype=np.float32).reshape(3, 4), 'n': np.arange(5)}
  good = tmp_path / 'good.safetensors'
  _write_safetensors(good, tensors)
  assert _same_arrays(_read_st(str(good)), tensors)
  header_len = 8 + struct.unpack('<Q', good.read_bytes()[:8])[0]
  outcomes = []
  for i, raw in enumerate(_mutations(good.read_bytes(), rng, CASES_PER_KIND)):
    p = tmp_path / f'm{i}.safetensors'
    p.write_bytes(raw)
    try:
      got = _read_st(str(p))
    except REFUSED as e:
      _one_line(e)
      outcomes.append('refused')
      continue
    # No checksum in the format: a flip in the data section reads as other values;
    # anything else must read back exactly.
    same_header = raw[:header_len] == good.read_bytes()[:header_len]
    assert same_header or _same_arrays(got, tensors), i
    outcomes.append('read')
  assert 'refused' in outcomes

  swaps = [lambda h: h.update(a=5), lambda h: h['a'].update(dtype='F8_E4M3'),
           lambda h: h['a'].update(shape='3x4'), lambda h: h['a'].update(shape=[3, -4]),
           lambda h: h['a'].update(data_offsets=[0]), lambda h: h['a'].update(extra=1),
           lambda h: h['n'].update(data_offsets=[0, 40]), lambda h: h.update(__metadata__=1),
           lambda h: h['a'].update(shape=[[3], 4]), lambda h: h['a'].update(dtype=None)]
  for i, edit in enumerate(swaps):
    p = tmp_path / f's{i}.safetensors'
    _write_safetensors(p, tensors, edit)
    with pytest.raises(safetensors_file.SafetensorsFileError) as e:
      _read_st(str(p))
    _one_line(e.value)
  nested = tmp_path / 'nested.safetensors'
  text = b'[' * 100_000 + b']' * 100_000
  nested.write_bytes(struct.pack('<Q', len(text)) + text)
  with pytest.raises(safetensors_file.SafetensorsFileError, match='not valid JSON'):
    _read_st(str(nested))


# ----------------------------------------------------------------------------- model folder


def _type_swaps(value):
  return [None, 5, -1, 'x', [], {}, [5], {'a': 1}, True, 1.5, [[[[]]]]] + (
      [value + [value[0]]] if isinstance(value, list) and value else [])


def test_model_json_type_swaps(tmp_path):
  src = demo.model_path('flow_vae')   # a format-1 folder (below: a stray "parts")
  good_meta = json.loads(open(os.path.join(src, 'model.json')).read())
  _, _, params = checkpoint.load_model(src)
  folder = tmp_path / 'vae'
  shutil.copytree(src, folder)
  n = 0

  def attempt(meta_text):
    nonlocal n
    (folder / 'model.json').write_text(meta_text)
    n += 1
    try:
      _, _, got = checkpoint.load_model(str(folder))
    except REFUSED as e:
      _one_line(e)
      return
    assert all(np.array_equal(a, b) for a, b in zip(
        __import__('jax').tree_util.tree_leaves(got),
        __import__('jax').tree_util.tree_leaves(params)))

  for key in list(good_meta):
    for value in _type_swaps(good_meta[key]):
      attempt(json.dumps({**good_meta, key: value}))
  for key in list(good_meta['config']):
    for value in _type_swaps(good_meta['config'][key]):
      attempt(json.dumps({**good_meta, 'config': {**good_meta['config'], key: value}}))
  for text in ('[1, 2]', '{', '[' * 100_000, '"x"', '', '\xff'):
    attempt(text)
  assert n > 50
  assert 'parts' not in good_meta   # a format-1 folder: a stray "parts" is refused
  (folder / 'model.json').write_text(json.dumps({**good_meta, 'parts': 5}))
  with pytest.raises(ValueError, match='"parts" must be'):
    checkpoint.load_model(str(folder))


# ----------------------------------------------------------------------------- label PNG


def _set_png_size(raw: bytes, w: int, h: int) -> bytes:
  """The PNG with its IHDR size replaced (chunk CRC recomputed: a valid header)."""
  b = bytearray(raw)
  struct.pack_into('>II', b, 16, w, h)
  struct.pack_into('>I', b, 29, zlib.crc32(bytes(b[12:29])))
  return bytes(b)


def test_label_png_fuzz(tmp_path):
  rng = random.Random(2)
  labels = np.random.default_rng(0).integers(0, 5, (24, 32)).astype(np.int32)
  good = tmp_path / 'good.png'
  label_maps.write_label_png(good, labels)
  raw = good.read_bytes()
  outcomes = set()
  for i, m in enumerate(_mutations(raw, rng, CASES_PER_KIND, protect=0)):
    p = tmp_path / f'm{i}.png'
    p.write_bytes(m)
    outcomes.add(_check(label_maps.read_label_png, p, labels, np.array_equal))
  assert 'refused' in outcomes
  bomb = tmp_path / 'bomb.png'
  bomb.write_bytes(_set_png_size(raw, 100_000, 100_000))
  with pytest.raises(ValueError, match='declares 100000 x 100000'):
    label_maps.read_label_png(bomb)
  # Other formats under a .png name: refused by signature, never handed to a decoder.
  eps = tmp_path / 'x.png'
  eps.write_bytes(b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n')
  with pytest.raises(ValueError, match='not a PNG'):
    label_maps.read_label_png(eps)
  jpg = tmp_path / 'j.png'
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(jpg, format='JPEG')
  with pytest.raises(ValueError, match='not a PNG'):
    label_maps.read_label_png(jpg)
  with pytest.raises(ValueError, match='not a PNG / JPEG / TIFF'):
    image_files.read_rgb(eps)


# ----------------------------------------------------------------------------- latents


def test_latent_fuzz(tmp_path):
  rng = random.Random(3)
  z = np.random.default_rng(0).standard_normal((6, 5, 4)).astype(np.float32)
  good = tmp_path / 'good.npy'
  np.save(good, z)
  raw = good.read_bytes()
  for i, m in enumerate(_mutations(raw, rng, CASES_PER_KIND)):
    p = tmp_path / f'm{i}.npy'
    p.write_bytes(m)
    try:
      got = latent_files.read_latent(p, 4)
    except REFUSED as e:
      _one_line(e)
      continue
    # No checksum in .npy: a flip in the data reads as another finite value.
    assert got.shape == (6, 5, 4) and got.dtype == np.float32 and np.isfinite(got).all()
  for bad in (np.zeros(8, np.float32), np.zeros((6, 5, 3), np.float32),
              np.full((2, 2, 4), np.inf, np.float32), np.zeros((2, 2, 4), np.complex64),
              np.zeros((2, 2, 4), bool), np.zeros((2, 2, 4), [('a', 'f4')]),
              np.zeros((2, 2, 2, 4), np.float32)):
    p = tmp_path / 'bad.npy'
    np.save(p, bad)
    with pytest.raises(ValueError) as e:
      latent_files.read_latent(p, 4)
    _one_line(e.value)
  np.savez(tmp_path / 'z.npz', z=z)
  os.replace(tmp_path / 'z.npz', tmp_path / 'z.npy')
  with pytest.raises(ValueError, match='npz'):
    latent_files.read_latent(tmp_path / 'z.npy', 4)
  huge = tmp_path / 'huge.npy'
  with open(huge, 'wb') as f:
    np.lib.format.write_array_header_1_0(f, {'descr': '<f4', 'fortran_order': False,
                                             'shape': (200_000, 200_000, 4)})
  with pytest.raises(ValueError, match='GiB'):
    latent_files.read_latent(huge, 4)


# ----------------------------------------------------------------------------- run state


def test_run_state_type_swaps(tmp_path):
  cfg = types.SimpleNamespace(mask=None, n_images=4, batch_size=2)
  good = {'format': 1, 'stage': 'image', 'batch_start': 2, 'first_sample': 0,
          'flags': {}, 'checkpoint_sha256': {'unet': 'ab'}, 'iterations': 3,
          'has_labels': True, 'extra': {}}
  resume._check_meta('ckpt', good, cfg)   # pylint: disable=protected-access
  refused = 0
  for key in good:
    for value in _type_swaps(good[key]) + [4, 1, 'mask']:
      meta = {**good, key: value}
      try:
        resume._check_meta('ckpt', meta, cfg)   # pylint: disable=protected-access
      except ValueError as e:
        _one_line(e)
        refused += 1
  assert refused > 60
  with pytest.raises(ValueError, match='batch_start 4'):   # past the end: refused, kept
    resume._check_meta('ckpt', {**good, 'batch_start': 4}, cfg)  # pylint: disable=protected-access
  path = tmp_path / 'meta.json'
  for text in ('[' * 100_000, '{"a": ', '[]'):
    path.write_text(text)
    with pytest.raises(ValueError):
      checkpoint.load_state_meta(str(tmp_path))


# ----------------------------------------------------------------------------- training data


def test_training_pairs_checked(tmp_path):
  rng = random.Random(4)
  folder = tmp_path / 'data'
  folder.mkdir()
  labels = np.random.default_rng(0).integers(0, 3, (20, 20)).astype(np.int32)
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / 'a.png')
  label_maps.write_label_png(folder / 'a_mask.png', labels)
  pairs = data.find_pairs(str(folder))
  data.check_pairs(pairs, 3, True, 16)
  image_raw = (folder / 'a.png').read_bytes()
  for i, m in enumerate(_mutations(image_raw, rng, 24)):
    (folder / 'a.png').write_bytes(m)
    try:
      data.check_pairs(pairs, 3, True, 16)
    except REFUSED as e:
      _one_line(e)
  (folder / 'a.png').write_bytes(image_raw)
  for bad_labels, match in ((np.full((20, 20), 7), 'out of range'),
                            (np.zeros((10, 10)), 'smaller than the crop')):
    label_maps.write_label_png(folder / 'a_mask.png', bad_labels.astype(np.int32))
    with pytest.raises(ValueError, match=match):
      data.check_pairs(pairs, 3, True, 16)
  label_maps.write_label_png(folder / 'a_mask.png', np.zeros((20, 24), np.int32))
  with pytest.raises(ValueError, match='but its mask is'):
    data.check_pairs(pairs, 3, True, 16)


def test_safetensors_reader_matches_the_package(reference_dir):
  """Our numpy reader gives the safetensors package's arrays for the reference VAE."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = str(reference_dir / 'vae' / 'diffusion_pytorch_model.safetensors')
  ours, theirs = safetensors_file.load(path), load_file(path)
  assert set(ours) == set(theirs) and len(ours) > 10
  for k, v in theirs.items():
    assert ours.shape(k) == v.shape and ours[k].dtype == v.dtype
    np.testing.assert_array_equal(ours[k], v)
