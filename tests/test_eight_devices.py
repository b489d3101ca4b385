"""Everything that needs 8 emulated CPU devices, in the test run's one 8-device
interpreter (the device count is fixed per process; conftest's `eight_devices`), in one
file so that xdist's `--dist loadfile` runs it on one worker and starts that interpreter
once: the sampler and the command on 1 vs 8 devices, every prediction type through
`sampling.sample` on a mesh, and data-parallel training.
"""

import dataclasses
import json
import pathlib

import numpy as np

from tiled_ldm_jax.models import configs

from test_train import _image_cfg, tiny  # noqa: F401  (fixture)

HERE = pathlib.Path(__file__).parent


def test_one_vs_eight_devices_identical(eight_devices):
  out = eight_devices.run(HERE / 'sharding_check.py')
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert "OK {'images': 8, 'patches': 8, 'pipeline': 2}" in out.stdout


def test_every_type_on_eight_devices(eight_devices):
  """Images split and patch split on 8 emulated CPU devices equal one device (the run's
  8-device interpreter)."""
  out = eight_devices.run(HERE / 'sampling_sharding_check.py')
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert 'OK' in out.stdout, out.stdout


_DP_SCRIPT = r'''
import dataclasses, json, os, sys, time
import jax
from tiled_ldm_jax import training
from tiled_ldm_jax.models import configs
cfg = training.from_config(json.loads(sys.argv[1]))
model_cfg = configs.model_config('image_unet', json.loads(sys.argv[2]))
out = {}
try:
  training.train(dataclasses.replace(cfg, batch_size=12), model_cfg,
                 os.path.join(sys.argv[3], 'bad'), devices=8)
except configs.ConfigError as e:
  out['indivisible'] = [str(e), os.path.exists(os.path.join(sys.argv[3], 'bad'))]
for name, devices, shard in (('1', 1, False), ('8', 8, False), ('8fsdp', 8, True)):
  c = dataclasses.replace(cfg, shard_params=shard)
  wd = os.path.join(sys.argv[3], name)
  t0 = time.perf_counter()
  training.train(c, model_cfg, wd, devices=devices)
  secs = time.perf_counter() - t0
  with open(os.path.join(wd, 'metrics.jsonl')) as f:
    lines = [json.loads(l) for l in f]
  out[name] = {'steps': [l['step'] for l in lines], 'loss': [l['loss'] for l in lines],
               'seconds': secs, 'devices': jax.device_count(),
               's_per_step_after_first': 1.0 / lines[-1]['steps_per_s']}
print('RESULT ' + json.dumps(out))
'''


def test_data_parallel_8_devices_matches_1(tiny, tmp_path, eight_devices):
  """Same global batch on 1 and 8 emulated devices (replicated and FSDP-sharded params):
  the 4 logged losses agree to 1e-4 relative. In the run's 8-device interpreter (the
  device count is fixed per process)."""
  cfg, model_cfg = _image_cfg(tiny, steps=4, batch_size=8, log_every=1, save_every=4)
  d = dataclasses.asdict(cfg)
  mc = configs.config_to_dict(model_cfg)
  script = tmp_path / 'dp_check.py'
  script.write_text(_DP_SCRIPT)
  proc = eight_devices.run(script, json.dumps(d), json.dumps(mc), tmp_path, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  res = json.loads(line[len('RESULT '):])
  print(json.dumps(res))
  msg, written = res['indivisible']
  assert 'batch_size 12 is not divisible by the 8 devices' in msg and not written
  one = np.array(res['1']['loss'])
  assert res['1']['steps'] == list(range(1, 5)) and res['1']['devices'] == 8
  for name in ('8', '8fsdp'):
    assert res[name]['steps'] == res['1']['steps']
    np.testing.assert_allclose(res[name]['loss'], one, rtol=1e-4)
  assert np.all(np.isfinite(one))
