"""Schedule, time pairs, the DDIM step and multi-label guidance against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiled_ldm_jax import convert
from tiled_ldm_jax.sampling import diffusion
from tiled_ldm_jax.models import unet


def test_schedule_matches_reference(reference_dir):
  d = np.load(reference_dir / 'image_unet' / 'cases.npz')
  np.testing.assert_allclose(diffusion.Schedule().alphas_cumprod, d['alphas_cumprod'],
                             rtol=0, atol=1e-7)


def test_time_pairs():
  p = diffusion.time_pairs(250)
  assert p.shape == (250, 2)
  assert tuple(p[0]) == (999, 995) and tuple(p[-1]) == (3, -1)
  assert (p[1:, 0] == p[:-1, 1]).all()
  # Truncation toward zero like torch's .int(): S=1000 has a pair (1, 0) then (0, -1).
  p = diffusion.time_pairs(1000)
  assert tuple(p[-2]) == (1, 0) and tuple(p[-1]) == (0, -1)
  assert tuple(diffusion.time_pairs(1)[0]) == (999, -1)
  for bad in (0, 1001, -3):
    with pytest.raises(ValueError, match='sampling steps'):
      diffusion.time_pairs(bad)


def test_last_step_returns_x0():
  sched = diffusion.Schedule()
  x = jnp.full((1, 2, 2, 1), 0.3)
  eps = jnp.full_like(x, 0.1)
  t, tn = jnp.array([3]), jnp.array([-1])
  out = diffusion.ddim_step(sched, x, eps, t, tn, jnp.ones_like(x) * 5, eta=1.0)
  x0 = np.clip(sched.sqrt_recip[3] * 0.3 - sched.sqrt_recipm1[3] * 0.1, -1, 1)
  np.testing.assert_allclose(out, x0, rtol=1e-6)


@pytest.fixture(scope='module')
def image_model(reference_dir):
  sd = convert.read_diffinfinite_checkpoint(str(reference_dir / 'image_unet' / 'model-1.pt'))
  cfg = convert.read_json(str(reference_dir / 'image_unet' / 'config.json'))
  return convert.convert_unet('image', sd, cfg)


@pytest.mark.parametrize('key,t,t_next,w', [('ddim_499_495_cfg4', 499, 495, 3.0),
                                            ('ddim_999_995_cfg4', 999, 995, 3.0),
                                            ('ddim_499_495_cfg1', 499, 495, 0.0)])
def test_ddim_multilabel_parity(reference_dir, image_model, key, t, t_next, w):
  config, params = image_model
  d = np.load(reference_dir / 'image_unet' / 'cases.npz')
  x = jnp.asarray(d['x'].transpose(0, 2, 3, 1))
  noise = jnp.asarray(d['noise'].transpose(0, 2, 3, 1))
  labels = jnp.asarray(d['masks'][:, 0], jnp.int32)
  sched = diffusion.Schedule()

  @jax.jit
  def step(params, x, labels, noise):
    tt, tn = jnp.full((4,), t), jnp.full((4,), t_next)
    eps, evals = diffusion.multilabel_eps(unet.eps_fn(config), params, x, tt, labels,
                                          num_classes=config.num_classes, w=w)
    return diffusion.ddim_step(sched, x, eps, tt, tn, noise), evals

  out, evals = step(params, x, labels, noise)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), d[key], atol=1e-4, rtol=0)
  # Packed passes: per patch one per label present, plus the unconditional one (w != 0,
  # or label 0 present), in chunks of pack_chunk(4) samples.
  lab = np.asarray(labels)
  wanted = sum(len(set(np.unique(p)) - {0}) + (w != 0 or (p == 0).any()) for p in lab)
  chunk = diffusion.pack_chunk(4)
  assert int(evals) == -(-wanted // chunk) * chunk <= 5 * 4


def _counting_eps(calls):
  def eps_fn(params, x, t, cond):
    calls.append(np.asarray(cond).copy())
    return x * 0 + cond[..., None].astype(jnp.float32)
  return eps_fn


def test_multilabel_passes_and_combination():
  """L+1 passes: null once, one conditional pass per label; label 0 gets the null output."""
  labels = np.zeros((2, 4, 4), np.int32)
  labels[0, :2] = 2
  labels[0, 2:] = 3
  labels[1] = 1
  labels[1, 0, 0] = 0
  x = jnp.zeros((2, 4, 4, 1))
  calls = []
  with jax.disable_jit():
    eps, evals = diffusion.multilabel_eps(_counting_eps(calls), None, x, jnp.zeros(2), jnp.asarray(labels),
                                          num_classes=5, w=2.0, chunk=1)
  # Packed pairs: image 0 null, 2, 3; image 1 null, 1 = 5 samples (chunks of 1: B = 2).
  assert len(calls) == 5 and int(evals) == 5
  assert not calls[0][0].any()          # the first pair is image 0's unconditional pass
  # cond_l = l on its pixels, null = 0: guided = (1 + w) * l; label 0 -> null = 0.
  np.testing.assert_allclose(np.asarray(eps)[..., 0], 3.0 * labels)

  calls.clear()
  with jax.disable_jit():  # w = 0 and no label 0: no unconditional pass at all.
    _, evals = diffusion.multilabel_eps(_counting_eps(calls), None, x, jnp.zeros(2),
                                        jnp.asarray(np.maximum(labels, 1)), num_classes=5, w=0.0,
                                        chunk=1)
  # No null pass: pairs (0, 2), (0, 3), (1, 1).
  assert len(calls) == 3 and int(evals) == 3 and all(c.any() for c in calls)


def multilabel_eps_by_slot(eps_fn, params, x, t, labels, *, num_classes: int, w: float):
  """`multilabel_eps` unpacked: batched passes over label slots (B samples each), as
  many as the patch with most labels needs (the form before packing; kept as its check).

  Every pixel with label l > 0 takes `diffusion.guide(null, cond_l, w)` where cond_l is the model
  run with mask `(labels == l) * l`; label-0 pixels take the unconditional output. The
  unconditional pass (all-zero mask) runs once for all labels, and is skipped when
  w == 0 and no pixel has label 0. Conditional passes loop over the k-th present
  non-zero label of each patch, as many times as the patch with most labels needs.

  Args:
    labels: [B, h, w] int label ids at the latent resolution of x.
  Returns:
    (eps [B, h, w, C], number of samples evaluated by the U-Net).
  """
  b = x.shape[0]
  ids = jnp.arange(1, num_classes, dtype=labels.dtype)                     # [L]
  present = (labels.reshape(b, -1, 1) == ids).any(axis=1)                  # [B, L]
  # Present labels of each patch first, in increasing order; absent slots hold 0.
  order = jnp.sort(jnp.where(present, ids, num_classes), axis=1)
  order = jnp.where(order == num_classes, 0, order)
  n_passes = present.sum(axis=1).max()

  need_null = w != 0.0
  # Pass 0 is the unconditional one (all-zero mask), run when guidance needs it or a
  # pixel has label 0; pass k >= 1 conditions on the (k-1)-th present label. One loop
  # body holds the only U-Net call, so the network is traced, lowered and compiled
  # once per program (not once for the null pass and once for the labels).
  first = jnp.where(need_null | (labels == 0).any(), 0, 1).astype(jnp.int32)

  def body(carry):
    k, out, null, evals = carry
    lab = jnp.where(k == 0, 0, order[:, jnp.maximum(k - 1, 0)]).astype(labels.dtype)  # [B]
    sel = labels == lab[:, None, None]                                     # [B, h, w]
    eps = eps_fn(params, x, t, jnp.where(sel, labels, 0)).astype(jnp.float32)
    null = jnp.where(k == 0, eps, null)
    value = eps if not need_null else jnp.where(k == 0, eps, diffusion.guide(null, eps, w))
    write = jnp.where(k == 0, labels == 0, sel & (lab[:, None, None] > 0))
    out = jnp.where(write[..., None], value, out)
    return k + 1, out, null, evals + b

  zeros = jnp.zeros(x.shape, jnp.float32)
  _, out, _, evals = jax.lax.while_loop(lambda c: c[0] <= n_passes, body,
                                        (first, zeros, zeros, jnp.int32(0)))
  return out, evals


@pytest.mark.parametrize('w,chunk,classes', [(2.0, None, 5), (0.0, None, 5), (3.0, 3, 4),
                                             (1.0, 1, 6), (2.0, 7, 3)])
def test_packed_passes_equal_the_unpacked_step(w, chunk, classes):
  """Packing changes which samples share a U-Net call, not what each pixel gets."""
  rng = np.random.RandomState(classes)
  b, h = 5, 8
  labels = rng.randint(0, classes, (b, h, h))
  labels[1] = 2                                   # one label only
  labels[2] = np.maximum(labels[2], 1)            # no label 0
  labels[3] = 0                                   # only label 0 (e.g. an idle slot)
  x = jnp.asarray(rng.randn(b, h, h, 3).astype(np.float32))
  t = jnp.asarray(rng.randint(0, 1000, b))
  mix = jnp.asarray(rng.randn(3, 3).astype(np.float32))

  def eps_fn(params, x, t, cond):                 # nonlinear in x, t and the mask
    return jnp.tanh(x @ params + 1e-3 * t[:, None, None, None] + 0.3 * cond[..., None])
  packed, n_packed = jax.jit(lambda x: diffusion.multilabel_eps(
      eps_fn, mix, x, t, jnp.asarray(labels), num_classes=classes, w=w, chunk=chunk))(x)
  ref, n_ref = jax.jit(lambda x: multilabel_eps_by_slot(
      eps_fn, mix, x, t, jnp.asarray(labels), num_classes=classes, w=w))(x)
  np.testing.assert_allclose(np.asarray(packed), np.asarray(ref), atol=1e-6, rtol=0)
  assert int(n_packed) < int(n_ref)


def test_idle_patches_cost_no_samples():
  """`valid=False` patches (the sampler's idle slots) run no pass; the others are unchanged."""
  rng = np.random.RandomState(0)
  b, h, classes = 6, 8, 4
  labels = jnp.asarray(rng.randint(0, classes, (b, h, h)))
  x = jnp.asarray(rng.randn(b, h, h, 3).astype(np.float32))
  t = jnp.asarray(rng.randint(0, 1000, b))
  valid = jnp.asarray([True, False, True, False, False, True])

  def eps_fn(params, x, t, cond):
    return jnp.tanh(x + 1e-3 * t[:, None, None, None] + 0.3 * cond[..., None])
  run = lambda v, c: jax.jit(lambda x: diffusion.multilabel_eps(
      eps_fn, None, x, t, labels, num_classes=classes, w=2.0, chunk=c, valid=v))(x)
  full, n_full = run(None, 1)
  part, n_part = run(valid, 1)
  keep = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(part)[keep], np.asarray(full)[keep], atol=1e-6, rtol=0)
  assert not np.asarray(part)[~keep].any()
  # chunks of 1: the samples are exactly the wanted pairs of the valid patches.
  lab = np.asarray(labels)
  wanted = [len(set(np.unique(p)) - {0}) + 1 for p in lab]
  assert int(n_full) == sum(wanted)
  assert int(n_part) == sum(n for n, k in zip(wanted, keep) if k)
