"""The provisioning API of mautrix-go's bridgev2 (v3), for bridge managers and clients.

An aiohttp application served under ``/_matrix/provision`` on the
appservice's listener (or a listener of its own): ``GET /v3/whoami``,
``GET /v3/login/flows``, ``POST /v3/login/start/{flowID}``, the
``/v3/login/step/{loginProcessID}/{stepID}/{stepType}`` submissions,
``POST /v3/login/cancel/{loginProcessID}``, ``POST /v3/logout/{loginID}``,
``GET /v3/logins``, and the chat-starting routes (``contacts``,
``search_users``, ``resolve_identifier``, ``create_dm``, ``create_group``),
which answer ``501 M_UNRECOGNIZED`` unless the connector implements them
(:class:`ChatStarter`).

Who is asking is told by ``Authorization: Bearer``:

- a Matrix access token of a user of this homeserver (asked of the
  homeserver's ``/account/whoami``, then trusted for :data:`TOKEN_CACHE_SECONDS`);
- ``openid:<token>`` with ``?user_id=``, an OpenID token of a user of any
  server (asked of that server's federation ``openid/userinfo``);
- the configured shared secret with ``?user_id=`` (compared in constant time).

Missing or wrong credentials get ``401`` (``M_MISSING_TOKEN`` or
``M_UNKNOWN_TOKEN``), a user without the ``user`` permission ``403
M_FORBIDDEN``; each user has a request rate limit (``429 M_LIMIT_EXCEEDED``), and
so has each client address for the tokens the bridge must ask a server about
(a flood of made-up tokens would otherwise be one request to a server each).
Every answer carries CORS headers, so a web client may call it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

import aiohttp
import attrs
from aiohttp import web
from aiohttp.typedefs import Handler

from bridge_kit._json import decode_request, json_text
from bridge_kit.app.ratelimit import TokenBucket
from bridge_kit.app.service import AppService
from bridge_kit.bridge.connector import NetworkConnector
from bridge_kit.bridge.login_flows import (
    LoginFlow,
    LoginSessions,
    LoginStep,
    OffersLoginFlows,
    StepType,
)
from bridge_kit.bridge.permissions import Level, Permissions
from bridge_kit.bridge.records import LoginRecord, LoginState
from bridge_kit.bridge.status import BridgeState, StateEvent, StatusReporter
from bridge_kit.client import HomeserverClient
from bridge_kit.config import BridgeConfig
from bridge_kit.errors import (
    InvalidInput,
    MatrixRequestError,
    UnknownLogin,
    WrongLoginStep,
)
from bridge_kit.ids import split_user_id
from bridge_kit.inbox.signals import ErrorReply
from bridge_kit.types import converter

__all__ = [
    "PREFIX",
    "TOKEN_CACHE_SECONDS",
    "AppHost",
    "ChatStarter",
    "NetworkInfo",
    "ProvisioningAPI",
    "ProvisioningSettings",
    "ResolvedIdentifier",
]

log = logging.getLogger(__name__)

PREFIX = "/_matrix/provision"
TOKEN_CACHE_SECONDS = 300.0
"""How long a Matrix access token, once the homeserver vouched for it, is trusted."""
_OPENID_CACHE_SECONDS = 3600.0
_REFUSED_CACHE_SECONDS = 30.0
_REFUSED = ""  # no user ID is empty: the cache's mark of a refused token
_CACHE_SIZE = 10_000
_MAX_BODY = 64 * 1024
_SECRET_MIN_LENGTH = 16
_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "X-Requested-With, Content-Type, Authorization",
}
_STEP_TYPES = {t.value: t for t in StepType if t is not StepType.COMPLETE}


@attrs.frozen
class NetworkInfo:
    """The network as ``whoami``'s ``network`` shows it (bridgev2's ``BridgeName``)."""

    displayname: str
    network_id: str
    network_url: str = ""
    #: An ``mxc://`` URI; the file's schema requires one.
    network_icon: str = ""
    beeper_bridge_type: str = ""


@attrs.frozen
class ProvisioningSettings:
    """The ``bridge.provisioning_*`` keys, checked."""

    #: ``None`` or shorter than 16 characters: shared-secret auth is off.
    shared_secret: str | None = None
    matrix_auth: bool = True
    per_minute: int = 60

    @classmethod
    def from_config(cls, section: BridgeConfig) -> ProvisioningSettings:
        return cls(
            shared_secret=section.provisioning_secret,
            matrix_auth=section.provisioning_matrix_auth,
            per_minute=section.provisioning_per_minute,
        )


@attrs.frozen
class ResolvedIdentifier:
    """A remote user found by ``resolve_identifier``, ``search_users`` or ``contacts``."""

    id: str
    name: str | None = None
    avatar_url: str | None = None
    identifiers: tuple[str, ...] = ()
    mxid: str | None = None
    dm_room_mxid: str | None = None


@runtime_checkable
class ChatStarter(Protocol):
    """Implemented by a connector that can find remote users and start chats with them.

    ``resolve_identifier`` with ``create_dm`` also creates the DM's portal and
    returns its room in ``dm_room_mxid``. A connector that cannot do one of
    these raises :class:`NotImplementedError` from it (answered ``501``).
    """

    async def resolve_identifier(
        self, login: LoginRecord, identifier: str, create_dm: bool
    ) -> ResolvedIdentifier | None: ...

    async def search_users(
        self, login: LoginRecord, query: str
    ) -> Sequence[ResolvedIdentifier]: ...

    async def contacts(self, login: LoginRecord) -> Sequence[ResolvedIdentifier]: ...

    async def create_group(
        self, login: LoginRecord, group_type: str, params: Mapping[str, Any]
    ) -> tuple[str, str]:
        """Create a group chat; its remote id and its portal's room id."""
        ...


class ProvisioningHost(Protocol):
    """What the API needs of the bridge (:class:`~bridge_kit.bridge.bridge.Bridge` has it)."""

    @property
    def network(self) -> NetworkInfo: ...
    @property
    def bot_user_id(self) -> str: ...
    @property
    def server_name(self) -> str: ...
    @property
    def homeserver_url(self) -> str: ...
    @property
    def command_prefix(self) -> str: ...

    def login_flows(self) -> Sequence[LoginFlow]: ...
    def may_log_in(self, user_id: str) -> bool: ...
    async def logins(self, user_id: str) -> list[LoginRecord]: ...
    async def logout(self, login: LoginRecord) -> None: ...
    async def management_room(self, user_id: str) -> str | None: ...
    def chat_starter(self) -> ChatStarter | None: ...


def _error_response(error: ErrorReply, **extra: Any) -> web.Response:
    body = {"errcode": error.errcode, "error": error.message, **extra}
    return web.json_response(body, status=error.status, dumps=json_text, headers=_CORS)


def _limited(request: web.Request, bucket: TokenBucket) -> ErrorReply:
    """429 M_LIMIT_EXCEEDED; the wait goes into the body (``retry_after_ms``)."""
    wait_ms = math.ceil((1 - bucket.available) * bucket.period / bucket.rate * 1000)
    request[_RETRY_AFTER_MS] = max(wait_ms, 1)
    return ErrorReply(429, "M_LIMIT_EXCEEDED", "Too many requests")


def _bucket_in(
    buckets: OrderedDict[str, TokenBucket], key: str, per_minute: int, clock: Callable[[], float]
) -> TokenBucket:
    """``key``'s bucket in ``buckets`` (made on first use; the least recently used
    go beyond :data:`_CACHE_SIZE`)."""
    bucket = buckets.get(key)
    if bucket is None:
        bucket = buckets[key] = TokenBucket(per_minute, 60.0, clock=clock)
    buckets.move_to_end(key)
    while len(buckets) > _CACHE_SIZE:
        buckets.popitem(last=False)
    return bucket


_USER = web.RequestKey("bridge_kit.provisioning.user", str)
_CLIENT = web.RequestKey("bridge_kit.provisioning.client", str)
_RETRY_AFTER_MS = web.RequestKey("bridge_kit.provisioning.retry_after_ms", int)


class ProvisioningAPI:
    """The provisioning routes, for ``host``; :meth:`app` builds the aiohttp application.

    ``sessions`` drives the login processes (the management room's ``login``
    uses the same); ``status`` gives each login's state.
    """

    def __init__(
        self,
        host: ProvisioningHost,
        sessions: LoginSessions[Any],
        status: StatusReporter,
        settings: ProvisioningSettings = ProvisioningSettings(),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.sessions = sessions
        self.status = status
        self.settings = settings
        self._clock = clock
        self._secret = settings.shared_secret or ""
        self._token_cache: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._limits: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lookups: OrderedDict[str, TokenBucket] = OrderedDict()
        self._http: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        """The application to mount at :data:`PREFIX` (``add_subapp``) or serve alone."""
        app = web.Application(client_max_size=_MAX_BODY, middlewares=[self._errors, self._auth])
        add = app.router.add_route
        add("GET", "/v3/whoami", self.whoami)
        add("GET", "/v3/login/flows", self.login_flows)
        add("GET", "/v3/logins", self.logins)
        add("POST", "/v3/login/start/{flow_id}", self.login_start)
        add("POST", "/v3/login/step/{process_id}/{step_id}/{step_type}", self.login_step)
        add("POST", "/v3/login/cancel/{process_id}", self.login_cancel)
        add("POST", "/v3/logout/{login_id}", self.logout)
        add("GET", "/v3/contacts", self.contacts)
        add("POST", "/v3/search_users", self.search_users)
        add("GET", "/v3/resolve_identifier/{identifier}", self.resolve_identifier)
        add("POST", "/v3/create_dm/{identifier}", self.create_dm)
        add("POST", "/v3/create_group/{group_type}", self.create_group)
        app.on_cleanup.append(self._close)
        return app

    # -- routes: the bridge and the user's logins ----------------------------------

    async def whoami(self, request: web.Request) -> web.Response:
        user_id = request[_USER]
        host = self.host
        body: dict[str, Any] = {
            "network": converter.unstructure(host.network),
            "login_flows": [converter.unstructure(f) for f in host.login_flows()],
            "homeserver": host.server_name,
            "bridge_bot": host.bot_user_id,
            "command_prefix": host.command_prefix,
            "logins": [self._whoami_login(record) for record in await host.logins(user_id)],
        }
        room = await host.management_room(user_id)
        if room:
            body["management_room"] = room
        return _json(body)

    def _whoami_login(self, record: LoginRecord) -> dict[str, Any]:
        state = self.status.login(record.id) or BridgeState.now(
            StateEvent.of_login(record.state),
            user_id=record.user_id,
            remote_id=record.id,
            remote_name=record.remote_name,
        )
        shown: dict[str, Any] = {
            "state_event": state.state_event.value,
            "timestamp": state.timestamp,
        }
        shown |= {k: v for k in ("error", "message", "reason") if (v := getattr(state, k))}
        if state.info:
            shown["info"] = state.info
        profile = {"name": record.remote_name} if record.remote_name else {}
        return {"state": shown, "id": record.id, "name": record.remote_name, "profile": profile}

    async def login_flows(self, request: web.Request) -> web.Response:
        return _json({"flows": [converter.unstructure(f) for f in self.host.login_flows()]})

    async def logins(self, request: web.Request) -> web.Response:
        records = await self.host.logins(request[_USER])
        return _json({"login_ids": [record.id for record in records]})

    async def logout(self, request: web.Request) -> web.Response:
        user_id, login_id = request[_USER], request.match_info["login_id"]
        records = await self.host.logins(user_id)
        chosen = records if login_id == "all" else [r for r in records if r.id == login_id]
        if not chosen and login_id != "all":
            raise _login_not_found()
        for record in chosen:
            await self.host.logout(record)
        return _json({})

    # -- routes: logging in ---------------------------------------------------------

    async def login_start(self, request: web.Request) -> web.Response:
        user_id, flow_id = request[_USER], request.match_info["flow_id"]
        relogin = request.query.get("login_id") or None
        if relogin is not None:
            await self._login_of(user_id, relogin)
        if flow_id not in {flow.id for flow in self.host.login_flows()}:
            raise ErrorReply(404, "M_NOT_FOUND", "Login flow not found")
        try:
            process_id, step = await self.sessions.start(user_id, flow_id, relogin)
        except UnknownLogin as exc:
            raise ErrorReply(404, "M_NOT_FOUND", "Login flow not found") from exc
        return _json(_step_body(process_id, step))

    async def login_step(self, request: web.Request) -> web.Response:
        user_id, info = request[_USER], request.match_info
        step_type = _STEP_TYPES.get(info["step_type"])
        if step_type is None:
            raise ErrorReply(
                404, "M_UNRECOGNIZED", f"Invalid step type {_shown(info['step_type'])}"
            )
        values = None
        if step_type is not StepType.DISPLAY_AND_WAIT:
            values = await _string_map(request)
        try:
            step = await self.sessions.submit(
                user_id,
                info["process_id"],
                info["step_id"],
                step_type,
                values,
                txn_id=request.query.get("txn_id", ""),
            )
        except UnknownLogin as exc:
            raise ErrorReply(404, "M_NOT_FOUND", str(exc)) from exc
        except WrongLoginStep as exc:
            raise ErrorReply(400, "M_BAD_STATE", str(exc)) from exc
        return _json(_step_body(info["process_id"], step))

    async def login_cancel(self, request: web.Request) -> web.Response:
        try:
            await self.sessions.cancel(request[_USER], request.match_info["process_id"])
        except UnknownLogin as exc:
            raise ErrorReply(404, "M_NOT_FOUND", "Login not found") from exc
        return _json({})

    # -- routes: starting chats -------------------------------------------------------

    async def contacts(self, request: web.Request) -> web.Response:
        starter, login = await self._starter(request, "listing contacts")
        found = await _supported(starter.contacts(login), "listing contacts")
        return _json({"contacts": [_identifier_body(r) for r in found]})

    async def search_users(self, request: web.Request) -> web.Response:
        starter, login = await self._starter(request, "searching users")
        body = await _json_body(request)
        query = body.get("query") if isinstance(body, dict) else None
        if not isinstance(query, str):
            raise ErrorReply(400, "M_NOT_JSON", "The body must be an object with a string 'query'")
        found = await _supported(starter.search_users(login, query), "searching users")
        return _json({"results": [_identifier_body(r) for r in found]})

    async def resolve_identifier(self, request: web.Request) -> web.Response:
        return await self._resolve(request, create_dm=False)

    async def create_dm(self, request: web.Request) -> web.Response:
        return await self._resolve(request, create_dm=True)

    async def _resolve(self, request: web.Request, *, create_dm: bool) -> web.Response:
        what = "creating DMs" if create_dm else "resolving identifiers"
        starter, login = await self._starter(request, what)
        identifier = request.match_info["identifier"]
        found = await _supported(starter.resolve_identifier(login, identifier, create_dm), what)
        if found is None:
            raise ErrorReply(404, "M_NOT_FOUND", "Identifier not found")
        return _json(_identifier_body(found))

    async def create_group(self, request: web.Request) -> web.Response:
        starter, login = await self._starter(request, "creating groups")
        params = await _json_body(request)
        if not isinstance(params, dict):
            raise ErrorReply(400, "M_NOT_JSON", "The body must be a JSON object")
        group_type = request.match_info["group_type"]
        chat_id, room_id = await _supported(
            starter.create_group(login, group_type, params), "creating groups"
        )
        return _json({"id": chat_id, "mxid": room_id})

    async def _starter(self, request: web.Request, what: str) -> tuple[ChatStarter, LoginRecord]:
        starter = self.host.chat_starter()
        if starter is None:
            raise _not_supported(what)
        user_id = request[_USER]
        wanted = request.query.get("login_id")
        if wanted:
            return starter, await self._login_of(user_id, wanted)
        records = await self.host.logins(user_id)
        if not records:
            raise _login_not_found()
        return starter, records[0]

    async def _login_of(self, user_id: str, login_id: str) -> LoginRecord:
        for record in await self.host.logins(user_id):
            if record.id == login_id:
                return record
        raise _login_not_found()

    # -- middlewares: errors, CORS, auth, limits ------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return web.Response(status=200, headers=_CORS)
        try:
            response = await handler(request)
        except ErrorReply as exc:
            wait = request.get(_RETRY_AFTER_MS)
            return _error_response(exc, **({} if wait is None else {"retry_after_ms": wait}))
        except InvalidInput as exc:
            # The connector refused the input (a wrong password): the login is over.
            return _error_response(ErrorReply(400, "M_INVALID_PARAM", str(exc)))
        except web.HTTPRequestEntityTooLarge:
            return _error_response(ErrorReply(413, "M_TOO_LARGE", "Request body too large"))
        except web.HTTPException as exc:
            if exc.status == 404:
                return _error_response(ErrorReply(404, "M_UNRECOGNIZED", "Unrecognized endpoint"))
            if exc.status == 405:
                return _error_response(
                    ErrorReply(405, "M_UNRECOGNIZED", "Invalid method for endpoint")
                )
            raise
        except Exception:
            log.exception(
                "provisioning: unexpected error answering %s %s", request.method, request.path
            )
            return _error_response(ErrorReply(500, "M_UNKNOWN", "Internal error"))
        response.headers.update(_CORS)
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        user_id = await self._authenticate(request)
        if not self.host.may_log_in(user_id):
            raise ErrorReply(403, "M_FORBIDDEN", "User does not have login permissions")
        bucket = _bucket_in(self._limits, user_id, self.settings.per_minute, self._clock)
        if not bucket.try_take():
            raise _limited(request, bucket)
        request[_USER] = user_id
        return await handler(request)

    async def _authenticate(self, request: web.Request) -> str:
        request[_CLIENT] = request.remote or ""
        token = _bearer(request)
        if not token:
            raise ErrorReply(401, "M_MISSING_TOKEN", "Missing auth token")
        claimed = request.query.get("user_id") or None
        if claimed is not None and not _valid_user_id(claimed):
            raise ErrorReply(400, "M_INVALID_PARAM", "user_id is not a valid Matrix user ID")
        if len(self._secret) >= _SECRET_MIN_LENGTH and _same(token, self._secret):
            if claimed is None:
                raise ErrorReply(
                    400, "M_MISSING_PARAM", "user_id is required with the shared secret"
                )
            return claimed
        if not self.settings.matrix_auth:
            raise _invalid_token()
        if token.startswith("openid:"):
            if claimed is None:
                raise ErrorReply(400, "M_MISSING_PARAM", "user_id is required with an OpenID token")
            return await self._check_openid(token.removeprefix("openid:"), claimed, request)
        return await self._check_access_token(token, claimed, request)

    def _take_lookup(self, request: web.Request) -> None:
        """Count a token the bridge must ask a server about against the client's
        address: 429 once its budget is spent."""
        bucket = _bucket_in(self._lookups, request[_CLIENT], self.settings.per_minute, self._clock)
        if not bucket.try_take():
            raise _limited(request, bucket)

    async def _check_access_token(
        self, token: str, claimed: str | None, request: web.Request
    ) -> str:
        key = "token:" + _digest(token)  # the cache keeps no token, only its digest
        user_id = self._cached(key)
        if user_id == _REFUSED:
            raise _invalid_token()
        if user_id is None:
            self._take_lookup(request)
            client = HomeserverClient(self.host.homeserver_url, token)
            try:
                user_id = (await client.whoami()).user_id
            except MatrixRequestError as exc:
                # Refused for a while too: a client looping on a bad token must not
                # turn each of its requests into one to the homeserver.
                self._remember(key, _REFUSED, _REFUSED_CACHE_SECONDS)
                raise _invalid_token() from exc
            finally:
                await client.close()
            self._remember(key, user_id, TOKEN_CACHE_SECONDS)
        if split_user_id(user_id)[1] != self.host.server_name:
            raise _invalid_token()  # an appservice or a remote user cannot use a local token
        if claimed is not None and claimed != user_id:
            raise _invalid_token()
        return user_id

    async def _check_openid(self, token: str, claimed: str, request: web.Request) -> str:
        server = split_user_id(claimed)[1]
        key = f"openid:{server}:{_digest(token)}"
        user_id = self._cached(key)
        if user_id == _REFUSED:
            raise _invalid_token()
        if user_id is None:
            self._take_lookup(request)
            try:
                user_id = await self._openid_subject(server, token)
            except ErrorReply:
                self._remember(key, _REFUSED, _REFUSED_CACHE_SECONDS)
                raise
            self._remember(key, user_id, _OPENID_CACHE_SECONDS)
        if user_id != claimed:
            raise _invalid_token()
        return user_id

    async def _openid_subject(self, server: str, token: str) -> str:
        base = await self._federation_base(server)
        url = f"{base}/_matrix/federation/v1/openid/userinfo?access_token={quote(token)}"
        try:
            async with self._session().get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("provisioning: OpenID check on %s failed: %s", server, exc)
            raise _invalid_token() from exc
        subject = body.get("sub") if isinstance(body, dict) else None
        if not isinstance(subject, str):
            raise _invalid_token()
        return subject

    async def _federation_base(self, server: str) -> str:
        """Where ``server`` serves federation: our homeserver for ourselves, else its
        ``.well-known/matrix/server`` delegation, else port 8448."""
        if server == self.host.server_name:
            return self.host.homeserver_url.rstrip("/")
        delegated = server if ":" in server else f"{server}:8448"
        try:
            url = f"https://{server}/.well-known/matrix/server"
            async with self._session().get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else None
            found = body.get("m.server") if isinstance(body, dict) else None
            if isinstance(found, str) and found:
                delegated = found if ":" in found else f"{found}:8448"
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass  # no delegation: the server name itself
        return f"https://{delegated}"

    def _cached(self, key: str) -> str | None:
        entry = self._token_cache.get(key)
        if entry is None or entry[1] < self._clock():
            return None
        return entry[0]

    def _remember(self, key: str, user_id: str, seconds: float) -> None:
        self._token_cache[key] = (user_id, self._clock() + seconds)
        self._token_cache.move_to_end(key)
        while len(self._token_cache) > _CACHE_SIZE:
            self._token_cache.popitem(last=False)

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    async def _close(self, _: web.Application) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


# -- bodies -----------------------------------------------------------------------------


def _step_body(process_id: str, step: LoginStep[Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "login_id": process_id,
        "type": step.type.value,
        "step_id": step.step_id,
    }
    if step.txn_id:
        body["txn_id"] = step.txn_id
    if step.instructions:
        body["instructions"] = step.instructions
    if step.type is StepType.USER_INPUT:
        body["user_input"] = {"fields": [converter.unstructure(f) for f in step.fields]}
    elif step.type is StepType.COOKIES:
        body["cookies"] = converter.unstructure(step.cookies)
    elif step.type is StepType.DISPLAY_AND_WAIT:
        body["display_and_wait"] = converter.unstructure(step.display)
    else:
        body["complete"] = {"user_login_id": step.login_id} if step.login_id else {}
    return body


def _identifier_body(found: ResolvedIdentifier) -> dict[str, Any]:
    body = {k: v for k, v in attrs.asdict(found).items() if v not in (None, ())}
    if "identifiers" in body:
        body["identifiers"] = list(body["identifiers"])
    return body


async def _json_body(request: web.Request) -> Any:
    # Mounted on the appservice's listener, the request has that app's (large) limit.
    body = await request.content.read(_MAX_BODY + 1)
    if len(body) > _MAX_BODY:
        raise ErrorReply(413, "M_TOO_LARGE", f"Request body over {_MAX_BODY} bytes")
    try:
        return decode_request(body)
    except (ValueError, RecursionError) as exc:
        raise ErrorReply(400, "M_NOT_JSON", "Request body is not valid JSON") from exc


async def _string_map(request: web.Request) -> dict[str, str]:
    body = await _json_body(request) if request.can_read_body else {}
    if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
        raise ErrorReply(400, "M_NOT_JSON", "The body must be a JSON object of strings")
    return body


async def _supported(call: Awaitable[Any], what: str) -> Any:
    try:
        return await call
    except NotImplementedError as exc:
        raise _not_supported(what) from exc


def _not_supported(what: str) -> ErrorReply:
    return ErrorReply(501, "M_UNRECOGNIZED", f"This bridge does not support {what}")


def _login_not_found() -> ErrorReply:
    return ErrorReply(404, "M_NOT_FOUND", "Login not found")


def _invalid_token() -> ErrorReply:
    return ErrorReply(401, "M_UNKNOWN_TOKEN", "Invalid auth token")


def _json(body: Any) -> web.Response:
    return web.json_response(body, dumps=json_text)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _valid_user_id(user_id: str) -> bool:
    try:
        split_user_id(user_id)
    except ValueError:
        return False
    return True


def _shown(text: str) -> str:
    return repr(text[:100])


# -- the host on an AppService ---------------------------------------------------------------


@attrs.define
class AppHost:
    """:class:`ProvisioningHost` on an :class:`~bridge_kit.app.service.AppService` and
    a connector: the bridge gives it the two things only it knows how to do.

    ``logout`` ends a login (disconnect, the connector's logout, forget it);
    ``management_room`` finds a user's management room (``None``: none yet).
    """

    app: AppService
    connector: NetworkConnector
    logout_login: Callable[[LoginRecord], Awaitable[None]]
    find_management_room: Callable[[str], Awaitable[str | None]] | None = None
    permissions: Permissions = attrs.field()

    @permissions.default
    def _permissions(self) -> Permissions:
        return Permissions.from_mapping(self.app.config.bridge.permissions)

    @property
    def network(self) -> NetworkInfo:
        connector = self.connector
        return NetworkInfo(
            displayname=connector.display_name,
            network_id=connector.network_id,
            network_url=getattr(connector, "network_url", ""),
            network_icon=getattr(connector, "network_icon", ""),
            beeper_bridge_type=getattr(connector, "bridge_type", "") or connector.network_id,
        )

    @property
    def bot_user_id(self) -> str:
        return self.app.bot.user_id

    @property
    def server_name(self) -> str:
        return self.app.domain or ""

    @property
    def homeserver_url(self) -> str:
        return self.app.config.homeserver.url

    @property
    def command_prefix(self) -> str:
        return self.app.config.bridge.command_prefix

    def login_flows(self) -> Sequence[LoginFlow]:
        connector = self.connector
        return connector.login_flows() if isinstance(connector, OffersLoginFlows) else ()

    def may_log_in(self, user_id: str) -> bool:
        return self.permissions.allows(user_id, Level.USER)

    async def logins(self, user_id: str) -> list[LoginRecord]:
        records = await self.app.store.logins(user_id)
        return [r for r in records if r.state is not LoginState.LOGGED_OUT]

    async def logout(self, login: LoginRecord) -> None:
        await self.logout_login(login)

    async def management_room(self, user_id: str) -> str | None:
        finder = self.find_management_room
        return await finder(user_id) if finder is not None else None

    def chat_starter(self) -> ChatStarter | None:
        connector = self.connector
        return connector if isinstance(connector, ChatStarter) else None
