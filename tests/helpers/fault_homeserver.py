"""A small, real aiohttp homeserver that misbehaves on purpose.

Synapse will not answer 429, 503, reset connections or stall on demand, so the
retry and bulk-registration tests run against this server instead. It speaks
just enough of the client-server API for an appservice:

* ``POST /_matrix/client/v3/register`` (appservice registration: ``type`` must be
  ``m.login.application_service``; a second registration of a username gets 400
  ``M_USER_IN_USE``; a localpart outside ``user_namespace`` gets 400 ``M_EXCLUSIVE``);
* ``GET /_matrix/client/v3/account/whoami`` (the sender, or the ``?user_id=``
  asserted puppet if it is registered, else 403 ``M_FORBIDDEN``);
* ``POST /_matrix/client/v3/createRoom`` (as the sender or a registered puppet;
  makes a new room ID each time and answers ``{"room_id": ...}``; the body is ignored);
* ``POST /_matrix/client/v3/join/{roomIdOrAlias}`` (as a registered puppet: any room
  ID is joined and answered ``{"room_id": ...}``; faults injected for :data:`JOIN_PATH`,
  the route's template, hit joins only).

All require the appservice token (``Authorization: Bearer`` or ``?access_token=``):
none gives 401 ``M_MISSING_TOKEN``, a wrong one 401 ``M_UNKNOWN_TOKEN``.
Any other path gets aiohttp's plain-text 404, i.e. a non-JSON error body.

Faults are drawn per request, from a seeded :class:`random.Random`, with the
probabilities of :class:`Faults`; :meth:`FaultHomeserver.inject` queues exact
faults for the next requests, or for the next requests to one path (they come
before the random draw)::

    faults = Faults(p429=0.1, p503=0.05, p_reset=0.05, p_commit_reset=0.05)
    async with FaultHomeserver(as_token="secret", faults=faults, seed=1) as hs:
        client = HomeserverClient(hs.url, "secret")
        ...
        assert hs.registered == set(localparts)          # none lost
        assert set(hs.replies_by_username.values()) == {1}   # none sent again after a reply
        assert hs.faults_injected[Fault.RESET] > 0        # the faults did happen

What a test can inspect (plain attributes, updated as requests arrive):

``url``                   base URL, e.g. ``http://127.0.0.1:41234``
``registered``            set of registered localparts
``commits_by_username``   Counter: successful registrations per localpart (never above 1 by
                          construction: a repeat gets M_USER_IN_USE, so it proves nothing)
``requests_by_username``  Counter: register requests received per localpart, faulted ones included
``replies_by_username``   Counter: register requests per localpart whose normal reply (200 or an
                          error such as M_USER_IN_USE) reached the client. A client that never
                          sends a puppet again once it has an answer keeps every count at 1.
``rooms``                 room IDs created, in order (also by requests whose reply a fault lost)
``create_room_requests``  createRoom requests received, faulted ones included
``total_requests``        every request received, on any path
``peers``                 client (host, port) pairs seen: one per TCP connection
``joins``                 Counter: successful joins per (room ID, user ID)
``peak_in_flight``        Counter: the most requests handled at once, per route (``register``,
                          ``join``...), with ``reply_delay`` seconds added to each
``faults_injected``       Counter of :class:`Fault` values actually applied
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import random
import re
import socket
import struct
from collections import Counter, deque
from types import TracebackType
from typing import Any

import attrs
from aiohttp import web

from bridge_kit.server.appservice_api import serve_app

__all__ = ["Fault", "FaultHomeserver", "Faults", "NotHttpServer"]

REGISTER_PATH = "/_matrix/client/v3/register"
WHOAMI_PATH = "/_matrix/client/v3/account/whoami"
CREATE_ROOM_PATH = "/_matrix/client/v3/createRoom"
JOIN_PATH = "/_matrix/client/v3/join/{roomIdOrAlias}"


class Fault(enum.Enum):
    """One way of misbehaving, applied to a single request."""

    RATE_LIMIT = "429 M_LIMIT_EXCEEDED with retry_after_ms (and a Retry-After header)"
    RATE_LIMIT_HEADER_ONLY = "429 M_LIMIT_EXCEEDED, no retry_after_ms, Faults.retry_after_header"
    UNAVAILABLE = "503 M_UNKNOWN"
    BAD_GATEWAY_HTML = "502 with an HTML body, as a reverse proxy sends it"
    RESET = "TCP reset before the request is handled"
    DISCONNECT = "connection closed (FIN) before the request is handled"
    COMMIT_THEN_RESET = "register commits, then the connection is reset (other routes: RESET)"
    COMMIT_THEN_504 = "the request is carried out, then a proxy's 504 HTML replaces the reply"
    SLOW = "the reply is delayed by Faults.slow_seconds, then handled normally"


@attrs.frozen
class Faults:
    """Per-request fault probabilities (each in [0, 1], summing to at most 1) and knobs."""

    p429: float = 0.0
    p429_header_only: float = 0.0
    p503: float = 0.0
    p502_html: float = 0.0
    p_reset: float = 0.0
    p_disconnect: float = 0.0
    p_commit_reset: float = 0.0
    p_commit_504: float = 0.0
    p_slow: float = 0.0
    retry_after_ms: int = 10
    retry_after_header: str = "1"  # whole seconds or an HTTP date; "" sends no header at all
    slow_seconds: float = 0.05

    def __attrs_post_init__(self) -> None:
        probabilities = [p for _, p in self.weighted()]
        if any(not 0.0 <= p <= 1.0 for p in probabilities) or sum(probabilities) > 1.0:
            raise ValueError(f"fault probabilities must be in [0, 1] and sum to <= 1: {self}")

    def weighted(self) -> list[tuple[Fault, float]]:
        """Each fault with its probability."""
        return [
            (Fault.RATE_LIMIT, self.p429),
            (Fault.RATE_LIMIT_HEADER_ONLY, self.p429_header_only),
            (Fault.UNAVAILABLE, self.p503),
            (Fault.BAD_GATEWAY_HTML, self.p502_html),
            (Fault.RESET, self.p_reset),
            (Fault.DISCONNECT, self.p_disconnect),
            (Fault.COMMIT_THEN_RESET, self.p_commit_reset),
            (Fault.COMMIT_THEN_504, self.p_commit_504),
            (Fault.SLOW, self.p_slow),
        ]


class FaultHomeserver:
    """The fake homeserver; an async context manager that listens on 127.0.0.1 (free port).

    ``user_namespace`` is a regex on the full user ID (default: every user of
    ``server_name``); ``sender_localpart`` is what whoami answers for the token.
    """

    def __init__(
        self,
        *,
        as_token: str,
        server_name: str = "test.local",
        sender_localpart: str = "_bk_bot",
        user_namespace: str | None = None,
        faults: Faults = Faults(),
        seed: int = 0,
        reply_delay: float = 0.0,
    ) -> None:
        self.as_token = as_token
        self.server_name = server_name
        self.sender_localpart = sender_localpart
        self.user_namespace = re.compile(user_namespace or rf"^@.*:{re.escape(server_name)}$")
        self.faults = faults
        self.url = ""
        self.registered: set[str] = set()
        self.commits_by_username: Counter[str] = Counter()
        self.requests_by_username: Counter[str] = Counter()
        self.replies_by_username: Counter[str] = Counter()
        self.rooms: list[str] = []
        self.create_room_requests = 0
        self.total_requests = 0
        self.peers: set[tuple[str, int]] = set()
        self.faults_injected: Counter[Fault] = Counter()
        self.joins: Counter[tuple[str, str]] = Counter()
        self.peak_in_flight: Counter[str] = Counter()
        self._in_flight: Counter[str] = Counter()
        self.reply_delay = reply_delay
        self._random = random.Random(seed)
        self._queued: deque[Fault] = deque()
        self._queued_by_path: dict[str, deque[Fault]] = {}
        self._runner: web.AppRunner | None = None

    def inject(self, *faults: Fault, path: str | None = None) -> None:
        """Apply these faults, in order, to the next requests (before any random draw).

        With ``path`` (e.g. ``WHOAMI_PATH``) only requests to that path get them,
        before any fault injected for all paths.
        """
        if path is None:
            self._queued.extend(faults)
        else:
            self._queued_by_path.setdefault(path, deque()).extend(faults)

    def user_id(self, localpart: str) -> str:
        """``@localpart:server_name``."""
        return f"@{localpart}:{self.server_name}"

    async def __aenter__(self) -> FaultHomeserver:
        app = web.Application()
        app.router.add_post(REGISTER_PATH, self._register)
        app.router.add_get(WHOAMI_PATH, self._whoami)
        app.router.add_post(CREATE_ROOM_PATH, self._create_room)
        app.router.add_post("/_matrix/client/v3/join/{room}", self._join)
        app.middlewares.append(self._count_requests)
        self._runner = await serve_app(app, "127.0.0.1", 0, shutdown_timeout=1.0)
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- request handling -------------------------------------------------------

    @web.middleware
    async def _count_requests(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.total_requests += 1
        if request.transport is not None:
            self.peers.add(request.transport.get_extra_info("peername"))
        route = request.path.split("/")[4] if request.path.count("/") >= 4 else request.path
        self._in_flight[route] += 1
        self.peak_in_flight[route] = max(self.peak_in_flight[route], self._in_flight[route])
        try:
            if self.reply_delay:
                await asyncio.sleep(self.reply_delay)
            response: web.StreamResponse = await handler(request)
        finally:
            self._in_flight[route] -= 1
        return response

    async def _register(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        username = body.get("username") if isinstance(body, dict) else None
        if isinstance(username, str):
            self.requests_by_username[username] += 1
        fault = self._next_fault(request.path)
        if early := await self._early_reply(request, fault):
            return early
        committed = False
        if not isinstance(body, dict) or body.get("type") != "m.login.application_service":
            reply = _error(400, "M_UNKNOWN", "type must be m.login.application_service")
        elif not isinstance(username, str) or not username:
            reply = _error(400, "M_UNKNOWN", "username is required")
        elif not self.user_namespace.match(self.user_id(username)):
            reply = _error(
                400, "M_EXCLUSIVE", "Invalid user localpart for this application service."
            )
        elif username in self.registered:
            reply = _error(400, "M_USER_IN_USE", "User ID already taken.")
        else:
            self.registered.add(username)
            self.commits_by_username[username] += 1
            committed = True
            reply = web.json_response(
                {"user_id": self.user_id(username), "home_server": self.server_name}
            )
        if committed and (lost := _lose_reply(request, fault)):
            return lost
        if isinstance(username, str):
            self.replies_by_username[username] += 1
        return reply

    async def _whoami(self, request: web.Request) -> web.StreamResponse:
        fault = self._next_fault(request.path)
        if early := await self._early_reply(request, fault):
            return early
        if lost := _lose_reply(request, fault):
            return lost
        asserted = request.query.get("user_id")
        if forbidden := self._identity_problem(asserted):
            return forbidden
        return web.json_response({"user_id": asserted or self.sender, "is_guest": False})

    async def _create_room(self, request: web.Request) -> web.StreamResponse:
        self.create_room_requests += 1
        fault = self._next_fault(request.path)
        if early := await self._early_reply(request, fault):
            return early
        if forbidden := self._identity_problem(request.query.get("user_id")):
            return forbidden
        room_id = f"!room{len(self.rooms) + 1}:{self.server_name}"
        self.rooms.append(room_id)
        if lost := _lose_reply(request, fault):
            return lost
        return web.json_response({"room_id": room_id})

    async def _join(self, request: web.Request) -> web.StreamResponse:
        fault = self._next_fault(JOIN_PATH)
        if early := await self._early_reply(request, fault):
            return early
        asserted = request.query.get("user_id")
        if asserted is None or asserted == self.sender:
            return _error(403, "M_FORBIDDEN", "only puppets join here")
        if forbidden := self._identity_problem(asserted):
            return forbidden
        room_id = request.match_info["room"]
        self.joins[room_id, asserted] += 1
        if lost := _lose_reply(request, fault):
            return lost
        return web.json_response({"room_id": room_id})

    @property
    def sender(self) -> str:
        """The appservice's own user ID."""
        return self.user_id(self.sender_localpart)

    def _identity_problem(self, asserted: str | None) -> web.Response | None:
        """403 unless ``asserted`` (a ``?user_id=``) is the sender or a registered puppet."""
        if asserted is None or asserted == self.sender:
            return None
        if not self.user_namespace.match(asserted):
            return _error(
                403, "M_FORBIDDEN", f"Application service cannot masquerade as {asserted}"
            )
        localpart = asserted[1:].rsplit(":", 1)[0]
        if localpart not in self.registered:
            return _error(
                403, "M_FORBIDDEN", f"Application service has not registered this user ({asserted})"
            )
        return None

    async def _early_reply(
        self, request: web.Request, fault: Fault | None
    ) -> web.StreamResponse | None:
        """Apply a fault that replaces the normal reply, or check the token; None: go on."""
        if fault is Fault.SLOW:
            await asyncio.sleep(self.faults.slow_seconds)
        if fault is Fault.RESET:
            return _reset(request)
        if fault is Fault.DISCONNECT:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if fault is Fault.UNAVAILABLE:
            return _error(503, "M_UNKNOWN", "Service temporarily unavailable")
        if fault is Fault.BAD_GATEWAY_HTML:
            return web.Response(
                status=502,
                text="<html><head><title>502 Bad Gateway</title></head></html>",
                content_type="text/html",
            )
        if unauthorised := self._check_token(request):
            return unauthorised
        if fault is Fault.RATE_LIMIT:
            return _error(
                429,
                "M_LIMIT_EXCEEDED",
                "Too Many Requests",
                retry_after_ms=self.faults.retry_after_ms,
                headers={"Retry-After": str(max(1, round(self.faults.retry_after_ms / 1000)))},
            )
        if fault is Fault.RATE_LIMIT_HEADER_ONLY:
            return _error(
                429,
                "M_LIMIT_EXCEEDED",
                "Too Many Requests",
                headers=(
                    {"Retry-After": self.faults.retry_after_header}
                    if self.faults.retry_after_header
                    else None
                ),
            )
        return None

    def _check_token(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
        token = token or request.query.get("access_token")
        if not token:
            return _error(401, "M_MISSING_TOKEN", "Missing access token")
        if not hmac.compare_digest(token.encode(), self.as_token.encode()):
            return _error(401, "M_UNKNOWN_TOKEN", "Invalid access token passed.", soft_logout=False)
        return None

    def _next_fault(self, path: str) -> Fault | None:
        for_path = self._queued_by_path.get(path)
        if for_path:
            fault: Fault | None = for_path.popleft()
        elif self._queued:
            fault = self._queued.popleft()
        else:
            fault = self._draw_fault()
        if fault is not None:
            self.faults_injected[fault] += 1
        return fault

    def _draw_fault(self) -> Fault | None:
        roll = self._random.random()
        for fault, probability in self.faults.weighted():
            if roll < probability:
                return fault
            roll -= probability
        return None


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


def _error(
    status: int,
    errcode: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    return web.json_response(
        {"errcode": errcode, "error": message, **extra}, status=status, headers=headers
    )


def _lose_reply(request: web.Request, fault: Fault | None) -> web.Response | None:
    """The reply that replaces a carried-out request's under a COMMIT_THEN_* fault, else None."""
    if fault is Fault.COMMIT_THEN_RESET:
        return _reset(request)
    if fault is Fault.COMMIT_THEN_504:
        return web.Response(
            status=504,
            text="<html><head><title>504 Gateway Time-out</title></head></html>",
            content_type="text/html",
        )
    return None


def _reset(request: web.Request) -> web.Response:
    """Abort the connection with a TCP RST (SO_LINGER 0): the client sees ECONNRESET."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    return web.Response()


class NotHttpServer:
    """A TCP server on 127.0.0.1 that greets like SSH and hangs up: ``--homeserver`` gone wrong.

    An async context manager; ``url`` is ``http://127.0.0.1:<port>`` and
    ``connections`` counts the connections it accepted.
    """

    def __init__(self, greeting: bytes = b"SSH-2.0-OpenSSH_9.6\r\n") -> None:
        self.greeting = greeting
        self.url = ""
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> NotHttpServer:
        self._server = await asyncio.start_server(self._greet, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _greet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(self.greeting)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
