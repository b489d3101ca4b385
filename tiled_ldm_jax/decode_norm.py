"""Shared GroupNorm statistics for tiled decoding (`blend_mode='shared'`).

A VAE decoder normalises with GroupNorm: each call divides by the mean and variance of
its input over the whole image. Decoded tile by tile, every tile normalises with its own
statistics, so neighbouring tiles differ in tone (the "tile-to-tile tone variation"
of tiled VAEs). Here every GroupNorm of the decoder is given one set of statistics for
the whole image instead:

- `measure`: the decoder on a batch of sample tiles, each GroupNorm normalising with the
  statistics pooled over the batch (all tiles together, as one image made of them) and
  returning them; so every layer's statistics are those of inputs that the earlier
  layers produced with pooled statistics too, as in a whole-image decode.
- `fixed`: the decoder with those statistics in every GroupNorm; with them the decoder
  is a function of the latent's neighbourhood only (up to its mid-block attention,
  which sees one tile), so tiles agree with each other and with the whole-image decode
  except near their borders, which the overlap cross-fade hides.

Both work on any Flax decoder by intercepting its `nn.GroupNorm` calls
(`flax.linen.intercept_methods`), in call order; a decoder with no GroupNorm is left as
it is (the statistics are then empty). Statistics are float32 `(mean, var)` pairs of
shape [groups], one per GroupNorm call.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Stats = tuple[tuple[Array, Array], ...]


def _groups(module: nn.GroupNorm, channels: int) -> int:
  if module.num_groups is not None:
    return module.num_groups
  return channels // module.group_size


def _pooled(module: nn.GroupNorm, x: Array) -> tuple[Array, Array]:
  """Mean and (two-pass) variance per group over batch, space and the group's channels."""
  g = _groups(module, x.shape[-1])
  xg = x.reshape(x.shape[:-1] + (g, x.shape[-1] // g))             # [B, H, W, G, C/G]
  axes = tuple(a for a in range(xg.ndim) if a != xg.ndim - 2)
  mean = xg.mean(axis=axes)                                       # [G]
  var = jnp.square(xg - mean[:, None]).mean(axis=axes)            # [G]
  return mean, var


def _normalise(module: nn.GroupNorm, x: Array, mean: Array, var: Array) -> Array:
  """What `module` computes on x, with the given statistics instead of x's own."""
  c = x.shape[-1]
  g = mean.shape[0]
  scale = jax.lax.rsqrt(var + module.epsilon)                     # [G]
  y = (x - jnp.repeat(mean, c // g)) * jnp.repeat(scale, c // g)  # [..., C]
  if module.use_scale:
    y = y * module.get_variable('params', 'scale').astype(jnp.float32)
  if module.use_bias:
    y = y + module.get_variable('params', 'bias').astype(jnp.float32)
  return y.astype(module.dtype or x.dtype)


def _is_norm(context) -> bool:
  return isinstance(context.module, nn.GroupNorm) and context.method_name == '__call__'


def measure(decode: Callable[[Any, Array], Array], params, z: Array) -> Stats:
  """GroupNorm statistics of `decode(params, z)` with every norm pooled over the batch
  (trace-time interception: call it inside `jax.jit` or eagerly)."""
  stats = []

  def interceptor(next_fun, args, kwargs, context):
    if not _is_norm(context):
      return next_fun(*args, **kwargs)
    x = args[0].astype(jnp.float32)
    mean, var = _pooled(context.module, x)
    stats.append((mean, var))
    return _normalise(context.module, x, mean, var)

  with nn.intercept_methods(interceptor):
    decode(params, z)
  return tuple(stats)


@functools.cache
def fixed(decode: Callable[[Any, Array], Array]) -> Callable[[Any, Array], Array]:
  """`(params_and_stats, z) -> image`: `decode` with `params_and_stats = (params, stats)`
  (from `measure`) in its GroupNorms, call by call. One function per decoder, so jitted
  programs that take it as a static argument are shared."""

  def normed(params_and_stats, z):
    params, stats = params_and_stats
    calls = iter(stats)

    def interceptor(next_fun, args, kwargs, context):
      if not _is_norm(context):
        return next_fun(*args, **kwargs)
      mean, var = next(calls)
      return _normalise(context.module, args[0].astype(jnp.float32), mean, var)

    with nn.intercept_methods(interceptor):
      return decode(params, z)
  return normed


def combine(parts: list[Stats], weights: list[float]) -> Stats:
  """Statistics of several sample batches as one: weighted means of mean and of
  var + mean^2 (the second moment), var = E[x^2] - mean^2 per norm call."""
  total = float(sum(weights))
  out = []
  for calls in zip(*parts):
    mean = sum(w * m for w, (m, _) in zip(weights, calls)) / total
    second = sum(w * (v + m * m) for w, (m, v) in zip(weights, calls)) / total
    out.append((mean, jnp.maximum(second - mean * mean, 0.0)))
  return tuple(out)
