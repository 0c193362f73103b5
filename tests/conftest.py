"""Shared fixtures: a real Synapse, the real PostgreSQL, unique names.

Under ``CI=true`` a missing Synapse or PostgreSQL fails the run; locally it
skips with the reason, so a contributor without them still runs the rest.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import settings

from bridge_kit.testing.synapse import SynapseServer, free_port, synapse_installed

# No per-example deadline: these machines are shared and noisy, and a slow example is
# not a wrong one (the speed of anything is measured in bench/, not here).
settings.register_profile("bridge_kit", deadline=None)
settings.load_profile("bridge_kit")

IN_CI = os.environ.get("CI") == "true"
SERVER_NAME = "test.local"


_SYNAPSE_FIXTURES = frozenset({"synapse", "synapse_factory", "homeserver", "synapse_devices"})

#: The homeserver options that push to-device events, device lists and one-time-key
#: counts to appservices (appservice-facts.md §9).
DEVICE_EXPERIMENTS = {
    "experimental_features": {
        "msc2409_to_device_messages_enabled": True,
        "msc3202_transaction_extensions": True,
    }
}
#: The registration flags for MSC4190 devices and the MSC3202/MSC2409 transaction data.
DEVICE_FLAGS = {
    "io.element.msc4190": True,
    "org.matrix.msc3202": True,
    "receive_ephemeral": True,
    "de.sorunome.msc2409.push_ephemeral": True,
}
_SYNAPSE_MODULES = frozenset({"test_appservice_e2e", "test_cli_online", "test_examples"})


# tryfirst: xdist's worker turns each xdist_group mark into a suffix of the node ID in
# a hook of its own, registered after this file; run later, the marks would go unseen
# and a module's tests would be spread over workers, each setting up its fixtures.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that starts Synapse or PostgreSQL, so ``-m "not synapse"`` is quick,
    and keep each module with a module-wide fixture on one xdist worker."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if fixtures & _SYNAPSE_FIXTURES or module in _SYNAPSE_MODULES:
            item.add_marker(pytest.mark.synapse)
        if "postgres_dsn" in fixtures:
            item.add_marker(pytest.mark.postgres)
        if _uses_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(module))
    # Under --dist loadgroup the groups and the slow tests are the long units of work:
    # handed out first, they run beside the short tests instead of after them. A
    # module's items stay together (the sort is stable and ranks whole modules): a
    # worker that ran another module's test in between would tear down this module's
    # fixtures (its own Synapse, a bridge) and set them up again.
    slow_modules = {_module(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: _long_first(item, slow_modules))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fail at once if xdist did not take the groups (a pytest it does not fit): each
    worker would set up every module's Synapse again, and the suite take twice as long."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or not session.config.getvalue("loadgroup"):
        return
    ungrouped = [
        item.nodeid
        for item in session.items
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid
    ]
    if ungrouped:
        message = (
            f"pytest-xdist ignored the xdist_group of {ungrouped[0]} (and "
            f"{len(ungrouped) - 1} more): this pytest and pytest-xdist do not fit together"
        )
        print(f"error: {message}", file=sys.__stderr__, flush=True)  # a worker's own words
        raise pytest.UsageError(message)


def _module(item: pytest.Item) -> str:
    return item.module.__name__ if item.module else ""


def _long_first(item: pytest.Item, slow_modules: set[str]) -> tuple[bool, bool]:
    return (
        item.get_closest_marker("xdist_group") is None,
        _module(item) not in slow_modules,
    )


def _uses_a_module_fixture(item: pytest.Item) -> bool:
    """Whether the test needs a fixture set up once per module (a private Synapse, a
    listening app): spread over workers, each would set it up again and again."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        definition.scope in ("module", "package")
        for definitions in info.name2fixturedefs.values()
        for definition in definitions
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Escape lone surrogates in the captured output before a report is sent anywhere.

    Tests feed the bridge strings from non-UTF-8 file names (lone surrogates), and
    its logs repeat them; an xdist worker cannot send such text to the controller
    (execnet encodes strictly) and dies. Escaped, the text still shows which
    character it was.
    """
    report.sections = [(title, _printable(text)) for title, text in report.sections]
    if report.longrepr is not None:
        text = str(report.longrepr)
        if isinstance(report.longrepr, str) or _printable(text) != text:
            report.longrepr = _printable(text)


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def missing_service(reason: str) -> None:
    """Fail under CI (the service is part of the contract there), skip locally."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


class TestHomeserver(SynapseServer):
    """A Synapse with two appservices loaded: ours and a rival that owns ``shared_``."""

    __test__ = False

    def __init__(self, workdir: Path, *, devices: bool = False) -> None:
        self.devices = devices
        self.as_token = secrets.token_urlsafe(48)
        self.hs_token = secrets.token_urlsafe(48)
        self.other_as_token = secrets.token_urlsafe(48)
        self.appservice_port = free_port()
        self.appservice_id = "bridge_kit_test"
        self.sender_localpart = "_bk_bot"
        self.registration_path = workdir / "registration.yaml"
        other_path = workdir / "other-registration.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.registration_path.write_text(yaml.safe_dump(self.registration_data()))
        other_path.write_text(yaml.safe_dump(self._other_registration()))
        super().__init__(
            workdir / "synapse",
            registrations=[self.registration_path, other_path],
            server_name=SERVER_NAME,
            extra_config=DEVICE_EXPERIMENTS if devices else None,
        )

    @property
    def appservice_url(self) -> str:
        return f"http://127.0.0.1:{self.appservice_port}"

    def registration_data(self) -> dict[str, Any]:
        flags = DEVICE_FLAGS if self.devices else {}
        return flags | {
            "id": self.appservice_id,
            "url": self.appservice_url,
            "as_token": self.as_token,
            "hs_token": self.hs_token,
            "sender_localpart": self.sender_localpart,
            "rate_limited": False,
            "namespaces": {
                "users": [
                    {"regex": r"^@_bk_.*:test\.local$", "exclusive": True},
                    {"regex": r"^@shared_.*:test\.local$", "exclusive": False},
                ],
                "aliases": [{"regex": r"^#_bk_.*:test\.local$", "exclusive": True}],
                "rooms": [],
            },
        }

    def _other_registration(self) -> dict[str, Any]:
        return {
            "id": "rival_bridge",
            "url": None,
            "as_token": self.other_as_token,
            "hs_token": secrets.token_urlsafe(48),
            "sender_localpart": "_rival_bot",
            "rate_limited": False,
            "namespaces": {"users": [{"regex": r"^@shared_.*:test\.local$", "exclusive": True}]},
        }


@contextlib.asynccontextmanager
async def _running_homeserver(
    workdir: Path, *, devices: bool = False
) -> AsyncIterator[TestHomeserver]:
    if not synapse_installed():
        missing_service("matrix-synapse is not installed (pip install -e '.[test]')")
    async with TestHomeserver(workdir, devices=devices) as homeserver:
        yield homeserver


@pytest.fixture(scope="session")
async def synapse(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestHomeserver]:
    """One real Synapse shared by the whole session (use unique localparts)."""
    async with _running_homeserver(tmp_path_factory.mktemp("synapse")) as homeserver:
        yield homeserver


@pytest.fixture(scope="session")
async def synapse_devices(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[TestHomeserver]:
    """A second shared Synapse for devices and encryption: the experimental options on,
    and the MSC4190/MSC3202/ephemeral flags in our registration."""
    workdir = tmp_path_factory.mktemp("synapse-devices")
    async with _running_homeserver(workdir, devices=True) as homeserver:
        yield homeserver


@pytest.fixture
def synapse_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., contextlib.AbstractAsyncContextManager[TestHomeserver]]:
    """Start a private Synapse: ``async with synapse_factory() as hs:``
    (``synapse_factory(devices=True)``: configured as ``synapse_devices``)."""

    def factory(*, devices: bool = False) -> contextlib.AbstractAsyncContextManager[TestHomeserver]:
        return _running_homeserver(tmp_path_factory.mktemp("private-synapse"), devices=devices)

    return factory


@contextlib.asynccontextmanager
async def scratch_database(
    prefix: str = "bk_test", *, for_synapse: bool = False
) -> AsyncIterator[str]:
    """A new database on the local PostgreSQL, dropped on exit; its DSN.

    ``for_synapse``: with the encoding and collation Synapse insists on.
    """
    import asyncpg

    admin_dsn = os.environ.get(
        "BRIDGE_KIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    try:
        admin = await asyncpg.connect(admin_dsn, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        missing_service(f"PostgreSQL not reachable at {admin_dsn}: {exc}")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    options = " ENCODING 'UTF8' LC_COLLATE='C' LC_CTYPE='C' TEMPLATE template0"
    await admin.execute(f'CREATE DATABASE "{name}"' + (options if for_synapse else ""))
    try:
        yield admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
async def postgres_dsn() -> AsyncIterator[str]:
    """A fresh database on the local PostgreSQL, dropped after the session."""
    async with scratch_database() as dsn:
        yield dsn


@pytest.fixture
def unique() -> str:
    """A short unique string for localparts on the shared Synapse."""
    return uuid.uuid4().hex[:8]
