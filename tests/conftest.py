"""Shared pytest set-up: one compilation cache per test run, fast compiles by default,
the reference data and the models converted from it, shared at session scope.

Set before JAX starts (this file is imported before any test module):
- a fresh persistent XLA compilation cache for the whole run (every program, however
  fast it compiled), inherited by every subprocess a test starts (JAX reads
  `JAX_COMPILATION_CACHE_DIR`; the scripts' `--compilation_cache_dir` defaults under
  `XDG_CACHE_HOME`, pointed here too), so a developer's own cache never hides the cold
  time CI sees, and a script run by a test writes nothing under `~`;
- `jax_disable_most_optimizations` (compiles ~30% faster); tests where numerics or speed
  under full optimization are the point opt out with `@pytest.mark.optimized`.
"""

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import types

# One folder per test run: made by the first process (pytest, or xdist's controller) and
# inherited by its workers and every subprocess through the environment.
_OWNER = 'TILED_LDM_TEST_CACHE' not in os.environ
if _OWNER:
  os.environ['TILED_LDM_TEST_CACHE'] = tempfile.mkdtemp(prefix='tiled_ldm_jax_tests_')
_CACHE_ROOT = os.environ['TILED_LDM_TEST_CACHE']
os.environ['XDG_CACHE_HOME'] = _CACHE_ROOT
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(_CACHE_ROOT, 'tiled_ldm_jax', 'xla')
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] = 'true'
# XLA:CPU's fusion emitters cost compile time that these small, short runs never earn
# back (measured cold: a 128 px demo request 8.1 -> 6.0 s, a tiny U-Net training run
# 14.0 -> 10.5 s); with full optimization they pay off (a 512 px demo sample ran 8% slower
# without them), so only the test run turns them off. Every process of the run has it.
TEST_XLA_FLAGS = '--xla_cpu_use_fusion_emitters=false'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_configure(config):
  config.addinivalue_line('markers', 'optimized: compile with full XLA optimization '
                          '(numerics or speed under the default compiler are the point)')
  config.addinivalue_line('markers', 'slow: the full suite only (`-m slow`); CI and the '
                          "README's command run `-m 'not slow'` (docs/testing.md)")


# The slow tier: end-to-end runs (commands, whole pipelines, training to the end) that
# each compile programs no other test shares, and second cases of a property a fast test
# already checks on another shape or setting. Everything here still runs in the full
# suite (`python -m pytest tests -n 2 --dist loadfile`, docs/testing.md); the fast tier
# keeps at least one test of every module and every parity test. Measured by
# TILED_LDM_DURATIONS_FILE (below) on this 2-core machine.
SLOW = (
    # CLI runs; their library paths are tested in-process at smaller cost
    # (test_strength_on_the_api, test_keep_mask_on_the_api, test_pipeline, test_estimate's
    # plan-vs-run, test_bad_requests' one-line errors).
    'tests/test_init_image.py::test_command_init_image',
    'tests/test_init_image.py::test_command_outpaint_and_tiff_init',
    'tests/test_api.py::test_api_staged_and_cli_are_identical',
    'tests/test_api.py::test_readme_example_runs',
    'tests/test_estimate.py::test_dry_run_writes_nothing_and_times',
    'tests/test_label_maps.py::test_run_with_a_tiff_mask',
    # second shapes / settings of a property with a fast case
    'tests/test_label_maps.py::test_banded_mask_stage_equals_the_whole_image[size0]',
    'tests/test_train.py::test_objective_trains_and_is_exported[flow]',
    # long runs: training resume to the bit, the partition blend's seam on the demo VAE,
    # the slide round trip (generate, train, sample), killing two processes mid-run
    'tests/test_train.py::test_resume_is_bitwise_exact',
    'tests/test_decode.py::test_partition_blend_removes_the_residual_seam_on_the_demo_vae',
    'tests/test_slide_training.py',
    'tests/test_multiprocess.py::test_resume_after_killing_both',
    # two command runs under full optimization to measure peak RSS (the plan's other
    # checks are fast unit tests in the same file)
    'tests/test_memory_plan.py::test_plan_within_1_to_1_5_of_the_measured_peak',
    # Measured cold on this machine (TILED_LDM_DURATIONS_FILE), the costliest of the rest,
    # each with a cheaper test of the same path kept in the fast tier (named after '#'):
    'tests/test_multiprocess.py::test_batch_split_n4',            # n1_shared_tiff_bands
    'tests/test_multiprocess.py::test_patch_split_n2_tiff_uses_all_devices',
    'tests/test_multiprocess.py::test_init_image_keep_mask_two_processes',
    'tests/test_multiprocess.py::test_training_two_processes_matches_one',  # eight devices
    'tests/test_multiprocess.py::test_n1_not_dividing_devices_shared_zarr',
    'tests/test_eight_devices.py::test_one_vs_eight_devices_identical',  # every_type
    'tests/test_resume.py::test_resume_mask_and_image_stages_byte_identical[2]',   # [5]
    'tests/test_resume.py::test_resume_at_the_default_grid[True]',        # [False]
    'tests/test_resume.py::test_resume_across_batches_with_given_mask',
    'tests/test_own_model.py::test_own_model_script',          # ..._by_the_models_objective
    'tests/test_own_model.py::test_pipeline_samples_by_the_models_objective[flow]',
    'tests/test_api.py::test_second_pipeline_compiles_nothing',  # test_program_cache
    'tests/test_api.py::test_given_labels_and_batches',         # test_pipeline
    'tests/test_api.py::test_grid_schedule_and_bfloat16',       # test_schedules, test_unet
    'tests/test_pipeline.py::test_with_given_mask_numbering_and_repeatability',
    'tests/test_pipeline.py::test_image_does_not_depend_on_batch_size',  # test_sampler
    'tests/test_any_shape.py::test_hxw_with_the_mask_model',    # test_with_mask_model
    'tests/test_init_image.py::test_keep_mask_on_the_api',      # test_sampling keep oracle
    'tests/test_init_image.py::test_strength_on_the_api',       # test_sampling strength
    'tests/test_label_maps.py::test_banded_mask_stage_equals_the_whole_image',
    'tests/test_decode_overlap.py::test_demo_vae_seams_no_worse_than_four_shift_and_close_to_whole_decode',
    'tests/test_benchmark.py::test_count_work_equals_the_real_run[random-2]',  # [random-1]
    'tests/test_eight_devices.py::test_data_parallel_8_devices_matches_1',  # test_train
    'tests/test_device_check.py::test_smoke_prints_every_measurement',  # test_benchmark
)


def pytest_unconfigure(config):
  del config
  if _OWNER:
    shutil.rmtree(_CACHE_ROOT, ignore_errors=True)
    del os.environ['TILED_LDM_TEST_CACHE']


# Files by how long they take (measured, `--durations`), longest first: with xdist's
# `--dist loadfile` the files are handed out in collection order, so starting the long
# ones first keeps both workers busy to the end. Files not named keep their order after.
_LONGEST_FIRST = ('test_multiprocess', 'test_eight_devices', 'test_api', 'test_train',
                  'test_slide_training',
                  'test_demo', 'test_check_reference', 'test_pipeline', 'test_sampling',
                  'test_resume', 'test_own_model', 'test_bad_requests', 'test_benchmark',
                  'test_decode', 'test_schedules', 'test_unet', 'test_vae')


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
  """The longest files first (stable within a file)."""
  del session, config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
  for item in items:
    if item.nodeid.startswith(SLOW):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _optimization_level(request):
  """Full XLA optimization only for tests marked `optimized`."""
  if request.node.get_closest_marker('optimized') is None:
    yield
    return
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', True)


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a subprocess with `devices` emulated CPU devices."""
  return f'{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}'


def subprocess_env(optimized: bool = False, **extra) -> dict:
  """The environment for a subprocess of a test: this run's compilation cache and
  optimization level, the repo importable."""
  env = dict(os.environ, **extra)
  env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')])
  env['JAX_DISABLE_MOST_OPTIMIZATIONS'] = 'false' if optimized else 'true'
  return env


def script_path(name: str) -> pathlib.Path:
  """A user command (scripts/) or a developer tool (tools/) by name."""
  user = REPO / 'scripts' / f'{name}.py'
  return user if user.exists() else REPO / 'tools' / f'{name}.py'


def run_script(script: str, *args, timeout: float = 600, env: dict | None = None,
               **kw) -> subprocess.CompletedProcess:
  """`python scripts/<script>.py args...` (or tools/) with `subprocess_env()`; text output captured."""
  return subprocess.run([sys.executable, str(script_path(script)),
                         *map(str, args)], capture_output=True, text=True, timeout=timeout,
                        env=env or subprocess_env(), check=False, **kw)


class ScriptServer:
  """A `script_runner.py` interpreter: `run(script, *args)` answers like
  `subprocess.run([python, script, *args])` (returncode, stdout, stderr), one request at a
  time, without a new interpreter per request. A request past `timeout` kills the
  server and fails (a hang fails fast)."""

  def __init__(self, env: dict | None = None):
    self.proc = subprocess.Popen([sys.executable, str(REPO / 'tests' / 'script_runner.py')],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 env=env or subprocess_env(), text=True, bufsize=1)

  def send(self, script, *args) -> None:
    """Starts a request; `receive` answers it (two servers can then work at once)."""
    import json  # pylint: disable=g-import-not-at-top
    assert self.proc.poll() is None, 'the script server has exited'
    self.proc.stdin.write(json.dumps([str(script), [str(a) for a in args]]) + '\n')
    self.proc.stdin.flush()

  def receive(self, timeout: float = 600, what: str = 'request') -> types.SimpleNamespace:
    """The answer to the request sent last; past `timeout` the server is killed and the
    test fails."""
    import json  # pylint: disable=g-import-not-at-top
    import select  # pylint: disable=g-import-not-at-top
    ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
    if not ready:
      self.kill()
      pytest.fail(f'{what}: no answer after {timeout:.0f} s')
    line = self.proc.stdout.readline()
    if not line:
      pytest.fail(f'{what}: the script server died (status {self.proc.wait()})')
    return types.SimpleNamespace(**json.loads(line))

  def run(self, script, *args, timeout: float = 600) -> types.SimpleNamespace:
    self.send(script, *args)
    return self.receive(timeout, f'{script} {args}')

  def alive(self) -> bool:
    return self.proc.poll() is None

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.close()
      try:
        self.proc.wait(30)
      except subprocess.TimeoutExpired:
        self.kill()


@pytest.fixture(scope='session')
def script_server():
  """One interpreter for in-process-like script runs (this run's cache, one device)."""
  server = ScriptServer()
  yield server
  server.close()


@pytest.fixture(scope='session')
def eight_devices():
  """The one interpreter of this run with 8 emulated CPU devices (the device count is
  fixed per process): every multi-device check runs its script here."""
  server = ScriptServer(subprocess_env(
      XLA_FLAGS=xla_flags(8), JAX_PLATFORMS='cpu'))
  yield server
  server.close()


@contextlib.contextmanager
def count_compiles():
  """Counts what JAX traces and compiles inside the block: yields a dict whose
  'traces' and 'compiles' grow as programs are traced / compiled (persistent-cache
  hits included: they still count as compiles asked for)."""
  counts = {'traces': 0, 'compiles': 0}
  events = {'/jax/core/compile/jaxpr_trace_duration': 'traces',
            '/jax/core/compile/backend_compile_duration': 'compiles'}

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event in events:
      counts[events[event]] += 1
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def reference_path() -> pathlib.Path:
  """`$TILED_LDM_REFERENCE`, else `<repo>/../shared/reference` (where CI has it)."""
  return pathlib.Path(os.environ.get('TILED_LDM_REFERENCE', REPO.parent / 'shared' / 'reference'))


@pytest.fixture(scope='session')
def reference_dir() -> pathlib.Path:
  path = reference_path()
  if not (path / 'README.md').is_file():
    pytest.fail(f'reference data not found at {path}; set TILED_LDM_REFERENCE')
  return path


@pytest.fixture(scope='session')
def converted(reference_dir, tmp_path_factory) -> dict:
  """The reference models converted once per run: {'image_unet', 'mask_unet', 'vae'} ->
  model folder."""
  from tiled_ldm_jax import convert  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp('converted')
  for kind in ('image_unet', 'mask_unet'):
    convert.convert_checkpoint(kind, str(reference_dir / kind / 'model-1.pt'), str(out / kind))
  convert.convert_checkpoint('vae', str(reference_dir / 'vae'), str(out / 'vae'))
  return {k: str(out / k) for k in ('image_unet', 'mask_unet', 'vae')}


@pytest.fixture(scope='session')
def demo_pipeline():
  """The bundled demo models, loaded once per run."""
  import tiled_ldm_jax  # pylint: disable=g-import-not-at-top
  return tiled_ldm_jax.Pipeline.from_pretrained()




_DURATIONS_FILE = os.environ.get('TILED_LDM_DURATIONS_FILE')


def pytest_runtest_logreport(report):
  """With TILED_LDM_DURATIONS_FILE set, one line per finished test phase (seconds, phase,
  outcome, test id) appended as it happens: where the suite's time goes, readable while
  it runs (`--durations` prints only at the end)."""
  if _DURATIONS_FILE and report.duration >= 0.5:
    with open(_DURATIONS_FILE, 'a') as f:
      f.write(f'{report.duration:8.1f} {report.when:8} {report.outcome:7} {report.nodeid}\n')
