"""Random-patch sampling of latents of any size in one compiled `lax.while_loop` (SPEC 3).

Every latent pixel carries how many DDIM steps it has taken (`times`). An iteration picks,
per image, up to K mutually non-overlapping P x P patches centred (after clamping) on
pixels drawn uniformly among those at the lowest level `min(times)`, runs one DDIM step
at that level on all patches as one batch, and writes the result only into the pixels
that were at the lowest level. Pixels already one step ahead are fed to the model at
their stored lower-level value, so each patch is denoised at one consistent noise level.
Hence `max(times) - min(times) <= 1` always, and every pixel takes exactly S steps.

What a step does is the process's business (`sampling/processes.py`): DDIM on a noise schedule
for eps / v / x0 models (the default: the original's cosine eps model) or Euler for flow
matching, or the process's other solver: DPM-Solver++(2M) gets each written pixel's x0
prediction of its previous level from `x0_prev`, a latent-sized buffer written exactly
where `x` is (so the history is per pixel, on either placement, and saved with the state
for resume); levels index its time grid. The denoiser gets a conditioning pytree per patch:
`Spatial` leaves ([N, h, w, ...], e.g. the label map) cropped to the patch, other leaves
([N, ...]) taken from the patch's image; idle slots get all zeros.

Fixes of the original (SPEC 3): the loop runs until every pixel has taken all S steps
(the final step to x0 included); the lower-level copy starts equal to `x`.

Where the patches go is the placement's business (`sampling/placements.py`, the loop
side of `sampling/windows.py`): an object that owns its carry, its window choice, which
buffer a window reads and which pixels it writes. 'random' (the original's distribution, kept with per-block counts so that an iteration costs
O(K^2 P^2 + (h/P)(w/P)), not O(h w)) or 'grid' (a shifted grid of windows per level,
about one evaluation per pixel and step). Level and termination come from per-image
counters, never from a reduction over the latent.

Randomness: image n uses only `keys[n]`: its initial noise from `fold_in(key, 0)`; random
schedule: for its i-th iteration `fold_in(fold_in(key, 1), i)`, split by `fold_in` per
patch slot; grid: the offset of level L from `fold_in(fold_in(key, 2), L)` and the DDIM
noise of window j from `fold_in(fold_in(fold_in(key, 3), L), j)`; keep-mask resampling
(`resample`) from `fold_in(fold_in(fold_in(key, 5), i or L), slot or j)`. So an image does not
depend on the other images of its batch (nor, on the grid, on K or the device count).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tiled_ldm_jax.sampling import placements
from tiled_ldm_jax.sampling import processes
from tiled_ldm_jax import program_cache
from tiled_ldm_jax import progress as progress_lib
from tiled_ldm_jax.sampling import windows as windows_lib
from tiled_ldm_jax import sharding as sharding_lib

SCHEDULES = tuple(placements.PLACEMENTS)   # the placements' names (`placements.py`)

# `(params, x [B,P,P,C], t [B], cond_patch) -> pred [B,P,P,C]` or `(pred, samples
# evaluated)`: the model's prediction (eps, v, x0 or flow velocity, see `sampling/processes.py`).
# Built by `sampling/guidance.py` from a model's eps function; the sampler never imports a model.
Denoiser = Callable[..., jax.Array | tuple[jax.Array, jax.Array]]


@flax.struct.dataclass
class Spatial:
  """A conditioning leaf at latent resolution, [N, h, w, ...]: cropped to each patch."""
  value: jax.Array


@flax.struct.dataclass
class Known:
  """What a keep mask holds fixed (`SamplerSettings.keep`): `init` [N, h, w, C] clean
  latents and `keep` [N, h, w] bool, both `Spatial`."""
  init: Spatial
  keep: Spatial


def known(init, keep) -> Known:
  """`Known` from arrays init [N, h, w, C] and keep [N, h, w] (non-zero = keep)."""
  return Known(spatial(jnp.asarray(init, jnp.float32)), spatial(jnp.asarray(keep) != 0))


def spatial(array) -> Spatial:
  """Marks `array` [N, h, w, ...] (latent resolution) to be cropped to each patch."""
  return Spatial(array if hasattr(array, 'shape') else np.asarray(array))


def _is_spatial(leaf) -> bool:
  return isinstance(leaf, Spatial)


def check_cond(cond, shape) -> None:
  """ValueError unless Spatial leaves are [N, h, w, ...] and the others [N, ...]."""
  n = shape[0]
  for leaf in jax.tree_util.tree_leaves(cond, is_leaf=_is_spatial):
    if isinstance(leaf, Spatial):
      if tuple(leaf.value.shape[:3]) != tuple(shape):
        raise ValueError(f'a spatial conditioning leaf of shape {leaf.value.shape} does not '
                         f'match the latent [N, h, w] = {list(shape)}')
    elif jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != n:
      raise ValueError(f'a conditioning leaf of shape {jnp.shape(leaf)} is not [N, ...] '
                       f'with N = {n} images')


@flax.struct.dataclass
class SamplerState:
  """The while-loop carry. N images, latent h x w with C channels."""
  x: jax.Array            # [N, h, w, C] float32: current value of every latent pixel
  x_low: jax.Array        # [N, h, w, C] float32: the second buffer (random: each pixel's
                          # value one level lower; grid: levels alternate reading x /
                          # x_low and writing the other; `placements.py`)
  times: jax.Array        # [N, h, w] int32: DDIM steps each pixel has taken (0..S)
  level: jax.Array        # [N] int32: the image's lowest level (grid: its current level)
  windows: placements.RandomCarry | placements.GridCarry   # the placement's own carry
  keys: jax.Array         # [N] typed PRNG keys, one per image
  image_iters: jax.Array  # [N] int32: iterations in which the image advanced patches
  iterations: jax.Array   # [] int32: loop iterations (one batch of N*K patches each)
  patches: jax.Array      # [] int32: patches advanced (valid slots)
  evaluations: jax.Array  # [] int32: samples run through the U-Net
  start: jax.Array        # [N] int32: the level the image's run began at (a pixel's
                          # solver history exists from the level after it)
  x0_prev: jax.Array      # [N, h, w, C] float32: a solver with history (DPM-Solver++):
                          # each pixel's x0 prediction at its previous level; [N, 1, 1, C]
                          # zeros (unused) otherwise


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Static knobs: changing one compiles a new program."""
  sampling_steps: int         # DDIM sampling steps S
  patch: int                  # latent patch side P (patch_size / 8)
  patches_per_step: int = 1   # K: non-overlapping patches per image per iteration
  eta: float = 1.0            # DDIM eta (0: deterministic)
  progress_every: int = 0     # progress lines, host sync every <= N iterations (0: silent)
  progress_label: str = 'sampling'
  schedule: str = 'random'    # 'random' (the original's) or 'grid' (sampling/windows.py)
  grid_margin: int = 0        # grid: latent pixels of context each side, not written;
                              # random: a window's border of this width not written
                              # (but at the latent's edge; 0: the original's)
  grid_margin_levels: int | None = None   # grid: the margin only in the last this many
                              # levels (earlier ones: margin 0); None: in every level
  grid_margin_first_levels: int = 0   # grid: and in the first this many levels
  keep: bool = False          # cond is (user cond, Known): kept pixels follow the init
  resample: int = 0           # keep: RePaint resampling passes of the windows that hold
                              # kept and free pixels (0: none)

  def __post_init__(self):
    if self.sampling_steps < 1:
      raise ValueError(f'sampling steps must be >= 1, got {self.sampling_steps}')
    if self.patch < 1:
      raise ValueError(f'patch side must be >= 1 latent pixel, got {self.patch}')
    windows_lib.check_margin(self.grid_margin, self.patch)
    check_knobs(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name in _KNOBS})


# The knobs the user-facing options share with `SamplerSettings`, checked by one function.
_KNOBS = ('schedule', 'patches_per_step', 'eta', 'grid_margin_levels',
          'grid_margin_first_levels', 'resample', 'progress_every')


def check_knobs(**knobs) -> None:
  """ValueError for a bad sampler knob (`_KNOBS`; None: unset, not checked). The one
  check of each, for `SamplerSettings` and for the options a user gives
  (`pipeline.Options`), so both refuse the same values with the same words."""
  unknown = set(knobs) - set(_KNOBS)
  if unknown:
    raise TypeError(f'not sampler knobs: {sorted(unknown)}')
  k = {name: value for name, value in knobs.items() if value is not None}
  if 'schedule' in k and k['schedule'] not in SCHEDULES:
    raise ValueError(f'schedule must be one of {SCHEDULES}, got {k["schedule"]!r}')
  if k.get('patches_per_step', 1) < 1:
    raise ValueError(f'patches_per_step must be >= 1, got {k["patches_per_step"]}')
  for name in ('eta', 'grid_margin_levels', 'grid_margin_first_levels', 'resample',
               'progress_every'):
    if k.get(name, 0) < 0:
      raise ValueError(f'{name} must be >= 0, got {k[name]}')


def check_start(sampling_steps: int, strength: float, *, init: bool, keep: bool) -> int:
  """The level a run starts from (`start_level`), after the one check of a start: the
  strength in (0, 1], and a keep mask only with init latents (what kept pixels follow)."""
  level = start_level(sampling_steps, strength)
  if keep and not init:
    raise ValueError('keep needs init latents (or an init_image): what the kept pixels '
                     'follow')
  return level


def _or_zeros(x0, like):
  """x0, or zeros where the solver keeps no x0 (one code path for both; the zeros are
  dropped by XLA when nothing reads them)."""
  return jnp.zeros_like(like) if x0 is None else x0


def _copy_keys(keys):
  """A fresh buffer: the caller's keys stay valid when the state is donated."""
  return jax.random.wrap_key_data(jnp.copy(jax.random.key_data(keys)),
                                  impl=jax.random.key_impl(keys))


def start_level(sampling_steps: int, strength: float) -> int:
  """The level an image starts from with `strength` s in (0, 1]: S - round(s S) (so
  round(s S) >= 1 steps run); ValueError outside (0, 1]."""
  s = float(strength)
  if not (0.0 < s <= 1.0):
    raise ValueError(f'strength must be in (0, 1], got {strength!r}')
  return sampling_steps - max(1, int(round(s * sampling_steps)))


def init_state(keys: jax.Array, shape: tuple[int, int], channels: int,
               patch: int, placement=None, history: bool = False) -> SamplerState:
  """x ~ N(0, 1) per image from `fold_in(key, 0)`; x_low = x; times = 0; level 0; the
  placement's carry (`placements.py`; default the random placement's with window side
  `patch`); `history`: a latent-sized x0_prev buffer (a solver that needs it)."""
  h, w = shape
  x = _initial_noise(keys, (h, w, channels))
  n = keys.shape[0]
  if placement is None:
    placement = placements.RandomPlacement(SamplerSettings(sampling_steps=1, patch=patch))
  zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: step_patch donates the state
  return SamplerState(x=x, x_low=jnp.copy(x), times=jnp.zeros((n, h, w), jnp.int32),
                      level=jnp.zeros((n,), jnp.int32), windows=placement.carry(n, h, w),
                      keys=_copy_keys(keys), image_iters=jnp.zeros((n,), jnp.int32),
                      iterations=zero(), patches=zero(), evaluations=zero(),
                      start=jnp.zeros((n,), jnp.int32),
                      x0_prev=jnp.zeros((n,) + ((h, w) if history else (1, 1)) + (channels,),
                                        jnp.float32))


def _own_buffers(true, crops):
  """The crops as buffers of their own, read before any write of the step (`true`: a
  traced predicate that always holds).

  Otherwise XLA fuses the crop of x_low into the in-place update of x (through the DDIM
  step) and the crop of x into that of x_low: each fusion reads the buffer the other
  writes, and copy insertion then duplicates x, x_low and times every iteration, an
  O(h w) cost per patch. A conditional is a fusion boundary (an optimization barrier is
  not: XLA:CPU expands it before fusing).
  """
  return jax.lax.cond(true, lambda c: c, lambda c: jax.tree_util.tree_map(jnp.zeros_like, c),
                      crops)


WATCH_EVERY = 50      # a `watch` with progress off: at most this many iterations a chunk
CHUNK_SECONDS = 2.0   # with progress on: host syncs about this often (a log line is rarer)
CHUNK_SHARE = 0.025   # ... and at least every 2.5% of the stage (lines come every >= 5%)


def next_chunk(chunk: int, spent: float, share: float, iterations: int, every: int) -> int:
  """Iterations to run before the host next looks at the progress: about CHUNK_SECONDS
  of work (from the last chunk's `spent` seconds) and at most CHUNK_SHARE of the stage
  (from the `share` of it the `iterations` so far did), growing at most 2x a chunk (a
  compile or a cheap level does not throw it off), within [1, every]. Syncing once a
  chunk, not once an iteration, keeps fast devices busy; a chunk of a fixed 50 made an
  85 s stage of 43 iterations log nothing between its start and end."""
  by_time = CHUNK_SECONDS * chunk / max(spent, 1e-6)
  by_share = CHUNK_SHARE * iterations / share if share > 0 else 1
  return int(max(1, min(every, 2 * chunk, by_time, by_share)))


class Sampler:
  """Compiled random-patch sampler for one denoiser, one `SamplerSettings`, one placement.

  Immutable after construction: the work split over `mesh` (a 1-D `jax.sharding.Mesh`)
  is decided here from the batch size `n_images` -- the images of the batch when N is a
  multiple of the device count, otherwise the N*K patches of each iteration (which must
  then be a multiple of it; the latent is replicated).

  `process` (`sampling/processes.py`) turns predictions into steps: default the original's DDIM
  for eps models on the cosine schedule (x0 clipped to [-1, 1]).

  `sample` runs the whole loop as one compiled program (per input shape). `run` continues
  a `SamplerState` for at most a given number of iterations (a dynamic argument: chunks
  do not recompile), which is how long runs are checkpointed and resumed; chunked and
  uninterrupted runs give identical states. `step_patch` (one iteration, state donated)
  is exposed for tests and tools that drive the loop from Python. `compiles()` counts the
  programs compiled so far (tests assert there is one per shape).
  """

  def __init__(self, denoise: Denoiser, settings: SamplerSettings, mesh=None,
               n_images: int | None = None, process=None):
    self.denoise = denoise
    self.settings = settings
    self.mesh = mesh
    self.n_images = n_images
    self.split = _choose_split(mesh, n_images, settings.patches_per_step)
    self.process = processes.Diffusion(clip_x0=1.0) if process is None else process
    self.pairs = self.process.time_grid(settings.sampling_steps)       # [S, 2] (t, t_next)
    self.history = bool(getattr(getattr(self.process, 'solver', None), 'history', False))
    self.placement = placements.for_settings(settings)
    self._label = settings.progress_label
    self._run_jit = program_cache.CachedJit(self._run, self._program_key(),
                                            donate_argnums=(1,), result_like=1)
    self._status_jit = jax.jit(self._status)
    self.step_patch = jax.jit(self._step_patch, donate_argnums=(1,))

  def compiles(self) -> int:
    """Programs compiled so far (loop and single step)."""
    return self._run_jit.cache_size() + self.step_patch._cache_size()  # pylint: disable=protected-access

  def _program_key(self):
    """What decides the loop program beside its arguments (None: a denoiser or process
    without a key, traced every process; `program_cache`)."""
    denoise = program_cache.key_of(self.denoise)
    process = getattr(self.process, 'program_key', lambda: None)()
    if denoise is None or process is None:
      return None
    mesh = None if self.mesh is None else (self.mesh.devices.shape, self.mesh.axis_names)
    return ('sampler', denoise, process, repr(self.settings), mesh, self.n_images,
            self.split)

  # --------------------------------------------------------------------------- one step

  def _step_patch(self, params, state: SamplerState, cond) -> SamplerState:
    """One iteration: up to K windows of every unfinished image advance a step. One
    skeleton for every placement (`placements.py`): it chooses the windows and their
    noise, says which buffer they read and which pixels they write, and commits them.

    cond: the conditioning pytree (`Spatial` leaves [N, h, w, ...], others [N, ...]).
    """
    place = self.placement
    p = self.settings.patch
    own = functools.partial(_own_buffers, state.iterations >= 0)
    win = place.choose(state, own, state.x.shape[-1])
    crops = placements.Crops(*own(tuple(
        placements.crop_slots(a, win.corners, p) for a in (state.x, state.x_low, state.times))))
    model_in = place.model_input(state, crops, win)
    cond, known = self._split(cond)
    cond_p = self._cond_patches(cond, win.corners, win.valid)
    hist = self._history(state, win.corners)
    new, x0, evals = self._denoise_patches(params, model_in, cond_p, win.valid, state.level,
                                           win.noise, hist)
    kp = None if known is None else self._cond_patches(known, win.corners, win.valid)  # once
    new, x0 = self._keep_known(new, kp, win.valid, state.level, win.noise, _or_zeros(x0, new))
    write = place.write_mask(state, crops, win)                         # [N, K, P, P]
    new, x0, evals = self._resample(params, new, x0, evals, model_in, write, cond_p, kp,
                                    win.valid, state.level, win.slot_keys, hist)
    active = state.level < self.settings.sampling_steps
    return state.replace(
        **place.commit(state, new, crops, win, write),
        x0_prev=self._paste_x0(state, x0, win.corners, write),
        image_iters=state.image_iters + active.astype(jnp.int32),
        iterations=state.iterations + 1,
        patches=state.patches + win.valid.sum().astype(jnp.int32),
        evaluations=state.evaluations + evals)

  def _cond_patches(self, cond, corners, valid):
    """The conditioning of every slot, leaves [N, K, ...]; idle slots all zeros (cheap
    for guidance that loops over the labels present)."""
    p = self.settings.patch
    n, k_slots = valid.shape

    def one(leaf):
      v = (placements.crop_slots(leaf.value, corners, p) if isinstance(leaf, Spatial)
           else jnp.broadcast_to(leaf[:, None], (n, k_slots) + leaf.shape[1:]))
      keep = valid.reshape(valid.shape + (1,) * (v.ndim - 2))
      return jnp.where(keep, v, jnp.zeros_like(v))
    return jax.tree_util.tree_map(one, cond, is_leaf=_is_spatial)

  def _split(self, cond):
    """(the denoiser's cond, `Known` or None)."""
    return cond if self.settings.keep else (cond, None)

  def _keep_known(self, new, kp, valid, level, noise, x0=None):
    """Kept pixels of the patches [N, K, P, P, C] take the init noised to the level
    they reach (the init itself after the last step), as RePaint: the free pixels
    are generated around them. `kp`: the slots' `Known` crops (None: no keep mask).
    The replacement noise is the step's own per-slot noise (its DDIM value for these
    pixels is discarded). With `x0` (a solver's predictions), returns (new, x0) with
    the kept pixels' x0 the init."""
    if kp is None:
      return new if x0 is None else (new, x0)
    s = self.settings
    nxt = level + 1                                                           # [N]
    t = jnp.asarray(self.pairs)[jnp.minimum(nxt, s.sampling_steps - 1), 0]    # [N]
    n, k = valid.shape
    flat = lambda a: a.reshape((n * k,) + a.shape[2:])
    noised = self.process.noised(flat(kp.init), flat(noise), jnp.repeat(t, k))
    target = jnp.where(jnp.repeat(nxt >= s.sampling_steps, k)[:, None, None, None],
                       flat(kp.init), noised).reshape(new.shape)
    new = jnp.where(kp.keep[..., None], target, new)
    if x0 is None:
      return new
    return new, jnp.where(kp.keep[..., None], kp.init, x0)

  def _resample(self, params, new, x0, evals, model_in, write, cond_p, kp, valid, level,
                slot_keys, hist):
    """RePaint's resampling where kept and free pixels meet: in the slots that hold kept
    pixels and write free ones, the step's result (kept pixels already replaced) is
    taken back to the step's start time with fresh noise (`process.renoise`) and the
    step is run again, `resample` times. Without it the free pixels are generated next
    to kept pixels that do not know them (the noised init is drawn independently), which
    leaves a seam at the border; each pass lets both sides agree one step further. The
    other slots keep their first result and run no more U-Net samples (idle to a
    denoiser that `skips_idle`; a pass with no such slot is skipped for any denoiser).
    `write` [N, K, P, P]: the pixels the step writes (the rest of the window stays at
    model_in); `kp`: the slots' `Known` crops; `slot_keys` [N, K]: a key per slot for
    the passes' noise.
    `x0`, `hist`: the solver's x0 predictions and history crops (or None).
    Returns (new, x0, evals)."""
    s = self.settings
    if kp is None or s.resample == 0:
      return new, x0, evals
    kept = kp.keep                                                        # [N, K, P, P]
    mixed = valid & kept.any(axis=(2, 3)) & (write & ~kept).any(axis=(2, 3))   # [N, K]
    n, k = valid.shape
    pair = jnp.asarray(self.pairs)[jnp.minimum(level, s.sampling_steps - 1)]      # [N, 2]
    t_cur, t_next = jnp.repeat(pair[:, 0], k), jnp.repeat(pair[:, 1], k)
    shape = new.shape[2:]
    normal = lambda keys, i: jax.vmap(jax.vmap(lambda key: jax.random.normal(
        jax.random.fold_in(key, i), shape)))(keys)                        # [N, K, P, P, C]

    def one_pass(r, carry):   # skipped whole when no slot is at the border
      return jax.lax.cond(mixed.any(), functools.partial(run_pass, r), lambda c: c, carry)

    def run_pass(r, carry):
      new, x0, evals = carry
      keys = jax.vmap(jax.vmap(lambda key: jax.random.fold_in(key, r)))(slot_keys)
      back = self.process.renoise(new.reshape((n * k,) + shape),
                                  normal(keys, 0).reshape((n * k,) + shape), t_next, t_cur)
      x_in = jnp.where(write[..., None], back.reshape(new.shape), model_in)
      step_noise = normal(keys, 1)
      again, x0_again, more = self._denoise_patches(params, x_in, cond_p, mixed, level,
                                                    step_noise, hist)
      again, x0_again = self._keep_known(again, kp, valid, level, step_noise,
                                         _or_zeros(x0_again, again))
      sel = mixed[:, :, None, None, None]
      x0 = None if x0 is None else jnp.where(sel, x0_again, x0)
      return jnp.where(sel, again, new), x0, evals + more
    return jax.lax.fori_loop(0, s.resample, one_pass, (new, x0, evals))

  def _denoise_patches(self, params, model_in, cond_p, valid, level, noise, hist=None):
    """One step at each image's `level` for patches [N, K, P, P, C]; (new, x0 or None,
    evaluations). `hist`: (x0_prev crops [N, K, P, P, C], has_prev [N]) for a solver with
    history, else None."""
    s = self.settings
    n, k_slots = valid.shape
    pair = jnp.asarray(self.pairs)[jnp.minimum(level, s.sampling_steps - 1)]      # [N, 2]
    t_cur = jnp.broadcast_to(pair[:, None, 0], (n, k_slots)).reshape(-1)
    t_next = jnp.broadcast_to(pair[:, None, 1], (n, k_slots)).reshape(-1)
    flat = lambda a: a.reshape((n * k_slots,) + a.shape[2:])
    leaves, tree = jax.tree_util.tree_flatten(cond_p)
    b_x, b_t, b_tn, b_noise, b_valid, *b_leaves = self._constrain_patches(
        flat(model_in), t_cur, t_next, flat(noise), flat(valid), *map(flat, leaves))
    # A denoiser that says it can (`skips_idle`) is told which slots are idle, so that it
    # runs no U-Net samples for them (their output is never written).
    kw = {'valid': b_valid} if getattr(self.denoise, 'skips_idle', False) else {}
    out = self.denoise(params, b_x, b_t, jax.tree_util.tree_unflatten(tree, b_leaves), **kw)
    pred, evals = out if isinstance(out, tuple) else (out, b_x.shape[0])
    history = None
    if hist is not None:
      x0_prev, has_prev = hist
      t_prev = jnp.asarray(self.pairs)[jnp.clip(level - 1, 0, s.sampling_steps - 1), 0]
      history = (flat(x0_prev), jnp.repeat(t_prev, k_slots),
                 jnp.repeat(has_prev, k_slots))
    new, x0 = self.process.solve(b_x, pred.astype(jnp.float32), b_t, b_tn, b_noise, s.eta,
                                 history)
    x0 = None if x0 is None else x0.reshape(model_in.shape)
    return new.reshape(model_in.shape), x0, jnp.asarray(evals, jnp.int32)

  def _history(self, state: SamplerState, corners):
    """(x0_prev crops [N, K, P, P, C], has_prev [N]) for a solver with history, else None.
    A pixel written at `level` took its previous step at level - 1 if level > start."""
    if not self.history:
      return None
    return (placements.crop_slots(state.x0_prev, corners, self.settings.patch),
            state.level > state.start)

  def _paste_x0(self, state: SamplerState, x0, corners, write):
    """x0_prev with the written pixels' new x0 predictions (unchanged without history)."""
    if not self.history:
      return state.x0_prev
    paste = jax.vmap(functools.partial(placements.paste_all, patch=self.settings.patch))
    return paste(state.x0_prev, x0, corners, write)

  # --------------------------------------------------------------------------- the loop

  def _fraction(self, state: SamplerState):
    """Share of the work done, from the counters (no reduction over the latent)."""
    s = self.settings
    n = state.times.shape[0]
    within = self.placement.within_level(state)
    done = jnp.minimum(state.level + jnp.where(state.level < s.sampling_steps, within, 0.0), s.sampling_steps)
    return done.sum() / (n * s.sampling_steps)

  def _status(self, state: SamplerState):
    """(share of the work done, all images done, iterations): three replicated scalars,
    read on the host between chunks of the loop."""
    return (self._fraction(state), state.level.min() >= self.settings.sampling_steps,
            state.iterations)

  def _run(self, params, state: SamplerState, cond, max_iterations):
    stop = state.iterations + max_iterations

    def body(state):
      return self._step_patch(params, state, cond)

    def not_done(st):
      return (st.level.min() < self.settings.sampling_steps) & (st.iterations < stop)
    return self.placement.finish(jax.lax.while_loop(not_done, body, state))

  def init(self, keys, shape, channels: int = 4, *, init=None,
           strength: float = 1.0) -> SamplerState:
    """The initial state for N images (one key each) of latent shape [N, h, w].

    `init` [N, h, w, C] (clean latents, e.g. `Pipeline.encode` of images) with
    `strength` s in (0, 1]: every pixel starts at level L0 = S - round(s S), its value
    the init noised to that level's time with the image's own initial noise
    (`process.noised`), so only the last round(s S) steps run; s = 1 (or no init) is
    sampling from noise.
    """
    check_shapes(shape, self.settings.patch)
    if keys.shape != tuple(shape[:1]):
      raise ValueError(f'need one key per image: keys {keys.shape}, latent {shape}')
    level = start_level(self.settings.sampling_steps, strength)
    state = init_state(keys, tuple(shape[1:]), channels, self.settings.patch,
                       self.placement, self.history)
    if init is not None:
      init = jnp.asarray(init, jnp.float32)
      if init.shape != state.x.shape:
        raise ValueError(f'init latents {tuple(init.shape)} do not match the latent '
                         f'{list(state.x.shape)}')
      if not bool(jnp.isfinite(init).all()):
        raise ValueError('init latents hold NaN or inf')
      if level > 0:
        x = self.process.noised(init, state.x, self.pairs[level][0])
        n = keys.shape[0]
        state = state.replace(x=x, x_low=jnp.copy(x),
                              times=jnp.full(state.times.shape, level, jnp.int32),
                              level=jnp.full((n,), level, jnp.int32),
                              start=jnp.full((n,), level, jnp.int32))
    return self.place(state)

  def run(self, params, state: SamplerState, cond,
          max_iterations: int | None = None, watch=None) -> SamplerState:
    """Continues `state` (donated) until done or `max_iterations` more iterations.

    With `progress_every`, the loop runs in chunks of that many iterations and the host
    logs between them: the compiled loop holds no host callback, so the persistent
    compilation cache can keep it (JAX does not cache programs with callbacks), and the
    same program serves progress on and off. Chunked and whole runs are identical.
    `watch(state, done)`: called on the host after every chunk (chunked as for progress,
    even with progress off; e.g. `output/live_preview.py`); it must not keep the state,
    which the next chunk donates.
    """
    check_cond(cond, state.times.shape)
    cond = jax.tree_util.tree_map(lambda a: self._place_labels(jnp.asarray(a)), cond)
    every = self.settings.progress_every
    if not every and watch is None:
      limit = np.iinfo(np.int32).max - int(state.iterations) if max_iterations is None \
          else max_iterations
      return self._run_jit(params, state, cond, jnp.int32(limit))
    quiet = not every
    every = every or WATCH_EVERY
    left = max_iterations
    # One device: chunks of about 2 s (next_chunk), the state committed like the chunks'
    # outputs (otherwise the second chunk compiles the loop again: an uncommitted and a
    # committed state are two programs). On a mesh, chunks of `every` as before: a
    # sharded state's layout after a chunk may differ from the placed one (another
    # program, rounding apart from a whole run), and several processes must run the
    # same chunks.
    adaptive = self.mesh is None and jax.process_count() == 1
    if adaptive:
      state = jax.device_put(state, jax.local_devices()[0])
    log = progress_lib.Progress(self._label, 'iterations',
                                **({'log': lambda *a: None} if quiet else {}))
    log.start()    # the ETA includes a first compile
    first, _, start = self._status_jit(state)
    first, start = float(first), int(start)   # a resumed or init-image run starts past 0
    chunk = 1 if adaptive else every
    while True:
      if left is not None:
        chunk = min(chunk, left)
      t0 = time.monotonic()
      state = self._run_jit(params, state, cond, jnp.int32(chunk))
      fraction, done, iterations = self._status_jit(state)    # one host sync per chunk
      spent = time.monotonic() - t0
      share = (float(fraction) - first) / (1.0 - first) if first < 1.0 else 1.0
      its = int(iterations) - start
      log.update(share, its)
      if left is not None:
        left -= chunk
      if watch is not None:
        watch(state, bool(done))
      if bool(done) or left == 0:
        if bool(done):
          log.finish(its)
        return state
      if adaptive:
        chunk = next_chunk(chunk, spent, share, its, every)

  def sample(self, params, keys, cond, channels: int = 4,
             hw: tuple[int, int] | None = None, *, init=None,
             strength: float = 1.0) -> SamplerState:
    """Samples N latents [N, h, w, channels]; returns the final state (x is the result).

    Args:
      params: denoiser params (passed through to `denoise`).
      keys: [N] typed PRNG keys, one per image (see `image_keys`).
      cond: conditioning pytree; `Spatial` leaves [N, h, w, ...] (e.g. `spatial(labels)`
        with labels [N, h, w] at latent resolution) are cropped to each patch.
      hw: latent (h, w); default the size of the spatial leaves.
    """
    if hw is None:
      found = [l.value.shape[1:3] for l in jax.tree_util.tree_leaves(cond, is_leaf=_is_spatial)
               if isinstance(l, Spatial)]
      if not found:
        raise ValueError('give the latent size hw: the conditioning has no spatial leaf')
      hw = found[0]
    return self.run(params, self.init(keys, (keys.shape[0],) + tuple(hw), channels,
                                      init=init, strength=strength), cond)

  # --------------------------------------------------------------------------- sharding

  def _sharding(self, by_image: bool):
    from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
    return NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names[0]) if by_image
                         else PartitionSpec())

  def place(self, state: SamplerState) -> SamplerState:
    """Puts the state on the mesh: split by image, or replicated (patch split)."""
    if self.mesh is None:
      return state
    if state.times.shape[0] != self.n_images:
      raise ValueError(f'this sampler was built for {self.n_images} images, got '
                       f'{state.times.shape[0]}')
    by_image = self.split == 'images'
    return jax.tree_util.tree_map(
        lambda a: sharding_lib.put_global(a, self._sharding(by_image and a.ndim > 0)), state)

  def _place_labels(self, labels):
    if self.mesh is None:
      return labels
    return sharding_lib.put_global(labels, self._sharding(self.split == 'images'))

  def _constrain_patches(self, *arrays):
    """Inside the step: split the flattened patch batch over the devices."""
    if self.split != 'patches':
      return arrays
    spec = self._sharding(True)
    return tuple(jax.lax.with_sharding_constraint(a, spec) for a in arrays)


@functools.lru_cache(maxsize=32)
def compiled(denoise: Denoiser, settings: SamplerSettings, mesh=None,
             n_images: int | None = None, process=None) -> Sampler:
  """THE compiled-sampler cache of the process, shared by `Pipeline` and `sampling.sample`:
  one `Sampler` (and so one set of compiled programs) per (denoiser, settings, mesh,
  batch, process). Denoisers built by `sampling/guidance.py` from equal configs are the same
  object, so equal requests reuse everything compiled before."""
  return Sampler(denoise, settings, mesh, n_images, process)


def _choose_split(mesh, n_images: int | None, k: int) -> str | None:
  """'images', 'patches' or None (no mesh): how a batch of N images uses the mesh."""
  if mesh is None:
    return None
  if n_images is None:
    raise ValueError('a sampler with a mesh needs n_images (the batch size)')
  devices = mesh.devices.size
  if n_images % devices == 0:
    return 'images'
  if (n_images * k) % devices == 0:
    return 'patches'
  raise ValueError(f'{devices} devices: need the image batch ({n_images}) or the patch batch '
                   f'(images x patches_per_step = {n_images * k}) to be a multiple of it')


def check_shapes(shape, patch: int, multiple: int = 1) -> None:
  """Raises ValueError for latents smaller than a patch or not a multiple of `multiple`."""
  if len(shape) != 3:
    raise ValueError(f'the latent shape must be [N, h, w], got {shape}')
  _, h, w = shape
  if h < patch or w < patch:
    raise ValueError(f'latent {h}x{w} is smaller than the patch {patch}x{patch}')
  if patch % multiple:
    raise ValueError(f'latent patch side {patch} must be a multiple of {multiple} '
                     f'(the U-Net downsamples by {multiple})')


def image_keys(seed: int | jax.Array, indices) -> jax.Array:
  """[N] keys `fold_in(root, image_index)`: image n is the same in any batch."""
  root = jax.random.key(seed) if isinstance(seed, int) else seed
  return _fold_in_each(root, jnp.asarray(indices, jnp.uint32))


# Compiled once per shape (eager vmaps of fresh lambdas would trace on every call).
_fold_in_each = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))


@functools.partial(jax.jit, static_argnums=(1,))
def _initial_noise(keys, shape):
  """[N, *shape] float32: image n's initial noise from `fold_in(keys[n], 0)`."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)
