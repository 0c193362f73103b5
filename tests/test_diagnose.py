"""The start-up ping: retried while the failure may pass, then explained (no Synapse)."""

from __future__ import annotations

from typing import Any

import pytest

from bridge_kit import MatrixRequestError, StartupCheckFailed, generate_registration
from bridge_kit.checks.homeserver import PingRetry, ping_homeserver
from bridge_kit.client.homeserver import HomeserverClient

REGISTRATION = generate_registration("bridge", "http://127.0.0.1:29334", "example.org", "_x_")
RACE = "AlreadyCalled: Tried to cancel an already-called event."


def reply(code: int, errcode: str, error: str, **extra: Any) -> MatrixRequestError:
    return MatrixRequestError.from_response(code, {"errcode": errcode, "error": error, **extra})


class FakeClient:
    """Answers the ping with the given errors in turn, then with success."""

    def __init__(self, *errors: MatrixRequestError) -> None:
        self.errors = list(errors)
        self.pings = 0

    async def ping_appservice(self, appservice_id: str) -> int:
        self.pings += 1
        if self.errors:
            raise self.errors.pop(0)
        return 7


class Sleeps(list[float]):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


async def ping(client: FakeClient, sleeps: Sleeps, retry: PingRetry | None = None) -> int:
    fake: Any = client  # only ping_appservice is called
    as_client: HomeserverClient = fake
    return await ping_homeserver(as_client, REGISTRATION, retry=retry or PingRetry(), sleep=sleeps)


async def test_a_failed_connection_is_retried_with_backoff_until_the_ping_passes() -> None:
    client = FakeClient(
        reply(502, "M_CONNECTION_FAILED", RACE),
        reply(502, "M_CONNECTION_FAILED", "ConnectError: Connection refused"),
        reply(504, "M_CONNECTION_TIMEOUT", "Timed out"),
    )
    sleeps = Sleeps()
    assert await ping(client, sleeps) == 7
    assert client.pings == 4
    assert sleeps == [1.0, 2.0, 4.0]


async def test_after_the_last_attempt_the_homeservers_own_words_and_the_cause_are_given() -> None:
    client = FakeClient(*[reply(502, "M_CONNECTION_FAILED", "ConnectError: refused")] * 5)
    sleeps = Sleeps()
    with pytest.raises(StartupCheckFailed) as failed:
        await ping(client, sleeps)
    assert client.pings == 5
    assert sum(sleeps) == 15.0  # 1 + 2 + 4 + 8
    message = str(failed.value)
    assert "cannot reach this appservice at http://127.0.0.1:29334" in message
    assert (
        "the homeserver said (after 5 attempts): 502 M_CONNECTION_FAILED: ConnectError" in message
    )


async def test_synapses_race_is_named_when_it_persists() -> None:
    client = FakeClient(*[reply(502, "M_CONNECTION_FAILED", RACE)] * 2)
    with pytest.raises(StartupCheckFailed) as failed:
        await ping(client, Sleeps(), PingRetry(attempts=2))
    assert "reached this appservice" in str(failed.value)
    assert "Synapse race" in str(failed.value)
    assert RACE in str(failed.value)


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (reply(502, "M_BAD_STATUS", "HTTP 403 Forbidden", status=403), "hs_token"),
        (reply(403, "M_FORBIDDEN", "Mismatching application service ID"), "different id"),
        (reply(400, "M_URL_NOT_SET", "no URL"), "url is null"),
    ],
)
async def test_a_verdict_is_not_retried(error: MatrixRequestError, cause: str) -> None:
    client = FakeClient(error)
    sleeps = Sleeps()
    with pytest.raises(StartupCheckFailed) as failed:
        await ping(client, sleeps)
    assert client.pings == 1
    assert sleeps == []
    assert cause in str(failed.value)
    assert f"the homeserver said: {error.status} {error.errcode}: {error.message}" in str(
        failed.value
    )
