"""U-Net checkpoint conversion: strictness, full-size structure, orbax round trip, and a
synthetic round trip at configs the reference does not cover."""

import hashlib
import json
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import ml_dtypes
import pytest

from tiled_ldm_jax import demo as demo_models

from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax import convert
from tiled_ldm_jax import geometry
from tiled_ldm_jax.convert import torch_zip
from tiled_ldm_jax.convert import torch_zip_write
from tiled_ldm_jax.models import configs
from tiled_ldm_jax.models import unet

PREFIX = 'ema_model.model.'




def _sections(message: str) -> dict[str, list[str]]:
  """A ConversionError message -> {"missing keys": [...], "unused keys": [...], ...}."""
  out, title = {}, None
  for line in message.splitlines()[1:]:
    m = re.fullmatch(r'  (.+) \((\d+)\):', line)
    if m:
      title = m[1]
      out[title] = []
    else:
      out[title].append(line.strip())
  for title, lines in out.items():
    count = re.search(re.escape(title) + r' \((\d+)\):', message)[1]
    assert int(count) == len(lines), message
  return out


def _random_params(config: configs.UNetConfig, seed: int):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                                unet.abstract_params(config))


def _to_torch_layout(params, prefix: str = PREFIX) -> dict[str, np.ndarray]:
  """Inverse of the conversion rules: Flax params -> a DiffInfinite-style state dict."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = tuple(p.key for p in path)
    w = np.asarray(leaf)
    if names[-1] == 'kernel':
      w = np.transpose(w, (3, 2, 0, 1)) if w.ndim == 4 else w.T   # HWIO -> OIHW / [out, in]
    elif names[-1] == 'g':
      w = w.reshape(1, -1, 1, 1)
    key = prefix + convert.torch_key(names)
    assert key not in out, f'two Flax params map to {key}'
    out[key] = w
  return out


def _torch_config(config: configs.UNetConfig) -> dict:
  return {'unet': {'dim': config.dim, 'num_classes': config.num_classes,
                   'dim_mults': list(config.dim_mults), 'channels': config.channels,
                   'resnet_block_groups': config.resnet_block_groups,
                   'block_per_layer': config.block_per_layer},
          'dm': {'timesteps': 1000, 'sampling_timesteps': 250, 'image_size': 16}}


# ----------------------------------------------------------------------------- key strictness


@pytest.fixture(scope='module')
def image_state_dict(reference_dir):
  sd = convert.read_diffinfinite_checkpoint(str(reference_dir / 'image_unet' / 'model-1.pt'))
  return sd, convert.read_json(str(reference_dir / 'image_unet' / 'config.json'))


def test_reference_state_dict_converts(image_state_dict):
  sd, cfg = image_state_dict
  # The EMA dict also holds the online copy and schedule buffers: ignored by the prefix.
  assert any(k.startswith('online_model.model.') for k in sd)
  assert 'ema_model.alphas_cumprod' in sd
  config, params = convert.convert_unet('image', sd, cfg)
  n_ema = sum(1 for k in sd if k.startswith(PREFIX))
  assert len(jax.tree_util.tree_leaves(params)) == n_ema
  k = sd[PREFIX + 'init_conv.weight']
  np.testing.assert_array_equal(params['init_conv']['kernel'], np.transpose(k, (2, 3, 1, 0)))
  np.testing.assert_array_equal(params['downs_0_2']['fn']['norm']['g'],
                                sd[PREFIX + 'downs.0.2.fn.norm.g'].reshape(-1))
  np.testing.assert_array_equal(params['time_mlp_1']['kernel'], sd[PREFIX + 'time_mlp.1.weight'].T)
  assert config.kind == 'image'


_MISSING = PREFIX + 'downs.0.2.fn.fn.to_q.weight'
_EXTRA = PREFIX + 'bogus.weight'
_RESHAPED = PREFIX + 'mid_block1.block1.proj.weight'


@pytest.mark.parametrize('edits', [('missing',), ('unused',), ('shape',),
                                   ('missing', 'unused', 'shape')])
def test_conversion_error_lists_every_offending_key(image_state_dict, edits):
  sd, cfg = image_state_dict
  sd = dict(sd)
  if 'missing' in edits:
    del sd[_MISSING]
  if 'unused' in edits:
    sd[_EXTRA] = np.zeros((3,), np.float32)
  if 'shape' in edits:
    sd[_RESHAPED] = sd[_RESHAPED][:-1]
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_unet('image', sd, cfg)
  sections = _sections(str(e.value))
  expected = {'missing': ('missing keys', _MISSING), 'unused': ('unused keys', _EXTRA),
              'shape': ('shape mismatches', _RESHAPED)}
  assert set(sections) == {expected[x][0] for x in edits}
  for x in edits:
    title, key = expected[x]
    lines = sections[title]
    assert len(lines) == 1
    assert lines[0] == key or lines[0].startswith(key + ':'), lines
  if 'shape' in edits:
    assert 'checkpoint (31, 32, 3, 3)' in sections['shape mismatches'][0]
    assert 'model expects (3, 3, 32, 32)' in sections['shape mismatches'][0]


def test_wrong_model_kind_is_a_conversion_error(image_state_dict):
  sd, cfg = image_state_dict
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_unet('mask', sd, cfg)
  sections = _sections(str(e.value))
  assert PREFIX + 'null_classes_emb' in sections['missing keys']
  assert PREFIX + 'downs.0.2.fn.fn.to_q.weight' in sections['unused keys']


# ----------------------------------------------------------------------------- config strictness

_BASE_UNET = {'dim': 16, 'num_classes': 5, 'dim_mults': [1, 2], 'channels': 4,
              'resnet_block_groups': 2, 'block_per_layer': 2}


@pytest.mark.parametrize('cfg, name', [
    ({'unet': dict(_BASE_UNET, self_condition=True)}, 'self_condition'),
    ({'unet': dict(_BASE_UNET, learned_variance=True)}, 'learned_variance'),
    ({'unet': dict(_BASE_UNET, learned_sinusoidal_cond=True)}, 'learned_sinusoidal_cond'),
    ({'unet': dict(_BASE_UNET, init_dim=32)}, 'init_dim'),
    ({'unet': dict(_BASE_UNET, out_dim=8)}, 'out_dim'),
    ({'unet': _BASE_UNET, 'dm': {'objective': 'pred_x0'}}, 'objective'),
    ({'unet': _BASE_UNET, 'dm': {'beta_schedule': 'linear'}}, 'beta_schedule'),
    ({'unet': _BASE_UNET, 'dm': {'timesteps': 500}}, 'timesteps'),
    ({'unet': _BASE_UNET, 'dm': {'mystery': 1}}, 'mystery'),
    ({'unet': _BASE_UNET, 'trainer': {}}, 'trainer'),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unet_config_rejects_unimplemented_options(cfg, name):
  with pytest.raises(configs.ConfigError, match=name):
    configs.unet_config_from_torch('image', cfg)


def test_unet_config_accepts_defaults_and_training_knobs():
  cfg = {'unet': dict(_BASE_UNET, learned_variance=False, init_dim=16, out_dim=4,
                      cond_drop_prob=0.5),
         'dm': {'objective': 'pred_noise', 'beta_schedule': 'cosine', 'timesteps': 1000,
                'sampling_timesteps': 50, 'loss_type': 'l2'}}
  config = configs.unet_config_from_torch('image', cfg)
  assert (config.dim, config.num_classes, config.dim_mults) == (16, 5, (1, 2))
  with pytest.raises(configs.ConfigError, match='num_classes'):
    configs.unet_config_from_torch('image', {'unet': {'dim': 16}})


def test_convert_checkpoint_refuses_non_empty_output(reference_dir, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('x')
  with pytest.raises(FileExistsError, match='not empty'):
    convert.convert_checkpoint('image_unet', str(reference_dir / 'image_unet' / 'model-1.pt'),
                               str(out))
  assert sorted(p.name for p in out.iterdir()) == ['keep.txt']


def test_convert_checkpoint_missing_file_names_it(reference_dir, tmp_path):
  missing = tmp_path / 'nowhere' / 'model-7.pt'
  for config_json in (None, str(reference_dir / 'image_unet' / 'config.json')):
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
      convert.convert_checkpoint('image_unet', str(missing), str(tmp_path / 'out'), config_json)
  assert not (tmp_path / 'out').exists()


def test_convert_checkpoint_writes_nothing_on_mismatch(reference_dir, tmp_path):
  cfg = tmp_path / 'config.json'
  cfg.write_text(json.dumps({'unet': dict(_BASE_UNET, dim=8, resnet_block_groups=2)}))
  with pytest.raises(convert.ConversionError, match='shape mismatches'):
    convert.convert_checkpoint('image_unet', str(reference_dir / 'image_unet' / 'model-1.pt'),
                               str(tmp_path / 'out'), str(cfg))
  assert not (tmp_path / 'out').exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json']   # no temporary left


def test_bfloat16_checkpoint_converts(tmp_path):
  """bfloat16 tensors (numpy has no arithmetic for them) convert exactly via float32;
  the checkpoint is written in torch's zip format by hand, laid out like Trainer.save."""
  config = configs.UNetConfig(kind='mask', dim=8, num_classes=2, dim_mults=(1, 2),
                              resnet_block_groups=4, block_per_layer=1)
  params = _random_params(config, 0)
  sd = {k: np.ascontiguousarray(v).astype(ml_dtypes.bfloat16)
        for k, v in _to_torch_layout(params).items()}
  sd['ema_model.alphas_cumprod'] = np.ones(1000, np.float64)
  torch_zip_write.save(
      str(tmp_path / 'model-1.pt'),
      {'step': 1, 'loss': 0.0, 'lr': 1e-4, 'model': torch_zip_write.OrderedDict(), 'opt': {},
       'scheduler': {}, 'scaler': None,
       'ema': torch_zip_write.OrderedDict(sd, initted=np.ones(1, np.float32),
                                          step=np.array([1], np.int64))},
      archive_name='model-1')
  (tmp_path / 'config.json').write_text(json.dumps(_torch_config(config)))
  got_config, got = convert.convert_checkpoint('mask_unet', str(tmp_path / 'model-1.pt'),
                                               str(tmp_path / 'out'))
  assert got_config == config
  expected = jax.tree_util.tree_map(
      lambda p: np.asarray(jnp.asarray(p, jnp.bfloat16).astype(jnp.float32)), params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)


def _digest(params) -> str:
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    a = np.ascontiguousarray(leaf)
    for part in (jax.tree_util.keystr(path), str(a.dtype), str(a.shape)):
      h.update(part.encode())
    h.update(a.tobytes())
  return h.hexdigest()


# Digests of the params converted from the reference files by the torch.load-based reader
# this one replaced (commit a5b5a61): the torch-free reader gives the same bytes.
_REFERENCE_DIGESTS = {
    'image': '9f0df313ec3ca35387a8c5aac174f22b49486a3951c75a5ea6d7bc21d68fa6e1',
    'mask': 'bb52518701b6e2b5c931f56c04f5cf9b695a17f2ed9fb63d8f3f8cc620b35cd8',
}


@pytest.mark.parametrize('kind', ['image', 'mask'])
def test_reference_conversion_unchanged_and_torch_free(reference_dir, tmp_path, monkeypatch,
                                                       kind):
  monkeypatch.setitem(sys.modules, 'torch', None)   # any `import torch` would now fail
  folder = reference_dir / f'{kind}_unet'
  _, params = convert.convert_checkpoint(f'{kind}_unet', str(folder / 'model-1.pt'),
                                         str(tmp_path / 'out'))
  assert _digest(params) == _REFERENCE_DIGESTS[kind]
  _, _, loaded = checkpoint.load_model(str(tmp_path / 'out'), expect=f'{kind}_unet')
  assert _digest(loaded) == _REFERENCE_DIGESTS[kind]


def test_hostile_checkpoint_is_refused_before_writing(tmp_path):
  marker = tmp_path / 'pwned'
  payload = torch_zip_write.Raw(torch_zip_write.global_op('os', 'system')
                                + b'(X' + len(f'touch {marker}').to_bytes(4, 'little')
                                + f'touch {marker}'.encode() + b'tR')
  torch_zip_write.save(str(tmp_path / 'model-1.pt'),
                       {'ema': torch_zip_write.OrderedDict({'x': payload})})
  (tmp_path / 'config.json').write_text(json.dumps(_torch_config(_SMALL)))
  with pytest.raises(ValueError, match='refusing global os.system'):
    convert.convert_checkpoint('image_unet', str(tmp_path / 'model-1.pt'), str(tmp_path / 'o'))
  assert not marker.exists() and not (tmp_path / 'o').exists()


def test_vae_conversion_stores_latent_scale(reference_dir, tmp_path):
  config, _ = convert.convert_checkpoint('vae', str(reference_dir / 'vae'), str(tmp_path / 'a'))
  assert config.latent_scale == geometry.DIFFINFINITE_LATENT_SCALE == 50.0
  config, _ = convert.convert_checkpoint('vae', str(reference_dir / 'vae'), str(tmp_path / 'b'),
                                         latent_scale=1 / 0.18215)
  assert config.latent_scale == pytest.approx(1 / 0.18215)
  _, loaded, _ = checkpoint.load_model(str(tmp_path / 'b'), expect='vae')
  assert loaded.latent_scale == pytest.approx(1 / 0.18215)
  with pytest.raises(ValueError, match='latent_scale'):
    convert.convert_checkpoint('image_unet', str(reference_dir / 'image_unet' / 'model-1.pt'),
                               str(tmp_path / 'c'), latent_scale=50.0)


def test_vae_bin_folder_reads_like_safetensors(reference_dir, tmp_path):
  """A diffusers folder with `diffusion_pytorch_model.bin` (torch zip) instead of
  safetensors: same state dict."""
  cfg, st = convert.read_diffusers_folder(str(reference_dir / 'vae'))
  folder = tmp_path / 'vae_bin'
  folder.mkdir()
  shutil.copy(reference_dir / 'vae' / 'config.json', folder / 'config.json')
  torch_zip_write.save(str(folder / 'diffusion_pytorch_model.bin'),
                       torch_zip_write.OrderedDict(st), archive_name='archive')
  cfg2, sd = convert.read_diffusers_folder(str(folder))
  assert cfg2 == cfg and sorted(sd) == sorted(st)
  for k in st:
    np.testing.assert_array_equal(sd[k], st[k])


# ----------------------------------------------------------------------------- full size


@pytest.mark.parametrize('name, kind, n_params', [
    ('diffinfinite_image_unet_5class', 'image', 172_101_124),
    ('diffinfinite_image_unet_10class', 'image', 172_102_404),
    ('diffinfinite_mask_unet', 'mask', 38_401_988),
])
def test_full_size_conversion(reference_dir, name, kind, n_params):
  with open(reference_dir / 'full_size_shapes' / f'{name}.json') as f:
    listing = json.load(f)
  assert listing['n_params'] == n_params
  shapes = listing['state_dict']
  assert sum(int(np.prod(s)) for s in shapes.values()) == n_params
  sd = {PREFIX + k: np.zeros(s, np.float32) for k, s in shapes.items()}
  config, params = convert.convert_unet(kind, sd, {'unet': listing['config']})
  del sd
  abstract = unet.abstract_params(config)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract)
  for p, a in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(abstract)):
    assert p.shape == a.shape and p.dtype == a.dtype == np.float32
  assert unet.count_params(params) == unet.count_params(abstract) == n_params
  assert len(jax.tree_util.tree_leaves(params)) == len(shapes)
  dim = listing['config']['dim']
  assert params['init_conv']['kernel'].shape == (7, 7, 4, dim)
  assert params['final_conv']['kernel'].shape == (1, 1, dim, 4)
  assert params['classes_emb']['embedding'].shape == (listing['config']['num_classes'], dim)
  if kind == 'mask':
    assert params['null_classes_emb'].shape == (dim,)


# ----------------------------------------------------------------------------- orbax folders


_SMALL = configs.UNetConfig(kind='image', dim=8, num_classes=3, dim_mults=(1, 2),
                            resnet_block_groups=4, block_per_layer=1)


@pytest.fixture(scope='module')
def saved_folder(tmp_path_factory):
  params = _random_params(_SMALL, 3)
  folder = tmp_path_factory.mktemp('orbax') / 'image_unet'
  checkpoint.save_model(str(folder), 'image_unet', _SMALL, params)
  return folder, params


def test_orbax_round_trip_is_exact(saved_folder):
  folder, params = saved_folder
  assert sorted(p.name for p in folder.iterdir()) == ['model.json', 'params']
  assert json.loads((folder / 'model.json').read_text())['format'] == 2
  assert not [p for p in folder.parent.iterdir() if p.name.startswith('.tmp-')]
  umask = os.umask(0)
  os.umask(umask)
  assert folder.stat().st_mode & 0o777 == 0o777 & ~umask   # not mkdtemp's private 0700
  model, config, loaded = checkpoint.load_model(str(folder))
  assert model == 'image_unet' and config == _SMALL
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
    assert isinstance(a, np.ndarray) and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileExistsError):
    checkpoint.save_model(str(folder), 'image_unet', _SMALL, params)


def test_save_in_parts_round_trips_and_streams(tmp_path):
  """Leaves from a generator, written a few at a time (tiny parts), come back exactly."""
  params = _random_params(_SMALL, 4)
  leaves = jax.tree_util.tree_leaves(params)
  def gen():
    yield from leaves

  part_bytes = 4 * 1024
  folder = tmp_path / 'm'
  checkpoint.save_model_leaves(str(folder), 'image_unet', _SMALL, gen(), part_bytes=part_bytes)
  meta = json.loads((folder / 'model.json').read_text())
  assert meta['format'] == 2 and len(meta['parts']) > 3
  assert meta['parts'][0][0] == 0 and meta['parts'][-1][1] == len(leaves)
  assert len(list((folder / 'params').iterdir())) == len(meta['parts'])
  _, _, loaded = checkpoint.load_model(str(folder))
  for a, b in zip(jax.tree_util.tree_leaves(loaded), leaves):
    np.testing.assert_array_equal(a, b)
  # A missing part is an error, not a partly random model.
  shutil.rmtree(folder / 'params' / 'part_00001')
  with pytest.raises((ValueError, OSError)):
    checkpoint.load_model(str(folder))


def test_format_1_folder_still_loads():
  demo = demo_models.model_path('flow_vae')      # the one bundled format-1 folder
  meta = json.loads(open(os.path.join(demo, 'model.json')).read())
  assert meta['format'] == 1
  model, _, params = checkpoint.load_model(demo)
  assert model == 'vae' and jax.tree_util.tree_leaves(params)


def test_mismatch_is_found_before_any_tensor_is_read(tmp_path, monkeypatch):
  """Keys and shapes come from the pickle: a bad checkpoint is refused, and a good one is
  checked, without reading one tensor; then tensors are read one per leaf yielded."""
  params = _random_params(_SMALL, 5)
  sd = _to_torch_layout(params, prefix='')
  torch_zip_write.save(str(tmp_path / 'a.pt'), torch_zip_write.OrderedDict(
      sd, **{'extra.weight': np.zeros(3, np.float32)}), archive_name='a')
  reads = []
  real = torch_zip.Tensor.numpy
  monkeypatch.setattr(torch_zip.Tensor, 'numpy',
                      lambda self, dtype=None: reads.append(1) or real(self, dtype))
  lazy = torch_zip.StateDict(torch_zip.tensors_of(torch_zip.load(str(tmp_path / 'a.pt')), 'a'))
  abstract = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
  with pytest.raises(convert.ConversionError, match='extra.weight'):
    convert.converted_leaves(lazy, abstract)
  good = torch_zip.StateDict({k: v for k, v in lazy._tensors.items() if k != 'extra.weight'})
  it = convert.converted_leaves(good, abstract)
  assert not reads
  for n, (a, b) in enumerate(zip(it, jax.tree_util.tree_leaves(params)), 1):
    assert len(reads) == n
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('field, value', [('dim', 16), ('num_classes', 4),
                                          ('block_per_layer', 2)])
def test_load_model_rejects_edited_config(saved_folder, tmp_path, field, value):
  folder, _ = saved_folder
  edited = tmp_path / 'edited'
  shutil.copytree(folder, edited)
  meta = json.loads((edited / 'model.json').read_text())
  meta['config'][field] = value
  (edited / 'model.json').write_text(json.dumps(meta))
  with pytest.raises(ValueError, match='params do not fit model.json'):
    checkpoint.load_model(str(edited))


def test_load_model_checks_the_kind(saved_folder, tmp_path):
  folder, _ = saved_folder
  with pytest.raises(ValueError, match='holds a image_unet model, expected vae'):
    checkpoint.load_model(str(folder), expect='vae')
  with pytest.raises(ValueError, match='expected mask_unet'):
    checkpoint.load_model(str(folder), expect='mask_unet')
  with pytest.raises(FileNotFoundError, match='no model.json'):
    checkpoint.load_model(str(tmp_path))


# ----------------------------------------------------------------------------- other configs


_CONFIGS = [
    dict(kind='image', dim=8, dim_mults=(1, 2, 2), resnet_block_groups=4, block_per_layer=1,
         num_classes=3),
    dict(kind='image', dim=12, dim_mults=(1, 3), resnet_block_groups=3, block_per_layer=3,
         num_classes=7),
    dict(kind='mask', dim=8, dim_mults=(1, 2, 2, 4), resnet_block_groups=2, block_per_layer=1,
         num_classes=2),
    dict(kind='mask', dim=16, dim_mults=(1, 2), resnet_block_groups=8, block_per_layer=3,
         num_classes=4),
]


@pytest.mark.parametrize('kw', _CONFIGS, ids=lambda kw: '{kind}_d{dim}_bpl{block_per_layer}'.format(**kw))
def test_synthetic_state_dict_round_trip_and_forward(kw):
  config = configs.UNetConfig(**kw)
  params = _random_params(config, 7)
  sd = _to_torch_layout(params)
  assert len(sd) == len(jax.tree_util.tree_leaves(params))
  assert all(v.shape == (1, v.shape[1], 1, 1) for k, v in sd.items() if k.endswith('.g'))
  got_config, got = convert.convert_unet(config.kind, sd, _torch_config(config))
  assert got_config == config
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)

  # The converted model runs at a non-square latent.
  b, h, w = 2, 2 * config.downsample_factor, 3 * config.downsample_factor
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, h, w, config.channels)), jnp.float32)
  t = jnp.asarray([10, 900])
  if config.kind == 'image':
    cond = jnp.asarray(rng.integers(0, config.num_classes, (b, 2 * h, 2 * w)), jnp.int32)
    null = None
  else:
    cond, null = jnp.asarray([config.num_classes - 1, 0]), jnp.asarray([False, True])
  eps = jax.jit(unet.eps_fn(config))(got, x, t, cond, null)
  assert eps.shape == x.shape and eps.dtype == jnp.float32
  assert np.isfinite(np.asarray(eps)).all()
