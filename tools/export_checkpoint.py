"""Exports the EMA params of a training checkpoint, for a run stopped before its last step.

  python tools/export_checkpoint.py --workdir=runs/demo/image_unet --step=750 \
      --output=runs/demo/image_unet/model_750

`scripts/train.py` exports `<workdir>/model` only after the config's last step. A run cut
short (a time limit, a shared machine) still has its checkpoints; this writes the model
folder of one of them the same way (`training.export.export`: the EMA params and the
model.json the sampler reads), with the config the run was started with (its
`train_config.json`). The learning rate at that step is the one of the full schedule,
not annealed to its end: say so where such a model is used.
"""

from __future__ import annotations

import json
import os
import tempfile

from absl import app
from absl import flags

from tiled_ldm_jax import training
from tiled_ldm_jax.files import atomic
from tiled_ldm_jax.models import checkpoint
from tiled_ldm_jax.training import export as export_lib
from tiled_ldm_jax.training import step as step_lib
from tiled_ldm_jax.training import tasks as tasks_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'the run\'s workdir')
_STEP = flags.DEFINE_integer('step', None, 'checkpointed step (default: the newest)')
_OUTPUT = flags.DEFINE_string('output', None, 'model folder to write')
flags.mark_flags_as_required(['workdir', 'output'])


def main(argv):
  del argv
  with open(os.path.join(_WORKDIR.value, 'train_config.json')) as f:
    train_cfg = json.load(f)['train']
  cfg, model_cfg = training.load_config(train_cfg)
  task = tasks_lib.make_task(cfg, model_cfg)
  ckpt_dir = os.path.join(os.path.abspath(_WORKDIR.value), 'checkpoints')
  step = _STEP.value if _STEP.value is not None else checkpoint.latest_step(ckpt_dir)
  state = checkpoint.restore_train_state(ckpt_dir, step_lib.abstract_state(task, cfg), step)
  with tempfile.TemporaryDirectory() as tmp:   # export.json names the config's last step
    export_lib.export(cfg, model_cfg, task, state.ema_params, _OUTPUT.value, tmp)
    with open(os.path.join(tmp, 'export.json')) as f:
      info = json.load(f)
  info.update(step=int(step), schedule_steps=cfg.steps)
  atomic.write_json(os.path.join(_WORKDIR.value, f'export_step{step}.json'), info)
  print(f'exported the EMA params of step {step} of {cfg.steps} to {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
