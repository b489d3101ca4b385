"""Shared pytest fixtures: where the reference data lives."""

import os
import pathlib

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def reference_path() -> pathlib.Path:
  """`$TILED_LDM_REFERENCE`, else `<repo>/../shared/reference` (where CI has it)."""
  return pathlib.Path(os.environ.get('TILED_LDM_REFERENCE', REPO.parent / 'shared' / 'reference'))


@pytest.fixture(scope='session')
def reference_dir() -> pathlib.Path:
  path = reference_path()
  if not (path / 'README.md').is_file():
    pytest.fail(f'reference data not found at {path}; set TILED_LDM_REFERENCE')
  return path


@pytest.fixture(scope='module')
def fast_compile():
  """Less XLA optimization for a module: ~30% faster where compile dominates; restored
  afterwards. Use with `pytestmark = pytest.mark.usefixtures('fast_compile')`."""
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', before)
