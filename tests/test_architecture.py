"""The shape of the package: which part may import which, and no import cycles.

Every import counts as an edge: at module level, under ``TYPE_CHECKING`` and
inside functions, since each ties the modules together for a reader and for a
refactoring, whenever Python happens to run it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import bridge_kit

PACKAGE = Path(bridge_kit.__file__).parent

#: Modules that are a part of their own, below the package that holds them: plain
#: records and parsers that lower layers build on.
LEAVES = frozenset({"bridge.records", "inbox.records", "store.url"})

#: Which part may import which. A part is a subpackage, a top-level module, or one of
#: LEAVES. A new edge goes here only if it keeps this graph free of cycles (checked
#: below); an edge that is not here fails, so a change of shape is a visible decision.
ALLOWED: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "_deprecated": frozenset(),
    "_extras": frozenset(),
    "_version": frozenset(),
    "_sealing": frozenset({"errors"}),
    "defaults": frozenset(),
    "_json": frozenset({"errors"}),
    "_yaml": frozenset({"errors"}),
    "ids": frozenset({"errors"}),
    "logs": frozenset(),
    "store.url": frozenset({"errors"}),
    "types": frozenset({"errors"}),
    "inbox.records": frozenset({"defaults"}),
    "bridge.records": frozenset(),
    "client": frozenset({"_deprecated", "_json", "errors", "store.url", "types"}),
    "metrics": frozenset({"client", "inbox.records"}),
    "registration": frozenset({"_yaml", "errors", "ids", "types"}),
    "_preconf": frozenset({"client", "registration", "types"}),
    "store": frozenset(
        {"_extras", "bridge.records", "defaults", "errors", "inbox.records", "store.url", "types"}
    ),
    "config": frozenset({"_yaml", "defaults", "errors", "ids", "store.url"}),
    "inbox": frozenset(
        {"_json", "defaults", "errors", "inbox.records", "logs", "metrics", "store", "types"}
    ),
    "intent": frozenset(
        {"_deprecated", "_sealing", "client", "errors", "inbox", "inbox.records", "store"}
        | {"types"}
    ),
    "puppets": frozenset({"client", "errors", "ids", "intent", "registration", "store", "types"}),
    "crypto": frozenset(
        {"_deprecated", "_json", "_sealing", "config", "errors", "ids", "inbox", "inbox.records"}
        | {"intent", "registration", "store", "types"}
    ),
    "server": frozenset(
        {"_json", "defaults", "errors", "inbox", "inbox.records", "metrics", "store", "types"}
    ),
    "checks": frozenset(
        {"_extras", "_yaml", "client", "config", "defaults", "errors", "ids", "intent"}
        | {"registration", "server", "store", "store.url"}
    ),
    "testing": frozenset({"_extras", "errors"}),
    "app": frozenset(
        {"_deprecated", "_extras", "checks", "client", "config", "crypto", "defaults", "errors"}
        | {"ids", "inbox", "inbox.records", "intent", "logs", "metrics", "puppets", "registration"}
        | {"server", "store", "store.url"}
    ),
    "cli": frozenset(
        {"_extras", "_version", "app", "checks", "client", "config", "defaults", "errors"}
        | {"inbox", "inbox.records", "intent", "logs", "puppets", "registration", "store"}
        | {"store.url", "testing", "types"}
    ),
    # The bridge layer builds on everything an appservice has (its row may shrink).
    "bridge": frozenset(
        {"_json", "app", "bridge.records", "client", "config", "crypto", "defaults", "errors"}
        | {"ids", "inbox", "inbox.records", "intent", "logs", "metrics", "puppets"}
        | {"registration", "server", "store", "types"}
    ),
    "__main__": frozenset({"cli"}),
    # The package itself re-exports the public API.
    "": frozenset(
        {"_deprecated", "_preconf", "_version", "app", "client", "config", "errors", "ids"}
        | {"inbox"}
        | {"intent", "logs", "metrics", "puppets", "registration", "server", "store", "types"}
    ),
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, name: str) -> Iterator[str]:
    """Every bridge_kit module ``path`` imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base.startswith("bridge_kit"):
                yield base
                yield from (f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("bridge_kit"))


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {dep for dep in _imports(path, name) if dep in modules and dep != name}
        for name, path in modules.items()
    }


def _part(module: str) -> str:
    """The part a module belongs to: its leaf, its subpackage or its top-level module."""
    inner = module.removeprefix("bridge_kit").removeprefix(".")
    for leaf in LEAVES:
        if inner == leaf:
            return leaf
    return inner.split(".")[0]


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        if state.get(node) == 2:
            return None
        if state.get(node) == 1:
            return [*trail[trail.index(node) :], node]
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if (cycle := visit(dep, [*trail, node])) is not None:
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if (cycle := visit(name, [])) is not None:
            return cycle
    return None


def test_no_module_imports_itself_back_through_any_import() -> None:
    graph = _graph()
    # A package's __init__ re-exporting its modules is not an edge back to it: Python
    # imports the package first whichever module is asked for.
    for name, deps in graph.items():
        deps.difference_update(
            d for d in set(deps) if name.startswith(f"{d}.") or d == "bridge_kit"
        )
    assert len(graph) > 50
    assert _find_cycle(graph) is None, "import cycle: " + " -> ".join(_find_cycle(graph) or [])


def test_each_part_imports_only_the_parts_it_may() -> None:
    parts = {_part(module) for module in _modules()}
    assert parts == set(ALLOWED), (
        f"parts without a rule or rules without a part: {parts ^ set(ALLOWED)}"
    )
    wrong = sorted(
        f"bridge_kit.{module.removeprefix('bridge_kit.')} imports {dep}"
        for module, deps in _graph().items()
        for dep in deps
        if _part(dep) != _part(module)
        and dep != "bridge_kit"
        and _part(dep) not in ALLOWED[_part(module)]
    )
    assert not wrong, "\n".join(wrong)


def test_the_allowed_parts_form_layers_without_a_cycle() -> None:
    graph = {part: set(deps) for part, deps in ALLOWED.items()}
    assert _find_cycle(graph) is None
    assert all(dep in ALLOWED for deps in ALLOWED.values() for dep in deps)


def test_private_modules_are_not_imported_from_outside_their_package() -> None:
    outside = sorted(
        f"{module} imports {dep}"
        for module, deps in _graph().items()
        for dep in deps
        if dep.rpartition(".")[2].startswith("_")
        and not dep.endswith("__main__")
        and dep.rpartition(".")[0] not in ("bridge_kit", module.rpartition(".")[0], module)
    )
    assert not outside, "\n".join(outside)
