"""The package's shape (tools/import_graph.py): no import circles between modules or
between floors (a sub-package and a top-level module importing each other), and no
placement or blend chosen by comparing strings inside the package."""

import importlib.util
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def _graph():
  spec = importlib.util.spec_from_file_location('import_graph', REPO / 'tools' / 'import_graph.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_no_circles_between_modules_or_floors():
  report = _graph().report(str(REPO))
  assert report['circles'] == [], report['circles']
  assert report['floor_circles'] == [], report['imports_in_floor_circles']


def test_the_measure_sees_a_floor_circle(tmp_path):
  """The check can fail: a sub-package that imports a top-level module importing it."""
  pkg = tmp_path / 'tiled_ldm_jax'
  (pkg / 'files').mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  (pkg / 'files' / '__init__.py').write_text('')
  (pkg / 'masks.py').write_text('from tiled_ldm_jax.files import reader\n')
  (pkg / 'files' / 'reader.py').write_text('from tiled_ldm_jax import masks\n')
  report = _graph().report(str(tmp_path))
  assert report['circles'] and report['floor_circles']


def test_no_string_switches_for_strategies():
  found = [f'{path.relative_to(REPO)}:{i}' for path in sorted((REPO / 'tiled_ldm_jax').rglob('*.py'))
           for i, line in enumerate(path.read_text().splitlines(), 1)
           if re.search(r'\b(schedule|blend_mode|blend) == ', line)]
  assert not found, found


def test_pipeline_is_the_users_face():
  """Pipeline's public methods are what a user calls; the stages, the request and the
  checks live in stages.py / request.py (issue: a request built once)."""
  assert _graph().report(str(REPO))['pipeline_public_methods'] == [
      'from_pretrained', 'resolve', 'request', 'sample_labels', 'sample_latents', 'encode',
      'iter_decode', 'band_source', 'decode']


def test_no_private_calls_across_the_top_modules():
  """generate/, estimate.py, stages.py and pipeline.py reach nothing private of each
  other: no `pipe._x`, `pipeline_lib._x`, `request_lib._x` or `stages_lib._x`."""
  pattern = re.compile(r'\b(pipe|pipeline|pipeline_lib|request_lib|stages|stages_lib|'
                       r'plan\.pipe|estimate)\._[a-z]')
  files = [REPO / 'tiled_ldm_jax' / n for n in ('pipeline.py', 'estimate.py', 'stages.py',
                                                'request.py')]
  files += sorted((REPO / 'tiled_ldm_jax' / 'generate').glob('*.py'))
  found = [f'{path.relative_to(REPO)}:{i}' for path in files
           for i, line in enumerate(path.read_text().splitlines(), 1)
           if pattern.search(line)]
  assert not found, found
