"""OME-Zarr stores as OME-Zarr readers see them (read back with zarr-python)."""

import json
import os

import numpy as np
import pytest

from tiled_ldm_jax.output import ome_zarr

zarr = pytest.importorskip('zarr')

from test_tiff_pyramid import failing_bands, reference_pyramid, smooth_noise  # pylint: disable=g-import-not-at-top,wrong-import-position


def bands_of(img, n):
  return ((r, img[r:r + n]) for r in range(0, img.shape[0], n))


def label_image(h, w):
  yy, xx = np.mgrid[0:h, 0:w]
  return ((yy // 41 + 3 * (xx // 29)) % 7).astype(np.int32)


def read_level(group, level):
  """Image level as [h, w, C]."""
  return np.asarray(group[str(level)][:]).transpose(1, 2, 0)


def test_store_metadata_levels_and_labels(tmp_path):
  img = smooth_noise(300, 451, seed=4)
  labels = label_image(300, 451)
  path = tmp_path / 'sample0000.zarr'
  shapes = ome_zarr.write_ome_zarr(path, bands_of(img, 37), img.shape, labels=labels,
                                   tile=64, mpp=0.5)
  assert shapes == [(300, 451), (150, 226), (75, 113), (38, 57)]
  assert os.listdir(tmp_path) == ['sample0000.zarr']        # no temporary left
  root = zarr.open_group(str(path), mode='r')
  ms = root.attrs['multiscales']
  assert len(ms) == 1 and ms[0]['version'] == '0.4'
  # Channel axis before the space axes (NGFF 0.4 order), micrometres with mpp.
  assert [(a['name'], a['type']) for a in ms[0]['axes']] == [
      ('c', 'channel'), ('y', 'space'), ('x', 'space')]
  assert [a.get('unit') for a in ms[0]['axes']] == [None, 'micrometer', 'micrometer']
  for level, ds in enumerate(ms[0]['datasets']):
    assert ds['path'] == str(level)
    assert ds['coordinateTransformations'] == [
        {'type': 'scale', 'scale': [1.0, 0.5 * 2 ** level, 0.5 * 2 ** level]}]
  assert [c['color'] for c in root.attrs['omero']['channels']] == ['FF0000', '00FF00',
                                                                   '0000FF']
  want = reference_pyramid(img, len(shapes))
  for level, (h, w) in enumerate(shapes):
    arr = root[str(level)]
    assert arr.shape == (3, h, w) and arr.dtype == np.uint8
    assert arr.chunks == (1, 64, 64)
    np.testing.assert_array_equal(read_level(root, level), want[level])
  # Labels: listed, image-label, same levels (nearest: top-left id of each 2x2 block).
  assert root['labels'].attrs['labels'] == ['tissue']
  lab = root['labels/tissue']
  assert lab.attrs['image-label']['source'] == {'image': '../../'}
  assert len(lab.attrs['multiscales'][0]['datasets']) == len(shapes)
  for level, (h, w) in enumerate(shapes):
    arr = lab[str(level)]
    assert arr.shape == (1, h, w) and arr.dtype == np.uint8
    step = 2 ** level
    np.testing.assert_array_equal(arr[0], labels[::step, ::step])
  # Nested chunk keys ("/"), as NGFF 0.4 lays them out.
  meta = json.loads((path / '0' / '.zarray').read_text())
  assert meta['dimension_separator'] == '/' and (path / '0' / '0' / '0' / '0').is_file()


def test_no_mpp_no_labels(tmp_path):
  img = smooth_noise(100, 80, seed=5)
  ome_zarr.write_ome_zarr(tmp_path / 'a.zarr', [(0, img)], img.shape, tile=32)
  root = zarr.open_group(str(tmp_path / 'a.zarr'), mode='r')
  ms = root.attrs['multiscales'][0]
  assert all('unit' not in a for a in ms['axes'])
  assert ms['datasets'][1]['coordinateTransformations'][0]['scale'] == [1.0, 2.0, 2.0]
  assert 'labels' not in root
  np.testing.assert_array_equal(read_level(root, 0), img)


def test_wide_label_ids_are_uint16(tmp_path):
  img = smooth_noise(64, 64)
  labels = np.arange(64 * 64).reshape(64, 64) % 700
  ome_zarr.write_ome_zarr(tmp_path / 'a.zarr', [(0, img)], img.shape, labels=labels, tile=32)
  arr = zarr.open_group(str(tmp_path / 'a.zarr'), mode='r')['labels/tissue/0']
  assert arr.dtype == np.uint16
  np.testing.assert_array_equal(arr[0], labels)


def test_processes_write_their_own_rows(tmp_path):
  """Two writers (as two processes would) fill disjoint row ranges in any order; the
  levels they leave out are built from the deepest one they wrote; the result equals the
  one-process store."""
  img = smooth_noise(512, 300, seed=6)
  labels = label_image(512, 300)
  one = tmp_path / 'one.zarr'
  ome_zarr.write_ome_zarr(one, bands_of(img, 64), img.shape, labels=labels, tile=64)
  path = tmp_path / 'two.zarr'
  store = ome_zarr.create_store(path, img.shape, tile=64)
  assert not os.path.exists(path)              # only the hidden temporary so far
  # Rows 256.. first, then 0..256, two levels each (256 = tile * 2^(levels-1) * 2).
  lower = ((256 + r, rows) for r, rows in bands_of(img[256:], 50))
  assert ome_zarr.write_bands(store, lower, levels=2) == (256, 512)
  assert ome_zarr.write_bands(store, bands_of(img[:256], 50), levels=2) == (0, 256)
  for r0 in (256, 0):
    rows = ((r0 + r, labels[r0 + r:r0 + r + 100]) for r in range(0, 256, 100))
    ome_zarr.write_bands(store, rows, array='labels', levels=2)
  ome_zarr.build_levels(store, 1)
  ome_zarr.build_levels(store, 1, array='labels')
  ome_zarr.finalize(store, path)
  a = zarr.open_group(str(one), mode='r')
  b = zarr.open_group(str(path), mode='r')
  n = len(a.attrs['multiscales'][0]['datasets'])
  assert n == 4
  for level in range(n):
    np.testing.assert_array_equal(a[str(level)][:], b[str(level)][:])
    np.testing.assert_array_equal(a[f'labels/tissue/{level}'][:],
                                  b[f'labels/tissue/{level}'][:])
  assert sorted(os.listdir(tmp_path)) == ['one.zarr', 'two.zarr']


def test_row_ranges_must_align_with_the_levels(tmp_path):
  img = smooth_noise(128, 64)
  store = ome_zarr.create_store(tmp_path / 'a.zarr', img.shape, tile=32)  # 3 levels
  with pytest.raises(ValueError, match='multiple of 4'):
    ome_zarr.write_bands(store, [(2, img[2:])])
  with pytest.raises(ValueError, match='rows end at 30'):
    ome_zarr.write_bands(store, [(0, img[:30])])
  with pytest.raises(ValueError, match='does not continue'):
    ome_zarr.write_bands(store, [(0, img[:16]), (32, img[32:])])


def test_failure_mid_stream_leaves_no_store(tmp_path):
  img = smooth_noise(128, 96, seed=7)
  path = tmp_path / 'sample0001.zarr'
  with pytest.raises(RuntimeError, match='decoder crashed'):
    ome_zarr.write_ome_zarr(path, failing_bands(img, 80), img.shape, tile=32,
                            labels=label_image(128, 96))
  assert os.listdir(tmp_path) == []
  # Too few rows: an error, not a store missing its bottom.
  with pytest.raises(ValueError, match='bands ended at row 64'):
    ome_zarr.write_ome_zarr(path, [(0, img[:64])], img.shape, tile=32)
  assert os.listdir(tmp_path) == []
  # A complete store already at the name survives a failed rewrite, then is replaced.
  ome_zarr.write_ome_zarr(path, [(0, img)], img.shape, tile=32)
  with pytest.raises(RuntimeError, match='decoder crashed'):
    ome_zarr.write_ome_zarr(path, failing_bands(255 - img, 48), img.shape, tile=32)
  assert os.listdir(tmp_path) == ['sample0001.zarr']
  np.testing.assert_array_equal(read_level(zarr.open_group(str(path), mode='r'), 0), img)
  ome_zarr.write_ome_zarr(path, [(0, 255 - img)], img.shape, tile=32)
  assert os.listdir(tmp_path) == ['sample0001.zarr']
  np.testing.assert_array_equal(read_level(zarr.open_group(str(path), mode='r'), 0),
                                255 - img)
