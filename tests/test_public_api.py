"""The public contract: what is exported, the error tree, typing, and the import layers."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import bridge_kit
from bridge_kit import errors

PACKAGE = Path(bridge_kit.__file__).parent
PUBLIC_MODULES = (
    "bridge_kit.app",
    "bridge_kit.errors",
    "bridge_kit.types",
    "bridge_kit.config",
    "bridge_kit.registration",
    "bridge_kit.client",
    "bridge_kit.server",
    "bridge_kit.intent",
    "bridge_kit.store",
    "bridge_kit.puppets",
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
        if info.name.startswith("bridge_kit.testing"):
            continue  # for tests and the demo, outside the public tree
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


@pytest.mark.parametrize(
    ("module_name", "old", "new"),
    [
        ("bridge_kit", "AppState", "AppLifecycle"),
        ("bridge_kit.app", "AppState", "AppLifecycle"),
        ("bridge_kit.intent", "RoomState", "RoomStateStore"),
        ("bridge_kit.crypto", "Device", "TrackedDevice"),
    ],
)
def test_renamed_exports_still_resolve_with_a_deprecation_warning(
    module_name: str, old: str, new: str
) -> None:
    module = importlib.import_module(module_name)
    with pytest.warns(DeprecationWarning, match=f"{module_name}.{old} is deprecated; use"):
        value = getattr(module, old)
    assert value is getattr(module, new)
    assert old not in module.__all__
    with pytest.raises(AttributeError):
        module.NoSuchName  # noqa: B018
