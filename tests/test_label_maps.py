"""Label maps that are never whole at pixel resolution (`masks.LabelMap`): equal to the
whole-map path bit for bit, at latent resolution, by rows, in the TIFF mask writer, and
the banded mask stage equal to decoding and cleaning the whole mask image."""

import numpy as np
import pytest

from tiled_ldm_jax import decode
from tiled_ldm_jax import masks
from tiled_ldm_jax.output import writers


@pytest.mark.parametrize('src_hw,out_hw', [((7, 5), (64, 40)), ((100, 60), (256, 384)),
                                           ((251, 249), (64, 64)), ((3, 97), (24, 1000)),
                                           ((32, 48), (32, 48))])
def test_label_map_equals_the_resized_array(src_hw, out_hw):
  rng = np.random.RandomState(sum(src_hw))
  src = rng.randint(0, 300, src_hw)
  whole = masks.resize_labels(src, out_hw)
  m = masks.LabelMap(src, out_hw)
  assert m.shape == out_hw and m.dtype == np.uint16 and m.source.dtype == np.uint16
  np.testing.assert_array_equal(np.asarray(m), whole)
  np.testing.assert_array_equal(m[3:11], whole[3:11])
  np.testing.assert_array_equal(m[5:9, 2:7], whole[5:9, 2:7])
  np.testing.assert_array_equal(m[out_hw[0] - 2:out_hw[0] + 5], whole[-2:])
  np.testing.assert_array_equal(m.latent(8), masks.latent_labels(whole, 8))
  assert m.present() == sorted(int(v) for v in np.unique(whole))
  assert m.max() == whole.max() and m.min() == whole.min()
  with pytest.raises(TypeError):
    m[::2]


def test_compact_dtypes():
  assert masks.compact(np.array([0, 255])).dtype == np.uint8
  assert masks.compact(np.array([0, 256])).dtype == np.uint16
  assert masks.compact(np.array([70000])).dtype == np.uint32
  with pytest.raises(ValueError):
    masks.compact(np.array([-1]))


def test_latent_label_maps_of_arrays_and_maps():
  src = np.arange(12).reshape(3, 4) % 5
  whole = masks.resize_labels(src, (48, 64))
  want = masks.latent_labels(np.stack([whole, whole]), 8).astype(np.int32)
  m = masks.LabelMap(src, (48, 64))
  np.testing.assert_array_equal(masks.latent_label_maps([m, m], 8), want)
  np.testing.assert_array_equal(masks.latent_label_maps(np.stack([whole, whole]), 8), want)
  assert masks.labels_shape([m, m]) == (2, 48, 64)


def test_clean_gray_equals_the_formula():
  rng = np.random.RandomState(0)
  q = (rng.randint(0, 5, (30, 41)) / 4).astype(np.float32)
  gray = masks.mask_gray(q)
  ids = masks.clean_gray(gray, 5)
  g = np.where(masks.find_boundaries(gray), np.uint8(0), gray)
  want = np.round(4 * masks.min_filter_valid(g).astype(np.float64) / 255).astype(np.int32)
  np.testing.assert_array_equal(ids, want)
  assert ids.dtype == np.uint8
  np.testing.assert_array_equal(masks.clean_mask(q, 5, (90, 120)),
                                masks.resize_labels(ids, (90, 120)))


def test_tiff_mask_written_by_rows_equals_the_array(tmp_path):
  tifffile = pytest.importorskip('tifffile')
  src = np.random.RandomState(1).randint(0, 4, (13, 9))
  m = masks.LabelMap(src, (300, 200))
  path = tmp_path / 'm_mask.tif'
  writers.write_labels(str(path), m, tile=64)
  np.testing.assert_array_equal(tifffile.imread(path), np.asarray(m))


@pytest.mark.parametrize('size', [(256, 256), (192, 320)])
def test_banded_mask_stage_equals_the_whole_image(demo_pipeline, size):
  """Decode by bands + gray per band + clean == decode whole + quantize + clean_mask."""
  pipe = demo_pipeline
  o = pipe.resolve(sampling_steps=1, mask_patch_size=32)
  f = pipe.geometry.factor
  mh, mw = (v // 4 for v in size)
  z = np.random.RandomState(2).randn(2, mh // f, mw // f, 4).astype(np.float32)
  lazy = pipe.labels_from_mask_latents(z, size, o, lazy=True)
  arrays = pipe.labels_from_mask_latents(z, size, o)
  settings = pipe._decode_settings(o, pipe._mask_patch((mh, mw), o))  # pylint: disable=protected-access
  for i in range(2):
    img = decode.decode_image(pipe._decoder(o), pipe.vae.params, z[i], settings)  # pylint: disable=protected-access
    want = masks.clean_mask(masks.quantize_mask_image(img, 5), 5, size)
    np.testing.assert_array_equal(arrays[i], want)
    np.testing.assert_array_equal(np.asarray(lazy[i]), want)
    assert lazy[i].source.shape == (mh - 5, mw - 5)
