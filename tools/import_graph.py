r"""The package's shape, read from its source (no import): modules and lines per folder,
import arrows between its modules, circles, upward imports, the longest functions and
`Pipeline`'s public methods. Prints one JSON object.

    python tools/import_graph.py [--root=.]

Floors: each sub-package (`files/`, `sampling/`, ...) is one node, each top-level module
(`tiled_ldm_jax/*.py`) another; "floor circles" are circles between those nodes (e.g.
`files/` importing `masks.py` while `masks.py` imports `files/`): a lower floor reaching
up. Imports inside functions count (they are arrows all the same).
"""

import argparse
import ast
import collections
import json
import os

PACKAGE = 'tiled_ldm_jax'


def _modules(root: str) -> dict[str, str]:
  out = {}
  base = os.path.join(root, PACKAGE)
  for folder, _, files in os.walk(base):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = path
  return out


def _imports(tree: ast.AST, name: str, modules) -> set[str]:
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      mod = node.module
      for a in node.names:
        full = f'{mod}.{a.name}'
        found.add(full if full in modules else mod)
  return {m for m in found if m in modules and m != name and m != PACKAGE}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))
  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def _node(module: str) -> str:
  """The floor a module belongs to: its sub-package, or itself at the top level."""
  parts = module.split('.')
  return '.'.join(parts[:2]) if len(parts) > 2 else module


def _floor_edges(edges):
  out = collections.defaultdict(set)
  for a, bs in edges.items():
    for b in bs:
      if _node(a) != _node(b):
        out[_node(a)].add(_node(b))
  return out


def report(root: str) -> dict:
  """The package's shape under `root` (the repository), as printed by `main`."""
  modules = _modules(root)
  edges, lines, functions = {}, collections.Counter(), []
  pipeline_public = []
  for name, path in sorted(modules.items()):
    src = open(path, encoding='utf-8').read()
    tree = ast.parse(src)
    edges[name] = _imports(tree, name, modules)
    folder = os.path.dirname(os.path.relpath(path, root))
    lines[folder] += src.count('\n')
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        functions.append((node.end_lineno - node.lineno + 1, f'{name}.{node.name}'))
      if (name == f'{PACKAGE}.pipeline' and isinstance(node, ast.ClassDef)
          and node.name == 'Pipeline'):
        pipeline_public = [f.name for f in node.body
                           if isinstance(f, ast.FunctionDef) and not f.name.startswith('_')]
  floors = _floor_edges(edges)
  floor_circles = _cycles(floors)
  in_circle = {n for c in floor_circles for n in c}
  tangles = sorted(f'{a} -> {b}' for a, bs in edges.items() for b in bs
                   if _node(a) != _node(b) and _node(a) in in_circle and _node(b) in in_circle
                   and any(_node(a) in c and _node(b) in c for c in floor_circles))
  per_folder = collections.Counter(os.path.dirname(os.path.relpath(p, root))
                                   for p in modules.values())
  return {
      'modules_per_folder': dict(sorted(per_folder.items())),
      'lines_per_folder': dict(sorted(lines.items())),
      'import_arrows': sum(len(v) for v in edges.values()),
      'circles': _cycles(edges),
      'floor_circles': floor_circles,
      'imports_in_floor_circles': tangles,
      'longest_functions': [f'{n} lines {f}' for n, f in sorted(functions, reverse=True)[:10]],
      'pipeline_public_methods': pipeline_public,
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--root', default='.')
  print(json.dumps(report(ap.parse_args().root), indent=1))


if __name__ == '__main__':
  main()
