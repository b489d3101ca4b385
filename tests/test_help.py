"""`--help` of every command lists its own flags (grouped for sample_large_image.py),
each with its default, and not absl's / JAX's; an unknown flag gets a did-you-mean."""

import dataclasses
import os
import re

import pytest

from conftest import script_path
from tiled_ldm_jax import generate
from tiled_ldm_jax import pipeline

SCRIPTS = sorted(os.path.splitext(n)[0] for n in os.listdir(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
                 if n.endswith('.py'))
MULTI_HOST = ['distributed', 'coordinator_address', 'num_processes', 'process_id']


def _defined(name: str) -> set[str]:
  """The flags a script defines, read from its source (the dataclass fields for
  sample_large_image.py)."""
  if name == 'sample_large_image':
    fields = [f.name for cls in (pipeline.Options, generate.GenerationConfig)
              for f in dataclasses.fields(cls) if f.metadata.get('flag', True)]
    return set(fields + MULTI_HOST + ['compilation_cache_dir'])
  src = open(script_path(name)).read()
  found = set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", src))
  if 'define_compilation_cache_flag' in src:
    found.add('compilation_cache_dir')
  return found


@pytest.mark.parametrize('name', SCRIPTS)
def test_help_lists_the_commands_own_flags(name, script_server):
  out = script_server.run(str(script_path(name)), '--help')
  assert out.returncode == 0, out.stderr
  listed = set(re.findall(r'^  --(?:\[no\])?(\w+)', out.stdout, re.M))
  want = _defined(name)
  assert len(want) >= 4, want
  assert listed == want, (sorted(listed - want), sorted(want - listed))
  assert '--helpfull' in out.stdout
  assert len(out.stdout.splitlines()) < 200
  # Each flag with a default shows it.
  if name == 'sample_large_image':
    steps = pipeline.Options().sampling_steps
    for flag in (f'--sampling_steps={steps}', '--output_format=png', '--progress_every=50',
                 '--[no]dry_run (default: false)'):
      assert flag in out.stdout, flag


def test_help_groups(script_server):
  out = script_server.run(str(script_path('sample_large_image')), '-h').stdout
  titles = [t.split(' (')[0] for t in re.findall(r'^(\w.*):$', out, re.M)]
  assert titles[:6] == ['what to make', 'models', 'inputs', 'outputs', 'sampling',
                        'devices and hosts'], titles
  assert 'other:' not in out                       # every flag has its group
  inputs = out.split('\ninputs:')[1].split('\noutputs:')[0]
  assert '--mask\n' in inputs and '--strength=1.0' in inputs


@pytest.mark.parametrize('arg,hint', [
    ('--steps=3', 'did you mean --sampling_steps?'),
    ('--sampling_step=3', 'did you mean --sampling_steps?'),
    ('--format=tif', 'did you mean --output_format?'),
    ('--nodryrun', 'did you mean --dry_run?'),
    ('--zzz=1', '(--help lists the flags)'),
])
def test_unknown_flag_hint(arg, hint, script_server):
  out = script_server.run(str(script_path('sample_large_image')), arg)
  assert out.returncode == 1
  hint = hint if hint.startswith('(') else f'({hint})'
  name = arg[2:].split('=')[0]
  assert out.stderr.strip().splitlines() == [f'error: unknown flag --{name} {hint}']


def test_output_format_aliases(tmp_path):
  assert [generate.output_format(f) for f in ('tif', 'TIFF', 'jpeg', 'ome-zarr', 'png')] == [
      'tiff', 'tiff', 'jpg', 'zarr', 'png']
  cfg = generate.GenerationConfig(output_format='bmp', imgs_path=str(tmp_path / 'never'))
  with pytest.raises(ValueError, match=r"or tif, jpeg.*got 'bmp'"):
    generate.prepare(cfg)                         # refused before any model is loaded
  assert not (tmp_path / 'never').exists()
