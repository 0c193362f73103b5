"""Start-up checks that turn every common set-up mistake into a plain diagnosis.

``whoami`` proves the homeserver loaded our registration; the appservice ping
(``POST /_matrix/client/v1/appservice/{id}/ping``) proves it can reach our URL
with the right hs_token (facts §6).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import aiohttp
import attrs
import yarl

from bridge_kit import defaults
from bridge_kit.checks.devices import device_lines
from bridge_kit.client.homeserver import HomeserverClient, RetryPolicy
from bridge_kit.errors import (
    Forbidden,
    HomeserverUnreachable,
    ListenError,
    MatrixRequestError,
    StartupCheckFailed,
    UnknownToken,
)
from bridge_kit.ids import split_user_id
from bridge_kit.registration import Registration
from bridge_kit.server.appservice_api import create_app, serve_app
from bridge_kit.store.memory import MemoryStore

log = logging.getLogger(__name__)

_HEALTH_TIMEOUT: Final = 5.0

NOT_LOADED = (
    "the homeserver does not know this registration's as_token: is the registration "
    "listed in app_service_config_files, and was the homeserver restarted after that?"
)


async def homeserver_domain(client: HomeserverClient, registration: Registration) -> str:
    """Ask ``whoami`` as the appservice and return the server name from the sender's ID."""
    try:
        whoami = await client.whoami()
    except UnknownToken as exc:
        raise StartupCheckFailed(NOT_LOADED) from exc
    except HomeserverUnreachable as exc:
        raise StartupCheckFailed(
            f"cannot reach the homeserver at {client.base_url}: {exc}"
        ) from exc
    except MatrixRequestError as exc:
        raise StartupCheckFailed(f"whoami failed: {exc}") from exc
    localpart, domain = split_user_id(whoami.user_id)
    if localpart != registration.sender_localpart:
        raise StartupCheckFailed(
            f"the homeserver says this as_token belongs to {whoami.user_id}, but the "
            f"registration's sender_localpart is {registration.sender_localpart!r}: "
            "the homeserver loaded a different registration file with the same as_token"
        )
    return domain


#: Ping failures that may pass by themselves: the homeserver could not connect, or got
#: no answer in time (a listener that has just come up, a pooled connection to the
#: process we replaced), or Synapse failed after reaching us (its own race when it
#: resumes queued transactions, "AlreadyCalled"; it reports that as a failed connection).
_TRANSIENT_PING: Final = frozenset({"M_CONNECTION_FAILED", "M_CONNECTION_TIMEOUT"})


@attrs.frozen
class PingRetry:
    """How often the start-up ping is tried: ``attempts``, waiting ``backoff`` seconds
    after the first failure and twice as long after each next one."""

    attempts: int = attrs.field(default=defaults.PING_ATTEMPTS, validator=attrs.validators.ge(1))
    backoff: float = attrs.field(default=defaults.PING_BACKOFF, validator=attrs.validators.ge(0))

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th failure (1-based)."""
        return float(self.backoff * 2 ** (failures - 1))


async def ping_homeserver(
    client: HomeserverClient,
    registration: Registration,
    *,
    retry: PingRetry = PingRetry(),
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> int:
    """Have the homeserver ping our ``url``; return the round trip in milliseconds.

    A failure that may pass by itself (the homeserver could not connect, or timed
    out) is retried per ``retry``; the :class:`StartupCheckFailed` raised at the
    end quotes the homeserver's own errcode and error text and names the likely cause.
    """
    failures = 0
    while True:
        try:
            return await client.ping_appservice(registration.id)
        except MatrixRequestError as exc:
            failures += 1
            if failures >= retry.attempts or exc.errcode not in _TRANSIENT_PING:
                raise StartupCheckFailed(_ping_failure(exc, registration, failures)) from exc
            delay = retry.delay(failures)
            log.warning(
                "the homeserver's ping of %s failed (attempt %d of %d): %s; trying again in %g s",
                registration.url, failures, retry.attempts, exc, delay,
            )  # fmt: skip
            await sleep(delay)


def _ping_failure(error: MatrixRequestError, registration: Registration, attempts: int) -> str:
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    said = f"{error.status} {error.errcode or 'no errcode'}: {error.message or '(no error text)'}"
    return f"{_ping_diagnosis(error, registration)}\n  the homeserver said{tries}: {said}"


def _ping_diagnosis(error: MatrixRequestError, registration: Registration) -> str:
    url = registration.url
    if error.errcode == "M_URL_NOT_SET":
        return "the registration's url is null, so the homeserver sends us nothing"
    if "AlreadyCalled" in error.message:
        return (
            f"the homeserver reached this appservice at {url}, then failed in its own "
            "retry of the transactions it had queued for us (a Synapse race after a restart)"
        )
    if error.errcode in _TRANSIENT_PING:
        return (
            f"the homeserver cannot reach this appservice at {url} "
            f"({error.errcode}): is the daemon listening there, and can the homeserver "
            "connect to that address?"
        )
    if error.errcode == "M_BAD_STATUS":
        return _bad_status_diagnosis(error, url)
    if isinstance(error, Forbidden):
        return (
            f"the homeserver refused the ping for id {registration.id!r}: the loaded "
            "registration has a different id, or the token is not an appservice token"
        )
    if isinstance(error, UnknownToken):
        return NOT_LOADED
    return "the homeserver could not ping this appservice"


def _bad_status_diagnosis(error: MatrixRequestError, url: str | None) -> str:
    status = error.body.get("status")
    if status in (401, 403):
        return (
            f"the homeserver reached {url} but was refused ({status}): the hs_token the "
            "homeserver loaded differs from this registration's; restart the homeserver "
            "after changing the registration"
        )
    if status == 404:
        return (
            f"the homeserver reached {url} but it answered 404 to the ping: is something "
            "else listening on that port?"
        )
    return f"the homeserver reached {url} but it answered {status}: {error.body.get('body')}"


#: A one-off check answers in seconds; it still rides out one Synapse race.
_CHECK_PING: Final = PingRetry(attempts=3, backoff=0.5)


async def check_against_homeserver(
    registration: Registration, homeserver_url: str, homeserver_config: str | None = None
) -> list[str]:
    """Run both checks once, serving ``/ping`` on the registration's URL meanwhile,
    then the device checks (:mod:`bridge_kit.checks.devices`).

    When something already listens there (the bridge itself, running), the
    homeserver pings that instead. Returns the lines to print (what was
    confirmed); raises :class:`StartupCheckFailed` with the diagnosis on the
    first failure.
    """
    # A one-off check should answer in seconds, not wait out a homeserver outage.
    quick = RetryPolicy(max_attempts=2, base_delay=0.2)
    async with HomeserverClient(homeserver_url, registration.as_token, retry=quick) as client:
        domain = await homeserver_domain(client, registration)
        sender = f"@{registration.sender_localpart}:{domain}"
        lines = [f"ok: the homeserver knows this registration (sender {sender})"]
        if registration.url is None:
            lines.append("warning: url is null, so the homeserver sends this appservice nothing")
            return lines + await device_lines(client, registration, sender, homeserver_config)
        async with _ping_responder(registration) as already_there:
            note = f"{registration.url} is served by {already_there}; the homeserver pings it there"
            try:
                duration_ms = await ping_homeserver(client, registration, retry=_CHECK_PING)
            except StartupCheckFailed as exc:
                if already_there is None:
                    raise
                raise StartupCheckFailed(f"{exc}\n  note: {note}") from exc
            if already_there is not None:
                lines.append(f"note: {note}")
        lines.append(f"ok: the homeserver reached {registration.url} in {duration_ms} ms")
        return lines + await device_lines(client, registration, sender, homeserver_config)


@contextlib.asynccontextmanager
async def _ping_responder(registration: Registration) -> AsyncIterator[str | None]:
    """Serve the appservice routes (with real hs_token checks) on the registration's URL.

    Yields ``None``, or, when the port is taken, who serves it already: the
    running bridge answers the homeserver's ping itself, which checks the same.
    """
    url = yarl.URL(registration.url or "")
    if url.host is None or url.port is None:
        raise StartupCheckFailed(
            f"the registration's url {registration.url!r} has no host and port"
        )

    # Transactions get 503: the homeserver keeps them for the bridge itself.
    app = create_app(hs_token=registration.hs_token, store=MemoryStore(), accept_transactions=False)
    try:
        runner = await serve_app(app, url.host, url.port)
    except ListenError as exc:
        cause = exc.__cause__
        if not isinstance(cause, OSError) or cause.errno != errno.EADDRINUSE:
            raise StartupCheckFailed(str(exc)) from exc  # e.g. a port we may not use
        runner = None
    if runner is None:
        yield await _who_serves(url, registration)
        return
    try:
        yield None
    finally:
        await runner.cleanup()


async def _who_serves(url: yarl.URL, registration: Registration) -> str:
    """Who listens on ``url`` already, in words, from its bridge_kit health route."""
    health_url = url.with_path("/_bridge_kit/health")
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_HEALTH_TIMEOUT)) as http,
            http.get(health_url) as response,
        ):
            health = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return "a process that is not a bridge_kit daemon"
    if not isinstance(health, dict) or "appservice_id" not in health:
        return "a process that is not a bridge_kit daemon"
    if health["appservice_id"] != registration.id:
        return f"a bridge_kit daemon of another appservice ({health['appservice_id']!r})"
    return f"the running bridge_kit daemon of {registration.id!r}"
