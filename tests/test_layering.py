"""The package's dependency rules, read from the source (ast): they hold or this test names the offender.

- no import cycles between modules, counting function-local imports (a cycle hidden by a late import
  is still a cycle);
- the model knows nothing of the layers above it: `models/` imports only the bottom modules;
- the bottom modules import nothing above them, and `sharding.py` only the bottom;
- the library does not import its tools or its command lines;
- every Orbax call lives in `checkpoint.py`, every `jax.jit` in `programs.py` (and the model's own
  host-side `forward`, since the model may not import upwards);
- no module sets environment variables when it is imported;
- no module reaches into another's private names (`module._name`).
"""

import ast
import os
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "pgpo_jax"
BOTTOM = {"pgpo_jax.buckets", "pgpo_jax.keypaths", "pgpo_jax.logical_axes", "pgpo_jax.checkpoint"}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PKG.rglob("*.py"):
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _resolve(name: str) -> str:
  while name not in MODULES and "." in name:
    name = name.rsplit(".", 1)[0]
  return name


def _imports(tree: ast.AST) -> set[str]:
  """pgpo_jax modules imported anywhere in the file (a `from pkg import sub` names the submodule)."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {_resolve(a.name) for a in node.names if a.name.startswith("pgpo_jax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pgpo_jax"):
      out |= {_resolve(f"{node.module}.{a.name}") for a in node.names}
  return out


GRAPH = {name: _imports(tree) - {name} for name, tree in TREES.items()}


def test_the_rules_see_the_package():
  assert {"pgpo_jax.trainer", "pgpo_jax.models.qwen2_5_vl.text", "pgpo_jax.sharding"} <= set(
    MODULES
  )
  assert "pgpo_jax.logical_axes" in GRAPH["pgpo_jax.models.qwen2_5_vl.text"]


def test_no_import_cycles():
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(GRAPH.get(node, ())):
      if state.get(nxt) == 1:
        cycle = path[path.index(nxt) :] + [nxt]
        # A package importing its own submodules (and them importing siblings) is not a cycle of concern.
        if not all(m.startswith(cycle[0] + ".") or m == cycle[0] for m in cycle):
          pytest.fail("import cycle: " + " -> ".join(cycle))
      elif state.get(nxt) is None:
        visit(nxt, path + [nxt])
    state[node] = 2

  for name in sorted(GRAPH):
    if name not in state:
      visit(name, [name])


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("pgpo_jax.models")))
def test_models_import_only_the_bottom(name):
  above = {m for m in GRAPH[name] if not m.startswith("pgpo_jax.models") and m not in BOTTOM}
  assert not above, (
    f"{MODULES[name]} imports {sorted(above)}: the model must not depend on the layers above it"
  )


@pytest.mark.parametrize(
  "name,allowed",
  [(m, set()) for m in sorted(BOTTOM)]
  + [("pgpo_jax.sharding", {"pgpo_jax.keypaths", "pgpo_jax.logical_axes"})],
)
def test_bottom_modules_import_nothing_above(name, allowed):
  assert GRAPH[name] <= allowed, f"{MODULES[name]} imports {sorted(GRAPH[name] - allowed)}"


@pytest.mark.parametrize(
  "name", sorted(m for m in MODULES if not m.startswith(("pgpo_jax.tools", "pgpo_jax.cli")))
)
def test_library_does_not_import_tools_or_commands(name):
  bad = {m for m in GRAPH[name] if m.startswith(("pgpo_jax.tools", "pgpo_jax.cli"))}
  assert not bad, f"{MODULES[name]} imports {sorted(bad)}"


def test_orbax_only_in_checkpoint():
  users = sorted(
    name
    for name, tree in TREES.items()
    for node in ast.walk(tree)
    if isinstance(node, (ast.Import, ast.ImportFrom))
    and any(
      (a.name if isinstance(node, ast.Import) else node.module or "").startswith("orbax")
      for a in node.names
    )
  )
  assert users == ["pgpo_jax.checkpoint"], users


def test_jit_only_in_programs():
  users = sorted(
    {
      name
      for name, tree in TREES.items()
      for node in ast.walk(tree)
      if isinstance(node, ast.Attribute) and node.attr == "jit" and ast.unparse(node.value) == "jax"
    }
  )
  assert users == ["pgpo_jax.models.qwen2_5_vl.model", "pgpo_jax.programs"], users


def _module_level(tree: ast.Module):
  """Statements that run at import time (module body, including `if`/`try` blocks, not functions)."""
  todo = list(tree.body)
  while todo:
    node = todo.pop()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      continue
    if (
      isinstance(node, ast.If)
      and isinstance(node.test, ast.Compare)
      and ast.unparse(node.test) == "__name__ == '__main__'"
    ):
      continue
    yield node
    todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_environment_variables_set_at_import(name):
  for node in _module_level(TREES[name]):
    text = ast.unparse(node) if not isinstance(node, (ast.If, ast.Try, ast.With)) else ""
    assert "os.environ" not in text, (
      f"{MODULES[name]}:{node.lineno} touches os.environ at import: {text}"
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_cross_module_access(name):
  tree = TREES[name]
  aliases = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      aliases |= {
        (a.asname or a.name.split(".")[0]) for a in node.names if a.name.startswith("pgpo_jax")
      }
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pgpo_jax"):
      aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES}
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and node.attr.startswith("_")
      and not node.attr.startswith("__")
    ):
      root = node.value
      while isinstance(root, ast.Attribute):
        root = root.value
      if isinstance(root, ast.Name) and root.id in aliases:
        pytest.fail(
          f"{MODULES[name]}:{node.lineno}: {ast.unparse(node)} is another module's private name"
        )


def test_commands_are_declared_and_importable():
  """Every console entry point in pyproject.toml names a `main` that exists."""
  import importlib
  import tomllib

  with open(PKG.parent / "pyproject.toml", "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert {"pgpo-train", "pgpo-convert", "pgpo-compile-check", "pgpo-eval", "pgpo-inspect"} <= set(
    scripts
  )
  for command, target in scripts.items():
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func)), command
    assert os.path.exists(PKG.parent / "scripts") and module.startswith("pgpo_jax.cli."), command
