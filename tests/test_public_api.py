"""The public contract: what is exported, the error tree, typing, and the import layers."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import bridge_kit
from bridge_kit import errors

PACKAGE = Path(bridge_kit.__file__).parent
PUBLIC_MODULES = (
    "bridge_kit.errors",
    "bridge_kit.types",
    "bridge_kit.config",
    "bridge_kit.registration",
    "bridge_kit.client.homeserver",
    "bridge_kit.store",
    "bridge_kit.puppets",
    "bridge_kit.server.appservice_api",
    "bridge_kit.app.runner",
    "bridge_kit.crypto",
)


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(bridge_kit).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(bridge_kit.__all__)
    assert sorted(bridge_kit.__all__) == bridge_kit.__all__


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_modules_declare_all_and_it_resolves(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__all__, f"{module_name} has an empty __all__"
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.__all__ names {name}, which it lacks"


def test_the_package_docstring_names_every_public_module() -> None:
    assert bridge_kit.__doc__ is not None
    for module_name in PUBLIC_MODULES:
        assert f":mod:`{module_name}`" in bridge_kit.__doc__


def test_every_exception_is_a_bridge_kit_error_in_errors_module() -> None:
    raised_anywhere = []
    for info in pkgutil.walk_packages([str(PACKAGE)], "bridge_kit."):
        if info.name == "bridge_kit.__main__":
            continue  # importing it runs the CLI
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            is_exception = inspect.isclass(value) and issubclass(value, BaseException)
            if is_exception and value.__module__ == module.__name__:
                raised_anywhere.append(value)
    assert raised_anywhere, "the walk found no exception classes at all"
    for cls in raised_anywhere:
        assert cls.__module__ == "bridge_kit.errors", f"{cls.__qualname__} in {cls.__module__}"
        assert issubclass(cls, bridge_kit.BridgeKitError), cls


def test_the_error_tree_docstring_names_every_error() -> None:
    assert errors.__doc__ is not None
    for name in errors.__all__:
        value = getattr(errors, name)
        if inspect.isclass(value):
            assert name in errors.__doc__, f"{name} is missing from the drawn tree"


def test_errcode_classes_are_mapped_including_grandchildren() -> None:
    @errors.errcode("M_TEST_GRANDCHILD")
    class Grandchild(errors.Forbidden):
        pass

    error = errors.MatrixRequestError.from_response(400, {"errcode": "M_TEST_GRANDCHILD"})
    assert type(error) is Grandchild
    for name in ("UserInUse", "Exclusive", "LimitExceeded", "UnknownToken", "NotFound"):
        cls = getattr(errors, name)
        mapped = errors.MatrixRequestError.from_response(400, {"errcode": cls.errcode_handled})
        assert type(mapped) is cls
    with pytest.raises(ValueError, match="already mapped"):
        errors.errcode("M_NOT_FOUND")(type("Again", (errors.MatrixRequestError,), {}))


def test_the_package_ships_py_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'bridge_kit = ["py.typed"]' in pyproject


def _module_imports(path: Path, name: str) -> set[str]:
    """Modules of bridge_kit imported at module level (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base.startswith("bridge_kit"):
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("bridge_kit"))
    return found


def test_modules_import_each_other_in_layers_without_a_cycle() -> None:
    modules: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {
        name: {dep for dep in _module_imports(path, name) if dep in modules and dep != name}
        for name, path in modules.items()
    }
    # The package __init__ re-exports everything; a submodule importing a sibling
    # goes through the package only by Python's rules, not by design.
    graph = {n: {d for d in deps if d != "bridge_kit"} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            cycle = [*trail[trail.index(node) :], node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        state[node] = 1
        for dep in sorted(graph[node]):
            if not dep.startswith(f"{node}."):  # a package importing its own modules
                visit(dep, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        visit(name, [])
    assert len(graph) > 20


def test_no_module_is_over_600_lines() -> None:
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 600
    }
    assert not long, long
