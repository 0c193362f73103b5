"""HomeserverClient: retries and error mapping against the fault homeserver, then real Synapse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from bridge_kit.client.homeserver import (
    ClientLifecycle,
    ClientObserver,
    HomeserverClient,
    RetryPolicy,
    WhoAmI,
)
from bridge_kit.errors import (
    ClientClosed,
    ConfigError,
    Exclusive,
    Forbidden,
    HomeserverUnreachable,
    LimitExceeded,
    MatrixRequestError,
    MissingToken,
    UnknownToken,
    UserInUse,
)
from bridge_kit.types import RegisterRequest
from tests.conftest import TestHomeserver
from tests.helpers.fault_homeserver import (
    CREATE_ROOM_PATH,
    REGISTER_PATH,
    Fault,
    FaultHomeserver,
    Faults,
    NotHttpServer,
)

TOKEN = "as-token-that-must-never-leak"
FAST = RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.005, max_rate_limit_waits=5)
WHOAMI = "/_matrix/client/v3/account/whoami"


class Recorder(ClientObserver):
    def __init__(self) -> None:
        self.responses: list[tuple[str, str, int, str | None]] = []
        self.rate_limit_delays: list[float] = []
        self.retries: list[tuple[str, float]] = []

    def on_response(
        self, method: str, endpoint: str, status: int, errcode: str | None, seconds: float
    ) -> None:
        assert seconds >= 0
        self.responses.append((method, endpoint, status, errcode))

    def on_rate_limited(self, delay: float) -> None:
        self.rate_limit_delays.append(delay)

    def on_retry(self, reason: str, delay: float) -> None:
        self.retries.append((reason, delay))


@pytest.fixture
async def hs() -> AsyncIterator[FaultHomeserver]:
    async with FaultHomeserver(as_token=TOKEN, user_namespace=r"^@_bk_.*:test\.local$") as server:
        yield server


@pytest.fixture
async def client(hs: FaultHomeserver) -> AsyncIterator[HomeserverClient]:
    async with HomeserverClient(hs.url, TOKEN, retry=FAST) as http:
        yield http


@pytest.fixture
def recorder(client: HomeserverClient) -> Recorder:
    observer = Recorder()
    client.observers.append(observer)
    return observer


def puppet(localpart: str) -> RegisterRequest:
    return RegisterRequest.for_puppet(localpart)


# -- the happy path -------------------------------------------------------------


async def test_register_then_whoami_as_the_puppet(
    hs: FaultHomeserver, client: HomeserverClient
) -> None:
    response = await client.register(puppet("_bk_alice"))

    assert response.user_id == "@_bk_alice:test.local"
    assert hs.registered == {"_bk_alice"}
    assert await client.whoami() == WhoAmI("@_bk_bot:test.local")
    assert await client.whoami("@_bk_alice:test.local") == WhoAmI("@_bk_alice:test.local")
    assert client.request_count == 3


async def test_request_sends_an_attrs_body_through_the_converter(
    hs: FaultHomeserver, client: HomeserverClient
) -> None:
    reply = await client.request("POST", "/_matrix/client/v3/register", body=puppet("_bk_attrs"))

    assert reply["user_id"] == "@_bk_attrs:test.local"
    assert hs.registered == {"_bk_attrs"}


async def test_one_keep_alive_connection_serves_sequential_requests(
    hs: FaultHomeserver, client: HomeserverClient
) -> None:
    for _ in range(10):
        await client.whoami()

    assert hs.total_requests == 10
    assert len(hs.peers) == 1


# -- rate limiting ----------------------------------------------------------------


async def test_429_waits_retry_after_ms_then_succeeds(
    hs: FaultHomeserver, client: HomeserverClient, recorder: Recorder
) -> None:
    hs.inject(Fault.RATE_LIMIT, Fault.RATE_LIMIT)

    await client.register(puppet("_bk_patient"))

    assert recorder.rate_limit_delays == [0.01, 0.01]  # Faults.retry_after_ms == 10
    assert hs.requests_by_username["_bk_patient"] == 3
    assert hs.registered == {"_bk_patient"}
    assert client.request_count == 3


async def test_429_honours_a_retry_after_header_in_seconds(
    hs: FaultHomeserver, client: HomeserverClient, recorder: Recorder
) -> None:
    hs.inject(Fault.RATE_LIMIT_HEADER_ONLY)  # Retry-After: 1

    assert await client.whoami() == WhoAmI("@_bk_bot:test.local")
    assert recorder.rate_limit_delays == [1.0]


async def test_429_honours_a_retry_after_http_date() -> None:
    past = Faults(retry_after_header="Wed, 21 Oct 2015 07:28:00 GMT")
    async with FaultHomeserver(as_token=TOKEN, faults=past) as hs:
        hs.inject(Fault.RATE_LIMIT_HEADER_ONLY)
        async with HomeserverClient(hs.url, TOKEN, retry=FAST) as client:
            recorder = Recorder()
            client.observers.append(recorder)
            await client.whoami()

    assert recorder.rate_limit_delays == [0.0]


async def test_429_without_any_hint_backs_off_exponentially() -> None:
    async with FaultHomeserver(as_token=TOKEN, faults=Faults(retry_after_header="")) as hs:
        hs.inject(*[Fault.RATE_LIMIT_HEADER_ONLY] * 3)
        policy = RetryPolicy(base_delay=0.001, max_delay=1.0)
        async with HomeserverClient(hs.url, TOKEN, retry=policy) as client:
            recorder = Recorder()
            client.observers.append(recorder)
            await client.whoami()

    ceilings = [0.001, 0.002, 0.004]
    assert len(recorder.rate_limit_delays) == 3
    assert all(0 <= d <= c for d, c in zip(recorder.rate_limit_delays, ceilings, strict=True))


@pytest.mark.parametrize(
    "faults",
    [
        Faults(retry_after_header="86400"),
        Faults(retry_after_header="inf"),
        Faults(retry_after_header="Fri, 31 Dec 9999 23:59:59 GMT"),
    ],
    ids=["a-day", "infinity", "year-9999"],
)
async def test_a_huge_retry_after_is_capped_at_max_rate_limit_delay(faults: Faults) -> None:
    capped = RetryPolicy(max_rate_limit_delay=0.01)
    async with (
        FaultHomeserver(as_token=TOKEN, faults=faults) as hs,
        HomeserverClient(hs.url, TOKEN, retry=capped) as client,
    ):
        recorder = Recorder()
        client.observers.append(recorder)
        hs.inject(Fault.RATE_LIMIT_HEADER_ONLY)
        async with asyncio.timeout(10):  # uncapped, it would sleep for a day or forever
            assert await client.whoami() == WhoAmI("@_bk_bot:test.local")

    assert recorder.rate_limit_delays == [0.01]


async def test_a_huge_retry_after_ms_is_capped_too() -> None:
    day = Faults(retry_after_ms=86_400_000)
    async with (
        FaultHomeserver(as_token=TOKEN, faults=day) as hs,
        HomeserverClient(hs.url, TOKEN, retry=RetryPolicy(max_rate_limit_delay=0)) as client,
    ):
        recorder = Recorder()
        client.observers.append(recorder)
        hs.inject(Fault.RATE_LIMIT)
        async with asyncio.timeout(10):
            await client.whoami()

    assert recorder.rate_limit_delays == [0.0]
    assert RetryPolicy().max_rate_limit_delay == 300.0


async def test_429_gives_up_after_max_rate_limit_waits() -> None:
    async with (
        FaultHomeserver(as_token=TOKEN, faults=Faults(p429=1.0)) as hs,
        HomeserverClient(hs.url, TOKEN, retry=FAST) as client,
    ):
        with pytest.raises(LimitExceeded) as raised:
            await client.whoami()

    assert raised.value.retry_after == 0.01
    assert client.request_count == FAST.max_rate_limit_waits + 1


# -- transient failures -------------------------------------------------------------


async def test_503_is_retried_then_succeeds(
    hs: FaultHomeserver, client: HomeserverClient, recorder: Recorder
) -> None:
    hs.inject(Fault.UNAVAILABLE, Fault.UNAVAILABLE)

    await client.register(puppet("_bk_retried"))

    assert [reason for reason, _ in recorder.retries] == ["HTTP 503", "HTTP 503"]
    assert [status for *_, status, _ in recorder.responses] == [503, 503, 200]
    assert hs.registered == {"_bk_retried"}


async def test_resets_and_disconnects_are_retried(
    hs: FaultHomeserver, client: HomeserverClient, recorder: Recorder
) -> None:
    hs.inject(Fault.RESET, Fault.DISCONNECT)

    await client.register(puppet("_bk_survivor"))

    assert [reason for reason, _ in recorder.retries] == [
        "ClientOSError",
        "ServerDisconnectedError",
    ]
    assert client.request_count == 3
    assert hs.commits_by_username["_bk_survivor"] == 1


async def test_a_register_committed_before_a_reset_answers_the_retry_with_user_in_use(
    hs: FaultHomeserver, client: HomeserverClient
) -> None:
    hs.inject(Fault.COMMIT_THEN_RESET)

    with pytest.raises(UserInUse):
        await client.register(puppet("_bk_committed"))

    assert hs.requests_by_username["_bk_committed"] == 2
    assert hs.commits_by_username["_bk_committed"] == 1


async def test_slow_replies_within_the_timeout_are_just_slow(
    hs: FaultHomeserver, client: HomeserverClient
) -> None:
    hs.inject(Fault.SLOW)

    assert await client.whoami() == WhoAmI("@_bk_bot:test.local")
    assert client.request_count == 1


async def test_timeouts_are_retried_then_reported_as_unreachable() -> None:
    slow = Faults(p_slow=1.0, slow_seconds=0.3)
    async with FaultHomeserver(as_token=TOKEN, faults=slow) as hs:
        policy = RetryPolicy(max_attempts=2, base_delay=0.001)
        async with HomeserverClient(hs.url, TOKEN, retry=policy, timeout=0.05) as client:
            with pytest.raises(HomeserverUnreachable, match=r"no reply within 0\.05 s"):
                await client.whoami()

    assert client.request_count == 2


async def test_resets_give_up_after_max_attempts() -> None:
    async with (
        FaultHomeserver(as_token=TOKEN, faults=Faults(p_reset=1.0)) as hs,
        HomeserverClient(hs.url, TOKEN, retry=FAST) as client,
    ):
        with pytest.raises(HomeserverUnreachable) as raised:
            await client.whoami()

    assert client.request_count == FAST.max_attempts == hs.total_requests
    message = str(raised.value)
    assert "gave up after 4 attempts" in message
    assert "Connection reset by peer" in message
    assert "\n" not in message


async def test_a_5xx_that_persists_raises_the_last_matrix_error() -> None:
    async with (
        FaultHomeserver(as_token=TOKEN, faults=Faults(p503=1.0)) as hs,
        HomeserverClient(hs.url, TOKEN, retry=FAST) as client,
    ):
        with pytest.raises(MatrixRequestError) as raised:
            await client.whoami()

    assert (raised.value.status, raised.value.errcode) == (503, "M_UNKNOWN")
    assert client.request_count == FAST.max_attempts


async def test_a_proxy_502_with_an_html_body_is_retried_and_mapped() -> None:
    async with (
        FaultHomeserver(as_token=TOKEN, faults=Faults(p502_html=1.0)) as hs,
        HomeserverClient(hs.url, TOKEN, retry=FAST) as client,
    ):
        with pytest.raises(MatrixRequestError) as raised:
            await client.whoami()

    assert type(raised.value) is MatrixRequestError
    assert (raised.value.status, raised.value.errcode) == (502, None)
    assert "502 Bad Gateway" in raised.value.message
    assert client.request_count == FAST.max_attempts


async def test_an_unreachable_port_is_reported_after_retries() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with HomeserverClient(f"http://127.0.0.1:{port}", TOKEN, retry=FAST) as client:
        with pytest.raises(HomeserverUnreachable, match="ClientConnectorError"):
            await client.whoami()

    assert client.request_count == FAST.max_attempts


async def test_many_puppets_under_random_faults_are_each_registered_exactly_once() -> None:
    faults = Faults(
        p429=0.1, p503=0.1, p_reset=0.05, p_disconnect=0.05, p_commit_reset=0.05, p_slow=0.05
    )
    localparts = [f"_bk_crowd{i}" for i in range(150)]
    patient = RetryPolicy(max_attempts=30, base_delay=0.001, max_delay=0.01)
    async with (
        FaultHomeserver(as_token=TOKEN, faults=faults, seed=7) as hs,
        HomeserverClient(hs.url, TOKEN, retry=patient, max_connections=16) as client,
    ):

        async def register(localpart: str) -> None:
            # UserInUse follows a commit-then-reset: the puppet exists, which is success.
            with contextlib.suppress(UserInUse):
                await client.register(puppet(localpart))

        await asyncio.gather(*(register(lp) for lp in localparts))

    assert hs.registered == set(localparts)
    # Once an answer (success or M_USER_IN_USE) reached the client, it never sent again.
    assert hs.replies_by_username == Counter(dict.fromkeys(localparts, 1))
    assert client.request_count == hs.total_requests
    assert {Fault.RATE_LIMIT, Fault.UNAVAILABLE, Fault.RESET, Fault.COMMIT_THEN_RESET} <= set(
        hs.faults_injected
    )


# -- requests that must not be carried out twice ---------------------------------------


async def test_a_504_after_the_room_was_made_is_not_resent(
    hs: FaultHomeserver, client: HomeserverClient
) -> None:
    hs.inject(Fault.COMMIT_THEN_504)

    with pytest.raises(MatrixRequestError) as raised:
        await client.request("POST", CREATE_ROOM_PATH, body={}, resend=False)

    assert raised.value.status == 504
    assert hs.create_room_requests == client.request_count == 1
    assert len(hs.rooms) == 1


async def test_a_reset_after_the_room_was_made_is_not_resent(
    hs: FaultHomeserver, client: HomeserverClient
) -> None:
    hs.inject(Fault.COMMIT_THEN_RESET)

    with pytest.raises(HomeserverUnreachable, match="not sent again"):
        await client.request("POST", CREATE_ROOM_PATH, body={}, resend=False)

    assert hs.create_room_requests == client.request_count == 1
    assert len(hs.rooms) == 1


async def test_a_timeout_is_not_resent_either() -> None:
    slow = Faults(p_slow=1.0, slow_seconds=0.3)
    async with (
        FaultHomeserver(as_token=TOKEN, faults=slow) as hs,
        HomeserverClient(hs.url, TOKEN, retry=FAST, timeout=0.05) as client,
    ):
        with pytest.raises(HomeserverUnreachable, match="not sent again"):
            await client.request("POST", CREATE_ROOM_PATH, body={}, resend=False)

        assert hs.create_room_requests == client.request_count == 1


async def test_a_request_not_to_resend_is_still_retried_after_a_429(
    hs: FaultHomeserver, client: HomeserverClient
) -> None:
    hs.inject(Fault.RATE_LIMIT)

    reply = await client.request("POST", CREATE_ROOM_PATH, body={}, resend=False)

    assert hs.rooms == [reply["room_id"]]
    assert hs.create_room_requests == 2


async def test_a_request_not_to_resend_is_still_retried_after_a_failed_connect() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with HomeserverClient(f"http://127.0.0.1:{port}", TOKEN, retry=FAST) as client:
        with pytest.raises(HomeserverUnreachable, match="ClientConnectorError"):
            await client.request("POST", CREATE_ROOM_PATH, body={}, resend=False)

    assert client.request_count == FAST.max_attempts


async def test_register_is_resent_after_a_504_and_finds_the_user_in_use(
    hs: FaultHomeserver, client: HomeserverClient
) -> None:
    hs.inject(Fault.COMMIT_THEN_504, path=REGISTER_PATH)

    with pytest.raises(UserInUse):
        await client.register(puppet("_bk_gateway"))

    assert hs.requests_by_username["_bk_gateway"] == 2
    assert hs.registered == {"_bk_gateway"}


# -- not a homeserver at all -----------------------------------------------------------


async def test_a_server_that_does_not_speak_http_is_reported_at_once() -> None:
    async with (
        NotHttpServer() as ssh,
        HomeserverClient(ssh.url, TOKEN, retry=FAST) as client,
    ):
        with pytest.raises(HomeserverUnreachable) as raised:
            await client.whoami()

    message = str(raised.value)
    assert message.startswith(f"GET {ssh.url}{WHOAMI}: not a Matrix homeserver reply (")
    assert "Bad status line" in message and "SSH-2.0-OpenSSH" in message
    assert message.endswith("is this the client-server URL?")
    assert "\n" not in message
    assert client.request_count == ssh.connections == 1  # not retried


async def test_a_redirect_loop_is_reported_at_once() -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.path)

    app = web.Application()
    app.router.add_get(WHOAMI, redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        async with HomeserverClient(f"http://{host}:{port}", TOKEN, retry=FAST) as client:
            with pytest.raises(HomeserverUnreachable, match="TooManyRedirects"):
                await client.whoami()
    finally:
        await runner.cleanup()

    assert client.request_count == 1


# -- errors that are never retried ------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error"),
    [
        pytest.param(lambda c: c.whoami("@_bk_ghost:test.local"), Forbidden, id="M_FORBIDDEN"),
        pytest.param(lambda c: c.register(puppet("outsider")), Exclusive, id="M_EXCLUSIVE"),
    ],
)
async def test_4xx_errors_map_to_their_class_and_are_not_retried(
    hs: FaultHomeserver, client: HomeserverClient, call: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await call(client)

    assert client.request_count == hs.total_requests == 1


async def test_user_in_use_is_not_retried(hs: FaultHomeserver, client: HomeserverClient) -> None:
    await client.register(puppet("_bk_twice"))

    with pytest.raises(UserInUse) as raised:
        await client.register(puppet("_bk_twice"))

    assert raised.value.status == 400
    assert raised.value.message == "User ID already taken."
    assert client.request_count == 2


@pytest.mark.parametrize(
    ("token", "error"), [("wrong", UnknownToken), ("", MissingToken)], ids=["wrong", "empty"]
)
async def test_token_problems_map_to_their_class(
    hs: FaultHomeserver, token: str, error: type[Exception]
) -> None:
    async with HomeserverClient(hs.url, token, retry=FAST) as client:
        with pytest.raises(error):
            await client.whoami()

    assert client.request_count == 1


async def test_a_non_json_error_body_still_gives_a_matrix_request_error(
    client: HomeserverClient, recorder: Recorder
) -> None:
    with pytest.raises(MatrixRequestError) as raised:
        await client.request("GET", "/_matrix/client/v3/nowhere")

    assert type(raised.value) is MatrixRequestError
    assert (raised.value.status, raised.value.errcode) == (404, None)
    assert "Not Found" in raised.value.message
    assert recorder.responses == [("GET", "/_matrix/client/v3/nowhere", 404, None)]


# -- observers, logging, configuration ------------------------------------------------


async def test_observers_see_every_attempt_with_a_query_free_endpoint(
    hs: FaultHomeserver, client: HomeserverClient, recorder: Recorder
) -> None:
    await client.register(puppet("_bk_seen"))
    hs.inject(Fault.RATE_LIMIT, Fault.UNAVAILABLE)
    await client.whoami("@_bk_seen:test.local")
    with pytest.raises(MatrixRequestError):
        await client.ping_appservice("some/bridge")

    ping = "/_matrix/client/v1/appservice/{appserviceId}/ping"
    assert recorder.responses == [
        ("POST", "/_matrix/client/v3/register", 200, None),
        ("GET", WHOAMI, 429, "M_LIMIT_EXCEEDED"),
        ("GET", WHOAMI, 503, "M_UNKNOWN"),
        ("GET", WHOAMI, 200, None),
        ("POST", ping, 404, None),
    ]
    assert recorder.rate_limit_delays == [0.01]
    assert [reason for reason, _ in recorder.retries] == ["HTTP 503"]


async def test_the_token_never_appears_in_logs_errors_or_repr(
    hs: FaultHomeserver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    hs.inject(Fault.RATE_LIMIT, Fault.UNAVAILABLE, Fault.RESET)
    async with HomeserverClient(hs.url, TOKEN, retry=FAST) as client:
        await client.register(puppet("_bk_quiet"))
        for call in (client.register(puppet("_bk_quiet")), client.whoami("@_bk_x:test.local")):
            with pytest.raises(MatrixRequestError) as raised:
                await call
            errors.append(str(raised.value))
    async with HomeserverClient(hs.url, TOKEN, retry=RetryPolicy(max_attempts=1)) as client:
        hs.inject(Fault.RESET)
        with pytest.raises(HomeserverUnreachable) as unreachable:
            await client.whoami()
        errors.append(str(unreachable.value))

    assert "/_matrix/client/v3/register" in caplog.text  # the log is there...
    assert TOKEN not in caplog.text  # ...without the token
    assert all(TOKEN not in error for error in errors)
    assert TOKEN not in repr(client)


@pytest.mark.parametrize("url", ["localhost:8008", "ftp://example.org", "http://"])
def test_a_malformed_homeserver_url_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="must look like http"):
        HomeserverClient(url, TOKEN)


async def test_a_closed_client_refuses_requests(hs: FaultHomeserver) -> None:
    client = HomeserverClient(hs.url + "/", TOKEN)
    assert client.state is ClientLifecycle.UNOPENED
    await client.whoami()
    assert client.state is ClientLifecycle.OPENED
    await client.close()
    assert client.state is ClientLifecycle.CLOSED
    with pytest.raises(ClientClosed, match="is closed"):
        await client.whoami()
    await client.close()  # closing twice is fine

    assert client.request_count == hs.total_requests == 1


# -- real Synapse -------------------------------------------------------------------


@pytest.fixture
async def synapse_client(synapse: TestHomeserver) -> AsyncIterator[HomeserverClient]:
    async with HomeserverClient(synapse.url, synapse.as_token, retry=FAST) as http:
        yield http


@pytest.mark.synapse
async def test_synapse_whoami_is_the_sender(synapse_client: HomeserverClient) -> None:
    assert await synapse_client.whoami() == WhoAmI("@_bk_bot:test.local")


@pytest.mark.synapse
async def test_synapse_registers_a_puppet_once(
    synapse: TestHomeserver, synapse_client: HomeserverClient, unique: str
) -> None:
    localpart = f"_bk_client{unique}"
    user_id = f"@{localpart}:test.local"

    response = await synapse_client.register(puppet(localpart))
    with pytest.raises(UserInUse):
        await synapse_client.register(puppet(localpart))

    assert response.user_id == user_id
    assert response.access_token is None  # inhibit_login
    assert await synapse.user_exists(user_id)
    assert (await synapse_client.whoami(user_id)).user_id == user_id
    assert synapse_client.request_count == 3


@pytest.mark.synapse
@pytest.mark.parametrize("localpart", ["shared_{}", "stranger{}"], ids=["rival", "outside"])
async def test_synapse_refuses_puppets_outside_our_exclusive_namespace(
    synapse_client: HomeserverClient, unique: str, localpart: str
) -> None:
    with pytest.raises(Exclusive):
        await synapse_client.register(puppet(localpart.format(unique)))

    assert synapse_client.request_count == 1


@pytest.mark.synapse
async def test_synapse_forbids_acting_as_an_unregistered_puppet(
    synapse_client: HomeserverClient, unique: str
) -> None:
    with pytest.raises(Forbidden):
        await synapse_client.whoami(f"@_bk_ghost{unique}:test.local")


@pytest.mark.synapse
async def test_synapse_rejects_a_wrong_token(synapse: TestHomeserver) -> None:
    async with HomeserverClient(synapse.url, "not-the-token", retry=FAST) as client:
        with pytest.raises(UnknownToken):
            await client.whoami()

    assert client.request_count == 1


@pytest.mark.synapse
async def test_synapse_ping_reports_that_nothing_listens_at_the_appservice_url(
    synapse: TestHomeserver, synapse_client: HomeserverClient
) -> None:
    with pytest.raises(MatrixRequestError) as raised:
        await synapse_client.ping_appservice(synapse.appservice_id, "ping-1")

    assert (raised.value.status, raised.value.errcode) == (502, "M_CONNECTION_FAILED")
    assert synapse_client.request_count == 1  # a verdict on the appservice, not retried


@pytest.mark.synapse
async def test_synapse_ping_with_another_appservice_id_is_forbidden(
    synapse_client: HomeserverClient,
) -> None:
    with pytest.raises(Forbidden):
        await synapse_client.ping_appservice("rival_bridge")
