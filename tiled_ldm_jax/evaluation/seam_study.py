"""Seams of sampler variants against their untiled floor (`tools/compare_seams.py`).

One label everywhere (a smooth and a textured class of the demo models), each variant at
each step count and seed; the floor is the same label, seed, steps and solver sampled
untiled (one window over the whole latent), decoded the same way. Rows: the line score
(`seams.line_score`), its ratio to the floor, U-Net samples per latent pixel-step,
seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw

from tiled_ldm_jax.evaluation import seams

UNTILED = 'untiled'


def _run(pipe, o, labels, seed: int):
  start = time.perf_counter()
  req = pipe.request(labels.shape[1:3], len(labels), o)
  smp, state, latent = pipe.stages.image_stage(req, labels, np.arange(len(labels)), seed)
  state = smp.run(pipe.unet.params, state, latent)
  jax.block_until_ready(state.x)
  return state, time.perf_counter() - start


def study(pipe, *, image_size: int, labels, seeds, steps, variants: dict[str, dict],
          out_dir: str | None = None, log=print) -> list[dict]:
  """Rows of every (label, seed, steps, variant), and of the untiled floors.

  variants: name -> `Options` overrides (e.g. {'solver': 'dpmpp2m'}); each variant's
  floor is the untiled run with its solver and eta. Images go to `out_dir` as
  `l{label}_s{seed}_{steps}_{name}.png` when given.
  """
  rows, floors = [], {}
  decode_o = pipe.resolve()          # every image decoded the same way (default tiles)
  for seed in seeds:              # seeds outermost: a cut run still has every label
    for label in labels:
      lab = np.full((1, image_size, image_size), int(label), np.int32)
      for s in steps:
        for name, overrides in [(None, None)] + list(variants.items()):
          if name is None:
            continue
          o = pipe.resolve(sampling_steps=s, **overrides)
          floor_key = (label, seed, s, o.solver, o.eta)
          todo = []
          if floor_key not in floors:
            todo.append((UNTILED, dataclasses.replace(
                o, patch_size=image_size, grid_margin=0, schedule='grid',
                patches_per_step=None)))
          todo.append((name, o))
          for run_name, ro in todo:
            state, secs = _run(pipe, ro, lab, seed)
            img = pipe.decode(state.x, options=decode_o)[0]
            score = seams.line_score(img)
            h, w = state.x.shape[1:3]
            p = ro.patch_size // pipe.geometry.factor   # evaluations count windows
            row = dict(label=int(label), seed=int(seed), steps=int(s), variant=run_name,
                       solver=ro.solver, eta=ro.eta, line_score=round(score, 3),
                       unet_samples_per_pixel_step=round(
                           float(state.evaluations) * p * p / (h * w * s), 3),
                       seconds=round(secs, 1))
            if run_name == UNTILED:
              floors[floor_key] = score
              row['variant'] = f'{UNTILED} ({ro.solver})'
            row['floor'] = round(floors[floor_key], 3)
            row['over_floor'] = round(score / max(floors[floor_key], 1e-9), 3)
            rows.append(row)
            log(json.dumps(row))
            if out_dir:
              os.makedirs(out_dir, exist_ok=True)
              Image.fromarray(img).save(_image_path(out_dir, row))
  return rows


def _image_path(out_dir: str, row: dict) -> str:
  name = row['variant'].replace(' (', '_').replace(')', '')   # 'untiled (ddim)' -> untiled_ddim
  return os.path.join(out_dir, f"l{row['label']}_s{row['seed']}_{row['steps']}_{name}.png")


def read_rows(log_path: str) -> list[dict]:
  """The rows `study` logged as JSON lines (e.g. a tool's output), for `figure`."""
  with open(log_path) as f:
    return [json.loads(line) for line in f if line.startswith('{"label"')]


def summary(rows: list[dict]) -> list[dict]:
  """Mean and spread over seeds and labels of each (variant, steps)."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r['variant'], r['steps']), []).append(r)
  out = []
  for (variant, s), g in groups.items():
    ratio = np.array([r['over_floor'] for r in g])
    out.append(dict(variant=variant, steps=s, runs=len(g),
                    line_score=round(float(np.mean([r['line_score'] for r in g])), 2),
                    over_floor=round(float(ratio.mean()), 2),
                    over_floor_max=round(float(ratio.max()), 2),
                    unet_samples_per_pixel_step=round(float(np.mean(
                        [r['unet_samples_per_pixel_step'] for r in g])), 3)))
  return out


def figure(out_dir: str, rows: list[dict], path: str, *, label: int, seed: int,
           crop: int = 320, contrast: float = 2.5, variants=None) -> None:
  """One image per (variant, steps) of `label` and `seed` in a grid (variants down,
  steps across), each the top-left crop with its contrast raised (seams are faint on
  the pale demo textures), its line score / floor and U-Net samples written under it."""
  from PIL import ImageEnhance  # pylint: disable=g-import-not-at-top
  mine = [r for r in rows if r['label'] == label and r['seed'] == seed
          and (variants is None or r['variant'] in variants)]
  variants = list(dict.fromkeys(r['variant'] for r in mine))
  steps = sorted({r['steps'] for r in mine})
  pad, text = 8, 30
  sheet = Image.new('RGB', (len(steps) * (crop + pad) + 160,
                            len(variants) * (crop + text + pad) + 24), 'white')
  draw = ImageDraw.Draw(sheet)
  for j, s in enumerate(steps):
    draw.text((160 + j * (crop + pad), 4), f'{s} steps', fill='black')
  for i, v in enumerate(variants):
    y = 24 + i * (crop + text + pad)
    draw.text((4, y + crop // 2), v[:24], fill='black')
    for j, s in enumerate(steps):
      r = next((r for r in mine if r['variant'] == v and r['steps'] == s), None)
      if r is None:
        continue
      img = Image.open(_image_path(out_dir, r))
      img = ImageEnhance.Contrast(img.crop((0, 0, crop, crop))).enhance(contrast)
      x = 160 + j * (crop + pad)
      sheet.paste(img, (x, y))
      draw.text((x, y + crop + 2), f"lines {r['line_score']:.2f} ({r['over_floor']:.2f}x "
                f"floor)", fill='black')
      draw.text((x, y + crop + 14), f"{r['unet_samples_per_pixel_step']:.2f} U-Net samples "
                f"per latent px-step", fill='black')
  sheet.save(path, quality=90)
