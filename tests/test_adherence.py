"""The mask-adherence measure separates right from wrong masks on synthetic textures."""

import numpy as np
import pytest

from tiled_ldm_jax.evaluation import adherence
from tiled_ldm_jax.training import data
from tiled_ldm_jax.files import label_maps


@pytest.fixture(scope='module')
def classifier():
  return adherence.fit_texture_classifier(5, n_images=12)


def test_right_mask_high_wrong_mask_low(classifier):
  ex = data.synth_example(4321, 384, data.SynthSpec(num_classes=5))
  right = adherence.mask_adherence(ex.image, ex.labels, classifier, skip_labels=())
  wrong = adherence.mask_adherence(ex.image, (ex.labels + 1) % 5, classifier, skip_labels=())
  assert right['patches'] > 100
  assert right['adherence'] > 0.9      # measured ~0.98 on held-out synthetic images
  assert wrong['adherence'] < 0.2      # below chance (0.2): the textures are distinct
  u8 = (ex.image * 255).astype(np.uint8)   # uint8 input is accepted too
  assert abs(adherence.mask_adherence(u8, ex.labels, classifier)['adherence']
             - right['adherence']) < 0.05


def test_pure_patches():
  labels = np.zeros((32, 32), np.int32)
  labels[:, 16:] = 2
  labels[:16, 14:16] = 1         # spoils the purity of the top-left patch
  lab, pure = adherence.pure_patch_labels(labels, 16, purity=0.9)
  np.testing.assert_array_equal(lab, [0, 2, 0, 2])
  np.testing.assert_array_equal(pure, [False, True, True, True])


def test_vae_round_trip_classifier_and_score_files(tmp_path):
  """Fit through the demo VAE, the classifier reads VAE reconstructions right and wrong
  masks wrong; `score_files` reads a sample's files and its JSON defaults."""
  import json
  from PIL import Image
  from tiled_ldm_jax.models import checkpoint
  from tiled_ldm_jax import demo
  _, vae_cfg, vae_params = checkpoint.load_model(demo.model_path('vae'), expect='vae')
  rt = adherence.vae_round_trip(vae_cfg, vae_params)
  clf = adherence.fit_texture_classifier(5, n_images=8, size=192, transform=rt)
  ex = data.synth_example(777, 256, data.SynthSpec(num_classes=5))
  recon = rt(ex.image)
  assert recon.shape == ex.image.shape
  right = adherence.score_sample(recon, ex.labels, clf, tile=128)
  wrong = adherence.mask_adherence(recon, (ex.labels % 4) + 1, clf)
  assert right['adherence'] > 0.9, right        # measured 0.98-0.99 (24 fit images)
  assert wrong['adherence'] < 0.25, wrong
  assert right['seam_ratio'] < 1.3               # an untiled reconstruction: no seams
  Image.fromarray((recon * 255).round().astype(np.uint8)).save(tmp_path / 'sample0000.png')
  label_maps.write_label_png(tmp_path / 'sample0000_mask.png', ex.labels)
  (tmp_path / 'sample0000.json').write_text(json.dumps({'config': {
      'vae_ckpt': demo.model_path('vae'), 'unet_ckpt': demo.model_path('image_unet'),
      'patch_size': 128}}))
  got = adherence.score_files(str(tmp_path / 'sample0000.png'), n_fit_images=8)
  assert got['tile'] == 128 and abs(got['adherence'] - right['adherence']) < 0.1
  with pytest.raises(FileNotFoundError):
    adherence.score_files(str(tmp_path / 'missing.png'), vae_dir=demo.model_path('vae'),
                          tile=128, num_labels=5)
