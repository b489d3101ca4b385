"""Building blocks of the DiffInfinite U-Nets (NHWC).

Module and parameter names mirror the PyTorch keys (see `tiled_ldm_jax.convert`):
`block1.proj`, `block1.norm`, `mlp.1`, `fn.norm.g`, `fn.fn.to_q`, ...
Norms and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
F32 = jnp.float32


def conv(features: int, kernel: int, *, name: str, stride: int = 1, padding: int | None = None,
         use_bias: bool = True, dtype: Dtype = F32, param_dtype: Dtype = F32) -> nn.Conv:
  """PyTorch-style Conv2d (symmetric zero padding, default `kernel // 2`)."""
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                 param_dtype=param_dtype, name=name)


class WSConv(nn.Module):
  """3x3 conv whose kernel is standardized per output channel at every call.

  Mean and biased variance over (kh, kw, in), eps 1e-5, computed in float32.
  """
  features: int
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x):  # [B, H, W, Cin] -> [B, H, W, Cout]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
    k = kernel.astype(F32)
    mean = k.mean(axis=(0, 1, 2), keepdims=True)
    var = k.var(axis=(0, 1, 2), keepdims=True)
    k = ((k - mean) * jax.lax.rsqrt(var + 1e-5)).astype(self.dtype)
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), k, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias.astype(self.dtype)


def group_norm(groups: int, eps: float, name: str, param_dtype: Dtype = F32):
  """GroupNorm computed in float32 (the caller casts back)."""
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=F32, param_dtype=param_dtype,
                      name=name)


class ChannelLayerNorm(nn.Module):
  """`(x - mean_c) * rsqrt(var_c + 1e-5) * g` over channels; no bias. Param `g` [C]."""
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C]
    g = self.param('g', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    dtype = x.dtype
    x = x.astype(F32)
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + 1e-5) * g.astype(F32)).astype(dtype)


class Block(nn.Module):
  """WSConv -> GroupNorm(eps 1e-5) -> optional FiLM `h*(scale+1)+shift` -> SiLU."""
  features: int
  groups: int
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x, scale_shift=None):
    x = WSConv(self.features, self.dtype, self.param_dtype, name='proj')(x)
    x = group_norm(self.groups, 1e-5, 'norm', self.param_dtype)(x.astype(F32))
    if scale_shift is not None:
      scale, shift = scale_shift
      x = x * (scale.astype(F32) + 1) + shift.astype(F32)
    return nn.silu(x).astype(self.dtype)  # Dropout(0.05) is the identity at inference.


class ResnetBlock(nn.Module):
  """Two Blocks, FiLM from `silu(cat(t_emb, c_emb))` on the first, 1x1 residual conv."""
  features: int
  groups: int
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x, cond_act):
    """x [B, H, W, Cin]; cond_act [B, 8*dim] = silu(cat(t_emb, c_emb))."""
    ss = nn.Dense(2 * self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                  name='mlp_1')(cond_act)[:, None, None, :]
    scale, shift = jnp.split(ss, 2, axis=-1)
    kw = dict(groups=self.groups, dtype=self.dtype, param_dtype=self.param_dtype)
    h = Block(self.features, name='block1', **kw)(x, (scale, shift))
    h = Block(self.features, name='block2', **kw)(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, name='res_conv', dtype=self.dtype,
               param_dtype=self.param_dtype)(x)
    return h + x.astype(self.dtype)


def sinusoidal_embedding(t, dim: int):
  """[B] -> [B, dim]: `cat(sin(t f), cos(t f))`, `f = exp(-log(1e4)/(half-1) * arange(half))`."""
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=F32) * -(math.log(10000.0) / (half - 1)))
  e = t.astype(F32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(e), jnp.cos(e)], axis=-1)


def _heads(x, heads):  # [B, H, W, (h c)] -> [B, h, N, c]
  b, hh, ww, hc = x.shape
  return x.reshape(b, hh * ww, heads, hc // heads).transpose(0, 2, 1, 3)


def _merge_heads(x, shape):  # [B, h, N, c] -> [B, H, W, (h c)]
  b, h, n, c = x.shape
  return x.transpose(0, 2, 1, 3).reshape(shape[0], shape[1], shape[2], h * c)


def pool_mask(mask, hw: tuple[int, int]):
  """Label mask [B, Hm, Wm] -> binary [B, h, w]: max-pool with kernel = stride, then > 0."""
  b, hm, wm = mask.shape
  kh, kw = hm // hw[0], wm // hw[1]
  m = mask[:, :hw[0] * kh, :hw[1] * kw].reshape(b, hw[0], kh, hw[1], kw).max(axis=(2, 4))
  return m > 0


class CrossAttention(nn.Module):
  """The image model's attention: queries from the binary label mask, keys/values from x.

  A query is `m * rowsum(W_q)` with `m` in {0, 1}, so each head has just two distinct
  query vectors. The default exact form computes the two attention results once per
  head (O(N)) and selects per position; `dense=True` runs the original O(N^2) softmax.
  """
  heads: int = 4
  dim_head: int = 32
  dense: bool = False
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x, mask):
    """x [B, H, W, C] (pre-normed), mask [B, Hm, Wm] labels -> [B, H, W, C]."""
    b, h, w, c = x.shape
    hidden = self.heads * self.dim_head
    mk = functools.partial(conv, kernel=1, use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype)
    to_q = mk(hidden, name='to_q')
    kv = mk(2 * hidden, name='to_kv')(x)
    k, v = jnp.split(kv, 2, axis=-1)
    k, v = _heads(k, self.heads), _heads(v, self.heads)               # [B, h, N, d]
    m = pool_mask(mask, (h, w))                                        # [B, H, W]
    scale = self.dim_head ** -0.5
    if self.dense:
      q = to_q(jnp.broadcast_to(m[..., None], (b, h, w, c)).astype(self.dtype))
      q = _heads(q, self.heads) * scale
      sim = jnp.einsum('bhid,bhjd->bhij', q, k).astype(F32)
      attn = jax.nn.softmax(sim, axis=-1).astype(self.dtype)
      out = jnp.einsum('bhij,bhjd->bhid', attn, v)
    else:
      # A 1x1 conv of an all-ones pixel is rowsum(W_q): the query of every m = 1 position.
      q1 = to_q(jnp.ones((1, 1, 1, c), self.dtype))[0, 0, 0].astype(F32) * scale
      q1 = q1.reshape(self.heads, self.dim_head)
      logits = jnp.einsum('hd,bhjd->bhj', q1, k.astype(F32))
      p = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      out_on = jnp.einsum('bhj,bhjd->bhd', p, v)                       # query m = 1
      out_off = v.mean(axis=2)                                         # query 0: uniform
      sel = m.reshape(b, 1, h * w, 1)
      out = jnp.where(sel, out_on[:, :, None, :], out_off[:, :, None, :])
    out = _merge_heads(out.astype(self.dtype), (b, h, w))
    return conv(c, 1, name='to_out', dtype=self.dtype, param_dtype=self.param_dtype)(out)


class LinearAttention(nn.Module):
  """The mask model's per-level attention (softmax over channels for q, positions for k)."""
  heads: int = 4
  dim_head: int = 32
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x, mask=None):
    del mask  # class-conditioned model: no mask input
    b, h, w, c = x.shape
    hidden = self.heads * self.dim_head
    qkv = conv(3 * hidden, 1, use_bias=False, name='to_qkv', dtype=self.dtype,
               param_dtype=self.param_dtype)(x)
    q, k, v = (_heads(t, self.heads).astype(F32) for t in jnp.split(qkv, 3, axis=-1))
    q = jax.nn.softmax(q, axis=-1) * self.dim_head ** -0.5             # over channels d
    k = jax.nn.softmax(k, axis=2)                                      # over positions n
    v = v / (h * w)
    context = jnp.einsum('bhnd,bhne->bhde', k, v)
    out = jnp.einsum('bhde,bhnd->bhne', context, q).astype(self.dtype)
    out = conv(c, 1, name='to_out_0', dtype=self.dtype, param_dtype=self.param_dtype)(
        _merge_heads(out, (b, h, w)))
    return ChannelLayerNorm(self.param_dtype, name='to_out_1')(out)


class Attention(nn.Module):
  """Full softmax self-attention (the mask model's middle block)."""
  heads: int = 4
  dim_head: int = 32
  dtype: Dtype = F32
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x, mask=None):
    del mask
    b, h, w, c = x.shape
    hidden = self.heads * self.dim_head
    qkv = conv(3 * hidden, 1, use_bias=False, name='to_qkv', dtype=self.dtype,
               param_dtype=self.param_dtype)(x)
    q, k, v = (_heads(t, self.heads) for t in jnp.split(qkv, 3, axis=-1))
    sim = jnp.einsum('bhid,bhjd->bhij', q * self.dim_head ** -0.5, k).astype(F32)
    attn = jax.nn.softmax(sim, axis=-1).astype(self.dtype)
    out = _merge_heads(jnp.einsum('bhij,bhjd->bhid', attn, v), (b, h, w))
    return conv(c, 1, name='to_out', dtype=self.dtype, param_dtype=self.param_dtype)(out)


class _PreNorm(nn.Module):
  attn: Callable[..., nn.Module]
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x, mask):
    return self.attn(name='fn')(ChannelLayerNorm(self.param_dtype, name='norm')(x), mask)


class PreNormResidual(nn.Module):
  """`x + attn(norm(x))`; names `fn.norm.g`, `fn.fn.*` like Residual(PreNorm(attn))."""
  attn: Callable[..., nn.Module]
  param_dtype: Dtype = F32

  @nn.compact
  def __call__(self, x, mask):
    return x + _PreNorm(self.attn, self.param_dtype, name='fn')(x, mask)
