"""The docs tell the truth about names: every file path, `*.py` module and dotted
`tiled_ldm_jax.` / `sampling.` name in README.md, BUILD.md and docs/ exists; the README
stays a library's README; no tracked file names an issue number or a machine path."""

import importlib
import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / 'README.md', REPO / 'BUILD.md'] + sorted((REPO / 'docs').glob('*.md'))
PATH = re.compile(r'(?<![\w./-])((?:tiled_ldm_jax|scripts|tools|configs|tests|docs)/'
                  r'[\w/.-]*\w)')
MODULE = re.compile(r'(?<![\w./-])(\w+\.py)\b')
DOTTED = re.compile(r'(?<![\w.])(tiled_ldm_jax(?:\.\w+)+|sampling\.[A-Za-z_]\w*)')
FILE_SUFFIXES = {'py', 'json', 'jsonl', 'md', 'png', 'jpg', 'tif', 'txt', 'toml', 'zarr'}
SHORT = re.compile(r'`(\w+)\.([A-Za-z_]\w*)[`(]')     # `masks.latent_labels(...)` in code


def _modules_by_stem() -> dict:
  """Stem -> dotted module, for the package's modules whose stem is unique."""
  seen = {}
  for path in (REPO / 'tiled_ldm_jax').rglob('*.py'):
    if path.stem == '__init__':
      continue
    dotted = '.'.join(path.relative_to(REPO).with_suffix('').parts)
    seen.setdefault(path.stem, []).append(dotted)
  return {k: v[0] for k, v in seen.items() if len(v) == 1}


def _resolve(dotted: str):
  """The object a dotted name refers to: the longest importable module, then attributes."""
  if dotted.startswith('sampling.'):
    dotted = 'tiled_ldm_jax.' + dotted
  parts = dotted.split('.')
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module('.'.join(parts[:i]))
    except ImportError:
      continue
    for name in parts[i:]:
      obj = getattr(obj, name)
    return obj
  raise ImportError(dotted)


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_every_named_path_and_name_exists(doc):
  text = doc.read_text()
  names = {p.name for p in REPO.rglob('*.py') if '.venv' not in p.parts}
  missing = [p for p in set(PATH.findall(text)) if not (REPO / p).exists()]
  missing += [m for m in set(MODULE.findall(text)) if m not in names]
  stems = _modules_by_stem()
  short = {f'{stems[a]}.{b}' for a, b in SHORT.findall(text)
           if a in stems and b not in FILE_SUFFIXES}
  for dotted in set(DOTTED.findall(text)) | short:
    try:
      _resolve(dotted)
    except (ImportError, AttributeError):
      missing.append(dotted)
  assert not missing, f'{doc.name} names what does not exist: {sorted(missing)}'


def test_readme_is_short_and_links_resolve():
  text = (REPO / 'README.md').read_text()
  assert len(text.splitlines()) <= 220
  for target in re.findall(r'\]\(([^)#]+)\)', text):
    if not target.startswith('http'):
      assert (REPO / target).exists(), target


def test_no_issue_numbers_or_machine_paths_in_tracked_files():
  files = subprocess.run(['git', 'ls-files'], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
  bad = re.compile(r'\bissues? ?#?\d+\b|/work/|/home/\w', re.I)
  found = []
  for name in files:
    path = REPO / name
    if path.suffix in ('.png', '.jpg', '.npy', '.npz', '.pt', '.bin', '.safetensors') or \
        name.startswith('tests/data/') or name == 'tests/test_docs.py' or not path.is_file():
      continue
    try:
      text = path.read_text()
    except UnicodeDecodeError:
      continue
    found += [f'{name}: {m.group(0)}' for m in bad.finditer(text)]
  assert not found, found
