"""The DiffInfinite U-Nets: image model (mask cross-attention) and mask model (class-conditioned).

Both share one skeleton (SPEC section 1). Inputs are NHWC; `t` is the diffusion time
index per sample. The conditioning argument differs:
- image model: `cond` is the label mask [B, Hm, Wm] (any resolution that is a multiple of
  the latent's); the class is `max(mask)` per sample;
- mask model: `cond` is the class id [B]; `null` [B] bool swaps the class embedding for
  the learned `null_classes_emb` (the unconditional pass of classifier-free guidance).
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tiled_ldm_jax import program_cache
from tiled_ldm_jax.models import layers
from tiled_ldm_jax.models.configs import UNetConfig


class UNet(nn.Module):
  config: UNetConfig

  def _attn(self, level_attention: bool) -> Callable[..., nn.Module]:
    cfg = self.config
    kw = dict(heads=cfg.heads, dim_head=cfg.dim_head, dtype=cfg.compute_dtype,
              param_dtype=cfg.params_dtype)
    if cfg.kind == 'image':
      return functools.partial(layers.CrossAttention, dense=cfg.dense_cross_attention, **kw)
    return functools.partial(layers.LinearAttention if level_attention else layers.Attention,
                             **kw)

  def _class_embedding(self, cond, null):
    cfg = self.config
    if cfg.kind == 'image':
      classes = cond.reshape(cond.shape[0], -1).max(axis=1).astype(jnp.int32)
    else:
      classes = cond.astype(jnp.int32)
    emb = nn.Embed(cfg.num_classes, cfg.dim, param_dtype=cfg.params_dtype,
                   name='classes_emb')(classes)                             # [B, dim]
    if cfg.kind == 'mask':
      null_emb = self.param('null_classes_emb', nn.initializers.normal(1.0), (cfg.dim,),
                            cfg.params_dtype)
      if null is not None:
        emb = jnp.where(null[:, None], null_emb[None, :].astype(emb.dtype), emb)
    return emb

  @nn.compact
  def __call__(self, x, t, cond, null=None):
    """x [B, H, W, channels]; t [B]; cond: mask [B, Hm, Wm] or classes [B] -> eps like x."""
    cfg = self.config
    dt, pdt = cfg.compute_dtype, cfg.params_dtype
    dense = functools.partial(nn.Dense, dtype=dt, param_dtype=pdt)
    gelu = functools.partial(nn.gelu, approximate=False)
    mask = cond if cfg.kind == 'image' else None
    tdim = 4 * cfg.dim

    t_emb = layers.sinusoidal_embedding(t, cfg.dim)
    t_emb = dense(tdim, name='time_mlp_3')(gelu(dense(tdim, name='time_mlp_1')(t_emb)))
    c_emb = self._class_embedding(cond, null)
    c_emb = dense(tdim, name='classes_mlp_2')(gelu(dense(tdim, name='classes_mlp_0')(c_emb)))
    cond_act = nn.silu(jnp.concatenate([t_emb, c_emb], axis=-1))           # [B, 8*dim]

    res = functools.partial(layers.ResnetBlock, groups=cfg.resnet_block_groups, dtype=dt,
                            param_dtype=pdt)
    attn_block = functools.partial(layers.PreNormResidual, param_dtype=pdt)
    conv = functools.partial(layers.conv, dtype=dt, param_dtype=pdt)
    bpl = cfg.block_per_layer
    n_levels = len(cfg.in_out)

    x = conv(cfg.dim, 7, name='init_conv')(x)
    r = x
    skips = []
    for i, (din, dout) in enumerate(cfg.in_out):
      for j in range(bpl):
        x = res(din, name=f'downs_{i}_{j}')(x, cond_act)
        if j < bpl - 1:
          skips.append(x)
      x = attn_block(self._attn(True), name=f'downs_{i}_{bpl}')(x, mask)
      skips.append(x)
      if i < n_levels - 1:
        x = conv(dout, 4, stride=2, padding=1, name=f'downs_{i}_{bpl + 1}')(x)
      else:
        x = conv(dout, 3, name=f'downs_{i}_{bpl + 1}')(x)

    mid = cfg.dims[-1]
    x = res(mid, name='mid_block1')(x, cond_act)
    x = attn_block(self._attn(False), name='mid_attn')(x, mask)
    x = res(mid, name='mid_block2')(x, cond_act)

    for i, (din, dout) in enumerate(reversed(cfg.in_out)):
      for j in range(bpl):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = res(dout, name=f'ups_{i}_{j}')(x, cond_act)
      x = attn_block(self._attn(True), name=f'ups_{i}_{bpl}')(x, mask)
      if i < n_levels - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)                 # nearest x2
        x = conv(din, 3, name=f'ups_{i}_{bpl + 1}_1')(x)
      else:
        x = conv(din, 3, name=f'ups_{i}_{bpl + 1}')(x)

    x = jnp.concatenate([x, r], axis=-1)
    x = res(cfg.dim, name='final_res_block')(x, cond_act)
    return conv(cfg.channels, 1, name='final_conv')(x).astype(jnp.float32)


def _example_inputs(config: UNetConfig, batch: int = 1):
  side = 2 * config.downsample_factor
  x = jnp.zeros((batch, side, side, config.channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  if config.kind == 'image':
    return x, t, jnp.zeros((batch, side, side), jnp.int32), None
  return x, t, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool)


def init_params(config: UNetConfig, rng: jax.Array):
  return UNet(config).init(rng, *_example_inputs(config))['params']


@functools.cache
def abstract_params(config: UNetConfig):
  """The param tree as `jax.ShapeDtypeStruct`s (no compute, no memory; traced once per
  config; treat as read-only)."""
  return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


@functools.cache
def eps_fn(config: UNetConfig):
  """Pure `(params, x, t, cond, null=None) -> eps`, ready for `jax.jit`.

  One function per (frozen, hashable) config: jit caches key on the function, so equal
  configs share every compiled program that uses it (a second Pipeline compiles nothing).
  """
  model = UNet(config)

  def apply(params, x, t, cond, null=None):
    return model.apply({'params': params}, x, t, cond, null)
  return program_cache.keyed(apply, 'unet.eps_fn', repr(config))


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
