"""Double puppeting: act as a real Matrix user's own account, with their access token.

The user's homeserver lets an appservice log in as one of its users when a
registration of that appservice has the user in its (non-exclusive) user
namespace: ``POST /login`` with ``m.login.application_service``. The access
token it gives is kept in the store, per user, so that a restart logs in no
more (each login makes a new device). A token the homeserver no longer knows
(``M_UNKNOWN_TOKEN``: logged out, device deleted) is replaced by one new login.

The stored token is sealed (AES-256-GCM, see :mod:`bridge_kit._sealing`) with a
key derived from ``encryption.pickle_key``, or the registration's as_token when
that is unset, as the crypto state is: a copy of the database alone does not act
as the user. A token stored in clear by an earlier release is sealed on first
use; one that no longer opens (the secret changed) is replaced by one new login.

:class:`DoublePuppetClient` is a :class:`~bridge_kit.client.homeserver.HomeserverClient`
that sends the user's token and no ``?user_id=`` assertion; wrap it in an
:class:`~bridge_kit.intent.Intent` (``app.double_puppet(user_id, as_token)`` does).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Final

import attrs

from bridge_kit._sealing import Sealer, hkdf_sha256
from bridge_kit.client import Raw
from bridge_kit.client.homeserver import (
    HomeserverClient,
    QueryValue,
    RetryPolicy,
    _Reply,
    structure_reply,
)
from bridge_kit.errors import (
    AppserviceLoginUnsupported,
    DoublePuppetError,
    MatrixRequestError,
    UnknownToken,
    WrongPickleKey,
)
from bridge_kit.store import Store

__all__ = ["LOGIN_ENDPOINT", "SEALED_PREFIX", "TOKEN_FIELD", "DoublePuppetClient", "token_sealer"]

#: The login route (the endpoint name observers see for it).
LOGIN_ENDPOINT: Final = "/_matrix/client/v3/login"
#: The per-user field of the store's profile table that holds the access token (a
#: stored key, not a module path: it keeps the name earlier releases stored it under).
TOKEN_FIELD: Final = "bridge_kit.double_puppet.access_token"  # noqa: S105 - a field name

#: How a sealed token starts in the store (a token from an earlier release does not).
SEALED_PREFIX: Final = "sealed:v1:"
_SALT: Final = b"bridge_kit sealed secrets"
_INFO: Final = b"double-puppet access tokens v1"

_log = logging.getLogger(__name__)


def token_sealer(secret: str) -> Sealer:
    """What seals the stored access tokens, for ``encryption.pickle_key`` or an as_token."""
    return Sealer(hkdf_sha256(secret.encode("utf-8"), _SALT, _INFO))


@attrs.frozen
class _LoginResponse:
    user_id: str
    access_token: str
    device_id: str | None = None


class DoublePuppetClient(HomeserverClient):
    """A client acting as the real user ``user_id`` with an access token of their own.

    The token comes from the store, or else from one appservice login with
    ``as_token`` (the token of the registration whose namespace holds the user);
    it is stored, sealed, for the next start. The login happens before the first
    request. ``sealing_secret``: what the stored token is sealed with
    (``encryption.pickle_key`` or the bridge's as_token; ``as_token`` if None).
    """

    def __init__(
        self,
        base_url: str,
        as_token: str,
        user_id: str,
        store: Store,
        *,
        retry: RetryPolicy | None = None,
        sealing_secret: str | None = None,
    ) -> None:
        retry = retry or RetryPolicy()
        super().__init__(base_url, "", retry=retry)
        self.user_id = user_id
        self.store = store
        self.login_count = 0
        """How many logins this client made (0 when the stored token served)."""
        self._login = HomeserverClient(base_url, as_token, retry=retry)
        self._login.observers = self.observers  # one set of observers sees both
        self._token: str | None = None
        self._lock = asyncio.Lock()
        self._sealer = token_sealer(sealing_secret or as_token)

    def __repr__(self) -> str:
        return f"<DoublePuppetClient {self.user_id}>"

    async def close(self) -> None:
        await self._login.close()
        await super().close()

    def abort_retries(self) -> None:
        self._login.abort_retries()
        super().abort_retries()

    async def access_token(self) -> str:
        """The user's access token: the stored one, or a new login's."""
        async with self._lock:
            if self._token is None:
                stored = (await self.store.profile(self.user_id)).get(TOKEN_FIELD)
                token = await self._opened(stored) if stored else None
                self._use(token or await self._log_in())
            assert self._token is not None
            return self._token

    async def _renew(self, rejected: str) -> None:
        """Log in again after ``rejected`` was refused, unless another request did."""
        async with self._lock:
            if self._token == rejected:
                self._use(await self._log_in())

    def _use(self, token: str) -> None:
        self._token = token
        self._headers = {"Authorization": f"Bearer {token}"}

    async def _log_in(self) -> str:
        body = {
            "type": "m.login.application_service",
            "identifier": {"type": "m.id.user", "user": self.user_id},
        }
        self.login_count += 1
        try:
            # Not resent after a lost reply: each login that happens makes a device.
            reply = await self._login.request("POST", LOGIN_ENDPOINT, body=body, resend=False)
        except MatrixRequestError as exc:
            raise _login_error(self.user_id, exc) from exc
        login = structure_reply(reply, _LoginResponse, "login")
        if login.user_id != self.user_id:
            raise DoublePuppetError(
                f"logging in as {self.user_id} gave a token for {login.user_id}"
            )
        await self._keep(login.access_token)
        return login.access_token

    def _bound_to(self) -> bytes:
        return f"{self.user_id}\0{TOKEN_FIELD}".encode("utf-8", "surrogatepass")

    async def _keep(self, token: str) -> None:
        sealed = self._sealer.seal(token.encode("utf-8"), self._bound_to())
        stored = SEALED_PREFIX + base64.b64encode(sealed).decode("ascii")
        await self.store.set_profile(self.user_id, TOKEN_FIELD, stored)

    async def _opened(self, stored: str) -> str | None:
        """The stored token, or None if it does not open (then a login replaces it)."""
        if not stored.startswith(SEALED_PREFIX):
            await self._keep(stored)  # in clear, from an earlier release: sealed now
            return stored
        try:
            sealed = base64.b64decode(stored.removeprefix(SEALED_PREFIX), validate=True)
            return self._sealer.open(sealed, self._bound_to()).decode("utf-8")
        except (binascii.Error, WrongPickleKey, UnicodeDecodeError):
            _log.warning(
                "the stored access token of %s does not open with this secret "
                "(encryption.pickle_key or the as_token changed?): logging in again",
                self.user_id,
            )
            return None

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
        # The user's own token says who we are: no identity assertion.
        params.pop("user_id", None)
        token = await self.access_token()
        try:
            return await super()._send_with_retries(
                method, path, params, data, endpoint, resend=resend, stream=stream
            )
        except UnknownToken:
            await self._renew(token)
            if isinstance(data, Raw) and not data.reusable:
                raise  # its chunks are gone; the next call has a valid token
        # A refused token means nothing was carried out: send it once more.
        return await super()._send_with_retries(
            method, path, params, data, endpoint, resend=resend, stream=stream
        )


def _login_error(user_id: str, exc: MatrixRequestError) -> BaseException:
    if isinstance(exc, AppserviceLoginUnsupported):
        return DoublePuppetError(
            f"the homeserver refused to log the appservice in as {user_id} "
            f"({exc.errcode}): the double-puppet registration has MSC4190 on "
            "(io.element.msc4190: true), which forbids appservice logins; "
            "remove that flag from that registration file"
        )
    if isinstance(exc, UnknownToken):
        return DoublePuppetError(
            f"the homeserver does not know the double-puppet as_token ({exc.errcode}): "
            f"is its registration file in the app_service_config_files of the "
            f"homeserver of {user_id}?"
        )
    return exc
