"""The optimizer, the EMA, the train state and the jitted train step.

Optimisation: Adam(b1, b2) on a one-cycle cosine learning rate, gradients clipped at
global norm `grad_clip`; an EMA of the params, `ema <- decay*ema + (1-decay)*params` on
every `ema_every`-th step (a copy of the params before step `ema_warmup`). The train
step is one jitted function with the `TrainState` donated; its randomness comes from the
key in the state, so a restored state continues bitwise as the uninterrupted run.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tiled_ldm_jax.models import unet as unet_lib
from tiled_ldm_jax.models import vae as vae_lib
from tiled_ldm_jax.training import parallel
from tiled_ldm_jax.training.config import TrainConfig, canonical
from tiled_ldm_jax.training.tasks import Task

# PRNG of init and training steps. 'rbg' (XLA RngBitGenerator) draws compile several
# times faster on CPU than the default threefry, whose unrolled rounds dominate the
# compile time of small models; its keys split and fold with threefry as usual.
RNG_IMPL = 'rbg'


def rng_key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl=RNG_IMPL)


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 [] optimizer steps taken
  params: Any              # the trained params
  ema_params: Any          # their exponential moving average (what is exported)
  opt_state: Any           # optax state
  rng: jax.Array           # uint32 key data (`RNG_IMPL`); split once per step


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  schedule = optax.cosine_onecycle_schedule(
      transition_steps=cfg.steps, peak_value=cfg.lr, pct_start=cfg.warmup_frac,
      div_factor=cfg.lr_div_factor, final_div_factor=cfg.lr_final_div_factor)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adam(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2))


def ema_update(ema, params, step, *, decay: float, every: int, warmup: int = 0):
  """EMA after optimizer step `step` (1-based): before `warmup` a copy of `params`; then on
  steps that are multiples of `every`, `decay * ema + (1 - decay) * params`; else unchanged."""
  step = jnp.asarray(step)
  copy = step < warmup
  update = (step % every) == 0

  def leaf(e, p):
    mixed = decay * e + (1.0 - decay) * p
    return jnp.where(copy, p, jnp.where(update, mixed, e)).astype(e.dtype)
  return jax.tree_util.tree_map(leaf, ema, params)


def make_train_step(loss_fn, tx: optax.GradientTransformation, cfg: TrainConfig,
                    shardings=None):
  """`(state, frozen, batch) -> (state, metrics)`, jitted, the state donated.

  shardings: None, or (state shardings, batch sharding, replicated sharding): the state
  keeps its sharding across steps, the batch is split, frozen params and metrics are
  replicated (see `parallel`)."""

  def step(state: TrainState, frozen, batch):
    rng, key = jax.random.split(jax.random.wrap_key_data(state.rng, impl=RNG_IMPL))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, frozen, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_step = state.step + 1
    ema = ema_update(state.ema_params, params, new_step, decay=cfg.ema_decay,
                     every=cfg.ema_every, warmup=cfg.ema_warmup)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}
    return TrainState(step=new_step, params=params, ema_params=ema, opt_state=opt_state,
                      rng=jax.random.key_data(rng)), metrics
  if shardings is None:
    return jax.jit(step, donate_argnums=0)
  state_sh, batch_sh, repl = shardings
  return jax.jit(step, donate_argnums=0, in_shardings=(state_sh, repl, batch_sh),
                 out_shardings=(state_sh, repl))


def compiled_step(task: Task, cfg: TrainConfig, mesh=None):
  """The jitted `(state, task.frozen, batch) -> (state, metrics)` of this run (state
  donated); on `mesh` (a `parallel.make_mesh`) data-parallel, else on the default device."""
  return _cached_step(task.loss, task.kind, task.model_config, canonical(cfg), mesh)


@functools.lru_cache(maxsize=8)
def _cached_step(loss_fn, kind, model_cfg, cfg: TrainConfig, mesh):
  """One jitted step per (loss, config, mesh): equal runs in a process compile once."""
  shardings = None
  if mesh is not None:
    abstract = _abstract(kind, model_cfg, cfg)
    shardings = (parallel.state_shardings(abstract, mesh, cfg.shard_params),
                 parallel.batch_sharding(mesh), parallel.replicated(mesh))
  return make_train_step(loss_fn, make_optimizer(cfg), cfg, shardings)


def init_state(task: Task, cfg: TrainConfig, mesh=None) -> TrainState:
  """Step 0: fresh params (from `cfg.seed`), EMA = a copy of them, empty optimizer state;
  on `mesh` created directly in the run's shardings (a model need not fit one device)."""
  ccfg = canonical(cfg)
  init = _jit_init_state(task.kind, task.model_config, ccfg)
  if mesh is None:
    params, opt_state, rng = init(np.int32(cfg.seed))
    # The EMA gets buffers of its own (the state is donated; no buffer may appear twice).
    ema = jax.device_put(jax.device_get(params))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                      opt_state=opt_state, rng=rng)
  sh = parallel.state_shardings(_abstract(task.kind, task.model_config, ccfg), mesh,
                                cfg.shard_params)
  params, opt_state, rng = jax.jit(
      init, out_shardings=(sh.params, sh.opt_state, sh.rng))(np.int32(cfg.seed))
  # jnp.copy in its own program: fresh buffers for the EMA (the state is donated).
  ema = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p),
                out_shardings=sh.ema_params)(params)
  step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=sh.step)()
  return TrainState(step=step, params=params, ema_params=ema, opt_state=opt_state, rng=rng)


def abstract_state(task: Task, cfg: TrainConfig) -> TrainState:
  """The TrainState's shapes and dtypes (no compute): the target of a restore."""
  return _abstract(task.kind, task.model_config, canonical(cfg))


def _abstract(kind: str, model_cfg, cfg: TrainConfig) -> TrainState:
  params, opt_state, rng = jax.eval_shape(_jit_init_state(kind, model_cfg, cfg),
                                          np.int32(cfg.seed))
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                    ema_params=params, opt_state=opt_state, rng=rng)


@functools.lru_cache(maxsize=8)
def _jit_init_state(kind: str, model_cfg, cfg: TrainConfig):
  """One compiled program per config (op-by-op init would compile every shape apart)."""
  lib = vae_lib if kind == 'vae' else unet_lib
  tx = make_optimizer(cfg)

  def init(seed):
    k_init, k_state = jax.random.split(jax.random.key(seed, impl=RNG_IMPL))
    params = lib.init_params(model_cfg, k_init)
    return params, tx.init(params), jax.random.key_data(k_state)
  return jax.jit(init)
