"""Configs: the one dict -> typed config path (`models.configs.from_dict`), the
`configs/*.py` files (ConfigDicts that set only what they change), and command-line
overrides of a training config (`--config.<field>=value`)."""

import dataclasses
import glob
import os

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from tiled_ldm_jax.models import config_files
from tiled_ldm_jax import training
from tiled_ldm_jax.models import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def test_from_dict_is_strict_and_converts():
  vae = configs.from_dict(configs.VAEConfig, {'block_out_channels': [16, 32],
                                              'norm_num_groups': 8, 'latent_scale': 2,
                                              'latents_mean': [0, 1, 2, 3]})
  assert vae.block_out_channels == (16, 32) and vae.latents_mean == (0.0, 1.0, 2.0, 3.0)
  assert isinstance(vae.latent_scale, float)
  with pytest.raises(configs.ConfigError, match=r"unknown VAEConfig fields: \['bogus'\]"):
    configs.from_dict(configs.VAEConfig, {'bogus': 1})
  with pytest.raises(configs.ConfigError, match=r"lacks required fields: \['dim', 'dim_mults'"):
    configs.from_dict(configs.UNetConfig, {'kind': 'image', 'num_classes': 2})
  with pytest.raises(configs.ConfigError, match='layers_per_block must be int'):
    configs.from_dict(configs.VAEConfig, {'layers_per_block': '2'})
  with pytest.raises(configs.ConfigError, match='augment must be bool'):
    training.from_config({'task': 'vae', 'model': 'x', 'steps': 1, 'batch_size': 1,
                          'image_size': 8, 'augment': 1})


def test_model_config_round_trips_and_checks_kind():
  unet = configs.UNetConfig(kind='mask', dim=8, num_classes=2, dim_mults=(1, 2),
                            resnet_block_groups=4)
  assert configs.model_config('mask_unet', configs.config_to_dict(unet)) == unet
  with pytest.raises(configs.ConfigError, match="kind='mask', expected 'image'"):
    configs.model_config('image_unet', configs.config_to_dict(unet))
  with pytest.raises(configs.ConfigError, match='model must be one of'):
    configs.model_config('vqgan', {})


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_files_set_only_what_they_change(path):
  """Each default lives in its dataclass: a config file returns a ConfigDict whose
  values all differ from the defaults (a training file holds every field, at its
  `TrainConfig` default unless set, so each is overridable)."""
  config = config_files.load(path)
  assert isinstance(config, ml_collections.ConfigDict)
  if 'task' in config:
    # Built on default_config(): every field present, so every one is overridable.
    assert set(config) == set(training.default_config())
    cfg, _ = training.load_config(config)
    assert os.path.isfile(cfg.model)
  else:
    kind, typed = config_files.load_model_config(path)
    defaults = {f.name: f.default for f in dataclasses.fields(typed)}
    same = [k for k in config if k != 'model' and defaults.get(k) == getattr(typed, k)]
    assert not same, f'{path} restates defaults: {same}'


def _parse(*args):
  """The training script's config flag, parsed from `args` (a private FlagValues)."""
  values, argv = flags.FlagValues(), ['train.py', *args]
  # config_flags defines one flag per override it finds in `sys_argv` (default sys.argv).
  config_flags.DEFINE_config_file('config', None, 'training config', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_command_line_overrides_reach_the_train_config():
  path = os.path.join(REPO, 'configs', 'demo_train_vae.py')
  cfg, _ = training.load_config(_parse(f'--config={path}', '--config.steps=3',
                                       '--config.batch_size=2', '--config.augment=false',
                                       '--config.lr=0.01'))
  assert (cfg.steps, cfg.batch_size, cfg.augment, cfg.lr) == (3, 2, False, 0.01)
  assert cfg.image_size == 64                      # untouched: the config file's value
  with pytest.raises(flags.IllegalFlagValueError, match='steps'):
    _parse(f'--config={path}', '--config.steps=three')


def test_unknown_override_is_a_clear_error(tmp_path, script_server):
  proc = script_server.run(os.path.join(REPO, 'scripts', 'train.py'),
                           f'--config={os.path.join(REPO, "configs", "demo_train_vae.py")}',
                           '--config.bacth_size=2', f'--workdir={tmp_path}', timeout=300)
  assert proc.returncode != 0
  assert 'unknown config field(s) bacth_size in' in proc.stderr, proc.stderr[-2000:]
  assert 'batch_size' in proc.stderr.splitlines()[-1]
  assert not os.listdir(tmp_path)
