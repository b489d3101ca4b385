"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in Flax linen, NHWC.

Module and parameter names mirror the diffusers state dict (see `convert.torch_key`),
e.g. `decoder/up_blocks_0/resnets_1/conv1/kernel` <- `decoder.up_blocks.0.resnets.1.conv1.weight`.

Numerics follow diffusers: GroupNorm eps 1e-6 everywhere, SiLU, ResnetBlock2D without a
time embedding (output scale 1), a single-head self-attention in each mid block
(scale 1/sqrt(C), residual, rescale 1), zero pad right/bottom before each stride-2 conv
of the encoder, nearest x2 + 3x3 conv in the decoder. Convs and matmuls run in
`config.dtype`; GroupNorm and the attention softmax always in float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tiled_ldm_jax.models.configs import VAEConfig

Array = jax.Array

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


class GroupNorm32(nn.GroupNorm):
  """nn.GroupNorm that upcasts its input: statistics, affine and output all in float32."""

  def __call__(self, x: Array, *args, **kwargs) -> Array:
    return super().__call__(x.astype(jnp.float32), *args, **kwargs)


class _Ctx(nn.Module):
  """Base: dtype helpers shared by every block (not a layer of its own)."""
  config: VAEConfig

  def conv(self, features: int, kernel: int, name: str, *, stride: int = 1,
           padding: Any = 'SAME') -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=self.config.compute_dtype, param_dtype=self.config.params_dtype,
                   name=name)

  def norm(self, name: str) -> nn.GroupNorm:
    # float32 statistics and output; two-pass variance as torch computes it.
    return GroupNorm32(num_groups=self.config.norm_num_groups, epsilon=1e-6,
                        dtype=jnp.float32, param_dtype=self.config.params_dtype,
                        use_fast_variance=False, name=name)

  def dense(self, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=self.config.compute_dtype,
                    param_dtype=self.config.params_dtype, name=name)


class ResnetBlock(_Ctx):
  """diffusers ResnetBlock2D with temb=None: x + conv2(silu(gn2(conv1(silu(gn1(x))))))."""
  out_channels: int = 0

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [B, H, W, Cin] -> [B, H, W, Cout]
    dt = self.config.compute_dtype
    h = nn.silu(self.norm('norm1')(x))                            # [B, H, W, Cin] f32
    h = self.conv(self.out_channels, 3, 'conv1')(h)               # [B, H, W, Cout]
    h = nn.silu(self.norm('norm2')(h))                            # [B, H, W, Cout] f32
    h = self.conv(self.out_channels, 3, 'conv2')(h)               # [B, H, W, Cout]
    if x.shape[-1] != self.out_channels:
      x = self.conv(self.out_channels, 1, 'conv_shortcut', padding='VALID')(x)
    return (x.astype(dt) + h).astype(dt)                          # [B, H, W, Cout]


class Attention(_Ctx):
  """The mid block's self-attention: one head of width C over all H*W positions."""

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [B, H, W, C] -> [B, H, W, C]
    b, hgt, wid, c = x.shape
    dt = self.config.compute_dtype
    h = self.norm('group_norm')(x).reshape(b, hgt * wid, c)       # [B, N, C] f32
    q = self.dense(c, 'to_q')(h)                                  # [B, N, C]
    k = self.dense(c, 'to_k')(h)                                  # [B, N, C]
    v = self.dense(c, 'to_v')(h)                                  # [B, N, C]
    logits = jnp.einsum('bqc,bkc->bqk', q, k,
                        preferred_element_type=jnp.float32)       # [B, N, N] f32
    probs = jax.nn.softmax(logits * (c ** -0.5), axis=-1)         # [B, N, N] f32
    out = jnp.einsum('bqk,bkc->bqc', probs.astype(dt), v)         # [B, N, C]
    out = self.dense(c, 'to_out_0')(out)                          # [B, N, C]
    return (out.reshape(b, hgt, wid, c) + x.astype(dt)).astype(dt)  # [B, H, W, C]


class MidBlock(_Ctx):
  """UNetMidBlock2D without time embedding: resnet, attention, resnet at constant width."""

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [B, H, W, C] -> [B, H, W, C]
    c = x.shape[-1]
    x = ResnetBlock(self.config, c, name='resnets_0')(x)
    x = Attention(self.config, name='attentions_0')(x)
    return ResnetBlock(self.config, c, name='resnets_1')(x)


class Downsample(_Ctx):
  """Downsample2D(padding=0): zero pad one row/column at the bottom/right, 3x3 stride 2."""

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [B, H, W, C] -> [B, H/2, W/2, C]
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))              # [B, H+1, W+1, C]
    return self.conv(x.shape[-1], 3, 'conv', stride=2, padding='VALID')(x)


class Upsample(_Ctx):
  """Upsample2D(use_conv=True): nearest-neighbour x2, then 3x3 conv."""

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [B, H, W, C] -> [B, 2H, 2W, C]
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)           # [B, 2H, 2W, C]
    return self.conv(x.shape[-1], 3, 'conv')(x)


class DownEncoderBlock(_Ctx):
  """DownEncoderBlock2D: `layers_per_block` resnets, then optionally a Downsample."""
  out_channels: int = 0
  add_downsample: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [B, H, W, Cin] -> [B, H', W', Cout]
    for j in range(self.config.layers_per_block):
      x = ResnetBlock(self.config, self.out_channels, name=f'resnets_{j}')(x)
    if self.add_downsample:
      x = Downsample(self.config, name='downsamplers_0')(x)
    return x


class UpDecoderBlock(_Ctx):
  """UpDecoderBlock2D: `layers_per_block + 1` resnets, then optionally an Upsample."""
  out_channels: int = 0
  add_upsample: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [B, H, W, Cin] -> [B, H', W', Cout]
    for j in range(self.config.layers_per_block + 1):
      x = ResnetBlock(self.config, self.out_channels, name=f'resnets_{j}')(x)
    if self.add_upsample:
      x = Upsample(self.config, name='upsamplers_0')(x)
    return x


class Encoder(_Ctx):
  """Image [B, H, W, in_channels] -> moments [B, H/f, W/f, 2*latent_channels] (pre quant_conv)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    widths = cfg.block_out_channels
    x = self.conv(widths[0], 3, 'conv_in')(x.astype(cfg.compute_dtype))  # [B, H, W, C0]
    for i, width in enumerate(widths):
      x = DownEncoderBlock(cfg, width, add_downsample=i < len(widths) - 1,
                           name=f'down_blocks_{i}')(x)            # [B, H/2^i', W/2^i', Ci]
    x = MidBlock(cfg, name='mid_block')(x)                        # [B, h, w, C-1]
    x = nn.silu(self.norm('conv_norm_out')(x))                    # [B, h, w, C-1] f32
    return self.conv(2 * cfg.latent_channels, 3, 'conv_out')(x)   # [B, h, w, 2L]


class Decoder(_Ctx):
  """Latent [B, h, w, latent_channels] (post quant conv) -> image [B, h*f, w*f, out_channels]."""

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg = self.config
    widths = tuple(reversed(cfg.block_out_channels))
    x = self.conv(widths[0], 3, 'conv_in')(z.astype(cfg.compute_dtype))  # [B, h, w, C-1]
    x = MidBlock(cfg, name='mid_block')(x)                        # [B, h, w, C-1]
    for i, width in enumerate(widths):
      x = UpDecoderBlock(cfg, width, add_upsample=i < len(widths) - 1,
                         name=f'up_blocks_{i}')(x)                # [B, h*2^i', w*2^i', Ci]
    x = nn.silu(self.norm('conv_norm_out')(x))                    # [B, H, W, C0] f32
    return self.conv(cfg.out_channels, 3, 'conv_out')(x)          # [B, H, W, out]


class AutoencoderKL(nn.Module):
  """diffusers AutoencoderKL: `encode` image -> (mean, logvar), `decode` latent -> image."""
  config: VAEConfig

  def setup(self):
    cfg = self.config
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, padding='VALID')
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), **kw)
    self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), **kw)

  def encode(self, x: Array) -> tuple[Array, Array]:
    """x [B, H, W, in] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent].

    logvar is clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
    H and W must be multiples of `config.downsample_factor`.
    """
    moments = self.quant_conv(self.encoder(x))                    # [B, h, w, 2L]
    mean, logvar = jnp.split(moments, 2, axis=-1)                 # [B, h, w, L] each
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: Array) -> Array:
    """z [B, h, w, latent] raw VAE latent (not scaled) -> image [B, h*f, w*f, out], unclipped."""
    z = self.post_quant_conv(z.astype(self.config.compute_dtype))  # [B, h, w, L]
    return self.decoder(z)                                        # [B, H, W, out]

  def __call__(self, x: Array) -> Array:
    """Encode then decode the mean (used to create every parameter at init)."""
    mean, _ = self.encode(x)
    return self.decode(mean)


def _init_input(config: VAEConfig) -> Array:
  side = config.downsample_factor
  return jnp.zeros((1, side, side, config.in_channels), jnp.float32)


@functools.cache
def abstract_params(config: VAEConfig) -> Any:
  """The param tree of `AutoencoderKL(config)` as `jax.ShapeDtypeStruct` leaves (traced
  once per config; treat as read-only)."""
  model = AutoencoderKL(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _init_input(config)))
  return shapes['params']


def init_params(config: VAEConfig, rng: Array) -> Any:
  """Freshly initialised params (Flax default initialisers; for tests and training)."""
  model = AutoencoderKL(config)
  return jax.jit(lambda r: model.init(r, _init_input(config)))(rng)['params']


@functools.cache
def decode_fn(config: VAEConfig) -> Callable[[Any, Array], Array]:
  """Pure `(params, z [B, h, w, latent]) -> image [B, H, W, out]` (jit-able; one function
  per config, so compiled programs are shared by equal configs)."""
  model = AutoencoderKL(config)

  def decode(params, z):
    return model.apply({'params': params}, z, method=AutoencoderKL.decode)
  return decode


@functools.cache
def encode_fn(config: VAEConfig) -> Callable[[Any, Array], tuple[Array, Array]]:
  """Pure `(params, x [B, H, W, in]) -> (mean, logvar)` (jit-able; one per config)."""
  model = AutoencoderKL(config)

  def encode(params, x):
    return model.apply({'params': params}, x, method=AutoencoderKL.encode)
  return encode
