"""Training: loss decreases, exact resume, EMA rule, VAE export, data generators and readers.

Tiny models (a few thousand params, 16 px crops) so the whole file runs in well under a
minute on two CPU cores; the image U-Net tests share one compiled train step.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax.training import data
from tiled_ldm_jax import training
from tiled_ldm_jax.models import configs
from tiled_ldm_jax.training import loader as loader_lib
from tiled_ldm_jax.models import vae as vae_lib
from tiled_ldm_jax.files import label_maps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_VAE = configs.VAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4)
TINY_IMAGE_UNET = configs.UNetConfig(kind='image', dim=8, num_classes=5, dim_mults=(1,),
                                     resnet_block_groups=4, block_per_layer=1)
TINY_MASK_UNET = configs.UNetConfig(kind='mask', dim=8, num_classes=2, dim_mults=(1,),
                                    resnet_block_groups=4, block_per_layer=1)
VAE_SCALE = 40.0   # the tiny VAE's exported latent scale (not the default 50)


def _write_model_config(path, model: str, config) -> str:
  d = {'model': model, **configs.config_to_dict(config)}
  d.pop('kind', None)
  with open(path, 'w') as f:
    f.write(f'def get_config():\n  return {d!r}\n')
  return str(path)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """Model config files, and a tiny VAE trained for 2 steps (the U-Nets encode with it)."""
  root = tmp_path_factory.mktemp('tiny')
  paths = {'root': root,
           'image': _write_model_config(root / 'image.py', 'image_unet', TINY_IMAGE_UNET),
           'mask': _write_model_config(root / 'mask.py', 'mask_unet', TINY_MASK_UNET),
           'vae_cfg': _write_model_config(root / 'vae_cfg.py', 'vae', TINY_VAE)}
  vae_cfg = training.from_config(dict(
      task='vae', model=paths['vae_cfg'], steps=2, batch_size=4, image_size=16,
      region_size=8.0, mask_image_fraction=0.5, latent_stats_batches=1,
      export_latent_std=5.0, export_latent_scale=VAE_SCALE, log_every=1))
  paths['vae_summary'] = training.train(vae_cfg, TINY_VAE, str(root / 'vae_run'))
  paths['vae'] = paths['vae_summary']['export']
  return paths


def _image_cfg(tiny, **kw):
  d = dict(task='image_unet', model=tiny['image'], steps=30, batch_size=4, image_size=16,
           lr=3e-3, ema_every=2, ema_decay=0.9, save_every=15, log_every=10,
           region_size=8.0, vae=tiny['vae'], seed=3)
  d.update(kw)
  return training.from_config(d), TINY_IMAGE_UNET


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
      for x, y in zip(la, lb))


# ----------------------------------------------------------------------------- training


def test_train_step_overfits_fixed_batch(tiny):
  cfg, model_cfg = _image_cfg(tiny)
  task = training.make_task(cfg, model_cfg)
  state = training.init_state(task, cfg)
  batch = {k: jnp.asarray(v) for k, v in task.batches(0).items()}
  assert batch['image'].shape == (4, 16, 16, 3) and batch['labels'].shape == (4, 16, 16)
  step = training.compiled_step(task, cfg)
  losses = []
  for _ in range(cfg.steps):
    state, metrics = step(state, task.frozen, batch)
    losses.append(float(metrics['loss']))
  assert int(state.step) == cfg.steps and np.all(np.isfinite(losses))
  before, after = np.mean(losses[:5]), np.mean(losses[-5:])
  assert after < 0.6 * before, losses


def test_resume_is_bitwise_exact(tiny, tmp_path):
  cfg, model_cfg = _image_cfg(tiny)
  straight = training.train(cfg, model_cfg, str(tmp_path / 'a'))
  assert straight['steps_done'] == 30 and straight['export']
  first = training.train(cfg, model_cfg, str(tmp_path / 'b'), until=15)
  assert first['steps_done'] == 15 and first['export'] is None
  assert checkpoint.latest_step(str(tmp_path / 'b' / 'checkpoints')) == 15
  with pytest.raises(training.WorkdirError, match='resume'):
    training.train(cfg, model_cfg, str(tmp_path / 'b'))
  other = dataclasses.replace(cfg, lr=1e-3)
  with pytest.raises(training.WorkdirError, match='lr'):
    training.train(other, model_cfg, str(tmp_path / 'b'), resume=True)
  ckpts = str(tmp_path / 'b' / 'checkpoints')       # the grain loader's state, saved
  saved = checkpoint.load_loader_state(ckpts, 15, 0)   # with the checkpoint, is restored
  assert saved == loader_lib.Loader.state_at(15)
  checkpoint.save_loader_state(ckpts, 15, 0, loader_lib.Loader.state_at(3))
  with pytest.raises(training.WorkdirError, match='loader state'):
    training.train(cfg, model_cfg, str(tmp_path / 'b'), resume=True)
  checkpoint.save_loader_state(ckpts, 15, 0, saved)
  second = training.train(cfg, model_cfg, str(tmp_path / 'b'), resume=True)
  assert second['start_step'] == 15 and second['steps_done'] == 30

  task = training.make_task(cfg, model_cfg)
  abstract = training.abstract_state(task, cfg)
  a = checkpoint.restore_train_state(str(tmp_path / 'a' / 'checkpoints'), abstract)
  b = checkpoint.restore_train_state(str(tmp_path / 'b' / 'checkpoints'), abstract)
  assert int(a.step) == int(b.step) == 30
  assert _leaves_equal(a, b)
  kind, loaded_cfg, exported = checkpoint.load_model(str(tmp_path / 'b' / 'model'))
  assert kind == 'image_unet' and loaded_cfg == model_cfg
  assert _leaves_equal(exported, a.ema_params)
  assert not _leaves_equal(a.ema_params, a.params)


def test_ema_update_rule():
  ema, params = {'w': jnp.full((3,), 1.0)}, {'w': jnp.full((3,), 3.0)}
  kw = dict(decay=0.75, every=10, warmup=5)
  np.testing.assert_array_equal(training.ema_update(ema, params, 4, **kw)['w'], 3.0)  # copy
  np.testing.assert_array_equal(training.ema_update(ema, params, 5, **kw)['w'], 1.0)  # held
  np.testing.assert_array_equal(training.ema_update(ema, params, 19, **kw)['w'], 1.0)
  np.testing.assert_allclose(training.ema_update(ema, params, 20, **kw)['w'], 1.5)
  # Under jit with a traced step, too.
  f = jax.jit(lambda e, p, s: training.ema_update(e, p, s, decay=0.5, every=2))
  np.testing.assert_allclose(f(ema, params, jnp.int32(2))['w'], 2.0)
  np.testing.assert_allclose(f(ema, params, jnp.int32(3))['w'], 1.0)


def test_vae_training_exports_normalised_model(tiny):
  summary = tiny['vae_summary']
  assert summary['steps_done'] == 2 and np.isfinite(summary['loss'])
  kind, cfg, _ = checkpoint.load_model(summary['export'])
  # The export stores the latent scale it chose in the VAE's model.json.
  assert kind == 'vae' and cfg == dataclasses.replace(TINY_VAE, latent_scale=VAE_SCALE)
  with open(os.path.join(os.path.dirname(summary['export']), 'export.json')) as f:
    info = json.load(f)
  assert info['latent_std_after'] == 5.0 and len(info['latent_std_before']) == 4
  assert info['latent_scale'] == VAE_SCALE
  # std 5 / latent_scale 40: an 8-sigma excursion is needed to reach the clip.
  assert info['clipped_fraction'] < 1e-3
  with open(os.path.join(os.path.dirname(summary['export']), 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [r['step'] for r in lines] == [1, 2] and all(np.isfinite(r['loss']) for r in lines)


def test_clipped_fraction_follows_latent_scale(tiny):
  """The share of diffusion latents outside DDIM's [-1, 1] x0 clip, at the VAE config's
  latent scale: all of them for a tiny scale, none for a huge one, something in between
  for one near their size."""
  params = checkpoint.load_model(tiny['vae'])[2]
  batches = lambda step: {'image': np.random.default_rng(step).uniform(0, 1, (2, 16, 16, 3))
                          .astype(np.float32)}
  cfg = training.from_config(dict(task='vae', model=tiny['vae_cfg'], steps=2, batch_size=2,
                                  image_size=16))
  frac = lambda scale: training.clipped_fraction(
      cfg, dataclasses.replace(TINY_VAE, latent_scale=scale), params, batches, 2)
  assert frac(1e-6) == 1.0 and frac(1e6) == 0.0
  assert 0.0 < frac(5.0) < 1.0


def test_unet_tasks_use_the_vae_latent_scale(tiny, tmp_path):
  """The image U-Net's loss sees latents divided by the scale stored with the VAE: the
  same VAE params saved with another scale give another loss, the same scale the same."""
  _, vae_cfg, vae_params = checkpoint.load_model(tiny['vae'])
  for name, scale in (('same', VAE_SCALE), ('other', 2.0)):
    checkpoint.save_model(str(tmp_path / name), 'vae',
                          dataclasses.replace(vae_cfg, latent_scale=scale), vae_params)
  cfg, model_cfg = _image_cfg(tiny)
  task = training.make_task(cfg, model_cfg)
  params = training.init_state(task, cfg).params
  batch = {k: jnp.asarray(v) for k, v in task.batches(0).items()}

  def loss(vae):
    t = training.make_task(dataclasses.replace(cfg, vae=str(tmp_path / vae)), model_cfg)
    return float(t.loss(params, t.frozen, batch, training.rng_key(0))[0])
  assert loss('same') == float(task.loss(params, task.frozen, batch, training.rng_key(0))[0])
  assert loss('other') != loss('same')


def test_mask_unet_train_step_shapes(tiny):
  """The mask U-Net's step, traced (not compiled, to keep this file fast): the state keeps
  its shapes, the loss is a scalar; batches carry label maps at 1/mask_downscale scale."""
  cfg = training.from_config(dict(
      task='mask_unet', model=tiny['mask'], steps=2, batch_size=2, image_size=16,
      region_size=32.0, mask_downscale=2, vae=tiny['vae']))
  task = training.make_task(cfg, TINY_MASK_UNET)
  batch = task.batches(0)
  assert set(batch) == {'labels', 'layout_class'} and batch['labels'].shape == (2, 16, 16)
  assert batch['layout_class'].max() < TINY_MASK_UNET.num_classes
  state = training.abstract_state(task, cfg)
  new_state, metrics = jax.eval_shape(training.compiled_step(task, cfg), state, task.frozen,
                                      batch)
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
  assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(
      jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state)))
  assert metrics['loss'].shape == ()


def test_normalize_vae_latents_is_exact(tiny):
  params = checkpoint.load_model(tiny['vae'])[2]
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)), jnp.float32)
  enc, dec = jax.jit(vae_lib.encode_fn(TINY_VAE)), jax.jit(vae_lib.decode_fn(TINY_VAE))
  mean0, logvar0 = enc(params, x)
  mu, sd = np.array([0.1, -0.2, 0.3, 0.0]), np.array([0.5, 2.0, 1.0, 0.25])
  new = training.normalize_vae_latents(params, mu, sd, 10.0)
  new = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), new)
  mean1, logvar1 = enc(new, x)
  c = 10.0 / sd
  np.testing.assert_allclose(mean1, c * (np.asarray(mean0) - mu), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logvar1, np.asarray(logvar0) + 2 * np.log(c), atol=1e-4)
  np.testing.assert_allclose(dec(new, mean1), dec(params, mean0), atol=1e-4)


def test_pick_label_cond():
  labels = jnp.asarray([[[0, 2], [3, 2]], [[0, 0], [0, 0]], [[4, 4], [4, 1]]], jnp.int32)
  for seed in range(5):
    cond = np.asarray(training.pick_label_cond(labels, training.rng_key(seed), 5))
    for b in range(3):
      ids = set(np.unique(cond[b])) - {0}
      assert len(ids) <= 1
      if ids:
        lab = ids.pop()
        np.testing.assert_array_equal(cond[b], np.where(labels[b] == lab, lab, 0))
      else:
        assert b == 1


def test_demo_configs_load():
  for name, task in (('image', 'image_unet'), ('mask', 'mask_unet'), ('vae', 'vae')):
    cfg, model_cfg = training.load_config(
        os.path.join(REPO, 'configs', f'demo_train_{name}.py'))
    assert cfg.task == task and os.path.isfile(cfg.model)
    if task != 'vae':
      assert model_cfg.kind == task.split('_')[0]
    else:
      assert model_cfg.downsample_factor == 8
  with pytest.raises(configs.ConfigError, match="unknown TrainConfig fields: \\['bogus'\\]"):
    training.from_config({'task': 'vae', 'model': 'x', 'steps': 1, 'batch_size': 1,
                          'image_size': 8, 'bogus': 1})
  with pytest.raises(configs.ConfigError, match='needs `vae`'):
    training.from_config({'task': 'image_unet', 'model': 'x', 'steps': 1, 'batch_size': 1,
                          'image_size': 8})


# ----------------------------------------------------------------------------- data


def test_synthetic_examples_deterministic_and_valid():
  spec = data.SynthSpec(num_classes=7)
  a = data.synth_example([5, 1], 64, spec)
  b = data.synth_example([5, 1], 64, spec)
  c = data.synth_example([5, 2], 64, spec)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not np.array_equal(a.labels, c.labels)
  assert a.image.shape == (64, 64, 3) and a.image.dtype == np.float32
  assert a.labels.shape == (64, 64) and a.labels.dtype == np.int32
  assert 0.0 <= a.image.min() and a.image.max() <= 1.0
  for seed in range(6):
    ex = data.synth_example([9, seed], (48, 80), spec)
    assert ex.labels.shape == (48, 80) and ex.image.shape == (48, 80, 3)
    assert 0 <= ex.labels.min() and ex.labels.max() < 7
    assert 0 <= ex.layout_class < spec.num_layout_classes
  # Every label, including the parametrised family (>= 5), has its own texture.
  means = [data.texture(l, np.random.default_rng(0), 32, 32).mean(axis=(0, 1))
           for l in range(7)]
  assert min(np.abs(means[i] - means[j]).max() for i in range(7) for j in range(i)) > 0.01
  # Layout classes favour different labels.
  counts = [np.bincount(np.concatenate([
      data.synth_labels([c, s], 64, data.SynthSpec(region_size=8.0), c).ravel()
      for s in range(4)]), minlength=5) for c in (0, 1)]
  assert counts[0][1] + counts[0][3] > counts[0][2] + counts[0][4]
  assert counts[1][2] + counts[1][4] > counts[1][1] + counts[1][3]


def _region_count(labels):
  """Connected same-label regions (4-neighbour), counted by flood fill."""
  seen = np.zeros(labels.shape, bool)
  n = 0
  for y0, x0 in zip(*np.nonzero(~seen)):
    if seen[y0, x0]:
      continue
    n += 1
    stack = [(y0, x0)]
    seen[y0, x0] = True
    while stack:
      y, x = stack.pop()
      for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
        if (0 <= yy < labels.shape[0] and 0 <= xx < labels.shape[1] and not seen[yy, xx]
            and labels[yy, xx] == labels[y, x]):
          seen[yy, xx] = True
          stack.append((yy, xx))
  return n


def test_region_size_range():
  """region_size_max draws a region size per example: counts spread from many small
  regions to a few large ones, deterministically; a fixed size keeps its stream."""
  fixed = data.SynthSpec(region_size=8.0)
  ranged = dataclasses.replace(fixed, region_size_max=64.0)
  counts = [_region_count(data.synth_example([3, s], 64, ranged, with_image=False).labels)
            for s in range(12)]
  assert max(counts) > 4 * min(counts), counts
  np.testing.assert_array_equal(data.synth_example([3, 0], 64, ranged).image,
                                data.synth_example([3, 0], 64, ranged).image)
  with pytest.raises(ValueError, match='region_size_max'):
    data.SynthSpec(region_size=8.0, region_size_max=4.0)
  src = data.SyntheticSource(ranged, 32, 2, seed=1, downscale=4)
  assert src.spec.region_size == 2.0 and src.spec.region_size_max == 16.0


def test_synthetic_source_batches_depend_on_seed_and_step():
  spec = data.SynthSpec()
  src = data.SyntheticSource(spec, 32, 3, seed=1)
  b0, b0_again, b1 = src.batch(0), src.batch(0), src.batch(1)
  np.testing.assert_array_equal(b0['image'], b0_again['image'])
  assert not np.array_equal(b0['labels'], b1['labels'])
  assert b0['image'].shape == (3, 32, 32, 3) and b0['labels'].shape == (3, 32, 32)
  assert b0['layout_class'].shape == (3,)
  masks_only = data.SyntheticSource(spec, 32, 2, seed=1, with_images=False, downscale=4).batch(0)
  assert 'image' not in masks_only and masks_only['labels'].shape == (2, 32, 32)
  grey = data.render_mask_image(masks_only['labels'], 5)
  assert grey.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(grey[..., 1], masks_only['labels'] / 4.0)


def test_augment_keeps_image_and_mask_aligned():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, (6, 9)).astype(np.int32)
  image = np.stack([labels * 10.0, labels + 0.5, -labels], -1).astype(np.float32)
  seen = set()
  for seed in range(40):
    img, lab = data.augment(image, labels, np.random.default_rng(seed))
    np.testing.assert_array_equal(img[..., 0], lab * 10.0)
    np.testing.assert_array_equal(img[..., 2], -lab)
    seen.add(lab.tobytes() + bytes(lab.shape))
  assert len(seen) == 8  # all eight rotations/flips of a generic array occur


def test_folder_round_trip(tmp_path):
  spec = data.SynthSpec(region_size=12.0)
  paths = data.write_synthetic_dataset(str(tmp_path / 'ds'), 4, 32, seed=2, spec=spec)
  pairs = data.find_pairs(str(tmp_path / 'ds'))
  assert [p for p, _ in pairs] == sorted(paths)
  for img_path, mask_path in pairs:
    i = int(os.path.basename(img_path)[6:11])
    ex = data.synth_example([2, i], 32, spec, layout_class=i % 2)
    np.testing.assert_array_equal(label_maps.read_label_png(mask_path), ex.labels)
    assert np.abs(data.read_image(img_path) - ex.image).mean() < 0.03  # JPEG
    assert data.folder_layout_class(mask_path, ex.labels) == i % 2
  src = data.FolderSource(str(tmp_path / 'ds'), 32, 4, seed=0, augment_data=False)
  b = src.batch(0)
  assert b['image'].shape == (4, 32, 32, 3) and b['labels'].dtype == np.int32
  # One epoch per batch of 4: every example exactly once, in a seeded order.
  got = sorted(int(c) for c in b['layout_class'])
  assert got == [0, 0, 1, 1]
  np.testing.assert_array_equal(src.batch(3)['labels'], src.batch(3)['labels'])
  small = data.FolderSource(str(tmp_path / 'ds'), 8, 2, seed=0, with_images=False,
                            downscale=4).batch(0)
  assert small['labels'].shape == (2, 8, 8) and 'image' not in small


def test_folder_augmentation_alignment(tmp_path):
  folder = tmp_path / 'grey'
  folder.mkdir()
  rng = np.random.default_rng(1)
  for i in range(3):
    labels = rng.integers(0, 5, (20, 24)).astype(np.uint8)
    Image.fromarray(np.repeat(labels[..., None] * 50, 3, -1)).save(folder / f'g{i}.png')
    label_maps.write_label_png(folder / f'g{i}_mask.png', labels)
  src = data.FolderSource(str(folder), 16, 3, seed=4, num_classes=5)
  for step in range(4):
    b = src.batch(step)
    np.testing.assert_array_equal(np.round(b['image'][..., 0] * 255 / 50), b['labels'])
  with pytest.raises(ValueError, match='out of range'):
    data.FolderSource(str(folder), 16, 1, seed=0, num_classes=3).batch(0)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no image/mask pairs'):
    data.find_pairs(str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError):
    data.find_pairs(str(tmp_path / 'absent'))


def test_fsdp_spec():
  from tiled_ldm_jax.training import parallel
  assert parallel.fsdp_spec((3, 3, 16, 32), 8) == jax.sharding.PartitionSpec(
      None, None, None, 'data')
  assert parallel.fsdp_spec((16, 12), 4) == jax.sharding.PartitionSpec('data', None)
  assert parallel.fsdp_spec((5, 3), 8) == jax.sharding.PartitionSpec()
  assert parallel.fsdp_spec((), 8) == jax.sharding.PartitionSpec()
  assert parallel.fsdp_spec((16,), 1) == jax.sharding.PartitionSpec()


# ----------------------------------------------------------------------------- objectives


@pytest.mark.parametrize('objective', ['eps', 'v', 'flow'])
def test_objective_inputs_match_hand_computation(objective):
  from tiled_ldm_jax.sampling import diffusion
  from tiled_ldm_jax.training import tasks
  z = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
  key = jax.random.key(7)
  x_t, t_in, target = tasks.objective_inputs(objective, z, key)
  k_t, k_n = jax.random.split(key)
  noise = np.asarray(jax.random.normal(k_n, z.shape))
  z = np.asarray(z, np.float64)
  if objective == 'flow':
    t = np.asarray(jax.random.uniform(k_t, (3,)), np.float64)
    tt = t[:, None, None, None]
    want_x, want_t, want = (1 - tt) * z + tt * noise, t * 1000.0, noise - z
    assert t_in.dtype == jnp.float32
  else:
    t = np.asarray(jax.random.randint(k_t, (3,), 0, 1000))
    a = np.asarray(diffusion.Schedule(1000).alphas_cumprod, np.float64)[t][:, None, None, None]
    want_x, want_t = np.sqrt(a) * z + np.sqrt(1 - a) * noise, t
    want = noise if objective == 'eps' else np.sqrt(a) * noise - np.sqrt(1 - a) * z
  np.testing.assert_allclose(np.asarray(t_in), want_t, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(x_t), want_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(target), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('objective', ['v', 'flow'])
def test_objective_trains_and_is_exported(tiny, tmp_path, objective):
  """v and flow (eps: test_train_step_overfits_fixed_batch): finite loss that falls on a
  fixed batch; the exported model.json records the objective."""
  cfg, model_cfg = _image_cfg(tiny, objective=objective, steps=20)
  task = training.make_task(cfg, model_cfg)
  state = training.init_state(task, cfg)
  batch = {k: jnp.asarray(v) for k, v in task.batches(0).items()}
  step = training.compiled_step(task, cfg)
  losses = []
  for _ in range(cfg.steps):
    state, metrics = step(state, task.frozen, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
  out = training.export_model(cfg, model_cfg, task, state.ema_params,
                              str(tmp_path / 'model'), str(tmp_path))
  with open(os.path.join(out, 'model.json')) as f:
    assert json.load(f)['objective'] == objective
  with open(tmp_path / 'export.json') as f:
    assert json.load(f)['objective'] == objective
