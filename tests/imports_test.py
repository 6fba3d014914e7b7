"""The package's import graph: no cycle, a leaf under the config schema, a docstring per module."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "hashgnn_jax"


def _module_names(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted name -> file of every module under the package folder `root` (packages included)."""
  names = {}
  for path in root.rglob("*.py"):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    names[".".join(parts)] = path
  return names


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
  """Module -> the package modules it imports anywhere in its body, functions included.

  `from a.b import c` imports the module a.b.c where c is one, else a.b; importing a module
  imports each package above it first, so those count too.
  """
  modules = _module_names(root)
  graph = {}
  for name, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          targets.add(full if full in modules else node.module)
    closed = set()
    for target in targets:
      parts = target.split(".")
      closed.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    graph[name] = {target for target in closed if target in modules and target != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state = {}  # name -> "open" while on the DFS path, "done" after.
  path = []

  def visit(name):
    state[name] = "open"
    path.append(name)
    for target in sorted(graph[name]):
      if state.get(target) == "open":
        return path[path.index(target):] + [target]
      if target not in state and (cycle := visit(target)):
        return cycle
    state[name] = "done"
    path.pop()
    return None

  for name in sorted(graph):
    if name not in state and (cycle := visit(name)):
      return cycle
  return None


def test_no_import_cycle():
  cycle = find_cycle(import_graph(PACKAGE))
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("lazy", [False, True])
def test_cycle_detector_finds_a_planted_cycle(tmp_path, lazy):
  root = tmp_path / "pkg"
  (root / "sub").mkdir(parents=True)
  (root / "__init__.py").write_text('"""Top."""\n')
  (root / "sub" / "__init__.py").write_text('"""Sub."""\n')
  (root / "a.py").write_text("from pkg.sub import b\n")
  back = "def f():\n  from pkg import a\n" if lazy else "import pkg.a\n"
  (root / "sub" / "b.py").write_text(back)
  graph = import_graph(root)
  assert graph["pkg.a"] == {"pkg", "pkg.sub", "pkg.sub.b"}
  assert find_cycle(graph) in (["pkg.a", "pkg.sub.b", "pkg.a"], ["pkg.sub.b", "pkg.a", "pkg.sub.b"])
  (root / "sub" / "b.py").write_text("import numpy\n")
  assert find_cycle(import_graph(root)) is None


def test_config_schema_reads_only_the_data_formats_leaf():
  graph = import_graph(PACKAGE)
  assert graph["hashgnn_jax.config_lib"] == {"hashgnn_jax", "hashgnn_jax.data",
                                             "hashgnn_jax.data.formats"}
  assert graph["hashgnn_jax.data.formats"] == set()


def test_subpackage_inits_import_nothing():
  # Re-exports would make every module of a stage load with any one of them, and put edges into
  # the graph that the folder tree does not show.
  graph = import_graph(PACKAGE)
  for name, path in _module_names(PACKAGE).items():
    if path.name == "__init__.py":
      assert graph[name] <= {"hashgnn_jax"}, name


def test_every_module_says_what_it_owns():
  for name, path in _module_names(PACKAGE).items():
    assert ast.get_docstring(ast.parse(path.read_text())), f"{name} has no docstring"
