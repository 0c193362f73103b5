"""The appservice's HTTP client for the homeserver's client-server API.

:class:`HomeserverClient` keeps one aiohttp session with a keep-alive
connection pool, authenticates with the appservice's ``as_token``, maps error
replies to :class:`~bridge_kit.errors.MatrixRequestError` subclasses and
retries what is worth retrying (see :class:`RetryPolicy`)::

    async with HomeserverClient("http://127.0.0.1:8008", as_token) as client:
        me = await client.whoami()
        await client.register(RegisterRequest.for_puppet("_bridge_alice"))
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar
from urllib.parse import quote

import aiohttp
import attrs
import cattrs
import yarl
from cattrs.gen import make_dict_unstructure_fn

from bridge_kit._json import encode_json
from bridge_kit.client._transfer import Raw, RawBody, prepared, query_params, read_chunks
from bridge_kit.client._wire import (
    checked_base_url,
    decode_json_reply,
    describe_client_error,
    describe_exception,
    errcode_of,
    is_transient,
    reason_label,
    request_url,
    retry_after_header,
    snippet,
)
from bridge_kit.errors import (
    BridgeKitError,
    ClientClosed,
    HomeserverUnreachable,
    LimitExceeded,
    MatrixRequestError,
    UnexpectedReply,
)
from bridge_kit.store.url import redact_store_url
from bridge_kit.types.converter import converter, describe_error
from bridge_kit.types.register import RegisterRequest, RegisterResponse

__all__ = [
    "REGISTER_ENDPOINT",
    "ClientLifecycle",
    "ClientObserver",
    "HomeserverClient",
    "RawBody",
    "RetryPolicy",
    "WhoAmI",
    "quote_segment",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_EXCEPTIONS: Final = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    TimeoutError,
)
#: The one transient exception after which the request certainly never left the client.
_NOT_SENT_EXCEPTIONS: Final = (aiohttp.ClientConnectorError,)

#: ``POST`` this to register a user (the endpoint name observers see for it).
REGISTER_ENDPOINT: Final = "/_matrix/client/v3/register"


#: A query parameter value; a sequence repeats the parameter (``via=a&via=b``).
QueryValue = str | Sequence[str]


@attrs.frozen
class RetryPolicy:
    """When and how long :class:`HomeserverClient` waits before sending a request again.

    * 429 / ``M_LIMIT_EXCEEDED``: wait as long as the reply asks (``retry_after_ms``,
      else the ``Retry-After`` header, else exponential backoff), at most
      ``max_rate_limit_waits`` times per request; then the :class:`LimitExceeded` is raised.
      A single wait lasts at most ``max_rate_limit_delay`` seconds, whatever the reply asks.
    * 502/503/504, connection errors and timeouts: exponential backoff with full
      jitter (a random delay up to ``min(max_delay, base_delay * 2**n)``), at most
      ``max_attempts`` attempts; then :class:`HomeserverUnreachable` (or the last 5xx
      :class:`MatrixRequestError`) is raised. A request sent with ``resend=False``
      (see :meth:`HomeserverClient.request`) is retried only after a failed connect.
    * Any other 4xx, and a reply that is not HTTP at all, is never retried.
    """

    max_attempts: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    base_delay: float = attrs.field(default=0.25, validator=attrs.validators.ge(0))
    max_delay: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    max_rate_limit_waits: int = attrs.field(default=30, validator=attrs.validators.ge(0))
    max_rate_limit_delay: float = attrs.field(default=300.0, validator=attrs.validators.ge(0))

    def backoff(self, failures: int, rng: random.Random) -> float:
        """A full-jitter delay after the ``failures``-th consecutive failure (1-based)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        return rng.uniform(0, ceiling)


class ClientObserver:
    """Hooks into every request a :class:`HomeserverClient` sends; the methods do nothing.

    Subclass, override what you need and append an instance to
    :attr:`HomeserverClient.observers` (for metrics, or to adapt concurrency).
    The hooks run inline, so they must be quick and must not raise.

    :meth:`on_response` sees every attempt that got an HTTP reply; an attempt
    lost to a connection error or timeout shows up as :meth:`on_retry` instead
    (or, for the last one, as the :class:`HomeserverUnreachable` raised).
    """

    def on_response(
        self, method: str, endpoint: str, status: int, errcode: str | None, seconds: float
    ) -> None:
        """An attempt got an HTTP reply; ``endpoint`` is a low-cardinality path (no query)."""

    def on_rate_limited(self, delay: float) -> None:
        """A 429 arrived; the client now sleeps ``delay`` seconds before trying again."""

    def on_retry(self, reason: str, delay: float) -> None:
        """A transient failure; the client retries after ``delay`` seconds.

        ``reason`` is a short label fit for a metric: ``"HTTP 503"``, ``"timeout"``
        or the connection error's class name (``"ServerDisconnectedError"``).
        """


class ClientLifecycle(enum.Enum):
    """Where a :class:`HomeserverClient` is in its life.

    ``UNOPENED``: created, no connection yet (the first request opens the pool).
    ``OPENED``: the pool is open. ``CLOSED``: :meth:`HomeserverClient.close` was
    called; every further request raises :class:`~bridge_kit.errors.ClientClosed`.
    """

    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


@attrs.frozen
class WhoAmI:
    """The reply of ``GET /account/whoami``."""

    user_id: str
    device_id: str | None = None
    is_guest: bool = False


@attrs.frozen
class _PingRequest:
    transaction_id: str | None = None


@attrs.frozen
class _PingResponse:
    duration_ms: int


def configure_converter(converter: cattrs.Converter) -> None:
    """Register the hooks of this module's models on ``converter``."""
    converter.register_unstructure_hook(
        _PingRequest,
        make_dict_unstructure_fn(_PingRequest, converter, _cattrs_omit_if_default=True),
    )


def quote_segment(value: str) -> str:
    """Percent-encode one path segment (a user ID, room alias, appservice id...).

    ``.`` and ``..`` become ``%2E`` and ``%2E%2E``: left alone, a room ID or state
    key of ``..`` would climb the path (``send_state("..", "..", {}, "whoami")``
    would reach ``/_matrix/client/v3/whoami``). The client sends paths exactly as
    given, so nothing on our side decodes them back.
    """
    quoted = quote(value, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


@attrs.frozen
class _Reply:
    status: int
    body: Any  # decoded JSON, or None when the body was not JSON
    text: str
    headers: Mapping[str, str]
    # A 2xx reply whose body is left unread, for streaming; the caller releases it.
    response: aiohttp.ClientResponse | None = None


class HomeserverClient:
    """An appservice's connection to its homeserver.

    Use it as an async context manager, or call :meth:`close` when done. One
    instance is meant to be shared by the whole bridge: it holds the pool of
    keep-alive connections (at most ``max_connections``). ``timeout`` bounds
    each attempt, in seconds.

    ``request_count`` counts the attempts made, retries included; append
    :class:`ClientObserver` instances to ``observers`` to watch each of them.
    """

    def __init__(
        self,
        base_url: str,
        as_token: str,
        *,
        retry: RetryPolicy = RetryPolicy(),
        max_connections: int = 100,
        timeout: float = 60.0,
    ) -> None:
        self.base_url = checked_base_url(base_url)
        self._encoded_base = str(yarl.URL(self.base_url))
        # For messages: a URL may carry basic-auth credentials (http://user:pw@host).
        self._shown_base = redact_store_url(self.base_url)
        self.retry = retry
        self.max_connections = max_connections
        self.timeout = timeout
        self.observers: list[ClientObserver] = []
        self.request_count = 0
        self._headers = {"Authorization": f"Bearer {as_token}"}
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random()
        self._retries_aborted = asyncio.Event()
        self.state = ClientLifecycle.UNOPENED

    def __repr__(self) -> str:
        return f"<HomeserverClient {self._shown_base}>"

    async def __aenter__(self) -> HomeserverClient:
        self._ensure_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def abort_retries(self) -> None:
        """Retry nothing from now on: a request waiting to retry (a backoff, a 429's
        wait of up to ``max_rate_limit_delay``) raises its error at once, and a
        later failure is raised instead of retried.

        For shutdown: a stopping app must not wait minutes for retries, so it
        waits for each request at most one attempt (``timeout``).
        """
        self._retries_aborted.set()

    async def close(self) -> None:
        """Close the connection pool for good; later requests raise :class:`ClientClosed`.

        Requests in flight are cut off, and those waiting to retry stop waiting:
        both raise :class:`ClientClosed` at once.
        """
        self.state = ClientLifecycle.CLOSED
        self._retries_aborted.set()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, QueryValue] | None = None,
        user_id: str | None = None,
        endpoint: str | None = None,
        resend: bool = True,
    ) -> dict[str, Any]:
        """Send a request, retrying per :attr:`retry`, and return the decoded JSON object.

        ``path`` starts with ``/_matrix/`` and its variable segments must be quoted
        with :func:`quote_segment`. ``body`` is an attrs model (unstructured with
        the project's converter) or plain JSON data. ``user_id`` asserts the
        identity of a puppet. ``endpoint`` names the route for observers, e.g.
        ``/_matrix/client/v3/rooms/{roomId}/join``; it defaults to ``path``.

        ``resend=False`` is for requests that must not be carried out twice
        (``createRoom``): it is sent again only when it certainly was not carried
        out, i.e. after a failed connect (:class:`aiohttp.ClientConnectorError`)
        or a 429, which refuses it. A timeout, a broken connection or a 502/503/504
        may come after the homeserver acted, so they are raised at once.

        Raises a :class:`MatrixRequestError` subclass for an error reply, and
        :class:`HomeserverUnreachable` when the homeserver could not be reached
        or did not answer in HTTP at all.
        """
        reply = await self.request_json(
            method, path, body=body, query=query, user_id=user_id, endpoint=endpoint, resend=resend
        )
        if not isinstance(reply, dict):
            raise UnexpectedReply(200, f"expected a JSON object, got: {snippet(str(reply))}", reply)
        return reply

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, QueryValue] | None = None,
        user_id: str | None = None,
        endpoint: str | None = None,
        resend: bool = True,
    ) -> Any:
        """:meth:`request` for a reply that may be any JSON value (``/state`` is an array)."""
        data = None if body is None else encode_json(_to_json(body))
        params, endpoint = query_params(query, user_id), endpoint or path
        reply = await self._send_with_retries(method, path, params, data, endpoint, resend=resend)
        if reply.body is None and reply.text.strip() != "null":
            raise UnexpectedReply(reply.status, f"expected JSON, got: {snippet(reply.text)}")
        return reply.body

    async def request_raw(
        self,
        method: str,
        path: str,
        *,
        data: RawBody,
        content_type: str,
        size: int | None = None,
        query: Mapping[str, QueryValue] | None = None,
        user_id: str | None = None,
        endpoint: str | None = None,
        resend: bool = True,
    ) -> dict[str, Any]:
        """:meth:`request` with a raw body: bytes, a file (reopened per attempt, read in
        chunks) or an async iterable of chunks (``size`` is its length), which is sent
        once only: any failure, even a 429, is raised."""
        raw, params = Raw(data, content_type, size), query_params(query, user_id)
        resend = resend and raw.reusable
        reply = await self._send_with_retries(
            method, path, params, raw, endpoint or path, resend=resend
        )
        if not isinstance(reply.body, dict):
            raise UnexpectedReply(reply.status, f"expected an object: {snippet(reply.text)}")
        return reply.body

    async def stream(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, QueryValue] | None = None,
        user_id: str | None = None,
        endpoint: str | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Yield a read's reply body in chunks (downloads), retried as :meth:`request` until
        the reply starts; a transfer that breaks off raises :class:`HomeserverUnreachable`."""
        reply = await self._send_with_retries(
            method,
            path,
            query_params(query, user_id),
            None,
            endpoint or path,
            resend=True,
            stream=True,
        )
        assert reply.response is not None  # a streamed 2xx comes with its open response
        async for chunk in read_chunks(
            reply.response, f"{method} {self._shown_base}{endpoint or path}"
        ):
            yield chunk

    async def register(self, request: RegisterRequest) -> RegisterResponse:
        """``POST /_matrix/client/v3/register``; see :meth:`RegisterRequest.for_puppet`."""
        reply = await self.request(
            "POST", REGISTER_ENDPOINT, body=request.body(), query=request.query()
        )
        return structure_reply(reply, RegisterResponse, "register")

    async def whoami(self, user_id: str | None = None) -> WhoAmI:
        """Who the as_token (or the asserted ``user_id``) is; proves the registration is loaded."""
        reply = await self.request("GET", "/_matrix/client/v3/account/whoami", user_id=user_id)
        return structure_reply(reply, WhoAmI, "whoami")

    async def ping_appservice(self, appservice_id: str, transaction_id: str | None = None) -> int:
        """Ask the homeserver to ping this appservice; return the round trip in milliseconds.

        Raises e.g. ``MatrixRequestError`` 502 ``M_CONNECTION_FAILED`` when the
        homeserver cannot reach the appservice's ``url``.
        """
        reply = await self.request(
            "POST",
            f"/_matrix/client/v1/appservice/{quote_segment(appservice_id)}/ping",
            body=_PingRequest(transaction_id),
            endpoint="/_matrix/client/v1/appservice/{appserviceId}/ping",
        )
        return structure_reply(reply, _PingResponse, "ping").duration_ms

    async def _send_with_retries(
        self,
        method: str,
        path: str,
        params: dict[str, QueryValue],
        data: bytes | Raw | None,
        endpoint: str,
        *,
        resend: bool,
        stream: bool = False,
    ) -> _Reply:
        # After a timeout, a broken connection or a gateway error the request may
        # have been carried out, and by default it is sent again anyway. That is
        # safe for what bridge_kit sends this way: reads; PUTs, which set a value
        # or carry a transaction ID the homeserver deduplicates; membership
        # changes, which a repeat finds already made; and /register, whose repeat
        # after a commit gets M_USER_IN_USE, which the puppet layer counts as
        # success. A call that would be carried out twice (createRoom) passes
        # resend=False. A body streamed from an iterable is sent once at most.
        where = f"{method} {self._shown_base}{endpoint}"
        once = isinstance(data, Raw) and not data.reusable
        failures = 0
        rate_limit_waits = 0
        while True:
            try:
                reply = await self._send_once(method, path, params, data, endpoint, stream)
            except _TRANSIENT_EXCEPTIONS as exc:
                failures += 1
                if once or (not resend and not isinstance(exc, _NOT_SENT_EXCEPTIONS)):
                    raise HomeserverUnreachable(
                        f"{where}: {describe_exception(exc, self.timeout)} "
                        "(not sent again: the homeserver may have carried it out)"
                    ) from exc
                if failures >= self.retry.max_attempts:
                    raise HomeserverUnreachable(
                        f"{where}: {describe_exception(exc, self.timeout)} "
                        f"(gave up after {failures} attempts)"
                    ) from exc
                if not await self._pause_before_retry(reason_label(exc), failures):
                    raise self._not_retried(
                        HomeserverUnreachable(
                            f"{where}: {describe_exception(exc, self.timeout)} "
                            "(not retried: the client is stopping)"
                        )
                    ) from exc
                continue
            except aiohttp.ClientError as exc:
                # Not HTTP (an SSH or database port), endless redirects, a URL aiohttp
                # refuses: none gets better by asking again.
                raise HomeserverUnreachable(
                    f"{where}: not a Matrix homeserver reply ({describe_client_error(exc)}); "
                    "is this the client-server URL?"
                ) from exc
            if 200 <= reply.status < 300:
                return reply
            error = _error_from(reply)
            if isinstance(error, LimitExceeded):
                rate_limit_waits += 1
                if once or rate_limit_waits > self.retry.max_rate_limit_waits:
                    raise error
                if not await self._pause_for_rate_limit(error, rate_limit_waits):
                    raise self._not_retried(error)
                continue
            if is_transient(error.status, error.errcode) and resend:
                failures += 1
                if failures >= self.retry.max_attempts:
                    raise error
                if not await self._pause_before_retry(f"HTTP {reply.status}", failures):
                    raise self._not_retried(error)
                continue
            raise error

    async def _send_once(
        self,
        method: str,
        path: str,
        params: dict[str, QueryValue],
        data: bytes | Raw | None,
        endpoint: str,
        stream: bool = False,
    ) -> _Reply:
        session = self._ensure_session()
        self.request_count += 1
        started = time.monotonic()
        with prepared(data, self._headers, self.timeout, stream) as (body, headers, options):
            response = await session.request(
                method,
                request_url(self._encoded_base, path),
                params=params,
                data=body,
                headers=headers,
                **options,
            )
            keep = stream and 200 <= response.status < 300  # handed over unread
            try:
                text = "" if keep else await response.text(errors="replace")
            finally:
                if not keep:
                    response.release()
        seconds = time.monotonic() - started
        decoded = None if keep else decode_json_reply(text)
        reply = _Reply(response.status, decoded, text, response.headers, response if keep else None)
        errcode = errcode_of(reply.body) if reply.status >= 400 else None
        log.debug("%s %s -> %s (%.3f s)", method, endpoint, reply.status, seconds)
        for observer in self.observers:
            observer.on_response(method, endpoint, reply.status, errcode, seconds)
        return reply

    async def _pause_before_retry(self, reason: str, failures: int) -> bool:
        """Wait out the backoff; False when the request must not be retried after all."""
        delay = self.retry.backoff(failures, self._rng)
        for observer in self.observers:
            observer.on_retry(reason, delay)
        return await self._wait_to_retry(delay)

    async def _pause_for_rate_limit(self, error: LimitExceeded, waits: int) -> bool:
        """Wait as long as the 429 asks (capped); False when it must not be retried."""
        delay = error.retry_after
        if delay is None:
            delay = self.retry.backoff(waits, self._rng)
        # ``not <=`` also catches NaN: a hint of a day, infinity or garbage must not stall us.
        if not delay <= self.retry.max_rate_limit_delay:
            delay = self.retry.max_rate_limit_delay
        delay = max(delay, 0.0)
        for observer in self.observers:
            observer.on_rate_limited(delay)
        return await self._wait_to_retry(delay)

    async def _wait_to_retry(self, delay: float) -> bool:
        """Sleep ``delay`` seconds, cut short by :meth:`abort_retries` or :meth:`close`;
        True when the request may be sent again."""
        if not self._retries_aborted.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._retries_aborted.wait()
        return not self._retries_aborted.is_set()

    def _not_retried(self, error: BridgeKitError) -> BridgeKitError:
        """What a request raises when retries were aborted: ``error``, or
        :class:`ClientClosed` when the client was closed meanwhile."""
        if self.state is ClientLifecycle.CLOSED:
            return ClientClosed(f"{self!r} was closed while a request waited to retry: {error}")
        return error

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self.state is ClientLifecycle.CLOSED:
            raise ClientClosed(f"{self!r} is closed; create a new client")
        self.state = ClientLifecycle.OPENED
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                # The token goes in the header only, never in URLs that end up in logs.
                headers={"Accept": "application/json"},
            )
            # aiohttp silently resends an idempotent request once when the connection
            # breaks; that would bypass the retry policy, the observers and
            # request_count, so the policy alone decides (no public switch exists).
            if hasattr(self._session, "_retry_connection"):
                self._session._retry_connection = False
        return self._session


def _to_json(body: Any) -> Any:
    if attrs.has(type(body)):
        return converter.unstructure(body)
    return body


def _error_from(reply: _Reply) -> MatrixRequestError:
    if isinstance(reply.body, dict):
        error = MatrixRequestError.from_response(reply.status, reply.body)
    else:
        cls = LimitExceeded if reply.status == 429 else MatrixRequestError
        error = cls(reply.status, None, f"non-JSON reply: {snippet(reply.text)}")
    if isinstance(error, LimitExceeded) and error.retry_after is None:
        error.retry_after = retry_after_header(reply.headers.get("Retry-After"))
    return error


def structure_reply(reply: dict[str, Any], cls: type[T], what: str) -> T:
    """Structure a success reply into ``cls``; a wrong shape is :class:`UnexpectedReply`."""
    try:
        return converter.structure(reply, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        raise UnexpectedReply(
            200, f"unexpected {what} reply: {describe_error(exc)}", reply
        ) from exc
