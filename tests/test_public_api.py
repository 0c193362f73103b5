"""The public contract: what is exported, the error tree, typing, and the import layers."""

from __future__ import annotations

import importlib
import inspect
import operator
import pkgutil
from pathlib import Path

import pytest

import bridge_kit
from bridge_kit import errors
from bridge_kit.inbox import signals

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


#: Exceptions outside the error tree, and why: each is a control-flow signal between
#: bridge_kit's own layers, never an error for a caller to catch, so an ``except
#: BridgeKitError`` must not swallow it.
SIGNALS = {
    signals.NotReady: "tells the inbox to try an item again later",
    signals.NotHere: "tells the inbox to leave an item to another daemon for a while",
    signals.Park: "tells the inbox to move an item out of its lane until it may go on",
    signals.ErrorReply: "tells the appservice API what to answer the homeserver",
    signals.TransactionFailed: "tells the appservice API a transaction was not stored",
}


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
    assert set(SIGNALS) <= set(raised_anywhere), "a signal moved: update SIGNALS"
    for cls in raised_anywhere:
        if cls in SIGNALS:
            assert cls.__module__ == "bridge_kit.inbox.signals", cls
            assert not issubclass(cls, bridge_kit.BridgeKitError), cls
            continue
        assert cls.__module__ == "bridge_kit.errors", f"{cls.__qualname__} in {cls.__module__}"
        assert issubclass(cls, bridge_kit.BridgeKitError), cls


def test_signals_are_not_in_the_public_error_tree() -> None:
    for cls in SIGNALS:
        assert cls.__name__ not in errors.__all__
        assert cls.__name__ not in bridge_kit.__all__
        assert not hasattr(errors, cls.__name__)


#: Each group of the error tree, and the classes ``except <group>`` must catch.
ERROR_GROUPS = {
    errors.SetupError: (
        errors.ConfigError,
        errors.UsageError,
        errors.EncryptionUnavailable,
        errors.RegistrationError,
        errors.DevicesUnavailable,
    ),
    errors.InvalidInput: (
        errors.InvalidLocalpart,
        errors.NotInNamespace,
        errors.InvalidMxc,
        errors.WrongType,
        errors.YamlError,
        errors.MediaTooLarge,
        errors.PowerLevelRefused,
        errors.CommandError,
        errors.MediaError,
        errors.MediaUnavailable,
        errors.LoginError,
        errors.UnknownLogin,
        errors.WrongLoginStep,
    ),
    errors.HomeserverError: (
        errors.HomeserverUnreachable,
        errors.UnexpectedReply,
        errors.DoublePuppetError,
        errors.RegistrationAborted,
        errors.PowerLevelConflict,
        errors.MatrixRequestError,
        errors.UserInUse,
        errors.Exclusive,
        errors.LimitExceeded,
        errors.UnknownToken,
        errors.MissingToken,
        errors.Forbidden,
        errors.ResourceLimitExceeded,
        errors.NotFound,
        errors.UnknownDevice,
        errors.AppserviceLoginUnsupported,
        errors.Banned,
    ),
    errors.ServiceError: (
        errors.LifecycleError,
        errors.ClientClosed,
        errors.StartupCheckFailed,
        errors.ListenError,
        errors.RemoteError,
        errors.SendFailed,
        errors.RemoteRefused,
        errors.LoginRefused,
        errors.UnknownChat,
    ),
    errors.CryptoError: (
        errors.EncryptionUnavailable,
        errors.CrossSigningFailed,
        errors.WrongPickleKey,
        errors.UndecryptableEvent,
        errors.NoRoomKey,
    ),
}


def _an_instance(cls: type[errors.BridgeKitError]) -> errors.BridgeKitError:
    """One ``cls`` built with plausible arguments, as bridge_kit raises it."""
    if cls is errors.Banned:
        return errors.Banned("!r", "@p:example.org", "@mod:example.org", "spam")
    if issubclass(cls, errors.MatrixRequestError):
        return cls(400, cls.errcode_handled, "refused")
    made_with = {
        errors.RegistrationError: lambda: errors.RegistrationError(["as_token: missing"]),
        errors.InvalidLocalpart: lambda: errors.InvalidLocalpart("A", "upper case"),
        errors.NotInNamespace: lambda: errors.NotInNamespace("@alice:example.org"),
        errors.InvalidMxc: lambda: errors.InvalidMxc("http://x"),
        errors.WrongType: lambda: errors.WrongType("a string", 3),
        errors.YamlError: lambda: errors.YamlError("not YAML", 1, 2),
        errors.MediaTooLarge: lambda: errors.MediaTooLarge(10, 5),
        errors.PowerLevelRefused: lambda: errors.PowerLevelRefused("!r", "@u:x", "a creator"),
        errors.PowerLevelConflict: lambda: errors.PowerLevelConflict("!r", "@u:x", 3),
        errors.RegistrationAborted: lambda: errors.RegistrationAborted("the token is wrong"),
        errors.UnexpectedReply: lambda: errors.UnexpectedReply(200, "no user_id"),
        errors.DevicesUnavailable: lambda: errors.DevicesUnavailable("MSC4190 is off"),
        errors.UndecryptableEvent: lambda: errors.UndecryptableEvent("replayed"),
        errors.NoRoomKey: lambda: errors.NoRoomKey("!r:example.org", "session"),
    }
    return made_with.get(cls, lambda: cls("it failed"))()


@pytest.mark.parametrize(
    ("group", "member"),
    [(group, member) for group, members in ERROR_GROUPS.items() for member in members],
    ids=lambda cls: cls.__name__,
)
def test_catching_a_group_catches_each_member(
    group: type[errors.BridgeKitError], member: type[errors.BridgeKitError]
) -> None:
    with pytest.raises(group) as caught:
        raise _an_instance(member)
    assert type(caught.value) is member


def test_every_error_is_in_a_group_or_a_short_list_under_the_root() -> None:
    direct = [
        cls
        for cls in errors.BridgeKitError.__subclasses__()
        if cls.__module__ == "bridge_kit.errors"
    ]
    assert len(direct) <= 8, [cls.__name__ for cls in direct]
    assert set(ERROR_GROUPS) <= set(direct)
    grouped = {member for members in ERROR_GROUPS.values() for member in members}
    for name in errors.__all__:
        value = getattr(errors, name)
        if inspect.isclass(value) and value not in direct and value is not errors.BridgeKitError:
            assert value in grouped, f"{name} is in no group of ERROR_GROUPS"


def test_no_group_has_more_than_eight_direct_children() -> None:
    # MatrixRequestError is left out: its children are the errcodes, flat by design.
    for group in (errors.BridgeKitError, *ERROR_GROUPS):
        children = [c for c in group.__subclasses__() if c.__module__ == "bridge_kit.errors"]
        assert len(children) <= 8, (group.__name__, [c.__name__ for c in children])


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
        ("bridge_kit", "ClientState", "ClientLifecycle"),
        ("bridge_kit.client", "ClientState", "ClientLifecycle"),
        ("bridge_kit.intent", "RoomState", "RoomStateStore"),
        ("bridge_kit.crypto", "Device", "TrackedDevice"),
        ("bridge_kit", "ErrorReply", "inbox.signals.ErrorReply"),
        ("bridge_kit", "TransactionFailed", "inbox.signals.TransactionFailed"),
    ],
)
def test_renamed_exports_still_resolve_with_a_deprecation_warning(
    module_name: str, old: str, new: str
) -> None:
    module = importlib.import_module(module_name)
    with pytest.warns(DeprecationWarning, match=f"{module_name}.{old} is deprecated; use"):
        value = getattr(module, old)
    assert value is operator.attrgetter(new)(module)
    assert old not in module.__all__
    with pytest.raises(AttributeError):
        module.NoSuchName  # noqa: B018
