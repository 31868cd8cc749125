"""The package's import graph: no module imports one that imports it back, and vidsim
modules are imported at the top of a file (a hidden import inside a function hides an
upward edge), except where a comment there says why."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vidsim"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree, module: str, top_level: bool):
  """vidsim modules imported by `tree` (only module-level statements when top_level)."""
  nodes = tree.body if top_level else [n for n in ast.walk(tree) if n not in tree.body]
  found = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("vidsim")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vidsim"):
      found.add(node.module)
      found |= {f"{node.module}.{a.name}" for a in node.names}
  return found


def _graph():
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph, nested = {}, {}
  for name, path in files.items():
    tree = ast.parse(path.read_text())
    graph[name] = {m for m in _imports(tree, name, top_level=True) if m in files and m != name}
    inner = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    lines = path.read_text().splitlines()
    for function in inner:
      for node in ast.walk(function):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
          if any(n.startswith("vidsim") for n in names) and "#" not in lines[node.lineno - 1]:
            nested.setdefault(name, []).append(node.lineno)
  return graph, nested


def test_no_import_cycles():
  graph, _ = _graph()
  # A package's __init__ is imported with any of its modules: an edge to a package is an edge to its __init__.
  state, cycles = {}, []

  def visit(node, path):
    state[node] = "open"
    for target in sorted(graph.get(node, ())):
      if state.get(target) == "open":
        cycles.append(path[path.index(target):] + [target])
      elif target not in state:
        visit(target, path + [target])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_vidsim_imports_are_at_the_top_or_say_why():
  _, nested = _graph()
  assert not nested, f"function-level vidsim imports without a comment saying why: {nested}"
