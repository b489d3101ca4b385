"""1 device vs 8 emulated devices give identical samples (sharding_check.py, run in the
test run's one 8-device interpreter)."""

import pathlib


def test_one_vs_eight_devices_identical(reference_dir, eight_devices):
  script = pathlib.Path(__file__).with_name('sharding_check.py')
  out = eight_devices.run(script, reference_dir)
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert "OK {'images': 8, 'patches': 8, 'pipeline': 2}" in out.stdout
