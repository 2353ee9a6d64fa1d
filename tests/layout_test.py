"""The package layout: no import cycle, the core knows no stage, every module
with logic has a test module, and docs/layout.md's block lists exactly the
modules that exist.

The import graph is built with `ast` from the source (every `import` and
`from ... import`, also those inside functions: a deferred import is still a
dependency), so the test needs no import of the package itself.
"""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "aya_jax")
# the stage packages; everything else under aya_jax/ except the entry point is
# the core (or models/, data/, sampling/), which must not import them
STAGES = ("aya_jax.train", "aya_jax.arbitrage", "aya_jax.merging", "aya_jax.world",
          "aya_jax.recipe")
ENTRY = ("aya_jax.main",)  # wiring: may import anything


def _modules() -> dict:
  """{dotted module name: file path} of every module of the package."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def _imports(module: str, path: str, known: set) -> set:
  """The package modules `module` imports (a `from pkg import name` counts as
  pkg.name when that is a module, else as pkg)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  is_package = path.endswith("__init__.py")
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name in known)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        parts = module.split(".")
        parts = parts if is_package else parts[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in known:
          out.add(full)
        elif base in known:
          out.add(base)
  out.discard(module)
  return out


@pytest.fixture(scope="module")
def graph() -> dict:
  modules = _modules()
  known = set(modules)
  return {m: _imports(m, p, known) for m, p in modules.items()}


def _cycles(graph: dict) -> list:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_cycle_finder_finds_a_planted_cycle():
  planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert _cycles(planted) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle(graph):
  assert _cycles(graph) == [], "import cycles in aya_jax/"


def _is_stage(module: str) -> bool:
  return any(module == s or module.startswith(s + ".") for s in STAGES)


def test_core_imports_no_stage(graph):
  bad = {m: sorted(d for d in deps if _is_stage(d))
         for m, deps in graph.items()
         if not _is_stage(m) and m not in ENTRY}
  bad = {m: deps for m, deps in bad.items() if deps}
  assert bad == {}, "core modules importing a stage package"


def _has_logic(path: str) -> bool:
  """A module that defines a function or a class (not only constants or re-exports)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  return any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body)


# packages whose modules' test files carry the package name (tests/merging_methods_test.py);
# the modules of the core and of models/, data/, sampling/, train/ have tests/<name>_test.py
PREFIXED = ("arbitrage", "merging", "world", "recipe")


def _test_names(module: str) -> list:
  """Where the test module of `module` must be."""
  parts = module.split(".")[1:]
  if len(parts) > 1 and parts[0] in PREFIXED:
    return [f"{'_'.join(parts)}_test.py"]
  return [f"{parts[-1]}_test.py"]


def test_every_module_with_logic_has_a_test_module():
  tests = set(os.listdir(os.path.join(ROOT, "tests")))
  missing = [m for m, p in sorted(_modules().items())
             if not p.endswith("__init__.py") and _has_logic(p)
             and not tests.intersection(_test_names(m))]
  assert missing == [], "modules without tests/<module>_test.py"


def layout_block(text: str) -> set:
  """The modules the code block of docs/layout.md ("# Layout") lists, as paths relative to
  aya_jax/ ("axes.py", "models/config.py"). In the block a line whose first
  word ends in "/" opens a package (its modules follow on it and on the more
  indented lines after it); the `*.py` words of other lines are top-level
  modules; lines starting with "#" are comments; the first unindented line
  after "aya_jax/" ends the package."""
  match = re.search(r"^#+ Layout\n.*?```\n(.*?)```", text, re.S | re.M)
  assert match, 'docs/layout.md has no "# Layout" section with a code block'
  out, package, package_indent = set(), None, -1
  for line in match.group(1).splitlines():
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or stripped.startswith("aya_jax/"):
      continue
    indent = len(line) - len(line.lstrip())
    if indent == 0:  # configs/, experiments/, tests/: outside the package
      break
    first = stripped.split()[0]
    if first.endswith("/"):
      package, package_indent = first.rstrip("/"), indent
    elif package is not None and indent <= package_indent:
      package = None
    names = re.findall(r"\b(\w+\.py)\b", stripped)
    out.update(f"{package}/{n}" if package else n for n in names)
  return out


def test_layout_block_parser():
  block = ("## Layout\n\n```\naya_jax/\n  main.py  axes.py     entry; axis names\n"
           "  # a comment\n  models/              config.py, layers.py\n"
           "                       hf.py\n  losses.py            pure losses\n"
           "configs/  one experiment per file: pipeline.py\n```\n")
  assert layout_block(block) == {"main.py", "axes.py", "models/config.py", "models/layers.py",
                                  "models/hf.py", "losses.py"}


def test_layout_block_lists_exactly_the_modules():
  listed = layout_block(open(os.path.join(ROOT, "docs", "layout.md"), encoding="utf-8").read())
  actual = {os.path.relpath(p, PACKAGE).replace(os.sep, "/") for p in _modules().values()
            if not p.endswith("__init__.py")}
  assert sorted(actual - listed) == [], "modules missing from the block of docs/layout.md"
  assert sorted(listed - actual) == [], "docs/layout.md lists modules that do not exist"
