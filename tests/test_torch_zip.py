"""The torch-free checkpoint reader: hostile pickles are refused before anything runs,
damaged files are named, tensors round-trip, and genuine torch files read correctly."""

import hashlib
import os
import pickle
import re
import zipfile

import ml_dtypes
import numpy as np
import pytest

from tiled_ldm_jax.convert import torch_zip
from tiled_ldm_jax.convert import torch_zip_write as tzw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _str(s: str) -> bytes:
  data = s.encode()
  return b'X' + len(data).to_bytes(4, 'little') + data


def _call(module: str, name: str, *args: str) -> bytes:
  """Opcodes of `module.name(*args)` through GLOBAL + REDUCE (what __reduce__ emits)."""
  return tzw.global_op(module, name) + b'(' + b''.join(_str(a) for a in args) + b'tR'


def _payloads(marker: str) -> dict[str, tuple[bytes, str]]:
  """name -> (opcodes pushing one object, the global the error must name). Each, run by
  the standard unpickler, would create `marker`."""
  touch = f'open({marker!r}, "w").close()'
  stack_global = _str('os') + _str('system') + b'\x93' + b'(' + _str(f'touch {marker}') + b'tR'
  inst = b'(' + _str(f'touch {marker}') + b'ios\nsystem\n'
  return {
      'os.system': (_call('os', 'system', f'touch {marker}'), 'os.system'),
      'posix.system': (_call('posix', 'system', f'touch {marker}'), 'posix.system'),
      'eval': (_call('builtins', 'eval', touch), 'builtins.eval'),
      'builtins.exec': (_call('builtins', 'exec', touch), 'builtins.exec'),
      'py2 __builtin__.eval': (_call('__builtin__', 'eval', touch), '__builtin__.eval'),
      'subprocess.Popen': (tzw.global_op('subprocess', 'Popen') + b'((' + _str('touch')
                           + _str(marker) + b'ltR', 'subprocess.Popen'),
      'torch.serialization.load': (_call('torch.serialization', 'load', marker),
                                   'torch.serialization.load'),
      'STACK_GLOBAL os.system': (stack_global, 'os.system'),
      'INST os.system': (inst, 'os.system'),
  }


_NAMES = list(_payloads('m'))
# Payloads the plain unpickler can run here (torch is not needed for them).
_RUNNABLE = [n for n in _NAMES if 'torch' not in n and 'posix' not in n]


def _whole_pickle(opcodes: bytes) -> bytes:
  return b'\x80\x02' + opcodes + b'.'


@pytest.mark.parametrize('name', _RUNNABLE)
def test_payloads_do_run_under_plain_pickle(tmp_path, name):
  """The control: each payload really creates its marker when unpickled normally, so the
  refusal tests below would notice if the reader ran it."""
  marker = tmp_path / 'pwned'
  opcodes, _ = _payloads(str(marker))[name]
  result = pickle.loads(_whole_pickle(opcodes))
  if hasattr(result, 'wait'):   # a Popen runs in the background
    result.wait()
  assert marker.exists()


def _hostile_checkpoint(path, opcodes: bytes, nested: bool):
  """A checkpoint whose pickle is the payload, or a genuine-looking trainer checkpoint
  with the payload as one value deep inside its EMA state dict."""
  if nested:
    obj = {'step': 1, 'ema': tzw.OrderedDict({'ema_model.model.w': np.ones(3, np.float32),
                                              'ema_model.model.x': tzw.Raw(opcodes)})}
    tzw.save(str(path), obj)
  else:
    tzw.save(str(path), {}, pickle_data=_whole_pickle(opcodes))


@pytest.mark.parametrize('nested', [False, True], ids=['top', 'nested'])
@pytest.mark.parametrize('name', _NAMES)
def test_hostile_globals_are_refused_and_nothing_runs(tmp_path, name, nested):
  marker = tmp_path / 'pwned'
  opcodes, global_name = _payloads(str(marker))[name]
  path = tmp_path / 'model-1.pt'
  _hostile_checkpoint(path, opcodes, nested)
  with pytest.raises(torch_zip.CheckpointError) as e:
    torch_zip.load(str(path))
  assert str(e.value) == (f'checkpoint {path}: refusing global {global_name} '
                          '(not a tensor/state-dict type)')
  assert not marker.exists()


def test_refusal_happens_before_any_call(tmp_path):
  """A payload after an allowed call: the reader stops at the bad global, so even a
  payload placed late in the pickle never runs (find_class raises, nothing is called)."""
  marker = tmp_path / 'pwned'
  opcodes, _ = _payloads(str(marker))['os.system']
  tzw.save(str(tmp_path / 'a.pt'), [np.zeros(2, np.float32), tzw.Raw(opcodes)])
  with pytest.raises(torch_zip.CheckpointError, match='refusing global os.system'):
    torch_zip.load(str(tmp_path / 'a.pt'))
  assert not marker.exists()


def _bad_opcodes():
  ok = tzw.global_op('collections', 'OrderedDict')
  return {
      # An allowed stand-in used as something else is still only data.
      'storage type called': (tzw.global_op('torch', 'FloatStorage') + b')R', 'malformed pickle'),
      'BUILD on a dict': (b'}' + b'}' + _str('__class__') + b'Ns' + b'b', 'malformed pickle'),
      'OrderedDict state not a dict': (ok + b')R' + _str('x') + b'b', 'OrderedDict state'),
      'persistent id not a storage': (_str('x') + b'Q', 'unexpected persistent id'),
      'huge memo index': (b'N' + b'r' + (2**31).to_bytes(4, 'little'), 'memo index'),
  }


@pytest.mark.parametrize('name', list(_bad_opcodes()))
def test_malformed_pickles_are_checkpoint_errors(tmp_path, name):
  opcodes, message = _bad_opcodes()[name]
  path = tmp_path / 'x.pt'
  tzw.save(str(path), {}, pickle_data=_whole_pickle(opcodes))
  with pytest.raises(torch_zip.CheckpointError, match=re.escape(message)) as e:
    torch_zip.load(str(path))
  assert '\n' not in str(e.value) and str(e.value).startswith(f'checkpoint {path}: ')


# ----------------------------------------------------------------------------- damaged files


def _small(path, **kw):
  tzw.save(str(path), {'a': np.arange(6, dtype=np.float32).reshape(2, 3),
                       'b': np.arange(4, dtype=np.int64)}, **kw)


@pytest.mark.parametrize('keep', [0.5, 0.98])
def test_truncated_zip(tmp_path, keep):
  path = tmp_path / 'model-1.pt'
  _small(path)
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(torch_zip.CheckpointError, match='not a readable zip'):
    torch_zip.load(str(path))


def test_missing_data_entry(tmp_path):
  path = tmp_path / 'model-1.pt'
  _small(path, skip_storages=('1',))
  with pytest.raises(torch_zip.CheckpointError,
                     match=re.escape('storage data/1 named by the pickle is missing')):
    torch_zip.load(str(path))


def test_storage_size_disagrees_with_dtype(tmp_path):
  """Float32 bytes declared as float64 elements: 4 x 8 bytes expected, 16 there."""
  v = tzw.View(np.arange(4, dtype=np.float32), 0, (4,), (1,), storage_name='DoubleStorage')
  tzw.save(str(tmp_path / 'x.pt'), {'w': v})
  with pytest.raises(torch_zip.CheckpointError,
                     match=re.escape('storage data/0 holds 16 bytes, but the pickle says 4 x '
                                     'float64 = 32 bytes')):
    torch_zip.load(str(tmp_path / 'x.pt'))


def test_unsupported_storage_dtype_is_refused(tmp_path):
  v = tzw.View(np.zeros(4, np.float32), 0, (2,), (1,), storage_name='ComplexFloatStorage')
  tzw.save(str(tmp_path / 'x.pt'), {'w': v})
  with pytest.raises(torch_zip.CheckpointError,
                     match=re.escape('refusing global torch.ComplexFloatStorage')):
    torch_zip.load(str(tmp_path / 'x.pt'))


@pytest.mark.parametrize('offset, shape, stride', [(0, (3, 4), (4, 1)),   # 12 > 10 elements
                                                   (8, (2,), (2,)),
                                                   (0, (2,), (-1,))])
def test_view_outside_its_storage_is_refused(tmp_path, offset, shape, stride):
  v = tzw.View(np.zeros(10, np.float32), offset, shape, stride)
  tzw.save(str(tmp_path / 'x.pt'), {'w': v})
  with pytest.raises(torch_zip.CheckpointError, match='tensor view|bad tensor view'):
    torch_zip.load(str(tmp_path / 'x.pt'))


def test_legacy_format_is_refused_with_advice(tmp_path):
  path = tmp_path / 'old.pt'
  path.write_bytes(pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2) + b'rest')
  with pytest.raises(torch_zip.CheckpointError, match=r'legacy \(pre-1.6\) torch format.*'
                     r'torch.save'):
    torch_zip.load(str(path))


def test_torchscript_and_other_files_are_refused(tmp_path):
  ts = tmp_path / 'ts.pt'
  with zipfile.ZipFile(ts, 'w') as zf:
    zf.writestr('ts/constants.pkl', b'\x80\x02].')
    zf.writestr('ts/code/__torch__.py', 'x = 1')
  with pytest.raises(torch_zip.CheckpointError, match='TorchScript archive'):
    torch_zip.load(str(ts))
  txt = tmp_path / 'notes.pt'
  txt.write_text('hello')
  with pytest.raises(torch_zip.CheckpointError, match='not a torch zip checkpoint'):
    torch_zip.load(str(txt))


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize('dtype', [np.float32, np.float16, ml_dtypes.bfloat16, np.float64,
                                   np.int64, np.int32, np.uint8, np.bool_])
def test_dtype_round_trip(tmp_path, dtype):
  rng = np.random.default_rng(0)
  a = (rng.normal(size=(3, 5)) * 100).astype(dtype)
  tzw.save(str(tmp_path / 'x.pt'), {'w': a, 'empty': np.zeros((0, 4), dtype)})
  got = torch_zip.load(str(tmp_path / 'x.pt'))
  w = got['w']
  assert isinstance(w, torch_zip.Tensor) and w.dtype == np.dtype(dtype) and w.shape == (3, 5)
  out = np.asarray(w)
  assert out.dtype == np.dtype(dtype) and out.flags.c_contiguous and out.flags.writeable
  np.testing.assert_array_equal(out, a)
  assert np.asarray(got['empty']).shape == (0, 4)


def test_bfloat16_to_float32_is_exact(tmp_path):
  a = np.array([1.0, -2.5, 3.140625, 1e30, -0.0], ml_dtypes.bfloat16)
  tzw.save(str(tmp_path / 'x.pt'), {'w': a})
  out = np.asarray(torch_zip.load(str(tmp_path / 'x.pt'))['w'], np.float32)
  np.testing.assert_array_equal(out, a.astype(np.float32))
  # bfloat16 is the top half of a float32.
  np.testing.assert_array_equal(out.view(np.uint32) >> 16, a.view(np.uint16))


@pytest.mark.parametrize('offset, shape, stride', [
    (0, (4, 3), (1, 4)),      # a transpose
    (5, (2, 3), (6, 2)),      # offset, every other element
    (1, (3, 4), (0, 1)),      # an expanded (broadcast) row
    (0, (2, 1, 3), (3, 99, 1)),   # stride of a size-1 dim is irrelevant
])
def test_non_contiguous_views(tmp_path, offset, shape, stride):
  storage = np.arange(20, dtype=np.float32)
  tzw.save(str(tmp_path / 'x.pt'), {'w': tzw.View(storage, offset, shape, stride)})
  out = np.asarray(torch_zip.load(str(tmp_path / 'x.pt'))['w'])
  expected = np.lib.stride_tricks.as_strided(storage[offset:], shape,
                                             tuple(4 * s for s in stride))
  np.testing.assert_array_equal(out, expected)
  assert out.flags.c_contiguous


def test_shared_storage_and_containers(tmp_path):
  storage = np.arange(10, dtype=np.int64)
  obj = {'step': 123, 'loss': [0.5, 0.4], 'scaler': None, 'big': 2**40, 'flag': True,
         'name': 'ünï', 't': (1, 2.0),
         'sd': tzw.OrderedDict({'a': tzw.View(storage, 0, (5,), (1,)),
                                'b': tzw.View(storage, 5, (5,), (1,))})}
  tzw.save(str(tmp_path / 'x.pt'), obj)
  got = torch_zip.load(str(tmp_path / 'x.pt'))
  assert {k: got[k] for k in ('step', 'loss', 'scaler', 'big', 'flag', 'name', 't')} == \
      {'step': 123, 'loss': [0.5, 0.4], 'scaler': None, 'big': 2**40, 'flag': True,
       'name': 'ünï', 't': (1, 2.0)}
  assert list(got['sd']) == ['a', 'b']
  np.testing.assert_array_equal(np.asarray(got['sd']['b']), [5, 6, 7, 8, 9])


def test_storage_entries_are_aligned_and_read_lazily(tmp_path, monkeypatch):
  path = tmp_path / 'x.pt'
  _small(path)
  with zipfile.ZipFile(path) as zf, open(path, 'rb') as f:
    for info in zf.infolist():
      if '/data/' in info.filename:
        assert torch_zip._data_offset(f, info) % 64 == 0   # pylint: disable=protected-access
  reads = []
  real = torch_zip._Storage.array   # pylint: disable=protected-access
  monkeypatch.setattr(torch_zip._Storage, 'array',   # pylint: disable=protected-access
                      lambda self: reads.append(self.key) or real(self))
  got = torch_zip.load(str(path))
  assert reads == []
  sd = torch_zip.StateDict(torch_zip.tensors_of(got, 'x'))
  assert sorted(sd) == ['a', 'b'] and reads == []
  assert sd['a'].dtype == np.float32 and sd['b'].dtype == np.int64
  assert reads == ['0', '1']
  np.testing.assert_array_equal(sd['a'], np.arange(6).reshape(2, 3))


# ----------------------------------------------------------------------------- genuine torch files


def _digest(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize('kind', ['image_unet', 'mask_unet'])
def test_reference_checkpoints_read(reference_dir, kind):
  """The torch-written reference files: Trainer layout, values agree with cases.npz."""
  ckpt = torch_zip.load(str(reference_dir / kind / 'model-1.pt'))
  assert list(ckpt) == ['step', 'loss', 'lr', 'model', 'opt', 'scheduler', 'ema', 'scaler']
  assert ckpt['step'] == 123 and ckpt['loss'] == [0.5, 0.4] and ckpt['scaler'] is None
  assert isinstance(ckpt['model'], dict) and 'version' in ckpt['model'].metadata['_metadata']['']
  ema = ckpt['ema']
  online = [k for k in ema if k.startswith('online_model.model.')]
  assert len(online) == len([k for k in ema if k.startswith('ema_model.model.')]) > 100
  step = np.asarray(ema['step'])
  assert step.dtype == np.int64
  alphas = np.asarray(ema['ema_model.alphas_cumprod'])
  if kind == 'image_unet':   # cases.npz holds the schedule the original computed
    np.testing.assert_allclose(alphas, np.load(reference_dir / kind / 'cases.npz')
                               ['alphas_cumprod'], rtol=1e-6)
  # Optimizer state: per-parameter Adam moments with the parameters' shapes.
  state = ckpt['opt']['state']
  assert sorted(state) == sorted(ckpt['opt']['param_groups'][0]['params'])
  assert all(set(s) == {'step', 'exp_avg', 'exp_avg_sq'} for s in state.values())
  model_shapes = {t.shape for t in ckpt['model'].values()}
  assert {s['exp_avg'].shape for s in state.values()} <= model_shapes


def test_reference_matches_torch_if_installed(reference_dir):
  """Exact equality with torch.load on the genuine files (skipped without torch)."""
  torch = pytest.importorskip('torch')
  for kind in ('image_unet', 'mask_unet'):
    path = str(reference_dir / kind / 'model-1.pt')
    ours, ref = torch_zip.load(path), torch.load(path, map_location='cpu', weights_only=True)
    n = _compare(ours, ref, torch)
    assert n > 1000


def _compare(a, b, torch) -> int:
  if isinstance(b, torch.Tensor):
    assert isinstance(a, torch_zip.Tensor) and a.shape == tuple(b.shape)
    np.testing.assert_array_equal(np.asarray(a), b.numpy())
    return 1
  if isinstance(b, dict):
    assert list(a) == list(b)
    return sum(_compare(a[k], b[k], torch) for k in b)
  if isinstance(b, (list, tuple)):
    assert len(a) == len(b)
    return sum(_compare(x, y, torch) for x, y in zip(a, b))
  assert a == b
  return 0


# ----------------------------------------------------------------------------- the CLI


def test_cli_refuses_hostile_checkpoint(tmp_path, script_server):
  marker = tmp_path / 'pwned'
  opcodes, _ = _payloads(str(marker))['os.system']
  ckpt = tmp_path / 'model-1.pt'
  _hostile_checkpoint(ckpt, opcodes, nested=True)
  (tmp_path / 'config.json').write_text('{"unet": {"dim": 8, "num_classes": 2}}')
  out = tmp_path / 'out'
  r = script_server.run(os.path.join(REPO, 'scripts', 'convert_torch.py'), '--kind=image_unet',
                        f'--torch_checkpoint={ckpt}', f'--output_dir={out}', timeout=300)
  assert r.returncode == 1, r
  assert r.stderr.strip() == (f'error: checkpoint {ckpt}: refusing global os.system '
                              '(not a tensor/state-dict type)'), r.stderr
  assert 'Traceback' not in r.stdout + r.stderr
  assert not marker.exists() and not out.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'model-1.pt']
