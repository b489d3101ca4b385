"""Label maps that are never whole at pixel resolution (`label_maps.LabelMap`): equal to the
whole-map path bit for bit, at latent resolution, by rows, in the TIFF mask writer, and
the banded mask stage equal to decoding and cleaning the whole mask image."""

import numpy as np
import pytest

from tiled_ldm_jax import decode
from tiled_ldm_jax import generate
from tiled_ldm_jax import masks
from tiled_ldm_jax.output import writers
from tiled_ldm_jax.models import vae

from test_pipeline import models  # noqa: F401  (fixture)
from tiled_ldm_jax.files import label_maps


@pytest.mark.parametrize('src_hw,out_hw', [((7, 5), (64, 40)), ((100, 60), (256, 384)),
                                           ((251, 249), (64, 64)), ((3, 97), (24, 1000)),
                                           ((32, 48), (32, 48))])
def test_label_map_equals_the_resized_array(src_hw, out_hw):
  rng = np.random.RandomState(sum(src_hw))
  src = rng.randint(0, 300, src_hw)
  whole = masks.resize_labels(src, out_hw)
  m = label_maps.LabelMap(src, out_hw)
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
  assert label_maps.compact(np.array([0, 255])).dtype == np.uint8
  assert label_maps.compact(np.array([0, 256])).dtype == np.uint16
  assert label_maps.compact(np.array([70000])).dtype == np.uint32
  with pytest.raises(ValueError):
    label_maps.compact(np.array([-1]))


def test_latent_label_maps_of_arrays_and_maps():
  src = np.arange(12).reshape(3, 4) % 5
  whole = masks.resize_labels(src, (48, 64))
  want = masks.latent_labels(np.stack([whole, whole]), 8).astype(np.int32)
  m = label_maps.LabelMap(src, (48, 64))
  np.testing.assert_array_equal(masks.latent_label_maps([m, m], 8), want)
  np.testing.assert_array_equal(masks.latent_label_maps(np.stack([whole, whole]), 8), want)
  assert masks.labels_shape([m, m]) == (2, 48, 64)


@pytest.mark.parametrize('band_rows', [1, 2, 7, 25, 26, 1000])
def test_clean_gray_in_bands_equals_the_whole_formula(band_rows):
  rng = np.random.RandomState(band_rows)
  q = (rng.randint(0, 5, (30, 41)) / 4).astype(np.float32)
  q[10:20, 5:30] = 0.5                                    # regions as well as speckle
  gray = masks.mask_gray(q)
  ids = masks.clean_gray(gray, 5, band_rows=band_rows)
  g = np.where(masks.find_boundaries(gray), np.uint8(0), gray)
  want = np.round(4 * masks.min_filter_valid(g).astype(np.float64) / 255).astype(np.int32)
  np.testing.assert_array_equal(ids, want)
  assert ids.dtype == np.uint8 and ids.shape == (25, 36)
  np.testing.assert_array_equal(masks.clean_mask(q, 5, (90, 120)),
                                masks.resize_labels(ids, (90, 120)))


def test_tiff_mask_written_by_rows_equals_the_array(tmp_path):
  tifffile = pytest.importorskip('tifffile')
  src = np.random.RandomState(1).randint(0, 4, (13, 9))
  m = label_maps.LabelMap(src, (300, 200))
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
  req = pipe.request(size, 2, o, label=1, image=False)
  lazy = pipe.stages.labels_from_mask_latents(req, z, lazy=True)
  arrays = pipe.stages.labels_from_mask_latents(req, z)
  settings = decode.TiledDecodeSettings(patch_size=min(32, mh, mw), factor=f,
                                        tile_batch=o.tile_batch,
                                        latent_scale=pipe.geometry.scale,
                                        blend_mode=o.blend_mode)
  decoder = vae.decode_fn(pipe.vae.config)
  for i in range(2):
    img = decode.decode_image(decoder, pipe.vae.params, z[i], settings)
    want = masks.clean_mask(masks.quantize_mask_image(img, 5), 5, size)
    np.testing.assert_array_equal(arrays[i], want)
    np.testing.assert_array_equal(np.asarray(lazy[i]), want)
    assert lazy[i].source.shape == (mh - 5, mw - 5)


def _tiff_labels(tmp_path, labels, name='labels.tif', tile=64):
  pytest.importorskip('tifffile')
  path = tmp_path / name
  writers.write_labels(str(path), labels, tile=tile)
  return str(path)


@pytest.mark.parametrize('out_hw', [(200, 328), (512, 96)])
def test_tiff_label_source_read_by_rows(tmp_path, out_hw):
  from tiled_ldm_jax.files import label_files
  labels = np.random.RandomState(3).randint(0, 5, (200, 330))
  labels[50:150, 100:300] = 4
  src = label_files.open_label_source(_tiff_labels(tmp_path, labels))
  assert isinstance(src, label_files.TiffLabels)
  assert src.shape == (200, 330) and src.ids == [0, 1, 2, 3, 4]
  m = label_maps.LabelMap(src, out_hw)
  whole = masks.resize_labels(labels, out_hw)
  np.testing.assert_array_equal(np.asarray(m), whole)
  np.testing.assert_array_equal(m[70:133], whole[70:133])
  np.testing.assert_array_equal(m.latent(8), whole[::8, ::8])
  assert m.max() == 4 and m.present() == [0, 1, 2, 3, 4]


def test_zarr_labels_of_a_run_read_back(demo_pipeline, tmp_path):
  """An OME-Zarr the command wrote is a label source: its labels group, lazily."""
  from tiled_ldm_jax.files import label_files
  from tiled_ldm_jax.output import ome_zarr
  labels = np.random.RandomState(4).randint(0, 5, (96, 160)).astype(np.int32)
  bands = ((r, np.full((min(64, 96 - r), 160, 3), 0.5, np.float32)) for r in range(0, 96, 64))
  path = str(tmp_path / 's.zarr')
  ome_zarr.write_ome_zarr(path, bands, (96, 160, 3), labels=labels, tile=64)
  assert label_files.is_ome_zarr_labels(path) and not label_files.is_tiff(path)
  src = label_files.open_label_source(path)
  assert src.shape == (96, 160)
  np.testing.assert_array_equal(np.asarray(label_maps.LabelMap(src, (96, 160))), labels)


def test_damaged_or_wrong_label_files_are_one_error(tmp_path):
  from tiled_ldm_jax.files import label_files
  labels = np.random.RandomState(5).randint(0, 3, (300, 300))
  good = _tiff_labels(tmp_path, labels)
  data = open(good, 'rb').read()
  cut = tmp_path / 'cut.tif'
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='cut.tif'):
    label_files.open_label_source(str(cut))
  rgb = tmp_path / 'rgb.tif'
  import tifffile
  tifffile.imwrite(rgb, np.zeros((64, 64, 3), np.uint8))
  with pytest.raises(ValueError, match='one channel'):
    label_files.open_label_source(str(rgb))
  flt = tmp_path / 'float.tif'
  tifffile.imwrite(flt, np.zeros((64, 64), np.float32))
  with pytest.raises(ValueError, match='integers'):
    label_files.open_label_source(str(flt))


def test_run_with_a_tiff_mask(models, tmp_path):  # noqa: F811
  """A tiled TIFF --mask: its size is the image's, read lazily; the _mask equals it; an id
  the model does not know is one error before any work."""
  from test_pipeline import config   # pylint: disable=g-import-not-at-top
  labels = np.zeros((128, 192), np.int32)
  labels[:, 64:] = 1
  labels[64:, 128:] = 3
  path = _tiff_labels(tmp_path, labels)
  plan = generate.prepare(config(models, tmp_path / 'out', mask=path, image_size=None,
                                 sampling_steps=1))
  assert plan.cfg.size == (128, 192)
  (record,) = generate.run(plan)
  got = label_maps.read_label_png(tmp_path / 'out' / 'sample0000_mask.png')
  np.testing.assert_array_equal(got, labels)
  assert record['labels_present'] == [0, 1, 3]
  labels[0, 0] = 9
  bad = _tiff_labels(tmp_path, labels, name='bad.tif')
  with pytest.raises(ValueError, match=r'out of range \[0, 5\): 9'):
    generate.prepare(config(models, tmp_path / 'out2', mask=bad, image_size=None))
  assert not (tmp_path / 'out2').exists()
