"""Double puppeting (``app.double_puppet``) against a real Synapse that loads three
registrations besides the rival's: the bridge's, a double-puppet one whose
non-exclusive namespace holds every user, and the same with MSC4190 on.

Effects are read back by another real user's plain HTTP; logins are counted with
a client observer and devices with Synapse's admin API.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge_kit import ClientObserver, HomeserverClient
from bridge_kit.client import RetryPolicy
from bridge_kit.errors import DoublePuppetError, HomeserverError
from bridge_kit.intent.double_puppet import (
    LOGIN_ENDPOINT,
    SEALED_PREFIX,
    TOKEN_FIELD,
    DoublePuppetClient,
)
from bridge_kit.store import Store, open_store
from tests.conftest import SERVER_NAME, TestHomeserver, missing_service
from tests.test_appservice_e2e import make_app
from tests.test_intent_api import CLIENT, Human, q


class DoublePuppetHomeserver(TestHomeserver):
    """The usual test homeserver plus the operator's double-puppet registrations."""

    __test__ = False

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.dp_token = secrets.token_urlsafe(48)
        self.msc4190_token = secrets.token_urlsafe(48)
        for name, token, extra in (
            ("double-puppet", self.dp_token, {}),
            ("msc4190", self.msc4190_token, {"io.element.msc4190": True}),
        ):
            path = workdir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(double_puppet_registration(name, token, extra)))
            self.registrations.append(path.resolve())


def double_puppet_registration(name: str, token: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": name,
        "url": None,
        "as_token": token,
        "hs_token": secrets.token_urlsafe(48),
        "sender_localpart": f"_{name.replace('-', '_')}_bot",
        "rate_limited": False,
        "namespaces": {"users": [{"regex": r"@.*:test\.local", "exclusive": False}]},
        **extra,
    }


@pytest.fixture(scope="module")
async def homeserver(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[DoublePuppetHomeserver]:
    from bridge_kit.testing.synapse import synapse_installed

    if not synapse_installed():
        missing_service("matrix-synapse is not installed (pip install -e '.[test]')")
    async with DoublePuppetHomeserver(tmp_path_factory.mktemp("double_puppet")) as hs:
        yield hs


class LoginCounter(ClientObserver):
    def __init__(self) -> None:
        self.logins = 0

    def on_response(
        self, method: str, endpoint: str, status: int, errcode: str | None, seconds: float
    ) -> None:
        if endpoint == LOGIN_ENDPOINT:
            self.logins += 1


def record_queries(client: HomeserverClient) -> list[dict[str, Any]]:
    """The query parameters of every request ``client`` sends from now on."""
    seen: list[dict[str, Any]] = []
    send_once = client._send_once

    async def recording(method: str, path: str, params: dict[str, Any], *rest: Any) -> Any:
        seen.append(dict(params))
        return await send_once(method, path, params, *rest)

    client._send_once = recording  # type: ignore[method-assign]
    return seen


async def human(hs: TestHomeserver, name: str) -> Human:
    token = await hs.create_user(name)
    return Human(hs, f"@{name}:{SERVER_NAME}", token)


async def device_count(hs: TestHomeserver, user_id: str) -> int:
    headers = {"Authorization": f"Bearer {await hs.admin_token()}"}
    url = f"{hs.url}/_synapse/admin/v2/users/{q(user_id)}/devices"
    async with hs.http.get(url, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        total: int = body["total"]
        return total


async def shared_room(owner: Human, guest: str) -> str:
    status, reply = await owner.call(
        "POST", f"{CLIENT}/createRoom", {"preset": "private_chat", "invite": [guest]}
    )
    assert status == 200, reply
    room_id: str = reply["room_id"]
    return room_id


async def test_double_puppet_sends_as_the_real_user_and_a_restart_logs_in_no_more(
    homeserver: DoublePuppetHomeserver, tmp_path: Path, unique: str
) -> None:
    alice = await human(homeserver, f"alice_{unique}")
    bob = await human(homeserver, f"bob_{unique}")
    room = await shared_room(bob, alice.user_id)
    devices_before = await device_count(homeserver, alice.user_id)
    db = tmp_path / "bk.db"

    counter = LoginCounter()
    async with make_app(homeserver, db) as app:
        puppet = app.double_puppet(alice.user_id, homeserver.dp_token)
        puppet.client.observers.append(counter)
        queries = record_queries(puppet.client)
        assert await puppet.join_room(room) == room
        first = await puppet.send_text(room, "sent by the bridge, as alice")
    assert counter.logins == 1
    # The user's own token says who is acting: no ?user_id= identity assertion.
    assert queries and all("user_id" not in query for query in queries)
    assert (await bob.event(room, first))["sender"] == alice.user_id

    restarted = LoginCounter()
    async with make_app(homeserver, db) as app:
        puppet = app.double_puppet(alice.user_id, homeserver.dp_token)
        puppet.client.observers.append(restarted)
        second = await puppet.send_text(room, "again, after a restart")
    assert restarted.logins == 0
    event = await bob.event(room, second)
    assert event["sender"] == alice.user_id
    assert event["content"]["body"] == "again, after a restart"
    assert await device_count(homeserver, alice.user_id) == devices_before + 1


async def test_a_forgotten_token_is_replaced_by_one_new_login(
    homeserver: DoublePuppetHomeserver, tmp_path: Path, unique: str
) -> None:
    alice = await human(homeserver, f"alice_{unique}")
    bob = await human(homeserver, f"bob_{unique}")
    room = await shared_room(bob, alice.user_id)
    counter = LoginCounter()
    async with make_app(homeserver, tmp_path / "bk.db") as app:
        puppet = app.double_puppet(alice.user_id, homeserver.dp_token)
        puppet.client.observers.append(counter)
        await puppet.join_room(room)
        old = await puppet.client.access_token()  # type: ignore[attr-defined]
        status, body = await Human(homeserver, alice.user_id, old).call(
            "POST", f"{CLIENT}/logout", {}
        )
        assert status == 200, body

        event_id = await puppet.send_text(room, "after the logout")

        new = await puppet.client.access_token()  # type: ignore[attr-defined]
    assert counter.logins == 2
    assert new not in (None, old)
    assert (await bob.event(room, event_id))["sender"] == alice.user_id


async def test_an_msc4190_registration_is_refused_with_the_flag_named(
    homeserver: DoublePuppetHomeserver, tmp_path: Path, unique: str
) -> None:
    alice = await human(homeserver, f"alice_{unique}")
    async with make_app(homeserver, tmp_path / "bk.db") as app:
        puppet = app.double_puppet(alice.user_id, homeserver.msc4190_token)
        with pytest.raises(DoublePuppetError, match=r"io\.element\.msc4190"):
            await puppet.send_text("!nowhere:test.local", "never sent")
        assert TOKEN_FIELD not in await app.store.profile(alice.user_id)


async def test_an_unknown_as_token_is_refused_with_a_hint(
    homeserver: DoublePuppetHomeserver, tmp_path: Path, unique: str
) -> None:
    alice = await human(homeserver, f"alice_{unique}")
    async with make_app(homeserver, tmp_path / "bk.db") as app:
        puppet = app.double_puppet(alice.user_id, "not-a-registered-token")
        with pytest.raises(DoublePuppetError, match="app_service_config_files"):
            await puppet.send_text("!nowhere:test.local", "never sent")


async def test_the_token_survives_in_a_reopened_store(tmp_path: Path) -> None:
    # The restart test above relies on this; here on its own, with no homeserver.
    url = f"sqlite:///{tmp_path / 'bk.db'}"
    async with open_store(url) as store:
        await store.set_profile("@alice:test.local", TOKEN_FIELD, "syt_token")
    async with open_store(url) as store:
        assert (await store.profile("@alice:test.local"))[TOKEN_FIELD] == "syt_token"


async def test_a_token_stored_by_an_earlier_release_is_used(tmp_path: Path) -> None:
    # The profile field is a stored key, not a module path: the package move must not
    # rename it, or every double puppet logs in again (a new device) after an upgrade.
    url = f"sqlite:///{tmp_path / 'bk.db'}"
    async with open_store(url) as store:
        await store.set_profile(
            "@alice:test.local", "bridge_kit.double_puppet.access_token", "syt_stored"
        )
    async with open_store(url) as store:
        # Nothing listens on the discard port: a login attempt would fail.
        client = DoublePuppetClient(
            "http://127.0.0.1:9", "as_token", "@alice:test.local", store,
            retry=RetryPolicy(max_attempts=1),
        )  # fmt: skip
        try:
            assert await client.access_token() == "syt_stored"
            assert client.login_count == 0
        finally:
            await client.close()


async def test_the_stored_token_is_sealed_and_opens_only_with_its_secret(tmp_path: Path) -> None:
    alice = "@alice:test.local"

    def client(store: Store, secret: str) -> DoublePuppetClient:
        # Nothing listens on the discard port: a login attempt fails.
        return DoublePuppetClient(
            "http://127.0.0.1:9", "as_token", alice, store,
            retry=RetryPolicy(max_attempts=1), sealing_secret=secret,
        )  # fmt: skip

    async with open_store(f"sqlite:///{tmp_path / 'bk.db'}") as store:
        await store.set_profile(alice, TOKEN_FIELD, "syt_stored")  # in clear, as before
        first = client(store, "the configured pickle key")
        assert await first.access_token() == "syt_stored"
        stored = (await store.profile(alice))[TOKEN_FIELD]
        assert stored is not None and stored.startswith(SEALED_PREFIX)
        assert b"syt_stored" not in base64.b64decode(stored.removeprefix(SEALED_PREFIX))
        again = client(store, "the configured pickle key")
        assert await again.access_token() == "syt_stored" and again.login_count == 0
        # Another secret (pickle_key changed): the token does not open, a login replaces it.
        other = client(store, "another pickle key!")
        with pytest.raises(HomeserverError):
            await other.access_token()
        assert other.login_count == 1
        for each in (first, again, other):
            await each.close()
