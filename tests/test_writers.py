"""Image / mask writers: PNG, JPEG, streamed pyramidal BigTIFF, atomicity."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from tiled_ldm_jax import convert
from tiled_ldm_jax import decode
from tiled_ldm_jax.output import writers
from tiled_ldm_jax.models import vae

from test_tiff_pyramid import failing_bands, reference_pyramid
from tiled_ldm_jax.files import label_maps

tifffile = pytest.importorskip('tifffile')


@pytest.fixture(scope='module')
def small_vae(reference_dir):
  cfg_dict, state_dict = convert.read_diffusers_folder(str(reference_dir / 'vae'))
  config, params = convert.convert_vae(cfg_dict, state_dict)
  return vae.decode_fn(config), params


def _levels(path):
  with tifffile.TiffFile(path) as f:
    assert f.is_bigtiff and f.pages[0].is_tiled
    return [level.asarray() for level in f.series[0].levels]


def _pyramid(img):
  """Reference pyramid down to a level of at most 64 px (the writer's default stop)."""
  n, side = 1, max(img.shape[:2])
  while side > 64:
    side, n = -(-side // 2), n + 1
  return reference_pyramid(img, n)


def test_stream_tiff_equals_in_memory_png(small_vae, tmp_path):
  """The reference VAE, a non-square latent (sides not multiples of P): the TIFF streamed
  band by band (level 0) equals the in-memory PNG exactly; levels are halved shapes."""
  f, params = small_vae
  z = np.random.default_rng(0).normal(size=(1, 27, 21, 4)).astype(np.float32) * 0.02
  labels = (np.arange(216)[:, None] // 50 + np.arange(168)[None] // 60).astype(np.int32)
  settings = decode.TiledDecodeSettings(patch_size=64, tile_batch=8)
  writers.write_image(tmp_path / 'a.png', decode.decode_image(f, params, z, settings,
                                                              uint8=True)[0])
  writers.write_labels(writers.mask_path(tmp_path / 'a.png'), labels)
  bands = decode.iter_decode_bands(f, params, z, settings, uint8=True)
  writers.write_tiff(tmp_path / 'a.tif', bands, (216, 168, 3), tile=64, compression='zlib')
  writers.write_labels(writers.mask_path(tmp_path / 'a.tif'), labels, tile=64)
  img = np.asarray(Image.open(tmp_path / 'a.png'))
  assert img.shape == (216, 168, 3)
  levels = _levels(tmp_path / 'a.tif')
  assert [lv.shape for lv in levels] == [(216, 168, 3), (108, 84, 3), (54, 42, 3)]
  np.testing.assert_array_equal(levels[0], img)
  for got, want in zip(levels, _pyramid(img)):
    np.testing.assert_array_equal(got, want)
  # In memory, float: the same pixels before quantisation.
  full = decode.decode_image(f, params, z, patch_size=64, tile_batch=8)[0]
  np.testing.assert_array_equal(decode.to_uint8(full), img)
  # Masks beside the images.
  np.testing.assert_array_equal(label_maps.read_label_png(tmp_path / 'a_mask.png'), labels)
  np.testing.assert_array_equal(tifffile.imread(tmp_path / 'a_mask.tif'), labels)
  assert sorted(os.listdir(tmp_path)) == ['a.png', 'a.tif', 'a_mask.png', 'a_mask.tif']


@pytest.mark.parametrize('shape,band', [((301, 203, 3), 37), ((130, 70, 1), 64),
                                        ((100, 90, 4), 100)])
def test_write_tiff_levels_odd_sizes(tmp_path, shape, band):
  img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
  bands = ((r, img[r:r + band]) for r in range(0, shape[0], band))
  shapes = writers.write_tiff(tmp_path / 'x.tiff', bands, shape, tile=64, compression='zlib')
  levels = _levels(tmp_path / 'x.tiff')
  want = _pyramid(img)
  assert shapes == [w.shape[:2] for w in want]
  assert [lv.shape[:2] for lv in levels] == shapes
  for got, w in zip(levels, want):
    np.testing.assert_array_equal(got.reshape(w.shape), w)


def test_write_tiff_float_bands_and_fixed_levels(tmp_path):
  x = np.random.default_rng(2).uniform(-0.1, 1.1, (80, 96, 3)).astype(np.float32)
  writers.write_tiff(tmp_path / 'f.tif', [(0, x[:50]), (50, x[50:])], x.shape, tile=32,
                     levels=2, compression=None)
  levels = _levels(tmp_path / 'f.tif')
  assert len(levels) == 2
  np.testing.assert_array_equal(levels[0], decode.to_uint8(x))


def test_failure_mid_write_leaves_no_file(tmp_path):
  img = np.zeros((128, 64, 3), np.uint8)
  with pytest.raises(RuntimeError, match='decoder crashed'):
    writers.write_tiff(tmp_path / 'x.tif', failing_bands(img, 96), img.shape, tile=32)
  assert os.listdir(tmp_path) == []
  # An existing file at the final name is left as it was.
  (tmp_path / 'x.tif').write_bytes(b'old')
  with pytest.raises(RuntimeError, match='decoder crashed'):
    writers.write_tiff(tmp_path / 'x.tif', failing_bands(img, 32), img.shape, tile=32)
  assert os.listdir(tmp_path) == ['x.tif'] and (tmp_path / 'x.tif').read_bytes() == b'old'
  # Too few rows is an error too, not a truncated file.
  with pytest.raises(ValueError, match='bands ended at row 64'):
    writers.write_tiff(tmp_path / 'y.tif', [(0, img[:64])], img.shape, tile=32)
  with pytest.raises(ValueError, match='does not continue row 16'):
    writers.write_tiff(tmp_path / 'y.tif', [(0, img[:16]), (32, img[32:])], img.shape, tile=32)
  # PNG: a failure while saving leaves nothing either.
  with pytest.raises(ValueError):
    writers.write_image(tmp_path / 'z.png', np.full((8, 8, 3), np.nan, np.complex64))
  assert os.listdir(tmp_path) == ['x.tif']


def test_png_failure_inside_save(tmp_path, monkeypatch):
  def boom(self, fp, *args, **kwargs):
    with open(fp, 'wb') as f:
      f.write(b'\x89PNG partial')
    raise OSError('disk full')
  monkeypatch.setattr(Image.Image, 'save', boom)
  with pytest.raises(OSError, match='disk full'):
    writers.write_image(tmp_path / 'a.png', np.zeros((4, 4, 3), np.uint8))
  assert os.listdir(tmp_path) == []


def test_png_jpeg_round_trip(tmp_path):
  x = np.random.default_rng(3).uniform(0, 1, (40, 56, 3)).astype(np.float32)
  writers.write_image(tmp_path / 'a.png', x)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'a.png')), decode.to_uint8(x))
  smooth = np.broadcast_to(np.linspace(0, 1, 56, dtype=np.float32)[None, :, None], x.shape)
  writers.write_image(tmp_path / 'a.jpg', smooth, quality=95)
  got = np.asarray(Image.open(tmp_path / 'a.jpg')).astype(int)
  assert got.shape == (40, 56, 3) and np.abs(got - decode.to_uint8(smooth)).max() <= 8
  with pytest.raises(ValueError, match='write_tiff'):
    writers.write_image(tmp_path / 'a.tif', x)
  assert sorted(os.listdir(tmp_path)) == ['a.jpg', 'a.png']


def test_labels_and_mask_paths(tmp_path):
  assert writers.mask_path('/a/b.png') == '/a/b_mask.png'
  assert writers.mask_path('/a/b.jpg') == '/a/b_mask.png'
  assert writers.mask_path('/a/b.TIF') == '/a/b_mask.TIF'
  wide = np.arange(300 * 70).reshape(300, 70) % 700
  writers.write_labels(tmp_path / 'm.tif', wide, tile=64)
  got = tifffile.imread(tmp_path / 'm.tif')
  assert got.dtype == np.uint16
  np.testing.assert_array_equal(got, wide)
  with pytest.raises(ValueError, match='integer'):
    writers.write_labels(tmp_path / 'm2.tif', wide.astype(np.float32))
  assert sorted(os.listdir(tmp_path)) == ['m.tif']


def test_missing_tifffile_names_the_package(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tifffile', None)    # a dependency, yet missing
  with pytest.raises(ImportError, match=r'pip install tifffile'):
    writers.write_tiff(tmp_path / 'x.tif', [], (8, 8, 3))
  assert os.listdir(tmp_path) == []
