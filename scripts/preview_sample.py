"""Writes a downscaled side-by-side preview of a sample: image | mask in label colours.

  python scripts/preview_sample.py --sample=results/large/sample0000.png \
      --output=docs/demo_sample.png --width=1024

The mask defaults to `<sample>_mask.png`. Label colours: 0 white, 1 red, 2 green,
3 blue, 4 yellow (`masks.colour_labels`).
"""

from absl import flags

from tiled_ldm_jax import flag_util
from tiled_ldm_jax.files import image_files
from tiled_ldm_jax import masks
from tiled_ldm_jax.output import writers
from tiled_ldm_jax.files import label_maps

_SAMPLE = flags.DEFINE_string('sample', None, 'Image written by sample_large_image.py.')
_MASK = flags.DEFINE_string('mask', None, 'Label PNG (default: <sample>_mask.png).')
_OUTPUT = flags.DEFINE_string('output', None, 'Preview PNG to write.')
_WIDTH = flags.DEFINE_integer('width', 1024, 'Width of the preview in pixels.')
flags.mark_flags_as_required(['sample', 'output'])


def main(argv):
  del argv
  mask = _MASK.value or writers.mask_path(_SAMPLE.value)
  flag_util.check_value('mask', mask, 'file')
  image = image_files.read_rgb(_SAMPLE.value, what='sample image')
  writers.write_image(_OUTPUT.value, masks.preview(image, label_maps.read_label_png(mask),
                                                   _WIDTH.value))


if __name__ == '__main__':
  flag_util.run(main, {'sample': 'file', 'mask': 'file', 'output': 'out',
                      'width': 'int>0'})
