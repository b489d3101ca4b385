"""1 device vs 8 emulated devices give identical samples (own process: XLA_FLAGS)."""

import os
import pathlib
import subprocess
import sys


def test_one_vs_eight_devices_identical(reference_dir):
  script = pathlib.Path(__file__).with_name('sharding_check.py')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run([sys.executable, str(script), str(reference_dir)], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert "OK {'images': 8, 'patches': 8, 'pipeline': 2}" in out.stdout
