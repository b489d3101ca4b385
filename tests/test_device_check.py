"""`tools/device_check.py --smoke`: the accelerator check runs end to end on CPU and
prints one JSON record per measurement with the fields the device table needs."""

import json
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_prints_every_measurement(script_server):
  run = script_server.run(REPO / 'tools' / 'device_check.py', '--smoke')
  assert run.returncode == 0, run.stderr[-2000:]
  records = [json.loads(l) for l in run.stdout.splitlines() if l.startswith('{')]
  names = [r['name'] for r in records]
  assert names == ['unet_forward_b1_float32', 'unet_forward_b1_bfloat16',
                   'sampler_random_k1', 'sampler_random_k4', 'sampler_grid_packed',
                   'decode_128'], names
  for r in records:
    assert r['seconds'] > 0 and r['device']
  for r in records[:5]:
    assert r['tflops'] > 0
  assert all(r['denoiser_evaluations'] > 0 for r in records[2:5])
