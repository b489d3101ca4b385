"""Interrupted + resumed runs equal uninterrupted ones; changed flags are refused."""

import os

import numpy as np
from PIL import Image
import pytest

from tiled_ldm_jax import generate
from tiled_ldm_jax.sampling import loop as loop_lib

from test_pipeline import config, given_mask, models  # noqa: F401  (fixtures)


class Interrupt(Exception):
  pass


def interrupt_after(monkeypatch, calls: int | None):
  """Makes the `calls`-th Sampler.run call (across stages) raise, as if killed mid-run.

  With calls=None it only counts."""
  real = loop_lib.Sampler.run
  count = {'n': 0}

  def run(self, *a, **k):
    count['n'] += 1
    if count['n'] == calls:
      raise Interrupt
    return real(self, *a, **k)
  monkeypatch.setattr(loop_lib.Sampler, 'run', run)
  return count


def _files(folder):
  return {n: open(os.path.join(folder, n), 'rb').read() for n in sorted(os.listdir(folder))
          if n.startswith('sample') and not n.endswith('.json')}


# Random placement (many iterations per level): chunks of 4 fall inside both stages.
STAGES_KW = dict(sampling_steps=3, checkpoint_every=4, schedule='random', patches_per_step=1)


@pytest.fixture(scope='module')
def whole_run(models, tmp_path_factory):
  """The uninterrupted run every interrupted one must equal (computed once)."""
  out = tmp_path_factory.mktemp('whole')
  generate.generate(config(models, out, **STAGES_KW))
  return _files(out)


@pytest.mark.parametrize('stop_at', [2, 5])   # 2: in the mask stage; 5: in the image stage
def test_resume_mask_and_image_stages_byte_identical(models, whole_run, tmp_path, monkeypatch,
                                                     stop_at):
  kw = STAGES_KW
  count = interrupt_after(monkeypatch, stop_at)
  with pytest.raises(Interrupt):
    generate.generate(config(models, tmp_path / 'cut', **kw))
  assert count['n'] == stop_at
  assert os.path.isdir(tmp_path / 'cut' / 'checkpoint')
  assert not [n for n in os.listdir(tmp_path / 'cut') if n.startswith('sample')]
  monkeypatch.undo()
  with pytest.raises(ValueError, match='unfinished run'):    # a fresh run is refused
    generate.prepare(config(models, tmp_path / 'cut', **kw))
  generate.generate(config(models, tmp_path / 'cut', resume=True, **kw))
  assert not os.path.exists(tmp_path / 'cut' / 'checkpoint')
  whole, cut = whole_run, _files(tmp_path / 'cut')
  assert whole.keys() == cut.keys() and len(whole) == 2
  assert whole == cut


def test_resume_across_batches_with_given_mask(models, given_mask, tmp_path, monkeypatch):
  """Cut at the first chunk of the second batch (the checkpoint is the one saved at the
  batch boundary, before its image stage began), from an init image at strength 0.5:
  the resumed batch starts from the init as the uninterrupted one did."""
  init = tmp_path / 'init.png'
  Image.fromarray(np.random.RandomState(1).randint(0, 256, (256, 256, 3), np.uint8)).save(init)
  kw = dict(STAGES_KW, checkpoint_every=5, mask=given_mask, n_images=2,
            init_image=str(init), strength=0.5)
  count = interrupt_after(monkeypatch, None)
  generate.generate(config(models, tmp_path / 'whole', **kw))
  monkeypatch.undo()
  assert count['n'] % 2 == 0
  interrupt_after(monkeypatch, count['n'] // 2 + 1)   # the second batch's first chunk
  with pytest.raises(Interrupt):
    generate.generate(config(models, tmp_path / 'cut', **kw))
  monkeypatch.undo()
  assert os.path.exists(tmp_path / 'cut' / 'sample0000.png')
  generate.generate(config(models, tmp_path / 'cut', resume=True, **kw))
  assert _files(tmp_path / 'whole') == _files(tmp_path / 'cut')


@pytest.mark.parametrize('from_init', [False, True])
def test_resume_at_the_default_grid(models, given_mask, tmp_path, monkeypatch, from_init):
  """The default placement (grid, margin in the last levels): cut mid-run, resumed,
  byte-identical; also from an init image with a keep mask, a strength and resampling
  (and a changed init file is refused)."""
  kw = dict(sampling_steps=3, checkpoint_every=1, mask=given_mask)
  if from_init:
    init, keep = tmp_path / 'init.png', tmp_path / 'keep.png'
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (256, 256, 3), np.uint8)).save(init)
    Image.fromarray(np.tril(np.ones((256, 256), np.uint8))).save(keep)
    kw.update(sampling_steps=4, init_image=str(init), keep_mask=str(keep), strength=0.75,
              resample=1)
  count = interrupt_after(monkeypatch, None)
  generate.generate(config(models, tmp_path / 'whole', **kw))
  monkeypatch.undo()
  assert count['n'] >= 3, count
  interrupt_after(monkeypatch, count['n'] // 2 + 1)
  with pytest.raises(Interrupt):
    generate.generate(config(models, tmp_path / 'cut', **kw))
  monkeypatch.undo()
  assert os.path.isdir(tmp_path / 'cut' / 'checkpoint')
  if from_init:
    saved = init.read_bytes()
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(init)
    with pytest.raises(ValueError, match='--init_image file'):
      generate.prepare(config(models, tmp_path / 'cut', resume=True, **kw))
    init.write_bytes(saved)
  generate.generate(config(models, tmp_path / 'cut', resume=True, **kw))
  assert _files(tmp_path / 'whole') == _files(tmp_path / 'cut')


@pytest.mark.parametrize('change,name', [(dict(sampling_steps=4), 'sampling_steps'),
                                         (dict(cond_scale=1.0), 'cond_scale'),
                                         (dict(seed=1), 'seed')])
def test_resume_with_changed_flag_is_refused(models, given_mask, tmp_path, monkeypatch,
                                            change, name):
  kw = dict(STAGES_KW, checkpoint_every=3, mask=given_mask)
  interrupt_after(monkeypatch, 2)
  with pytest.raises(Interrupt):
    generate.generate(config(models, tmp_path, **kw))
  monkeypatch.undo()
  with pytest.raises(ValueError, match=f'would change the result: {name}'):
    generate.prepare(config(models, tmp_path, resume=True, **{**kw, **change}))
  # Neutral settings may change.
  generate.prepare(config(models, tmp_path, resume=True, **{**kw, 'progress_every': 7}))


def test_resume_without_checkpoint(models, given_mask, tmp_path):
  with pytest.raises(ValueError, match='no saved run'):
    generate.prepare(config(models, tmp_path, resume=True, mask=given_mask))
