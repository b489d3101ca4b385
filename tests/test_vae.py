"""AutoencoderKL (diffusers layout) in Flax: parity, full-size structure, config strictness."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiled_ldm_jax import convert
from tiled_ldm_jax.models import configs
from tiled_ldm_jax.models import vae

TOL = 1e-4


@pytest.fixture(scope='module')
def small_vae(reference_dir):
  """(config, params, cases) of the reference diffusers VAE; cases NHWC."""
  cfg_dict, state_dict = convert.read_diffusers_folder(str(reference_dir / 'vae'))
  config, params = convert.convert_vae(cfg_dict, state_dict)
  cases = np.load(reference_dir / 'vae' / 'cases.npz')
  nhwc = {k: np.transpose(cases[k], (0, 2, 3, 1)) for k in ('z', 'decoded')}
  return config, params, nhwc


def _diffusers_dict(config: configs.VAEConfig) -> dict:
  n = len(config.block_out_channels)
  return {
      '_class_name': 'AutoencoderKL', '_diffusers_version': '0.42.1', 'act_fn': 'silu',
      'block_out_channels': list(config.block_out_channels),
      'down_block_types': ['DownEncoderBlock2D'] * n,
      'up_block_types': ['UpDecoderBlock2D'] * n,
      'force_upcast': True, 'in_channels': config.in_channels,
      'latent_channels': config.latent_channels, 'latents_mean': None, 'latents_std': None,
      'layers_per_block': config.layers_per_block, 'mid_block_add_attention': True,
      'norm_num_groups': config.norm_num_groups, 'out_channels': config.out_channels,
      'sample_size': 64, 'scaling_factor': config.scaling_factor, 'shift_factor': None,
      'use_post_quant_conv': True, 'use_quant_conv': True,
  }


def _to_torch_layout(params) -> dict:
  """Inverse of the conversion rules: Flax params -> torch-layout state dict."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = tuple(p.key for p in path)
    w = np.asarray(leaf)
    if names[-1] == 'kernel':
      w = np.transpose(w, (3, 2, 0, 1)) if w.ndim == 4 else w.T   # HWIO -> OIHW, [in,out] -> [out,in]
    out[convert.torch_key(names)] = w
  return out


# ----------------------------------------------------------------------------- parity


@pytest.mark.optimized   # parity under the full XLA optimizer a user's run gets
def test_decode_parity_jit(small_vae):
  config, params, cases = small_vae
  out = np.asarray(jax.jit(vae.decode_fn(config))(params, cases['z']))
  assert out.shape == cases['decoded'].shape
  err = np.abs(out - cases['decoded']).max()
  assert err <= TOL, err


def test_decode_parity_no_jit(small_vae):
  config, params, cases = small_vae
  with jax.disable_jit():
    out = np.asarray(vae.decode_fn(config)(params, cases['z'][:1]))
  err = np.abs(out - cases['decoded'][:1]).max()
  assert err <= TOL, err


def test_decode_bfloat16_close(small_vae):
  """Compute in bfloat16 (params float32): same network, looser agreement."""
  config, params, cases = small_vae
  bf16 = configs.from_dict(configs.VAEConfig,
                          {**configs.config_to_dict(config), 'dtype': 'bfloat16'})
  out = jax.jit(vae.decode_fn(bf16))(params, cases['z'])
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out, np.float32) - cases['decoded']).max()
  assert err < 0.1 * np.abs(cases['decoded']).max(), err


def test_encode_non_square(small_vae):
  config, params, _ = small_vae
  f = config.downsample_factor
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 3 * f, 5 * f, config.in_channels),
                         minval=-1.0, maxval=1.0)
  mean, logvar = jax.jit(vae.encode_fn(config))(params, x)
  assert mean.shape == logvar.shape == (2, 3, 5, config.latent_channels)
  assert np.isfinite(np.asarray(mean)).all() and np.isfinite(np.asarray(logvar)).all()
  assert float(logvar.min()) >= vae.LOGVAR_RANGE[0] and float(logvar.max()) <= vae.LOGVAR_RANGE[1]
  # Each sample is encoded on its own (no cross-batch coupling).
  mean0, _ = jax.jit(vae.encode_fn(config))(params, x[:1])
  np.testing.assert_allclose(np.asarray(mean0), np.asarray(mean[:1]), atol=1e-5)


def _np_conv(x, weight, bias, stride=1, padding=0):
  """NCHW float64 conv2d with OIHW weights (numpy, an implementation independent of XLA)."""
  if padding:
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  kh, kw = weight.shape[2:]
  win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
  win = win[:, :, ::stride, ::stride]                              # [B, I, H', W', kh, kw]
  return np.einsum('bihwyx,oiyx->bohw', win, weight) + bias[None, :, None, None]


def _numpy_encode(state_dict, config, x_nchw):
  """An independent numpy encoder in float64 (the reference data has no encode case),
  written from the diffusers layer layout: NCHW, OIHW weights, as the checkpoint holds."""
  w = {k: np.asarray(v, np.float64) for k, v in state_dict.items()}
  silu = lambda v: v / (1 + np.exp(-v))

  def gn(x, p):
    b, c, hh, ww = x.shape
    g = x.reshape(b, config.norm_num_groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)
    return (g.reshape(b, c, hh, ww) * w[p + '.weight'][None, :, None, None]
            + w[p + '.bias'][None, :, None, None])

  def conv(x, p, **kw):
    return _np_conv(x, w[p + '.weight'], w[p + '.bias'], **kw)

  def res(x, p):
    h = conv(silu(gn(x, p + '.norm1')), p + '.conv1', padding=1)
    h = conv(silu(gn(h, p + '.norm2')), p + '.conv2', padding=1)
    return (conv(x, p + '.conv_shortcut') if p + '.conv_shortcut.weight' in w else x) + h

  def attn(x, p):
    b, c, hh, ww = x.shape
    n = gn(x, p + '.group_norm').reshape(b, c, hh * ww).transpose(0, 2, 1)
    q, k, v = (n @ w[f'{p}.{s}.weight'].T + w[f'{p}.{s}.bias'] for s in ('to_q', 'to_k', 'to_v'))
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(c)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    o = (att / att.sum(-1, keepdims=True)) @ v
    o = o @ w[p + '.to_out.0.weight'].T + w[p + '.to_out.0.bias']
    return o.transpose(0, 2, 1).reshape(b, c, hh, ww) + x

  n_blocks = len(config.block_out_channels)
  h = conv(x_nchw.astype(np.float64), 'encoder.conv_in', padding=1)
  for i in range(n_blocks):
    for j in range(config.layers_per_block):
      h = res(h, f'encoder.down_blocks.{i}.resnets.{j}')
    if i < n_blocks - 1:   # diffusers pads right/bottom by one before the stride-2 conv
      h = conv(np.pad(h, ((0, 0), (0, 0), (0, 1), (0, 1))),
               f'encoder.down_blocks.{i}.downsamplers.0.conv', stride=2)
  h = res(h, 'encoder.mid_block.resnets.0')
  h = attn(h, 'encoder.mid_block.attentions.0')
  h = res(h, 'encoder.mid_block.resnets.1')
  h = conv(silu(gn(h, 'encoder.conv_norm_out')), 'encoder.conv_out', padding=1)
  mean, logvar = np.split(conv(h, 'quant_conv'), 2, axis=1)
  return mean, np.clip(logvar, -30, 20)


def test_encode_matches_numpy_reference(reference_dir, small_vae):
  config, params, _ = small_vae
  _, state_dict = convert.read_diffusers_folder(str(reference_dir / 'vae'))
  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 48, 64)).astype(np.float32)  # NCHW
  want_mean, want_logvar = _numpy_encode(state_dict, config, x)
  mean, logvar = jax.jit(vae.encode_fn(config))(params, np.transpose(x, (0, 2, 3, 1)))
  np.testing.assert_allclose(np.transpose(np.asarray(mean), (0, 3, 1, 2)), want_mean, atol=TOL)
  np.testing.assert_allclose(np.transpose(np.asarray(logvar), (0, 3, 1, 2)), want_logvar,
                             atol=TOL)


# ----------------------------------------------------------------------------- structure


def test_full_size_sd2_structure(reference_dir):
  listing = json.loads((reference_dir / 'full_size_shapes' / 'sd2_vae.json').read_text())
  state_dict = {k: np.zeros(shape, np.float32) for k, shape in listing['state_dict'].items()}
  assert sum(v.size for v in state_dict.values()) == listing['n_params'] == 83_653_863
  config, params = convert.convert_vae(listing['config'], state_dict)
  del state_dict
  assert config.block_out_channels == (128, 256, 512, 512) and config.norm_num_groups == 32
  assert sum(np.size(p) for p in jax.tree.leaves(params)) == 83_653_863
  abstract = vae.abstract_params(config)
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  shapes = jax.tree.map(lambda p: tuple(np.shape(p)), params)
  assert shapes == jax.tree.map(lambda a: tuple(a.shape), abstract)


_OTHER = configs.VAEConfig(in_channels=1, out_channels=2, latent_channels=2,
                           block_out_channels=(8, 12, 16), layers_per_block=1,
                           norm_num_groups=4)


def test_init_params_matches_abstract():
  """init_params builds the abstract tree, in param_dtype (an rbg key: threefry init
  takes ~15 s to compile on 2 CPU cores)."""
  config = dataclasses.replace(_OTHER, param_dtype='bfloat16')
  params = vae.init_params(config, jax.random.key(0, impl='unsafe_rbg'))
  abstract = vae.abstract_params(config)
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  assert jax.tree.leaves(jax.tree.map(lambda p, a: p.shape == a.shape, params, abstract)) == [
      True] * len(jax.tree.leaves(abstract))
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_other_config_round_trip():
  """3 levels, 4 groups, 2 latent channels, 1 layer: params -> torch layout -> convert."""
  config = _OTHER
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.2,
                        vae.abstract_params(config))
  state_dict = _to_torch_layout(params)
  assert 'decoder.up_blocks.0.resnets.1.conv1.weight' in state_dict
  assert 'encoder.down_blocks.1.resnets.0.conv_shortcut.weight' in state_dict
  assert 'encoder.down_blocks.2.downsamplers.0.conv.weight' not in state_dict
  assert 'decoder.up_blocks.2.upsamplers.0.conv.weight' not in state_dict
  assert state_dict['encoder.mid_block.attentions.0.to_out.0.weight'].shape == (16, 16)
  assert state_dict['encoder.conv_out.weight'].shape == (4, 16, 3, 3)
  cfg2, params2 = convert.convert_vae(_diffusers_dict(config), state_dict)
  assert cfg2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # A missing key is reported by name.
  del state_dict['decoder.conv_norm_out.bias']
  with pytest.raises(convert.ConversionError, match='decoder.conv_norm_out.bias'):
    convert.convert_vae(_diffusers_dict(config), state_dict)
  # And the model runs at this config: [1, 4, 8, 1] -> latent [1, 1, 2, 2] -> [1, 4, 8, 2].
  x = jnp.linspace(-1, 1, 32).reshape(1, 4, 8, 1)
  mean, _ = vae.encode_fn(config)(params2, x)
  assert mean.shape == (1, 1, 2, 2)
  assert vae.decode_fn(config)(params2, mean).shape == (1, 4, 8, 2)


# ----------------------------------------------------------------------------- configs


def test_config_dict_round_trip():
  config = configs.VAEConfig(latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1., 1., 1., 1.))
  d = json.loads(json.dumps(configs.config_to_dict(config)))
  assert configs.from_dict(configs.VAEConfig, d) == config


def test_config_rejects_unknown_key():
  d = _diffusers_dict(configs.VAEConfig())
  d['use_fancy_norm'] = True
  with pytest.raises(configs.ConfigError, match='use_fancy_norm'):
    configs.vae_config_from_diffusers(d)


@pytest.mark.parametrize('key,value', [
    ('up_block_types', ['UpDecoderBlock2D', 'AttnUpDecoderBlock2D', 'UpDecoderBlock2D',
                        'UpDecoderBlock2D']),
    ('down_block_types', ['DownEncoderBlock2D'] * 3 + ['AttnDownEncoderBlock2D']),
    ('act_fn', 'gelu'),
    ('use_quant_conv', False),
    ('use_post_quant_conv', False),
    ('mid_block_add_attention', False),
    ('shift_factor', 0.1159),
])
def test_config_rejects_unsupported(key, value):
  d = _diffusers_dict(configs.VAEConfig())
  d[key] = value
  with pytest.raises(configs.ConfigError, match=key) as err:
    configs.vae_config_from_diffusers(d)
  if key.endswith('block_types'):
    assert 'Attn' in str(err.value)


def test_config_rejects_bad_widths():
  d = _diffusers_dict(configs.VAEConfig())
  d['norm_num_groups'] = 24
  with pytest.raises(configs.ConfigError, match='norm_num_groups'):
    configs.vae_config_from_diffusers(d)
