"""DiffInfinite U-Nets: parity through the public converter, and the exact O(N) cross-attention.

Parity runs the reference checkpoints through `convert.convert_checkpoint` and
`checkpoint.load_model` (what a user does), then compares with the original's outputs.
The cross-attention tests use configs that are NOT in the reference (other widths,
depths, class counts, non-square latents, masks above latent resolution).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax import convert
from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax.models import configs
from tiled_ldm_jax.models import layers
from tiled_ldm_jax.models import unet

TOL = 1e-4          # against the PyTorch reference (float32 on CPU)
TOL_DENSE = 1e-5    # exact O(N) cross-attention vs the dense O(N^2) softmax, same weights




def _nhwc(a):
  return np.moveaxis(np.asarray(a), 1, -1)


def _max_err(ours_nhwc, theirs_nchw):
  ours = np.asarray(ours_nhwc)
  assert ours.shape == _nhwc(theirs_nchw).shape
  return float(np.abs(ours.astype(np.float64) - _nhwc(theirs_nchw)).max())


# ----------------------------------------------------------------------------- parity


@pytest.fixture(scope='module')
def converted(reference_dir, tmp_path_factory):
  """kind -> (config, params, cases, jitted eps_fn), each converted once via the public API."""
  out = {}
  root = tmp_path_factory.mktemp('converted_unets')
  for kind in ('image_unet', 'mask_unet'):
    folder = root / kind
    config, params = convert.convert_checkpoint(kind, str(reference_dir / kind / 'model-1.pt'),
                                                str(folder))
    model, loaded_config, loaded = checkpoint.load_model(str(folder), expect=kind)
    assert model == kind and loaded_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    with np.load(reference_dir / kind / 'cases.npz') as d:
      cases = {k: d[k] for k in d.files}
    out[kind] = (loaded_config, loaded, cases, jax.jit(unet.eps_fn(loaded_config)))
  return out


def _image_inputs(cases, idx=slice(None)):
  return (jnp.asarray(_nhwc(cases['x'])[idx]), jnp.asarray(cases['t'][idx]),
          jnp.asarray(cases['masks'][idx, 0]).astype(jnp.int32))


def test_reference_configs_are_what_the_converter_reads(converted):
  image, mask = converted['image_unet'][0], converted['mask_unet'][0]
  assert (image.kind, image.dim, image.num_classes, image.dim_mults) == ('image', 16, 5, (1, 2))
  assert (mask.kind, mask.dim, mask.num_classes, mask.dim_mults) == ('mask', 16, 2, (1, 2))
  assert not image.dense_cross_attention   # the default is the exact O(N) form


@pytest.mark.optimized   # parity under the full XLA optimizer a user's run gets
@pytest.mark.parametrize('key, w', [('eps', None), ('eps_cfg4', 3.0)])
def test_image_unet_parity_jit(converted, key, w):
  config, params, cases, f = converted['image_unet']
  x, t, m = _image_inputs(cases)
  assert len(np.unique(cases['masks'][1])) == config.num_classes  # all labels, 0 included
  cond = f(params, x, t, m)
  out = cond if w is None else diffusion.guide(f(params, x, t, jnp.zeros_like(m)), cond, w)
  assert _max_err(out, cases[key]) < TOL


def test_image_unet_parity_dense_cross_attention(converted):
  config, params, cases, _ = converted['image_unet']
  f = jax.jit(unet.eps_fn(dataclasses.replace(config, dense_cross_attention=True)))
  assert _max_err(f(params, *_image_inputs(cases)), cases['eps']) < TOL


def test_image_unet_parity_no_jit(converted):
  config, params, cases, _ = converted['image_unet']
  i = slice(1, 2)   # the sample holding every label
  with jax.disable_jit():
    out = unet.eps_fn(config)(params, *_image_inputs(cases, i))
  assert _max_err(out, cases['eps'][i]) < TOL


@pytest.mark.optimized
@pytest.mark.parametrize('key, null', [('eps_cond', False), ('eps_null', True)])
def test_mask_unet_parity_jit(converted, key, null):
  _, params, cases, f = converted['mask_unet']
  classes = jnp.asarray(cases['classes'])
  assert set(np.asarray(classes)) == {0, 1}
  out = f(params, jnp.asarray(_nhwc(cases['x'])), jnp.asarray(cases['t']), classes,
          jnp.full(classes.shape, null))
  assert _max_err(out, cases[key]) < TOL


def test_mask_unet_parity_no_jit(converted):
  config, params, cases, _ = converted['mask_unet']
  i = slice(1, 2)
  classes = jnp.asarray(cases['classes'][i])
  with jax.disable_jit():
    out = unet.eps_fn(config)(params, jnp.asarray(_nhwc(cases['x'])[i]),
                              jnp.asarray(cases['t'][i]), classes,
                              jnp.array([False]))
  assert _max_err(out, cases['eps_cond'][i]) < TOL


def test_mask_unet_null_flag_is_per_sample(converted):
  _, params, cases, f = converted['mask_unet']
  classes = jnp.asarray(cases['classes'])
  null = jnp.array([True, False, True, False])
  out = np.asarray(f(params, jnp.asarray(_nhwc(cases['x'])), jnp.asarray(cases['t']), classes,
                     null))
  for i, n in enumerate(np.asarray(null)):
    ref = cases['eps_null' if n else 'eps_cond'][i:i + 1]
    assert _max_err(out[i:i + 1], ref) < TOL


# ----------------------------------------------------------------------------- helpers


def random_params(config: configs.UNetConfig, seed: int):
  """Random values for every parameter (no leaf left at its init constant).

  Built from `unet.abstract_params` with numpy: jitting `unet.init_params` costs ~15 s
  of XLA compile per config on CPU, this costs nothing.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      return rng.normal(0, 1.0 / np.sqrt(fan_in), shape).astype(np.float32)
    if name in ('scale', 'g'):
      return (1.0 + 0.2 * rng.normal(size=shape)).astype(np.float32)
    if name == 'bias':
      return (0.1 * rng.normal(size=shape)).astype(np.float32)
    return rng.normal(size=shape).astype(np.float32)   # embedding, null_classes_emb

  return jax.tree_util.tree_map_with_path(fill, unet.abstract_params(config))


def label_mask(rng, batch, hw, num_classes, block, specks=0.02):
  """Blocky label maps [B, H, W], ~40% label 0, plus isolated specks (max-pool sees them).

  Sample 0 is all zero (the unconditional pass); sample 1 holds the largest label.
  """
  h, w = hw
  shape = (batch, -(-h // block), -(-w // block))
  coarse = np.where(rng.random(shape) < 0.4, 0, rng.integers(1, num_classes, shape))
  m = np.repeat(np.repeat(coarse, block, 1), block, 2)[:, :h, :w]
  speck = rng.random((batch, h, w)) < specks
  m = np.where(speck & (m == 0), rng.integers(1, num_classes, (batch, h, w)), m)
  m[0] = 0
  m[1, 0, 0] = num_classes - 1
  return jnp.asarray(m, jnp.int32)


# ----------------------------------------------------------------------------- O(N) == dense


# (name, UNetConfig kwargs, latent (H, W), mask resolution factor)
_CROSS_CASES = [
    ('bpl1_c3_latent_res', dict(dim=8, dim_mults=(1, 2, 2), resnet_block_groups=4,
                                block_per_layer=1, num_classes=3), (16, 24), 1),
    ('bpl3_c7_mask_x8', dict(dim=8, dim_mults=(1, 2, 2), resnet_block_groups=4,
                             block_per_layer=3, num_classes=7), (16, 24), 8),
]


@pytest.mark.parametrize('name, kw, hw, factor', _CROSS_CASES, ids=[c[0] for c in _CROSS_CASES])
def test_exact_cross_attention_equals_dense_in_unet(name, kw, hw, factor):
  config = configs.UNetConfig(kind='image', **kw)
  params = random_params(config, seed=len(name))
  rng = np.random.default_rng(0)
  b = 3
  x = jnp.asarray(rng.normal(size=(b, *hw, config.channels)), jnp.float32)
  t = jnp.asarray([999, 500, 3])
  m = label_mask(rng, b, (hw[0] * factor, hw[1] * factor), config.num_classes, block=4 * factor,
                 specks=0.1 / factor**2)
  for s in (1, 2, 4):   # every level sees both query kinds
    pooled = np.asarray(layers.pool_mask(m, (hw[0] // s, hw[1] // s)))[1:]
    assert pooled.any() and not pooled.all()
  exact_fn = jax.jit(unet.eps_fn(config))
  exact = exact_fn(params, x, t, m)
  dense = jax.jit(unet.eps_fn(dataclasses.replace(config, dense_cross_attention=True)))(
      params, x, t, m)
  assert exact.shape == (b, *hw, config.channels)
  assert np.isfinite(np.asarray(exact)).all()
  assert float(np.abs(np.asarray(exact)).max()) > 0.1   # a non-trivial output
  np.testing.assert_allclose(np.asarray(exact), np.asarray(dense), rtol=0, atol=TOL_DENSE)
  # The mask matters (so the comparison exercises the attention): dropping it changes eps.
  other = exact_fn(params, x, t, m.at[2].set(0))
  assert float(np.abs(np.asarray(other[2] - exact[2])).max()) > 1e-3


def _cross_attention(dense, params, x, mask):
  return layers.CrossAttention(heads=4, dim_head=32, dense=dense).apply({'params': params},
                                                                          x, mask)


@pytest.fixture(scope='module')
def cross_attention_setup():
  rng = np.random.default_rng(1)
  c = 24
  x = jnp.asarray(rng.normal(size=(2, 6, 10, c)), jnp.float32)
  params = layers.CrossAttention(heads=4, dim_head=32).init(
      jax.random.key(0), x, jnp.zeros((2, 6, 10), jnp.int32))['params']
  # Larger query weights than the init: sharp softmaxes are the hard case.
  params = dict(params, to_q=dict(kernel=params['to_q']['kernel'] * 3.0),
                to_out=dict(params['to_out'],
                            bias=jnp.asarray(rng.normal(size=(c,)), jnp.float32)))
  return params, x


@pytest.mark.parametrize('mask_kind', ['random_x2', 'random_latent', 'all_zero', 'all_ones'])
def test_cross_attention_layer_exact_equals_dense(cross_attention_setup, mask_kind):
  params, x = cross_attention_setup
  rng = np.random.default_rng(2)
  b, h, w, _ = x.shape
  if mask_kind == 'random_x2':
    mask = rng.integers(0, 3, (b, 2 * h, 2 * w)) * (rng.random((b, 2 * h, 2 * w)) < 0.2)
  elif mask_kind == 'random_latent':
    mask = rng.integers(0, 4, (b, h, w))
  elif mask_kind == 'all_zero':
    mask = np.zeros((b, h, w))
  else:
    mask = np.ones((b, h, w))
  mask = jnp.asarray(mask, jnp.int32)
  exact = np.asarray(_cross_attention(False, params, x, mask))
  dense = np.asarray(_cross_attention(True, params, x, mask))
  np.testing.assert_allclose(exact, dense, rtol=0, atol=TOL_DENSE)
  if mask_kind in ('all_zero', 'all_ones'):
    # One query per head everywhere: the output is the same at every position.
    np.testing.assert_allclose(exact, np.broadcast_to(exact[:, :1, :1], exact.shape),
                               rtol=0, atol=1e-5)
  if mask_kind == 'random_x2':
    pooled = np.asarray(layers.pool_mask(mask, (h, w)))
    assert pooled.any() and not pooled.all()


def test_pool_mask_max_pools_then_binarizes():
  m = np.zeros((1, 4, 6), np.int32)
  m[0, 1, 1] = 3     # window (0, 0)
  m[0, 2, 5] = 1     # window (1, 2)
  pooled = np.asarray(layers.pool_mask(jnp.asarray(m), (2, 3)))
  np.testing.assert_array_equal(pooled, [[[True, False, False], [False, False, True]]])
  np.testing.assert_array_equal(np.asarray(layers.pool_mask(jnp.asarray(m), (4, 6))), m > 0)
