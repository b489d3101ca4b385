"""The TIFFs we write are read back without imagecodecs (our reader decodes JPEG with
Pillow), by other tools with it (tifffile.imread), and the command's own TIFF output is a
valid --init_image and --mask."""

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from tiled_ldm_jax import masks
from tiled_ldm_jax.files import large_images
from tiled_ldm_jax.files import tiff_rows
from tiled_ldm_jax.output import writers

from test_pipeline import config

DEMO = {'image_unet': None, 'vae': None, 'mask_unet': None}   # the bundled demo models


def _image(h, w):
  y, x = np.mgrid[0:h, 0:w] / 9.0
  img = 0.5 + 0.3 * np.stack([np.sin(x + y), np.cos(x - 2 * y), np.sin(3 * x)], -1)
  return (img * 255).astype(np.uint8)


@pytest.fixture
def no_jpeg_codec(monkeypatch):
  """tifffile as in a default install (no imagecodecs: no JPEG decoder), wherever run."""
  real = tiff_rows._decodable  # pylint: disable=protected-access
  monkeypatch.setattr(tiff_rows, '_decodable', lambda tf, c: c != 7 and real(tf, c))


def test_own_jpeg_tiff_read_without_imagecodecs(tmp_path, no_jpeg_codec):  # pylint: disable=unused-argument
  img = _image(100, 150)                            # edge tiles are padded: 4 x 5 tiles
  path = tmp_path / 'slide.tif'
  writers.write_tiff(path, [(0, img[:60]), (60, img[60:])], img.shape, tile=32)
  src = large_images.open_rgb_source(str(path))     # what --init_image opens
  assert src._rows._pillow_jpeg  # pylint: disable=protected-access
  got = src.read_rows(0, 100)
  assert got.shape == img.shape and got.dtype == np.uint8
  err = np.abs(got.astype(int) - img).mean()
  assert err < 3, err                               # JPEG at quality 90
  np.testing.assert_array_equal(src.read_rows(37, 71), got[37:71])   # any band
  try:
    import imagecodecs  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return
  ref = tifffile.imread(path)                       # other tools: the `tiff` extra
  assert np.abs(ref.astype(int) - got).max() <= 1


@pytest.mark.parametrize('mode', ['RGB', 'L'])
def test_libtiff_jpeg_with_shared_tables(tmp_path, no_jpeg_codec, mode):  # pylint: disable=unused-argument
  """Pillow's TIFF writer is libtiff: abbreviated JPEG strips after JPEGTables, RGB
  coded with component ids 'R', 'G', 'B'; read as libtiff itself reads them."""
  img = _image(70, 90)
  img = img if mode == 'RGB' else img[..., 0]
  path = tmp_path / f'{mode}.tif'
  Image.fromarray(img).save(path, compression='jpeg', quality=90)
  with tifffile.TiffFile(path) as tf:
    assert tf.pages[0].jpegtables is not None
  got = tiff_rows.TiffRows(path).read_rows(0, 70)
  with Image.open(path) as im:
    ref = np.asarray(im.convert(mode))
  np.testing.assert_array_equal(got.reshape(ref.shape), ref)


def test_codecs_we_cannot_decode_are_one_line_errors(tmp_path, monkeypatch):
  """RGB-coded JPEG that libjpeg would take for YCbCr, and a codec tifffile lacks."""
  tile = np.ascontiguousarray(_image(32, 32))
  buf = io.BytesIO()
  Image.fromarray(tile).save(buf, format='JPEG')    # YCbCr-coded (JFIF, ids 1, 2, 3)
  path = tmp_path / 'rgb_jpeg.tif'
  writers._allow_preencoded(tifffile, 'jpeg')  # pylint: disable=protected-access
  tifffile.imwrite(path, iter([buf.getvalue()]), shape=(32, 32, 3), dtype=np.uint8,
                   tile=(32, 32), photometric='rgb', compression='jpeg')
  with tifffile.TiffFile(path, mode='r+b') as tf:  # tifffile wrote YCbCr: say RGB
    tf.pages[0].tags['PhotometricInterpretation'].overwrite(2)
  monkeypatch.setattr(tiff_rows, '_decodable', lambda tf, c: c not in (7, 8))
  with pytest.raises(ValueError, match='take for YCbCr needs imagecodecs'):
    tiff_rows.TiffRows(path).read_rows(0, 32)
  zlib = tmp_path / 'zlib.tif'
  tifffile.imwrite(zlib, tile, compression='zlib')
  with pytest.raises(ValueError, match='ADOBE_DEFLATE compression needs imagecodecs'):
    tiff_rows.TiffRows(zlib)


def test_command_tiff_files_are_valid_inputs(tmp_path, no_jpeg_codec):  # pylint: disable=unused-argument
  """The image and label TIFFs as the command writes them (its default compression)
  are read back as --init_image, --mask and --keep_mask, band by band as a run reads
  them. (Running the command twice costs ~50 s of compiling on 2 cores.)"""
  from tiled_ldm_jax import generate  # pylint: disable=g-import-not-at-top
  img = _image(128, 128)
  labels = np.zeros((128, 128), np.uint8)
  labels[:, 40:] = 1
  labels[64:, 90:] = 4
  folder = tmp_path / 'out'
  folder.mkdir()
  image = str(folder / 'sample0000.tif')
  writers.write_tiff(image, [(0, img)], img.shape,
                     compression=generate.GenerationConfig.tiff_compression)
  mask = writers.mask_path(image)
  writers.write_labels(mask, labels)
  plan = generate.prepare(config(DEMO, tmp_path / 'next', init_image=image, mask=mask,
                                 keep_mask=mask, strength=0.5, image_size=128))
  assert np.abs(plan.init_image.read_rows(0, 128).astype(int) - img).mean() < 3
  np.testing.assert_array_equal(plan.mask.rows(0, 128), labels)
  assert plan.keep.shape == (16, 16) and plan.keep.any() and not plan.keep.all()
