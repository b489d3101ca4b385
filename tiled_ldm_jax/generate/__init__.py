"""Files on disk from a `Pipeline`: what `scripts/sample_large_image.py` runs (SPEC 5).

Read top to bottom:

- `config.py`: `GenerationConfig` (every field a flag) and where a sample's files go;
- `inputs.py`: `prepare(cfg) -> Plan`, every check that can fail (flags, models, label
  and init files, output folder, memory, disk, resume) before any compute, with the
  run's `request.Request` built once; `dry_run(plan)` reports it;
- `runner.py`: `run(plan)` generates batch by batch: label maps (`--mask`, or the mask
  model), the image stage, then each sample's files, saving a resumable state between
  chunks with `checkpoint_every` (`resume.py`);
- `write.py`: the writers (`sampleNNNN.<ext>` beside `sampleNNNN_mask.png` and
  `sampleNNNN.json`), each file written under a temporary name and renamed when
  complete (`files/atomic.py`): an interrupted run leaves nothing that looks whole.

Image n of a run uses the keys the `Pipeline` gives index n, so it does not depend on
the batch it was sampled in.
"""

from tiled_ldm_jax.generate.config import DEFAULT_IMAGE_SIZE
from tiled_ldm_jax.generate.config import FORMATS
from tiled_ldm_jax.generate.config import GenerationConfig
from tiled_ldm_jax.generate.config import next_index
from tiled_ldm_jax.generate.config import output_format
from tiled_ldm_jax.generate.inputs import Plan
from tiled_ldm_jax.generate.inputs import dry_run
from tiled_ldm_jax.generate.inputs import label_report
from tiled_ldm_jax.generate.inputs import label_summary
from tiled_ldm_jax.generate.inputs import prepare
from tiled_ldm_jax.generate.runner import encode_init
from tiled_ldm_jax.generate.runner import generate
from tiled_ldm_jax.generate.runner import run
from tiled_ldm_jax.generate.write import shares_decode

__all__ = ['DEFAULT_IMAGE_SIZE', 'FORMATS', 'GenerationConfig', 'Plan', 'dry_run',
           'encode_init', 'generate', 'label_report', 'label_summary', 'next_index',
           'output_format', 'prepare', 'run', 'shares_decode']
