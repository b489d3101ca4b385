"""A trained U-Net's objective (model.json) picks how it is sampled, in the pipeline and
in the README's "your own model" example (`examples/own_model.py`, `scripts/sample_own_model.py`)."""

import inspect
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from tiled_ldm_jax import demo
from tiled_ldm_jax import masks
from tiled_ldm_jax.examples import own_model
from tiled_ldm_jax import pipeline
from tiled_ldm_jax import sampling
from tiled_ldm_jax import stages
from tiled_ldm_jax.evaluation import benchmark
from tiled_ldm_jax.models import unet
from tiled_ldm_jax.files import label_maps

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _with_objective(tmp_path, objective: str) -> str:
  """The demo image U-Net's folder relabelled as a model trained with `objective`."""
  folder = tmp_path / f'unet_{objective}'
  shutil.copytree(demo.model_path('image_unet'), folder)
  meta = json.loads((folder / 'model.json').read_text())
  meta['objective'] = objective
  (folder / 'model.json').write_text(json.dumps(meta))
  return str(folder)


@pytest.mark.parametrize('objective', ['flow', 'v'])
def test_pipeline_samples_by_the_models_objective(tmp_path, objective):
  """The pipeline's image stage on a flow / v model equals `sampling.sample` with that
  prediction and the pipeline's keys, and differs from sampling it as eps."""
  labels = benchmark.benchmark_label_map(128, 256, 4)[None]            # [1, 128, 256]
  folder = _with_objective(tmp_path, objective)
  pipe = pipeline.Pipeline.from_pretrained(folder, demo.model_path('vae'))
  assert pipe.unet.objective == objective
  opts = dict(sampling_steps=3, patch_size=128, schedule='random', patches_per_step=1,
              solver='ddim')   # the process trained_unet gives: DDIM (eta 1) / Euler
  z = np.asarray(pipe.sample_latents(labels, seed=4, **opts))
  # The expectation from the training objectives' definitions (docs/training.md), not
  # from the mapping the pipeline uses (`guidance.trained_unet`).
  apply = unet.eps_fn(pipe.unet.config)
  if objective == 'flow':   # x_t = (1 - t) x0 + t noise, the U-Net told t * 1000: Euler
    net, process = (lambda p, x, t, *c: apply(p, x, t * 1000.0, *c)), sampling.Flow()
  else:                     # v on the cosine schedule, x0 not clipped: DDIM
    net, process = apply, sampling.Diffusion('v', 'cosine', clip_x0=None)
  direct = sampling.sample(
      sampling.multilabel_guidance(net, pipe.unet.config.num_classes, 3.0), pipe.unet.params,
      sampling.spatial(masks.latent_labels(labels, 8).astype(np.int32)),
      keys=stages.stage_keys(4, [0], stages.IMAGE),
      latent_shape=(16, 32, 4), patch=16, sampling_steps=3, process=process)
  np.testing.assert_allclose(z, np.asarray(direct), atol=1e-5)
  eps = pipeline.Pipeline.from_pretrained(demo.model_path('image_unet'), demo.model_path('vae'))
  assert eps.unet.objective == 'eps'
  assert np.abs(np.asarray(eps.sample_latents(labels, seed=4, **opts)) - z).max() > 1e-2


def test_unknown_objective_is_refused(tmp_path):
  folder = _with_objective(tmp_path, 'score')
  with pytest.raises(ValueError, match="unknown objective 'score'"):
    pipeline.Pipeline.from_pretrained(folder, demo.model_path('vae'))


def test_docs_example_is_the_functions_code():
  text = (ROOT / 'docs' / 'own_model.md').read_text()
  blocks = re.findall(r'<!-- own-model-example -->\s*```python\n(.*?)```', text, re.S)
  assert len(blocks) == 1, 'docs/own_model.md must hold one marked own-model example'
  source = inspect.getsource(own_model.sample_trained_unet)
  squash = lambda s: ' '.join(s.split())
  for line in blocks[0].splitlines():
    code = line.split('#')[0].strip()
    if code and not code.startswith(('from ', 'import ')):
      assert squash(code) in squash(source), f'docs line not in the code: {line}'


def test_own_model_script(tmp_path, script_server):
  """The script on the demo eps model (and the bundled flow model when present) writes
  an image whose label regions differ; a bad request writes nothing."""
  models = [(demo.model_path('image_unet'), demo.model_path('vae'))]
  if (pathlib.Path(demo.model_path('flow_unet')) / 'model.json').is_file():
    models.append((demo.model_path('flow_unet'), demo.model_path('flow_vae')))
  for i, (model, vae) in enumerate(models):
    out = tmp_path / f'own{i}.png'
    run = script_server.run(ROOT / 'scripts/sample_own_model.py', f'--unet_ckpt={model}',
                            f'--vae_ckpt={vae}', '--image_size=256', '--sampling_steps=3',
                            f'--output={out}')
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])['shape'] == [256, 256, 3]
    img = np.asarray(Image.open(out), np.float32)
    left, right = img[64:, :96].mean((0, 1)), img[64:, 160:].mean((0, 1))
    assert np.abs(left - right).max() > 2.0, (left, right)   # labels 1 and 2 differ
  bad = tmp_path / 'bad.png'
  label_maps.write_label_png(tmp_path / 'ids7.png', np.full((128, 128), 7, np.int32))
  for args, message in ((['--image_size=100'], 'not divisible by the latent factor 8'),
                        ([f'--labels={tmp_path / "ids7.png"}'], 'out of range [0, 5): 7')):
    run = script_server.run(ROOT / 'scripts/sample_own_model.py', f'--output={bad}', *args,
                            timeout=300)
    assert run.returncode == 1 and run.stderr.strip() == f'error: {run.stderr.strip()[7:]}'
    assert len(run.stderr.strip().splitlines()) == 1 and message in run.stderr, run.stderr
    assert not bad.exists()
