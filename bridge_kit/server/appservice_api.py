"""The HTTP API an appservice serves to its homeserver, as an aiohttp application.

:func:`create_app` builds the application from plain callables (a transaction
handler, query hooks, third-party hooks), so it can be served and tested on its
own. Every reply is JSON, errors included. Transactions go through a
:class:`~bridge_kit.inbox.transactions.TransactionProcessor`, whose dedup lives in the
store, so it survives restarts. :func:`serve_app` serves it without an access
log, which would print the legacy ``access_token`` query parameter.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn

import attrs
from aiohttp import web
from aiohttp.typedefs import Handler

from bridge_kit import defaults
from bridge_kit._json import decode_request, json_text
from bridge_kit.errors import ListenError
from bridge_kit.inbox.signals import ErrorReply, TransactionFailed
from bridge_kit.inbox.transactions import TransactionProcessor
from bridge_kit.metrics import Metrics
from bridge_kit.store.base import Store
from bridge_kit.types import MatrixErrorBody, unstructure

__all__ = [
    "PROCESSOR_KEY",
    "QueryHook",
    "ThirdPartyHandlers",
    "abort_requests",
    "create_app",
    "serve_app",
]

log = logging.getLogger(__name__)

QueryHook = Callable[[str], Awaitable[bool]]
JSONHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_APP_PREFIX = "/_matrix/app/v1"
_LEGACY_THIRDPARTY_PREFIX = "/_matrix/app/unstable"
_EMPTY_OBJECT = b"{}"
#: How much of a request's own text (a path, an ID) an error message or log line repeats.
_SHOWN_LENGTH = 200


@attrs.define
class ThirdPartyHandlers:
    """Hooks for the ``/thirdparty`` routes; a route whose hook is ``None`` answers 404.

    Each hook returns JSON data or attrs models (unstructured with the converter).
    """

    #: ``GET /thirdparty/protocol/{protocol}``: the protocol's metadata, or ``None`` if unknown.
    protocol: Callable[[str], Awaitable[dict[str, Any] | None]] | None = None
    #: ``GET /thirdparty/location/{protocol}``: ``(protocol, fields)`` to portal locations.
    location: Callable[[str, dict[str, str]], Awaitable[list[dict[str, Any]]]] | None = None
    #: ``GET /thirdparty/user/{protocol}``: ``(protocol, fields)`` to remote users.
    user: Callable[[str, dict[str, str]], Awaitable[list[dict[str, Any]]]] | None = None
    #: ``GET /thirdparty/location?alias=``: a Matrix room alias to remote locations.
    location_by_alias: Callable[[str], Awaitable[list[dict[str, Any]]]] | None = None
    #: ``GET /thirdparty/user?userid=``: a Matrix user ID to remote users.
    user_by_id: Callable[[str], Awaitable[list[dict[str, Any]]]] | None = None


def _error_response(error: ErrorReply, headers: Mapping[str, str] | None = None) -> web.Response:
    body = unstructure(MatrixErrorBody(errcode=error.errcode, error=error.message))
    return web.json_response(body, status=error.status, headers=headers, dumps=json_text)


async def serve_app(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float = defaults.SHUTDOWN_TIMEOUT,
) -> web.AppRunner:
    """Serve ``app`` on ``host:port``; stop it with ``await runner.cleanup()``.

    Raises :class:`ListenError` with a plain message when the port is taken or
    not allowed. aiohttp's access log stays off: it would print a legacy
    ``?access_token=`` query string.
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "is another process, perhaps another bridge, using that port?"
        ) from exc
    return runner


PROCESSOR_KEY = web.AppKey("bridge_kit.processor", TransactionProcessor)
"""Where :func:`create_app` keeps its :class:`TransactionProcessor` (``app[PROCESSOR_KEY]``)."""

#: The tasks handling requests right now, for :func:`abort_requests`.
_HANDLING = web.AppKey("bridge_kit.handling", set[asyncio.Task[Any]])


def abort_requests(app: web.Application) -> int:
    """Cancel the requests ``app`` is handling now; return how many.

    For a stop past its deadline: aiohttp's own shutdown waits for them (up to
    its ``shutdown_timeout``), and does not cancel them if that wait is itself
    cancelled, which would leave them running, their connections open.
    """
    handling = app.get(_HANDLING, set())
    for task in handling:
        task.cancel()
    return len(handling)


def create_app(
    *,
    hs_token: str,
    store: Store,
    on_accepted: Callable[[], object] | None = None,
    accept_transactions: bool = True,
    on_user_query: QueryHook | None = None,
    on_alias_query: QueryHook | None = None,
    thirdparty: ThirdPartyHandlers | None = None,
    max_body_bytes: int = defaults.MAX_BODY_BYTES,
    metrics: Metrics | None = None,
    health: Callable[[], dict[str, Any]] | None = None,
    prune_keep: int = defaults.DEDUP_KEEP,
    prune_every: int = defaults.DEDUP_PRUNE_EVERY,
    prune_max_age: float | None = defaults.DEDUP_MAX_AGE,
) -> web.Application:
    """Build the appservice API application.

    ``store`` must already be open. Each new transaction goes into the store's
    inbox in one commit, then ``on_accepted()`` is called (the inbox's wake-up);
    if the store fails, the homeserver gets 500 and retries. With
    ``accept_transactions=False`` every transaction gets 503, so the homeserver
    keeps it for whoever serves the appservice for real. ``on_user_query``
    and ``on_alias_query`` answer ``GET /users`` and ``GET /rooms`` (True means
    200, otherwise 404); namespace checks belong to them. ``health`` feeds
    ``GET /_bridge_kit/health`` (503 when its ``status`` is present and not
    ``"ok"``); ``metrics`` enables ``GET /metrics``.
    """
    if not hs_token:
        raise ValueError("hs_token must not be empty")
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be positive")
    processor = TransactionProcessor(
        store,
        on_accepted,
        metrics=metrics,
        prune_every=prune_every,
        prune_keep=prune_keep,
        prune_max_age=prune_max_age,
    )
    routes = _Routes(
        hs_token=hs_token,
        processor=processor if accept_transactions else None,
        on_user_query=on_user_query,
        on_alias_query=on_alias_query,
        thirdparty=thirdparty or ThirdPartyHandlers(),
        max_body_bytes=max_body_bytes,
    )
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_json_errors])
    app[PROCESSOR_KEY] = processor
    app[_HANDLING] = set()
    routes.add_to(app)
    app.router.add_get("/_bridge_kit/health", _health_route(health))
    if metrics is not None:
        app.router.add_get("/metrics", _metrics_route(metrics))

    async def wait_for_prune(_: web.Application) -> None:
        await processor.wait_idle()

    app.on_cleanup.append(wait_for_prune)
    return app


@attrs.define
class _Routes:
    hs_token: str
    processor: TransactionProcessor | None
    on_user_query: QueryHook | None
    on_alias_query: QueryHook | None
    thirdparty: ThirdPartyHandlers
    max_body_bytes: int

    def add_to(self, app: web.Application) -> None:
        add = app.router.add_route
        for prefix in (_APP_PREFIX, ""):
            add("PUT", f"{prefix}/transactions/{{txnId}}", self._auth(self.transaction))
            add("GET", f"{prefix}/users/{{userId}}", self._auth(self.user_query))
            add("GET", f"{prefix}/rooms/{{roomAlias}}", self._auth(self.alias_query))
        for prefix in (_APP_PREFIX, _LEGACY_THIRDPARTY_PREFIX):
            base = f"{prefix}/thirdparty"
            add("GET", f"{base}/protocol/{{protocol}}", self._auth(self.protocol))
            add("GET", f"{base}/location/{{protocol}}", self._auth(self.location))
            add("GET", f"{base}/user/{{protocol}}", self._auth(self.user))
            add("GET", f"{base}/location", self._auth(self.location_by_alias))
            add("GET", f"{base}/user", self._auth(self.user_by_id))
        add("POST", f"{_APP_PREFIX}/ping", self._auth(self.ping))

    # -- auth ------------------------------------------------------------------

    def _auth(self, handler: JSONHandler) -> JSONHandler:
        async def authenticated(request: web.Request) -> web.StreamResponse:
            try:
                self._check_token(request)
            except ErrorReply as refused:
                # One line, and never the token: the path without its query string
                # (which may hold the legacy access_token), escaped.
                log.warning(
                    "refused %s %s from %s: %s",
                    request.method,
                    _loggable(request.rel_url.raw_path),
                    request.remote,
                    refused.message,
                )
                raise
            return await handler(request)

        return authenticated

    def _check_token(self, request: web.Request) -> None:
        header_token = _bearer_token(request)
        query_token = request.query.get("access_token")
        token = header_token if header_token is not None else query_token
        if not token:
            raise ErrorReply(401, "M_MISSING_TOKEN", "Missing access token")
        if (
            header_token is not None
            and query_token is not None
            and not _same(header_token, query_token)
        ):
            raise ErrorReply(
                403,
                "M_FORBIDDEN",
                "The Authorization header and the access_token parameter differ",
            )
        if not _same(token, self.hs_token):
            raise ErrorReply(403, "M_FORBIDDEN", "Invalid homeserver token")

    # -- routes ----------------------------------------------------------------

    async def transaction(self, request: web.Request) -> web.StreamResponse:
        txn_id = request.match_info["txnId"]
        try:
            body = await _read_json(request, self.max_body_bytes)
        except ErrorReply as refused:
            if refused.status == 413 and self.processor is not None:
                self.processor.refused(txn_id, "body", refused.message)
            raise
        if self.processor is None:
            raise ErrorReply(503, "M_UNKNOWN", "Not accepting transactions now; retry later")
        try:
            await self.processor.process(txn_id, body)
        except TransactionFailed:
            raise ErrorReply(
                500, "M_UNKNOWN", f"Storing transaction {_shown(txn_id)} failed; retry it"
            ) from None
        return _ok()

    async def user_query(self, request: web.Request) -> web.StreamResponse:
        user_id = request.match_info["userId"]
        if self.on_user_query is None or not await self.on_user_query(user_id):
            raise ErrorReply(404, "M_NOT_FOUND", f"User {_shown(user_id)} does not exist")
        return _ok()

    async def alias_query(self, request: web.Request) -> web.StreamResponse:
        alias = request.match_info["roomAlias"]
        if self.on_alias_query is None or not await self.on_alias_query(alias):
            raise ErrorReply(404, "M_NOT_FOUND", f"Room alias {_shown(alias)} does not exist")
        return _ok()

    async def protocol(self, request: web.Request) -> web.StreamResponse:
        protocol = request.match_info["protocol"]
        hook = self.thirdparty.protocol or _no_thirdparty("protocol")
        metadata = await hook(protocol)
        if metadata is None:
            raise ErrorReply(404, "M_NOT_FOUND", f"Unknown protocol {_shown(protocol)}")
        return _json(_hook_result(metadata, dict, "protocol"))

    async def location(self, request: web.Request) -> web.StreamResponse:
        hook = self.thirdparty.location or _no_thirdparty("location")
        found = await hook(request.match_info["protocol"], _fields(request))
        return _found(_hook_result(found, list, "location"), "locations")

    async def user(self, request: web.Request) -> web.StreamResponse:
        hook = self.thirdparty.user or _no_thirdparty("user")
        found = await hook(request.match_info["protocol"], _fields(request))
        return _found(_hook_result(found, list, "user"), "users")

    async def location_by_alias(self, request: web.Request) -> web.StreamResponse:
        hook = self.thirdparty.location_by_alias or _no_thirdparty("location")
        found = await hook(_required_param(request, "alias"))
        return _found(_hook_result(found, list, "location_by_alias"), "locations")

    async def user_by_id(self, request: web.Request) -> web.StreamResponse:
        hook = self.thirdparty.user_by_id or _no_thirdparty("user")
        found = await hook(_required_param(request, "userid"))
        return _found(_hook_result(found, list, "user_by_id"), "users")

    async def ping(self, request: web.Request) -> web.StreamResponse:
        # The body ({"transaction_id": ...}) carries nothing we must act on, but a
        # malformed one is still refused like on every other route.
        if request.body_exists:
            await _read_json(request, self.max_body_bytes)
        return _ok()


# -- request parsing --------------------------------------------------------------


def _bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ErrorReply(
            401, "M_MISSING_TOKEN", "The Authorization header must be 'Bearer <token>'"
        )
    return token.strip()


def _same(a: str, b: str) -> bool:
    # aiohttp hands over header bytes that are not UTF-8 as lone surrogates
    # (surrogateescape), and a percent-decoded query may hold any surrogate:
    # surrogatepass encodes every str, so such a token is merely wrong.
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )


def _loggable(text: str) -> str:
    """``text`` cut short and escaped, so a log line stays one line of ASCII."""
    return text[:_SHOWN_LENGTH].encode("unicode_escape").decode("ascii")


def _shown(value: str) -> str:
    """A value from the request, cut short for an error message (the reply stays small)."""
    return value if len(value) <= _SHOWN_LENGTH else value[:_SHOWN_LENGTH] + "…"


async def _read_json(request: web.Request, max_bytes: int) -> Any:
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    # Chunked bodies have no Content-Length: read() enforces client_max_size as it goes.
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(max_bytes) from None
    try:
        # 1e999 is read as infinity: see decode_request.
        return decode_request(body)
    except ValueError as exc:
        raise ErrorReply(400, "M_NOT_JSON", f"Body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ErrorReply(400, "M_NOT_JSON", "Body is nested too deeply") from None


def _too_large(max_bytes: int) -> ErrorReply:
    return ErrorReply(413, "M_TOO_LARGE", f"Body is larger than {max_bytes} bytes")


def _fields(request: web.Request) -> dict[str, str]:
    return {key: value for key, value in request.query.items() if key != "access_token"}


def _required_param(request: web.Request, name: str) -> str:
    value = request.query.get(name)
    if not value:
        raise ErrorReply(400, "M_MISSING_PARAM", f"Missing query parameter '{name}'")
    return value


def _no_thirdparty(kind: str) -> NoReturn:
    raise ErrorReply(404, "M_NOT_FOUND", f"This bridge does not provide third-party {kind}s")


def _found(results: list[Any], what: str) -> web.Response:
    # The spec answers "nothing found" with 404 (Synapse takes 200 [] the same way).
    if not results:
        raise ErrorReply(404, "M_NOT_FOUND", f"No {what} were found with the given parameters")
    return _json(results)


def _hook_result(value: Any, expected: type, hook: str) -> Any:
    data = unstructure(value)
    if not isinstance(data, expected):
        raise TypeError(
            f"third-party hook {hook!r} returned {type(value).__name__}, "
            f"expected {expected.__name__}"
        )
    return data


# -- responses and middleware ---------------------------------------------------


def _ok() -> web.Response:
    return web.Response(body=_EMPTY_OBJECT, content_type="application/json")


def _json(data: Any) -> web.Response:
    # allow_nan=False: a hook's NaN is a 500 here, not "NaN" (invalid JSON) for the homeserver.
    return web.json_response(data, dumps=json_text)


_HTTP_ERRCODES = {
    404: ("M_UNRECOGNIZED", "Unrecognized request"),
    405: ("M_UNRECOGNIZED", "Method not allowed on this endpoint"),
}


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into a Matrix JSON error body; never leak a traceback."""
    handling = request.app.get(_HANDLING)
    task = asyncio.current_task()
    if handling is not None and task is not None:
        handling.add(task)
    try:
        return await handler(request)
    except ErrorReply as exc:
        return _error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return _error_response(_too_large(request.client_max_size))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        errcode, message = _HTTP_ERRCODES.get(exc.status, ("M_UNKNOWN", exc.reason))
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _error_response(ErrorReply(exc.status, errcode, message), allow)
    except Exception:
        # request.path, not the URL: the query may carry the legacy access_token.
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return _error_response(ErrorReply(500, "M_UNKNOWN", "Internal server error"))
    finally:
        if handling is not None:
            handling.discard(task)


def _health_route(health: Callable[[], dict[str, Any]] | None) -> JSONHandler:
    async def route(_: web.Request) -> web.StreamResponse:
        status = {"status": "ok"} if health is None else health()
        healthy = status.get("status", "ok") == "ok"
        return web.json_response(status, status=200 if healthy else 503, dumps=json_text)

    return route


def _metrics_route(metrics: Metrics) -> JSONHandler:
    async def route(_: web.Request) -> web.StreamResponse:
        body, content_type = metrics.render()
        response = web.Response(body=body)
        # Set whole: the exposition content type carries a version parameter.
        response.headers["Content-Type"] = content_type
        return response

    return route
