"""tools/check_reference.py end to end: passes on the reference, fails on altered data."""

import json
import os
import pathlib
import re
import shutil

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tools' / 'check_reference.py'


def _run(reference_dir, output_dir, server):
  """Runs the script in the run's script server (fast compiles: the 27 cases pass there
  too; parity under the full optimizer is `@pytest.mark.optimized` in test_unet/test_vae)."""
  args = [f'--reference_dir={reference_dir}', f'--output_dir={output_dir}']
  proc = server.run(SCRIPT, *args, timeout=300)
  lines = proc.stdout.strip().splitlines()
  assert lines, proc.stderr[-3000:]
  results = [json.loads(line) for line in lines[:-1]]
  return proc, results, lines[-1]


def test_reference_passes(reference_dir, tmp_path, script_server):
  proc, results, summary = _run(reference_dir, tmp_path, script_server)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  m = re.fullmatch(r'(\d+) passed, 0 failed', summary)
  assert m and int(m[1]) == len(results), summary
  for r in results:
    assert r['ok'] is True, r
    assert isinstance(r['tol'], float) and r['max_abs_err'] <= r['tol'], r
  # Every case the reference holds, listed here from its files (not from the checker's
  # own discovery): a DDIM, blend or clean-mask case that vanished would fail.
  keys = lambda *parts: set(np.load(os.path.join(reference_dir, *parts)).files)
  expected = {'image_unet/eps', 'image_unet/eps_cfg4', 'mask_unet/eps_cond',
              'mask_unet/eps_null', 'vae/decoded', 'blend/tiled_no_blend', 'blend/blended'}
  expected |= {f'ddim/{k}' for k in keys('image_unet', 'cases.npz') if k.startswith('ddim_')}
  expected |= {f'clean_mask/{k}' for k in keys('clean_mask_cases.npz') if k.startswith('in')}
  expected |= {f'blend/{k}' for k in keys('vae', 'blend_cases.npz') if k.startswith('window_')}
  assert all(any(n.startswith(f) for n in expected) for f in ('ddim/', 'clean_mask/', 'blend/window_'))
  names = [r['case'] for r in results]
  assert sorted(names) == sorted(expected), sorted(set(names) ^ expected)
  # The models were converted into --output_dir by the public converter.
  for kind in ('image_unet', 'mask_unet', 'vae'):
    assert (tmp_path / kind / 'model.json').is_file()


def test_altered_reference_fails(reference_dir, tmp_path, script_server):
  ref = tmp_path / 'ref'
  (ref / 'image_unet').mkdir(parents=True)
  for name in ('model-1.pt', 'config.json'):
    shutil.copy(reference_dir / 'image_unet' / name, ref / 'image_unet' / name)
  with np.load(reference_dir / 'image_unet' / 'cases.npz') as d:
    np.savez(ref / 'image_unet' / 'cases.npz', x=d['x'], t=d['t'], masks=d['masks'],
             eps=d['eps'] + 1e-2, eps_cfg4=d['eps_cfg4'])
  proc, results, summary = _run(ref, tmp_path / 'out', script_server)
  assert proc.returncode == 1, proc.stdout
  by_name = {r['case']: r for r in results}
  assert set(by_name) == {'image_unet/eps', 'image_unet/eps_cfg4'}
  bad = by_name['image_unet/eps']
  assert bad['ok'] is False and abs(bad['max_abs_err'] - 1e-2) < 1e-3, bad
  assert by_name['image_unet/eps_cfg4']['ok'] is True
  assert summary == '1 passed, 1 failed'


def test_empty_folder_fails(tmp_path, script_server):
  (tmp_path / 'ref').mkdir()
  proc, results, summary = _run(tmp_path / 'ref', tmp_path / 'out', script_server)
  assert proc.returncode == 1
  assert results == [] and summary == '0 passed, 0 failed'
