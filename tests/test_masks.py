"""Tests for tiled_ldm_jax.masks: CleanMask parity, quantization, label-map helpers."""

import os

import numpy as np
import pytest
from PIL import Image

from tiled_ldm_jax import masks
from tiled_ldm_jax.files import label_maps


@pytest.fixture(scope='module')
def cases(reference_dir):
  with np.load(reference_dir / 'clean_mask_cases.npz') as d:
    return {k: d[k] for k in d.files}


# ----------------------------------------------------------------------------- CleanMask


@pytest.mark.parametrize('i', [0, 1])
def test_clean_mask_matches_reference_exactly(cases, i):
  out = masks.clean_mask(cases[f'in{i}'], num_labels=5, out_size=128)
  ref = cases[f'out{i}']
  assert out.dtype == np.int32 and out.shape == ref.shape == (128, 128)
  np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize('i', [0, 1])
def test_quantize_is_identity_on_reference_inputs(cases, i):
  m = cases[f'in{i}'][0]
  img = np.repeat(m[..., None], 3, axis=-1)
  np.testing.assert_array_equal(masks.quantize_mask_image(img, 5), m)


def test_find_boundaries_two_regions_marks_both_sides():
  g = np.zeros((4, 6), np.uint8)
  g[:, 3:] = 5
  b = masks.find_boundaries(g)
  expected = np.zeros((4, 6), bool)
  expected[:, 2:4] = True
  np.testing.assert_array_equal(b, expected)


def test_find_boundaries_is_4_connected_with_replicated_edges():
  g = np.ones((4, 4), np.uint8)
  g[0, 0] = 2                      # corner pixel: its diagonal (1, 1) is not a 4-neighbour
  expected = np.zeros((4, 4), bool)
  expected[0, 0] = expected[0, 1] = expected[1, 0] = True
  np.testing.assert_array_equal(masks.find_boundaries(g), expected)
  # a uniform image has no boundary (edge replication: no virtual differing border)
  assert not masks.find_boundaries(np.full((3, 5), 7, np.uint8)).any()


def test_min_filter_shrinks_by_5_and_takes_window_min():
  rng = np.random.default_rng(0)
  g = rng.integers(0, 256, size=(13, 9)).astype(np.uint8)
  out = masks.min_filter_valid(g)
  assert out.shape == (8, 4) and out.dtype == np.uint8
  brute = np.array([[g[i:i + 6, j:j + 6].min() for j in range(4)] for i in range(8)])
  np.testing.assert_array_equal(out, brute)
  with pytest.raises(ValueError, match='at least'):
    masks.min_filter_valid(np.zeros((5, 10), np.uint8))


def test_clean_mask_two_regions_by_hand():
  # 16x16, left half 0.25 (gray 63 -> label 1), right half 0.75 (gray 191 -> label 3).
  # Columns 7 and 8 are boundary (zeroed); the 6-wide min over the valid extent (11
  # columns) is 0 wherever its window [j, j+5] touches column 7 or 8, i.e. j = 2..8.
  m = np.full((16, 16), 0.25, np.float32)
  m[:, 8:] = 0.75
  out = masks.clean_mask(m, num_labels=5, out_size=11)
  row = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 3, 3], np.int32)
  np.testing.assert_array_equal(out, np.broadcast_to(row, (11, 11)))


def test_clean_mask_truncates_to_8_bit():
  # 0.5 * 255 = 127.5 -> 127 (truncation) -> round(4 * 127 / 255) = round(1.99) = 2
  out = masks.clean_mask(np.full((8, 8), 0.5, np.float32), num_labels=5, out_size=3)
  np.testing.assert_array_equal(out, np.full((3, 3), 2))


def test_clean_mask_non_square_out_size(cases):
  out = masks.clean_mask(cases['in1'], num_labels=5, out_size=(96, 160))
  assert out.shape == (96, 160) and out.dtype == np.int32
  assert set(np.unique(out)) <= set(np.unique(cases['out1']))
  # same as resizing the 59x59 label map directly with PIL
  small = masks.clean_mask(cases['in1'], num_labels=5, out_size=59)
  direct = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((160, 96), Image.NEAREST))
  np.testing.assert_array_equal(out, direct)


@pytest.mark.parametrize('num_labels', [3, 10])
def test_clean_mask_other_num_labels(num_labels):
  rng = np.random.default_rng(num_labels)
  k = num_labels - 1
  blocks = rng.integers(0, num_labels, size=(4, 4))
  m = (np.kron(blocks, np.ones((16, 16), int)) / k).astype(np.float32)   # 64x64
  m = masks.quantize_mask_image(m[..., None], num_labels)
  out = masks.clean_mask(m, num_labels, out_size=100)
  assert out.shape == (100, 100) and out.dtype == np.int32
  assert out.min() >= 0 and out.max() < num_labels
  # block interiors keep their label (away from boundaries and the min filter's reach)
  small = masks.clean_mask(m, num_labels, out_size=59)
  for bi in range(4):
    for bj in range(4):
      assert small[bi * 16 + 5, bj * 16 + 5] == blocks[bi, bj]


def test_clean_mask_bad_inputs():
  with pytest.raises(ValueError, match='num_labels'):
    masks.clean_mask(np.zeros((8, 8), np.float32), 1, 8)
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    masks.clean_mask(np.full((8, 8), 1.5, np.float32), 5, 8)
  with pytest.raises(ValueError, match='float'):
    masks.clean_mask(np.zeros((8, 8), np.int32), 5, 8)
  with pytest.raises(ValueError, match='shape'):
    masks.clean_mask(np.zeros((2, 8, 8), np.float32), 5, 8)
  with pytest.raises(ValueError, match='at least'):
    masks.clean_mask(np.zeros((5, 8), np.float32), 5, 8)
  with pytest.raises(ValueError, match='size'):
    masks.clean_mask(np.zeros((8, 8), np.float32), 5, (8, 8, 8))


# ----------------------------------------------------------------------------- quantize


def test_quantize_by_hand():
  img = np.array([[[0.1, 0.2, 0.3, 0.4],      # rounds to 0,1,1,2 -> mean 1 -> 0.25
                   [0.25, 0.5, 0.25, 0.5],    # 1,2,1,2 -> mean 1.5 -> 2 (half to even)
                   [0.0, 0.25, 0.0, 0.25],    # 0,1,0,1 -> mean 0.5 -> 0 (half to even)
                   [0.9, 1.3, 1.0, 0.95]]],   # clipped: 4,4,4,4 -> 1
                 np.float32)                  # [H=1, W=4, C=4]
  q = masks.quantize_mask_image(img, 5)
  np.testing.assert_array_equal(q, np.array([[0.25, 0.5, 0.0, 1.0]], np.float32))
  assert q.dtype == np.float32 and q.shape == (1, 4)
  # batched NHWC, and num_labels = 3 (levels 0, 0.5, 1)
  q3 = masks.quantize_mask_image(np.stack([img, img]), 3)
  # x2 then round: 0,0,1,1 -> 0 ; 0,1,0,1 (0.5 -> 0) -> 0 ; 0,0,0,0 -> 0 ; 2,2,2,2 -> 1
  np.testing.assert_array_equal(q3, np.array([[[0.0, 0.0, 0.0, 1.0]]] * 2, np.float32))
  with pytest.raises(ValueError, match='HWC'):
    masks.quantize_mask_image(np.zeros((4, 4)), 5)
  with pytest.raises(ValueError, match='num_labels'):
    masks.quantize_mask_image(img, 1)


# ----------------------------------------------------------------------------- helpers


def test_resize_labels_preserves_large_ids():
  labels = np.array([[0, 300], [70000, 5]], np.int64)
  out = masks.resize_labels(labels, (4, 6))
  assert out.dtype == np.int32 and out.shape == (4, 6)
  np.testing.assert_array_equal(out, np.repeat(np.repeat(labels, 2, 0), 3, 1))
  assert masks.resize_labels(labels, 2).tolist() == labels.tolist()
  with pytest.raises(ValueError, match='integer'):
    masks.resize_labels(labels.astype(np.float32), 4)
  with pytest.raises(ValueError, match='int32'):
    masks.resize_labels(labels + 2**40, 4)


def test_latent_labels():
  labels = np.arange(32 * 48).reshape(32, 48).astype(np.int32)
  out = masks.latent_labels(labels)
  assert out.shape == (4, 6)
  np.testing.assert_array_equal(out, labels[::8, ::8])
  assert masks.latent_labels(np.stack([labels, labels]), factor=4).shape == (2, 8, 12)
  with pytest.raises(ValueError, match='divisible'):
    masks.latent_labels(labels[:30])


def test_validate_labels():
  ok = np.array([[0, 1], [2, 4]], np.int32)
  assert masks.validate_labels(ok, 5) is not None
  with pytest.raises(ValueError, match=r'-1, 5, 7'):
    masks.validate_labels(np.array([[-1, 5], [7, 0]]), 5)
  with pytest.raises(ValueError, match='integer dtype'):
    masks.validate_labels(ok.astype(np.float32), 5)


@pytest.mark.parametrize('high, mode', [(4, 'P'), (255, 'P'), (1000, 'I;16')])
def test_png_round_trip(tmp_path, high, mode):
  rng = np.random.default_rng(high)
  labels = rng.integers(0, high + 1, size=(17, 23)).astype(np.int32)
  labels[0, 0] = high
  path = tmp_path / 'mask.png'
  path.write_bytes(b'old')                       # overwritten atomically
  label_maps.write_label_png(path, labels)
  assert os.listdir(tmp_path) == ['mask.png']    # no temporary file left behind
  with Image.open(path) as img:
    assert img.mode == mode and img.size == (23, 17)
    np.testing.assert_array_equal(np.asarray(img), labels)   # the pixels are the ids
    if mode == 'P':          # and a viewer shows the labels' colours (preview_sample's)
      np.testing.assert_array_equal(np.asarray(img.convert('RGB')),
                                    masks.colour_labels(labels))
  out = label_maps.read_label_png(str(path))
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, labels)


def test_read_label_png_modes(tmp_path):
  labels = np.array([[0, 1, 2], [3, 4, 0]], np.uint8)
  Image.fromarray(labels).convert('RGB').save(tmp_path / 'gray_rgb.png')
  np.testing.assert_array_equal(label_maps.read_label_png(tmp_path / 'gray_rgb.png'), labels)
  pal = Image.fromarray(labels).convert('P')
  pal.putpalette([v for i in range(256) for v in (i * 40 % 256, 0, 255 - i)])
  pal.save(tmp_path / 'pal.png')
  with Image.open(tmp_path / 'pal.png') as img:
    assert img.mode == 'P'
  np.testing.assert_array_equal(label_maps.read_label_png(tmp_path / 'pal.png'), labels)
  Image.fromarray(labels > 1).save(tmp_path / 'bits.png')     # mode '1'
  np.testing.assert_array_equal(label_maps.read_label_png(tmp_path / 'bits.png'), labels > 1)


def test_read_label_png_bad_inputs(tmp_path):
  missing = tmp_path / 'nope.png'
  with pytest.raises(FileNotFoundError, match='nope.png'):
    label_maps.read_label_png(missing)
  rgb = np.zeros((2, 2, 3), np.uint8)
  rgb[0, 0] = (255, 0, 0)
  Image.fromarray(rgb).save(tmp_path / 'color.png')
  with pytest.raises(ValueError, match='channels differ.*class id.*mode L'):
    label_maps.read_label_png(tmp_path / 'color.png')
  Image.fromarray(np.zeros((2, 2, 4), np.uint8)).save(tmp_path / 'rgba.png')
  with pytest.raises(ValueError, match="'RGBA'.*class id.*mode L"):
    label_maps.read_label_png(tmp_path / 'rgba.png')


def test_write_label_png_bad_inputs(tmp_path):
  path = tmp_path / 'm.png'
  with pytest.raises(ValueError, match='65536'):
    label_maps.write_label_png(path, np.array([[-1, 0]]))
  with pytest.raises(ValueError, match='65536'):
    label_maps.write_label_png(path, np.array([[70000, 0]]))
  with pytest.raises(ValueError, match='integer'):
    label_maps.write_label_png(path, np.zeros((2, 2), np.float32))
  with pytest.raises(ValueError, match='shape'):
    label_maps.write_label_png(path, np.zeros((2, 2, 2), np.int32))
  assert not os.listdir(tmp_path)


def test_write_label_png_failure_leaves_nothing(tmp_path, monkeypatch):
  path = tmp_path / 'm.png'
  path.write_bytes(b'previous')

  def broken_save(self, fp, *args, **kwargs):
    with open(fp, 'wb') as f:    # the atomic helper hands Pillow a temporary path
      f.write(b'\x89PNG partial')
    raise OSError('disk full')

  monkeypatch.setattr(Image.Image, 'save', broken_save)
  with pytest.raises(OSError, match='disk full'):
    label_maps.write_label_png(path, np.zeros((4, 4), np.int32))
  assert os.listdir(tmp_path) == ['m.png'] and path.read_bytes() == b'previous'


def test_colour_labels_and_preview():
  labels = np.array([[0, 1], [2, 9]], np.int32)
  rgb = masks.colour_labels(labels)
  assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
  np.testing.assert_array_equal(rgb[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(rgb[1, 1], rgb[0, 1])          # 9 cycles to 1
  assert len({tuple(c) for c in masks.colour_labels(np.arange(8)[None])[0]}) == 8
  image = np.zeros((64, 32, 3), np.uint8)
  lab = np.zeros((64, 32), np.int32)
  lab[:, 16:] = 3
  p = masks.preview(image, lab, width=40, gap=8)
  assert p.shape == (32, 40, 3)                                # two 16 px halves + gap
  np.testing.assert_array_equal(p[:, 16:24], 255)
  np.testing.assert_array_equal(p[5, -1], masks.colour_labels(np.array([[3]]))[0, 0])
  with pytest.raises(ValueError, match='differ'):
    masks.preview(image, lab[:32], width=40)
