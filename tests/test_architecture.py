"""The import direction of docs/architecture.md, checked on the source (AST, nothing imported).

What is checked, precisely:

- an *import* is an ``import X`` or ``from X import Y`` statement anywhere in a file (module
  level, inside a function, under ``if TYPE_CHECKING``); relative imports are resolved; for
  ``from X import Y`` the imported module is ``X.Y`` when that is a module of ours, else ``X``;
- a *module-level* import is one executed when the module is imported: not inside a function
  or class body, not under ``if TYPE_CHECKING:``;
- a *unit* is a subpackage of ``node`` (``node.receive``, ``node.jobs`` ...), a top-level module
  of ``node`` (``node.settings``, ``node.cli`` ...), or the package ``worklists``.

Rules:

1. ``models`` never imports ``node`` (any import);
2. ``node.receive`` never imports ``node.web``, and ``worklists`` never imports ``node.web`` (any import);
3. each unit imports at module level only the units `ALLOWED` lists for it, so the graph of
   module-level imports between units has no cycle (checked separately too);
4. below ``node/``, no two modules share a file name (``__init__``, ``errors`` excepted, and the
   ``node/commands`` modules, which are named after the command groups they register), and no
   module of a stage shares its name with a module of ``models`` or ``worklists``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "models", "worklists")

#: unit -> the units it may import at module level (docs/architecture.md, "What may import what")
ALLOWED: dict[str, set[str]] = {
    "node.errors": set(),
    "node.settings": {"node.errors"},
    "node.db": {"node.errors", "node.settings"},
    "worklists": {"node.db", "node.errors"},
    "node.results": {"node.errors", "node.settings", "worklists"},
    "node.intake": {"node.db", "node.errors", "node.settings"},
    "node.ops.restart": set(),
    "node.receive": {"node.db", "node.errors", "node.settings", "node.intake", "node.ops.restart"},
    "node.dispatch": {"node.db", "node.errors", "node.settings", "node.results"},
    "node.jobs": {"node.db", "node.errors", "node.settings", "node.results", "worklists"},
    "node.ops": {
        "node.db",
        "node.errors",
        "node.settings",
        "node.intake",
        "node.jobs",
        "node.dispatch",
        "node.ops.restart",
    },
    "node.web": {
        "node.db",
        "node.errors",
        "node.settings",
        "node.intake",
        "node.jobs",
        "node.dispatch",
        "node.ops",
        "worklists",
    },
    "node.ups": {"node.db", "node.errors", "node.settings", "worklists"},
    "node.demo": {"node.db", "node.errors", "node.settings", "node.web"},
    "node.commands": {"node.db", "node.errors", "node.settings"},
    "node.cli": {"node.db", "node.errors", "node.settings"},
}


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of ours."""
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if any(not p.isidentifier() for p in parts):
                continue  # e.g. node/db/migrations/versions/0001_initial_schema.py
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str) -> list[tuple[str, bool]]:
    """(imported module, executed at module level) for every import statement of module ``name``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), top)
            elif isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                for a in child.names:
                    sub = f"{mod}.{a.name}"
                    found.append((sub if sub in MODULES else mod, top))
            else:
                visit(child, top)

    visit(tree, True)
    return found


def unit_of(module: str) -> str | None:
    """The unit a module of ours belongs to (None outside node and worklists)."""
    if module == "worklists" or module.startswith("worklists."):
        return "worklists"
    parts = module.split(".")
    if parts[0] != "node" or len(parts) < 2:
        return None
    if module == "node.ops.restart" or module.startswith("node.ops.restart."):
        return "node.ops.restart"
    return f"node.{parts[1]}"


def _ours(imported: str) -> bool:
    return imported.split(".")[0] in PACKAGES


def test_the_units_cover_every_module():
    units = {unit_of(m) for m in MODULES if unit_of(m)} - {"node", None}
    assert units <= set(ALLOWED), sorted(units - set(ALLOWED))


def test_models_never_imports_node():
    bad = [
        (m, i)
        for m in MODULES
        if m.split(".")[0] == "models"
        for i, _ in imports_of(m)
        if i == "node" or i.startswith("node.")
    ]
    assert not bad, bad


def test_receive_and_worklists_never_import_the_web():
    bad = [
        (m, i)
        for m in MODULES
        if m.startswith(("node.receive", "worklists"))
        for i, _ in imports_of(m)
        if i == "node.web" or i.startswith("node.web.")
    ]
    assert not bad, bad


def module_level_graph() -> dict[str, set[str]]:
    """unit -> units it imports at module level (imports inside a unit are left out)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for m in MODULES:
        u = unit_of(m)
        if u is None or u == "node":
            continue
        graph[u]
        for imported, top in imports_of(m):
            v = unit_of(imported) if _ours(imported) else None
            if top and v is not None and v != u and v != "node":
                graph[u].add(v)
    return graph


def test_module_level_imports_follow_the_allowed_directions():
    bad = {u: sorted(vs - ALLOWED[u]) for u, vs in module_level_graph().items() if vs - ALLOWED[u]}
    assert not bad, f"module-level imports docs/architecture.md does not allow: {bad}"


def test_no_import_cycle_between_units_at_module_level():
    graph = module_level_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(v) :] + [v]))
            if v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)


def test_module_names_are_unique():
    exempt = {"__init__", "errors"}
    by_name: dict[str, list[str]] = defaultdict(list)
    for m, path in MODULES.items():
        if path.name == "__init__.py" or path.stem in exempt:
            continue
        if m.startswith("node.commands."):
            continue
        if m.split(".")[0] == "node" and m.count(".") == 1:
            continue  # node.cli, node.settings: the top level
        by_name[path.stem].append(m)
    clashes = {n: ms for n, ms in by_name.items() if len(ms) > 1 and any(x.startswith("node.") for x in ms)}
    assert not clashes, clashes
