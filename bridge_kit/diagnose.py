"""Start-up checks that turn every common set-up mistake into a plain diagnosis.

``whoami`` proves the homeserver loaded our registration; the appservice ping
(``POST /_matrix/client/v1/appservice/{id}/ping``) proves it can reach our URL
with the right hs_token (facts §6).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import yarl

from bridge_kit.client import HomeserverClient, RetryPolicy
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
from bridge_kit.server import create_app, serve_app
from bridge_kit.store.memory import MemoryStore

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


async def ping_homeserver(client: HomeserverClient, registration: Registration) -> int:
    """Have the homeserver ping our ``url``; return the round trip in milliseconds."""
    try:
        return await client.ping_appservice(registration.id)
    except MatrixRequestError as exc:
        raise StartupCheckFailed(_ping_diagnosis(exc, registration)) from exc


def _ping_diagnosis(error: MatrixRequestError, registration: Registration) -> str:
    url = registration.url
    if error.errcode == "M_URL_NOT_SET":
        return "the registration's url is null, so the homeserver sends us nothing"
    if error.errcode in ("M_CONNECTION_FAILED", "M_CONNECTION_TIMEOUT"):
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
    return f"the homeserver could not ping this appservice: {error}"


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


async def check_against_homeserver(registration: Registration, homeserver_url: str) -> list[str]:
    """Run both checks once, serving ``/ping`` on the registration's URL meanwhile.

    Returns the lines to print (what was confirmed); raises
    :class:`StartupCheckFailed` with the diagnosis on the first failure.
    """
    # A one-off check should answer in seconds, not wait out a homeserver outage.
    quick = RetryPolicy(max_attempts=2, base_delay=0.2)
    async with HomeserverClient(homeserver_url, registration.as_token, retry=quick) as client:
        domain = await homeserver_domain(client, registration)
        sender = f"@{registration.sender_localpart}:{domain}"
        lines = [f"ok: the homeserver knows this registration (sender {sender})"]
        if registration.url is None:
            lines.append("warning: url is null, so the homeserver sends this appservice nothing")
            return lines
        async with _ping_responder(registration):
            duration_ms = await ping_homeserver(client, registration)
        lines.append(f"ok: the homeserver reached {registration.url} in {duration_ms} ms")
        return lines


@contextlib.asynccontextmanager
async def _ping_responder(registration: Registration) -> AsyncIterator[None]:
    """Serve the appservice routes (with real hs_token checks) on the registration's URL."""
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
        raise StartupCheckFailed(f"{exc} Stop it, or check without --homeserver.") from exc
    try:
        yield
    finally:
        await runner.cleanup()
