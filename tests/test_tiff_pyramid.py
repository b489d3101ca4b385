"""Pyramidal TIFF as slide viewers read it: OpenSlide (generic tiled TIFF) and tifffile."""

import os

import numpy as np
import pytest
from PIL import Image

from tiled_ldm_jax.output import writers

tifffile = pytest.importorskip('tifffile')
openslide = pytest.importorskip('openslide')   # openslide-python + openslide-bin (test extra)


def smooth_noise(h, w, seed=0, cell=24):
  """uint8 [h, w, 3]: random colours on a coarse grid, bicubic-upsampled (tissue-like
  smoothness, so JPEG's error is that of real content, not of white noise)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (h // cell + 2, w // cell + 2, 3), dtype=np.uint8)
  big = Image.fromarray(small).resize(((w // cell + 2) * cell, (h // cell + 2) * cell),
                                      Image.BICUBIC)
  return np.asarray(big)[:h, :w].copy()


def reference_pyramid(img, n_levels):
  """Rounded 2x2 means, an odd last row/column paired with itself (int64, independent
  of the writer's uint16 code)."""
  out = [img]
  for _ in range(n_levels - 1):
    x = out[-1].astype(np.int64)
    if x.shape[0] % 2:
      x = np.concatenate([x, x[-1:]])
    if x.shape[1] % 2:
      x = np.concatenate([x, x[:, -1:]], axis=1)
    s = x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]
    out.append(((s + 2) // 4).astype(np.uint8))
  return out


def psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return np.inf if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def failing_bands(img, fail_at):
  """16-row bands of img, raising once row `fail_at` is reached (a crashed decoder)."""
  for r in range(0, img.shape[0], 16):
    if r >= fail_at:
      raise RuntimeError('decoder crashed')
    yield r, img[r:r + 16]


def bands_of(img, n):
  return ((r, img[r:r + n]) for r in range(0, img.shape[0], n))


def read_level(slide, level):
  w, h = slide.level_dimensions[level]
  ds = slide.level_downsamples[level]
  # read_region takes level-0 coordinates of the top-left corner, then level-sized w, h.
  region = np.asarray(slide.read_region((0, 0), level, (w, h)))
  assert (region[..., 3] == 255).all()          # every pixel inside the image
  assert ds == pytest.approx(2 ** level, rel=0.01)
  return region[..., :3]


@pytest.mark.parametrize('compression', ['jpeg', 'zlib', 'none'])
def test_openslide_reads_every_level(tmp_path, compression):
  # Colour cells of 96 px: 12 px at level 3, enough for JPEG's 4:2:0 chroma (8 px cells
  # give 35 dB at level 0 but 16 dB at level 3: the PSNR bound is for content at a
  # scale the level can hold). Odd level sides further down.
  img = smooth_noise(600, 904, cell=96)
  path = tmp_path / f'{compression}.tif'
  shapes = writers.write_tiff(path, bands_of(img, 37), img.shape, tile=128,
                              compression=compression, mpp=0.25)
  assert shapes == [(600, 904), (300, 452), (150, 226), (75, 113)]
  want = reference_pyramid(img, len(shapes))
  with openslide.OpenSlide(path) as slide:
    assert slide.properties['openslide.vendor'] == 'generic-tiff'
    assert slide.level_count == len(shapes)
    assert slide.level_dimensions == tuple((w, h) for h, w in shapes)
    assert float(slide.properties['openslide.mpp-x']) == pytest.approx(0.25)
    assert float(slide.properties['openslide.mpp-y']) == pytest.approx(0.25)
    for level, ref in enumerate(want):
      got = read_level(slide, level)
      if compression == 'jpeg':
        assert psnr(got, ref) > 35, (level, psnr(got, ref))
        # Colours, not just structure: a YCbCr/RGB mix-up shifts the channel means.
        np.testing.assert_allclose(got.mean((0, 1)), ref.mean((0, 1)), atol=1.0)
      else:
        np.testing.assert_array_equal(got, ref)
    # A region off the origin at level 2, in level-0 coordinates.
    region = np.asarray(slide.read_region((4 * 20, 4 * 30), 2, (50, 40)))[..., :3]
    if compression != 'jpeg':
      np.testing.assert_array_equal(region, want[2][30:70, 20:70])


@pytest.mark.parametrize('compression', ['jpeg', 'zlib', 'none'])
def test_tifffile_sees_one_multiscale_series(tmp_path, compression):
  img = smooth_noise(300, 200, seed=1)
  path = tmp_path / 'a.tiff'
  writers.write_tiff(path, bands_of(img, 64), img.shape, tile=64, compression=compression,
                     mpp=0.5)
  with tifffile.TiffFile(path) as f:
    assert f.is_bigtiff and len(f.series) == 1
    levels = f.series[0].levels
    assert [lv.shape for lv in levels] == [(300, 200, 3), (150, 100, 3), (75, 50, 3),
                                          (38, 25, 3)]
    # Successive top-level IFDs (OpenSlide ignores SubIFDs), level >= 1 reduced.
    assert len(f.pages) == 4
    assert [p.subfiletype for p in f.pages] == [0, 1, 1, 1]
    assert all(p.is_tiled and not p.subifds for p in f.pages)
    for level, page in enumerate(f.pages):
      assert page.tags['ResolutionUnit'].value == 3             # centimeter
      num, den = page.tags['XResolution'].value
      assert num / den == pytest.approx(1e4 / (0.5 * 2 ** level), rel=1e-6)
    first = f.pages[0]
    if compression == 'jpeg':
      assert first.compression == 7 and first.photometric == 6    # JPEG, YCbCr
      assert first.tags['YCbCrSubSampling'].value == (2, 2)
    else:
      assert first.compression == {'zlib': 8, 'none': 1}[compression]
      assert first.predictor == (2 if compression == 'zlib' else 1)
      for got, want in zip(levels, reference_pyramid(img, 4)):
        np.testing.assert_array_equal(got.asarray(), want)


def test_no_mpp_writes_no_resolution(tmp_path):
  img = smooth_noise(100, 100)
  writers.write_tiff(tmp_path / 'a.tif', [(0, img)], img.shape, tile=32)
  with openslide.OpenSlide(tmp_path / 'a.tif') as slide:
    assert 'openslide.mpp-x' not in slide.properties
    assert slide.level_count == 3                 # 100 -> 50 -> 25 (one 32 tile)
  with tifffile.TiffFile(tmp_path / 'a.tif') as f:
    assert 'XResolution' not in f.pages[0].tags or f.pages[0].tags['ResolutionUnit'].value != 3


def test_jpeg_quality_trades_size_for_fidelity(tmp_path):
  img = smooth_noise(256, 256, seed=2, cell=8)
  sizes, errors = [], []
  for q in (50, 95):
    path = tmp_path / f'q{q}.tif'
    writers.write_tiff(path, [(0, img)], img.shape, tile=128, levels=1, jpeg_quality=q)
    sizes.append(os.path.getsize(path))
    with openslide.OpenSlide(path) as slide:
      errors.append(psnr(read_level(slide, 0), img))
  assert sizes[0] < sizes[1] and errors[0] < errors[1]


def test_threads_write_the_same_file(tmp_path):
  """Tiles compressed on 4 threads land in order: byte-identical to one thread."""
  img = smooth_noise(333, 250, seed=3)
  for compression in ('jpeg', 'zlib'):
    paths = []
    for workers in (1, 4):
      paths.append(tmp_path / f'{compression}{workers}.tif')
      writers.write_tiff(paths[-1], bands_of(img, 50), img.shape, tile=32,
                         compression=compression, workers=workers)
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_grayscale_jpeg_and_bad_arguments(tmp_path):
  img = smooth_noise(130, 70)[..., :1]
  writers.write_tiff(tmp_path / 'g.tif', [(0, img)], img.shape, tile=64, mpp=1.0)
  with openslide.OpenSlide(tmp_path / 'g.tif') as slide:
    got = read_level(slide, 0)
    assert psnr(got[..., 0], img[..., 0]) > 35
  rgba = np.zeros((64, 64, 4), np.uint8)
  with pytest.raises(ValueError, match='alpha'):
    writers.write_tiff(tmp_path / 'x.tif', [(0, rgba)], rgba.shape, tile=32)
  with pytest.raises(ValueError, match='compression'):
    writers.write_tiff(tmp_path / 'x.tif', [(0, img)], img.shape, compression='lzw')
  with pytest.raises(ValueError, match='mpp'):
    writers.write_tiff(tmp_path / 'x.tif', [(0, img)], img.shape, mpp=0)
  assert sorted(os.listdir(tmp_path)) == ['g.tif']


def test_failure_mid_stream_leaves_nothing(tmp_path):
  img = smooth_noise(256, 128)

  def bands():
    yield 0, img[:100]
    raise RuntimeError('decoder crashed')

  with pytest.raises(RuntimeError, match='decoder crashed'):
    writers.write_tiff(tmp_path / 'a.tif', bands(), img.shape, tile=32, workers=3)
  assert os.listdir(tmp_path) == []
