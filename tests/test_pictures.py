"""What a user looks at: the overview JPEG written beside a TIFF / OME-Zarr sample (every
k-th pixel of the streamed bands, the labels' colours beside)."""

import numpy as np
from PIL import Image

from tiled_ldm_jax import generate
from tiled_ldm_jax.generate import write as generate_write
from tiled_ldm_jax import masks
from tiled_ldm_jax.files import label_maps


def test_overview_of_streamed_bands(tmp_path, monkeypatch):
  monkeypatch.setattr(generate_write, 'OVERVIEW_SIDE', 40)
  h, w = 100, 130                                  # k = ceil(130 / 40) = 4
  y, x = np.mgrid[0:h, 0:w]
  img = np.stack([2 * y, 2 * x - y // 2, 255 - x], -1).clip(0, 255).astype(np.uint8)
  labels = label_maps.LabelMap(np.arange(16, dtype=np.uint8).reshape(4, 4) % 5, (h, w))  # blocks
  view = generate_write._Overview(h, w)  # pylint: disable=protected-access
  bands = [(r, img[r:r + 23]) for r in range(0, h, 23)]   # bands not aligned to k
  assert [r for r, _ in view.tap(iter(bands))] == [r for r, _ in bands]
  np.testing.assert_array_equal(np.concatenate(view.parts), img[::4, ::4])
  view.write(str(tmp_path / 'o.jpg'), labels)
  with Image.open(tmp_path / 'o.jpg') as im:
    assert im.format == 'JPEG' and im.size == (2 * 33 + 8, 25)
    got = np.asarray(im)
  colours = masks.colour_labels(np.asarray(labels)[::4, ::4])
  assert np.median(np.abs(got[:, -33:].astype(int) - colours)) < 8   # JPEG of flat blocks
  assert np.abs(got[:, :33].astype(int) - img[::4, ::4]).mean() < 6
