"""Diffusion maths (SPEC section 2): cosine schedule, DDIM time pairs and step, guidance.

Also the two ways a patch's noise estimate is formed:
- `multilabel_eps` (image model): one unconditional pass and one conditional pass per
  non-zero label present, combined per pixel (L+1 passes; the original runs 2L);
- `class_eps` (mask model): class-conditioned, with the learned null class embedding.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_STEPS = 1000
# Flow-matching U-Nets trained here are told t * this (t in [0, 1]), so the sinusoidal
# time embedding sees the range of the diffusion timesteps.
FLOW_TIME_SCALE = 1000.0
OBJECTIVES = ('eps', 'v', 'flow')   # what a U-Net trained by scripts/train.py predicts


def cosine_alphas_cumprod(timesteps: int = NUM_TRAIN_STEPS, s: float = 0.008) -> np.ndarray:
  """[T] float64 alphas_cumprod of the cosine schedule, betas clipped to [0, 0.999]."""
  x = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64)
  ac = np.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
  ac = ac / ac[0]
  betas = np.clip(1 - (ac[1:] / ac[:-1]), 0, 0.999)
  return np.cumprod(1.0 - betas)


class Schedule:
  """Per-time-index tables as float32 (computed in float64 like the original's buffers).

  The cosine schedule of `timesteps` steps, or any `alphas_cumprod` [T] (see
  `processes.noise_schedule` for the linear ones).
  """

  def __init__(self, timesteps: int = NUM_TRAIN_STEPS, alphas_cumprod=None):
    ac = (cosine_alphas_cumprod(timesteps) if alphas_cumprod is None
          else np.asarray(alphas_cumprod, np.float64))
    self.timesteps = len(ac)
    self.alphas_cumprod = ac.astype(np.float32)
    self.sqrt_recip = np.sqrt(1.0 / ac).astype(np.float32)
    self.sqrt_recipm1 = np.sqrt(1.0 / ac - 1).astype(np.float32)
    self.sqrt_ac = np.sqrt(ac).astype(np.float32)             # v and x0 predictions
    self.sqrt_1m_ac = np.sqrt(1.0 - ac).astype(np.float32)


def time_pairs(steps: int, timesteps: int = NUM_TRAIN_STEPS) -> np.ndarray:
  """[S, 2] int32 (t, t_next): `int(linspace(-1, T-1, S+1))` reversed, consecutive pairs.

  Truncation toward zero as `torch.Tensor.int()`; S=250 gives 999->995->...->3->-1.
  """
  if not 1 <= steps <= timesteps:
    raise ValueError(f'sampling steps must be in [1, {timesteps}], got {steps}')
  times = np.trunc(np.linspace(-1, timesteps - 1, steps + 1, dtype=np.float32)).astype(np.int32)
  times = times[::-1]
  return np.stack([times[:-1], times[1:]], axis=1)


PREDICTIONS = ('eps', 'v', 'x0')   # what a diffusion model predicts (see to_x0_eps)


def to_x0_eps(sched: Schedule, x, pred, t_idx, prediction: str = 'eps'):
  """(x0, eps) implied by a model's prediction at time indices t_idx [B] (x_t = sqrt(a) x0
  + sqrt(1-a) eps; v = sqrt(a) eps - sqrt(1-a) x0)."""
  bshape = (-1,) + (1,) * (x.ndim - 1)
  table = lambda a: jnp.asarray(a)[t_idx].reshape(bshape)
  if prediction == 'eps':
    return table(sched.sqrt_recip) * x - table(sched.sqrt_recipm1) * pred, pred
  if prediction == 'x0':
    return pred, (x - table(sched.sqrt_ac) * pred) / table(sched.sqrt_1m_ac)
  if prediction == 'v':
    sa, s1a = table(sched.sqrt_ac), table(sched.sqrt_1m_ac)
    return sa * x - s1a * pred, s1a * x + sa * pred
  raise ValueError(f'prediction must be one of {PREDICTIONS}, got {prediction!r}')


def ddim_step(sched: Schedule, x, eps, t, t_next, noise, eta: float = 1.0, *,
              prediction: str = 'eps', clip: float | None = 1.0):
  """One DDIM step from time index t to t_next (per sample; x, eps, noise [B, ...]).

  `eps` is the model's prediction of type `prediction`, turned into (x0, eps) first; for
  eps models `x0 = clip(sqrt(1/a_t) x - sqrt(1/a_t - 1) eps, -1, 1)` (the original's;
  `clip=None`: no clipping); eps is not re-derived after the clip. Where `t_next <= 0`
  (the original's `time_next > 0` test) the result is x0.
  """
  bshape = (-1,) + (1,) * (x.ndim - 1)
  t_idx = jnp.clip(t, 0, sched.timesteps - 1)
  n_idx = jnp.clip(t_next, 0, sched.timesteps - 1)
  ac = jnp.asarray(sched.alphas_cumprod)
  a_t = ac[t_idx].reshape(bshape)
  a_n = ac[n_idx].reshape(bshape)
  x0, eps = to_x0_eps(sched, x, eps, t_idx, prediction)
  if clip is not None:
    x0 = jnp.clip(x0, -clip, clip)
  sigma = eta * jnp.sqrt((1 - a_t / a_n) * (1 - a_n) / (1 - a_t))
  c = jnp.sqrt(jnp.maximum(1 - a_n - sigma ** 2, 0.0))
  x_next = x0 * jnp.sqrt(a_n) + c * eps + sigma * noise
  return jnp.where(t_next.reshape(bshape) > 0, x_next, x0)


def guide(null, cond, w: float):
  """Classifier-free guidance with the user's weight w: `null + (1+w)(cond - null)`."""
  return null + (1.0 + w) * (cond - null)


# `(params, x [B,h,w,C], t [B], cond, null) -> eps` of a U-Net (see models.unet.eps_fn).
EpsFn = Callable[..., jax.Array]


# Packed guidance: a call's (patch, pass) pairs run in chunks of ceil(B / PACK_DIVISOR)
# samples, so the last chunk's padding is at most a quarter of the batch. Measured
# (benchmark_sampler --count_only, 4096 px, grid, margin 0, all windows of a level per
# call): 2.98 samples per latent pixel-step with chunks of B, 2.26 with B/4, 2.13 with B/8.
# Small batches keep chunks of B (up to PACK_MIN_CHUNK): never more U-Net calls than the
# unpacked step, and no batch-1 calls where the batch was a few images.
PACK_DIVISOR = 4
PACK_MIN_CHUNK = 8


def pack_chunk(batch: int) -> int:
  """Samples per U-Net call of the packed guidance for a batch of `batch` patches."""
  return max(-(-batch // PACK_DIVISOR), min(batch, PACK_MIN_CHUNK))


def multilabel_eps(eps_fn: EpsFn, params, x, t, labels, *, num_classes: int, w: float,
                   chunk: int | None = None, valid=None):
  """Guided noise estimate of the image model for patches holding several labels.

  Every pixel with label l > 0 takes `guide(null, cond_l, w)` where cond_l is the model
  run with mask `(labels == l) * l`; label-0 pixels take the unconditional output
  (SPEC 2). The passes are packed: the (patch, pass) pairs that are needed -- one
  unconditional pass per patch that has label-0 pixels or when w != 0, one conditional
  pass per label present in it -- are run in chunks of `chunk` samples (default
  `pack_chunk(B)`), so a call costs about sum over patches of (labels present + 1)
  samples instead of
  B x (most labels in a patch + 1). Each pixel receives exactly one conditional and one
  unconditional output, so the result equals the unpacked step's (batched passes over
  label slots; `tests/test_diffusion.py` keeps that form as the check).

  Args:
    labels: [B, h, w] int label ids at the latent resolution of x.
    chunk: samples per U-Net call (static; default `pack_chunk(B)`).
    valid: optional [B] bool; patches that are False (the sampler's idle slots) run no
      pass and their output is zeros.
  Returns:
    (eps [B, h, w, C], number of samples evaluated by the U-Net).
  """
  b = x.shape[0]
  c = pack_chunk(b) if chunk is None else int(chunk)
  slots = num_classes                                     # slot 0: null, slot l: label l
  ids = jnp.arange(1, num_classes, dtype=labels.dtype)                     # [L]
  present = (labels.reshape(b, -1, 1) == ids).any(axis=1)                  # [B, L]
  has_zero = (labels == 0).reshape(b, -1).any(axis=1)                      # [B]
  need_null = (jnp.full((b,), w != 0.0) | has_zero)[:, None]               # [B, 1]
  wanted = jnp.concatenate([need_null, present], axis=1)                  # [B, slots]
  if valid is not None:
    wanted = wanted & valid[:, None]
  wanted = wanted.reshape(-1)                                              # [B * slots]
  total = wanted.sum()
  # The wanted pairs first, in (patch, slot) order; one fixed-size gather per chunk.
  order = jnp.argsort(~wanted, stable=True).astype(jnp.int32)
  order = jnp.concatenate([order, jnp.zeros((c,), jnp.int32)])           # room to slice
  n_chunks = (total + c - 1) // c

  def body(carry):
    k, null, cond = carry
    pair = jax.lax.dynamic_slice(order, (k * c,), (c,))                  # [C]
    valid = k * c + jnp.arange(c) < total
    win, lab = pair // slots, (pair % slots).astype(labels.dtype)        # patch, label
    lab_p = labels[win]                                                  # [C, h, w]
    sel = (lab_p == lab[:, None, None]) & (lab[:, None, None] > 0)
    eps = eps_fn(params, x[win], t[win], jnp.where(sel, lab_p, 0)).astype(jnp.float32)
    # Each patch gets one null pass and each pixel one conditional pass: adding to zeros
    # is exact, and unwanted slots go nowhere (index b is dropped).
    to_null = jnp.where(valid & (lab == 0), win, b)
    to_cond = jnp.where(valid & (lab > 0), win, b)
    null = null.at[to_null].add(eps, mode='drop')
    cond = cond.at[to_cond].add(jnp.where(sel[..., None], eps, 0.0), mode='drop')
    return k + 1, null, cond

  zeros = jnp.zeros(x.shape, jnp.float32)
  _, null, cond = jax.lax.while_loop(lambda carry: carry[0] < n_chunks, body,
                                     (jnp.int32(0), zeros, zeros))
  value = guide(null, cond, w) if w != 0.0 else cond
  out = jnp.where((labels == 0)[..., None], null, value)
  if valid is not None:
    out = jnp.where(valid[:, None, None, None], out, 0.0)
  return out, (n_chunks * c).astype(jnp.int32)



def original_pass_count(labels, valid, *, num_classes: int, w: float):
  """U-Net samples the original's `ddim_multimask` runs for these patches (for benchmarks).

  Per patch and label present: two passes (conditional and null) for l > 0 when w != 0,
  else one. labels [B, h, w]; valid [B] bool (idle slots count nothing).
  """
  b = labels.shape[0]
  ids = jnp.arange(num_classes, dtype=labels.dtype)
  present = (labels.reshape(b, -1, 1) == ids).any(axis=1) & valid[:, None]     # [B, L+1]
  per_label = jnp.where(ids > 0, 2 if w != 0.0 else 1, 1)
  return (present * per_label).sum().astype(jnp.int32)


def class_eps(eps_fn: EpsFn, params, x, t, classes, *, w: float):
  """Guided noise estimate of the mask model for class ids [B] (no condition dropout).

  Returns (eps, samples evaluated). With w == 0 only the conditional pass runs; otherwise
  conditional and null passes run as one batch of 2B.
  """
  b = x.shape[0]
  if w == 0.0:
    return eps_fn(params, x, t, classes, jnp.zeros((b,), bool)).astype(jnp.float32), b
  both = eps_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                jnp.concatenate([classes, classes]),
                jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)]))
  cond, null = jnp.split(both.astype(jnp.float32), 2)
  return guide(null, cond, w), 2 * b
