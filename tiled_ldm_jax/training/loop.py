"""The training loop: workdir, resume, the steps, metrics logging, checkpoints, export.

Exact resume: batch `step` is a pure function of (seed, step) (see `data`), the step's
randomness comes from the state's key, and the state (step, params, EMA, optimizer,
key) is checkpointed with orbax every `save_every` steps, the data loader's (grain)
iterator state beside it. A run interrupted and resumed therefore ends with bitwise the
same params as an uninterrupted one.

A workdir holds `train_config.json` (the run's configs; a resume must match it),
`checkpoints/`, `metrics.jsonl` (one JSON line per logged step: `step`, `loss` -- the
mean over the steps since the previous line --, `steps_per_s` and the task's other
metrics of the last step), and at the end `model/` (the EMA params, loaded like a
converted checkpoint) and `export.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from tiled_ldm_jax.files import atomic
from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax import sharding
from tiled_ldm_jax.models import configs as configs_lib
from tiled_ldm_jax.training.export import export
from tiled_ldm_jax.training import loader as loader_lib
from tiled_ldm_jax.training import parallel
from tiled_ldm_jax.training import step as step_lib
from tiled_ldm_jax.training.config import TrainConfig, WorkdirError, load_config
from tiled_ldm_jax.training.tasks import Task, make_task


def train(cfg: TrainConfig, model_cfg, workdir: str, *, resume: bool = False,
          until: int | None = None, devices: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; exports `<workdir>/model` when all steps are done.

  Args:
    cfg, model_cfg: the run (see `load_config`).
    workdir: holds `train_config.json`, `checkpoints/`, `metrics.jsonl` and `model/`.
    resume: continue from the newest checkpoint (without it, existing checkpoints are
      an error, so a run is never silently overwritten).
    until: stop (after a checkpoint) once this many steps are done, without exporting.
    devices: data-parallel over this many devices (None: all JAX sees, every process's
      in a multi-host run); the global batch `cfg.batch_size` is split over them.

  Returns:
    A summary: steps done, last logged loss, steps/s, seconds, export folder (or None).
  """
  loader_lib.require_grain()   # before any work: a missing extra is a one-line error
  workdir = os.path.abspath(workdir)
  mesh = parallel.make_mesh(cfg.batch_size, devices)
  sharding.warm_collectives(mesh)   # while the processes are in step (gloo's set-up)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  task = make_task(cfg, model_cfg)   # reads and checks the data: before the workdir exists
  latest = _prepare_workdir(cfg, model_cfg, workdir, ckpt_dir, resume)
  state = _initial_state(task, cfg, ckpt_dir, latest, mesh)
  start = int(state.step)
  stop = cfg.steps if until is None else min(int(until), cfg.steps)
  n_params = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(state.params))
  logging.info('%s: %d params, steps %d -> %d of %d, batch %d over %d devices, %d px',
               cfg.task, n_params, start, stop, cfg.steps, cfg.batch_size, mesh.devices.size,
               cfg.image_size)
  log = _MetricsLog(os.path.join(workdir, 'metrics.jsonl'), cfg)
  state = _run_steps(task, cfg, state, range(start, stop), log, ckpt_dir, mesh)
  summary = {'task': cfg.task, 'start_step': start, 'steps_done': int(state.step),
             'loss': log.loss, 'steps_per_s': log.rate, 'seconds': log.seconds(),
             'export': None}
  if int(state.step) >= cfg.steps:
    ema = parallel.to_host(state.ema_params)   # collective: every process gathers
    summary['export'] = os.path.join(workdir, 'model')
    if sharding.is_writer():
      export(cfg, model_cfg, task, ema, summary['export'], workdir)
  return summary


def run(config, workdir: str, *, resume: bool = False, until: int | None = None,
        devices: int | None = None) -> dict[str, Any]:
  """The `scripts/train.py` entry point: a config (file path or ConfigDict), train, export."""
  cfg, model_cfg = load_config(config)
  return train(cfg, model_cfg, workdir, resume=resume, until=until, devices=devices)


# ----------------------------------------------------------------------------- workdir


def _prepare_workdir(cfg: TrainConfig, model_cfg, workdir: str, ckpt_dir: str,
                     resume: bool) -> int | None:
  """Creates `workdir`, checks a resume against its `train_config.json` and (re)writes
  that file; returns the newest checkpointed step (None for a fresh run)."""
  os.makedirs(workdir, exist_ok=True)
  record = {'train': dataclasses.asdict(cfg), 'model': configs_lib.config_to_dict(model_cfg)}
  record = json.loads(json.dumps(record))
  cfg_path = os.path.join(workdir, 'train_config.json')
  latest = checkpoint.latest_step(ckpt_dir)
  if latest is not None and not resume:
    raise WorkdirError(f'{workdir} already holds checkpoints (newest step {latest}); '
                       'pass resume=True (--resume) to continue it, or use a new workdir')
  if os.path.exists(cfg_path) and latest is not None:
    _check_resume_config(cfg_path, record)
  if sharding.is_writer():
    atomic.write_json(cfg_path, record)
  return latest


def _flat(record: dict) -> dict[str, Any]:
  return {f'{section}.{k}': v for section, d in record.items() for k, v in d.items()}


def _check_resume_config(path: str, record: dict) -> None:
  with open(path) as f:
    old = _flat(json.load(f))
  new = _flat(record)
  diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  if diff:
    raise WorkdirError(f'{path}: the run was started with a different config; differing: '
                       + ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff))


def _initial_state(task: Task, cfg: TrainConfig, ckpt_dir: str, latest: int | None, mesh):
  """A fresh state, or the one checkpointed at step `latest`, in the run's shardings."""
  if latest is None:
    return step_lib.init_state(task, cfg, mesh)
  abstract = step_lib.abstract_state(task, cfg)
  state = checkpoint.restore_train_state(ckpt_dir, abstract, latest)
  logging.info('resumed from step %d', latest)
  state = jax.tree_util.tree_map(lambda v, s: np.asarray(v, s.dtype), state, abstract)
  return parallel.put(state, parallel.state_shardings(abstract, mesh, cfg.shard_params))


# ----------------------------------------------------------------------------- steps


def _run_steps(task: Task, cfg: TrainConfig, state, steps: range, log: '_MetricsLog',
               ckpt_dir: str, mesh):
  """Runs `steps`, logging and checkpointing. Each process loads only its rows of every
  global batch through grain (`loader`), read ahead by worker threads, and puts them on
  its devices; the loader's iterator state is saved beside each checkpoint."""
  step_fn = step_lib.compiled_step(task, cfg, mesh)
  frozen = parallel.put(task.frozen, jax.tree_util.tree_map(
      lambda _: parallel.replicated(mesh), task.frozen))
  data = loader_lib.Loader(task.example, task.batch_size, cfg.steps)
  parallel.check_process_rows(mesh, task.batch_size, data.rows)
  batches = data.iterator(_loader_state(ckpt_dir, steps.start))
  process = jax.process_index()
  for step in steps:
    batch = parallel.put_local_batch(next(batches), mesh, task.batch_size)
    state, metrics = step_fn(state, frozen, batch)
    done = step + 1
    log.add(done, metrics, last=done == steps.stop)
    if done % cfg.save_every == 0 or done == steps.stop:
      checkpoint.save_train_state(ckpt_dir, done, state, max_to_keep=cfg.keep_checkpoints)
      checkpoint.save_loader_state(ckpt_dir, done, process, batches.get_state())
  return state


def _loader_state(ckpt_dir: str, start: int) -> dict:
  """The loader state saved with checkpoint `start` (a resume), else the state whose next
  batch is step `start` (a fresh run, or a checkpoint written before the loader saved
  its state). A saved state pointing elsewhere is an error, not a silent data shift."""
  expected = loader_lib.Loader.state_at(start)
  if start == 0:
    return expected
  saved = checkpoint.load_loader_state(ckpt_dir, start, jax.process_index())
  if saved is None:
    logging.info('no saved loader state at step %d: positioned by the step', start)
    return expected
  if saved != expected:
    raise WorkdirError(f'{ckpt_dir}/{start}: the saved loader state {saved} does not point '
                       f'at step {start} ({expected})')
  return saved


class _MetricsLog:
  """The loss to the log and `metrics.jsonl`: the first step of a call alone (its time
  is compilation, not throughput), then the mean loss and steps/s of every `log_every`
  steps. Losses are summed on device, so only logged steps wait for the device."""

  def __init__(self, path: str, cfg: TrainConfig):
    self.path, self.cfg = path, cfg
    self.t_start = time.perf_counter()
    self.t_log, self.n, self.loss_sum = None, 0, 0.0
    self.loss, self.rate = None, None

  def seconds(self) -> float:
    return time.perf_counter() - self.t_start

  def add(self, done: int, metrics: dict, last: bool) -> None:
    if self.t_log is None:
      self.loss = float(metrics['loss'])
      logging.info('step %d: loss %.5f (first step, with compilation, %.1f s)', done,
                   self.loss, self.seconds())
      self._append(done, metrics, first_step_s=self.seconds())
      self.t_log = time.perf_counter()
      return
    self.loss_sum = self.loss_sum + metrics['loss']
    self.n += 1
    if done % self.cfg.log_every == 0 or last:
      now = time.perf_counter()
      self.loss, self.rate = float(self.loss_sum) / self.n, self.n / max(now - self.t_log, 1e-9)
      extra = self._append(done, metrics, steps_per_s=self.rate)
      logging.info('step %d/%d: loss %.5f, %.2f steps/s, ETA %.0f s  %s', done,
                   self.cfg.steps, self.loss, self.rate, (self.cfg.steps - done) / self.rate,
                   ' '.join(f'{k} {v:.4g}' for k, v in extra.items()))
      self.t_log, self.n, self.loss_sum = now, 0, 0.0

  def _append(self, done: int, metrics: dict, **timing) -> dict[str, float]:
    """One metrics.jsonl line (process 0 only): step, loss, `timing`, the other metrics."""
    extra = {k: float(v) for k, v in metrics.items() if k != 'loss'}
    if not sharding.is_writer():
      return extra
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': done, 'loss': self.loss, **timing, **extra}) + '\n')
    return extra
