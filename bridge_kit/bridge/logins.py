"""Logins: Matrix users' accounts on the remote network, each with its client.

A login's state follows bridgev2's names (:class:`~bridge_kit.bridge.records.LoginState`).
The layer connects each stored login at start and again after a
``TRANSIENT_DISCONNECT``, with jittered exponential backoff; after
``BAD_CREDENTIALS`` (the client raised :class:`~bridge_kit.errors.LoginRefused`)
or ``LOGGED_OUT`` it waits for the user. Each change is stored and, for a login
made in a management room, told to its user there.

Credentials are sealed (AES-256-GCM, a key derived from ``encryption.pickle_key``)
before they are stored when a pickle key is configured; never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Callable
from typing import Any, Final

import attrs

from bridge_kit.app.service import AppService
from bridge_kit.bridge.connector import LoginInfo, NetworkClient, NetworkConnector
from bridge_kit.bridge.records import LoginRecord, LoginState
from bridge_kit.errors import BridgeKitError, ConfigError, LoginRefused, WrongPickleKey

__all__ = ["Login", "Logins", "Sealer"]

log = logging.getLogger(__name__)

#: The metadata key of the room a login's state changes are told in.
MANAGEMENT_ROOM: Final = "management_room"
_BACKOFF_FIRST: Final = 1.0
_BACKOFF_MAX: Final = 300.0
_SEALED: Final = b"bk-sealed-v1:"


class Sealer:
    """Seals credentials with a key derived from the pickle key; without one, stores
    them as they are (the store is then what protects them)."""

    def __init__(self, pickle_key: str | None) -> None:
        self._key: bytes | None = None
        if pickle_key:
            # Only with a pickle key: the e2ee extra provides cryptography.
            try:
                from bridge_kit.crypto.vault import derive_pickle_key
            except ImportError:
                raise ConfigError(
                    "encryption.pickle_key seals bridge logins' credentials, which needs "
                    "the e2ee extra (pip install 'bridge_kit[e2ee]')"
                ) from None
            # A key of its own (not the crypto store's): the prefix separates them.
            self._key = derive_pickle_key("bridge logins\0" + pickle_key)

    def seal(self, login_id: str, data: bytes | None) -> bytes | None:
        if data is None or self._key is None:
            return data
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = secrets.token_bytes(12)
        sealed = AESGCM(self._key).encrypt(nonce, data, login_id.encode("utf-8"))
        return _SEALED + nonce + sealed

    def unseal(self, login_id: str, data: bytes | None) -> bytes | None:
        if data is None or not data.startswith(_SEALED):
            return data
        if self._key is None:
            raise WrongPickleKey(
                f"the credentials of login {login_id} are sealed: set encryption.pickle_key"
            )
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        body = data[len(_SEALED) :]
        try:
            return AESGCM(self._key).decrypt(body[:12], body[12:], login_id.encode("utf-8"))
        except InvalidTag:
            raise WrongPickleKey(
                f"the credentials of login {login_id} do not open with this pickle key"
            ) from None


class Login:
    """A login and its client (the :class:`~bridge_kit.bridge.connector.LoginHandle`)."""

    def __init__(self, logins: Logins, record: LoginRecord, credentials: bytes | None) -> None:
        self._logins = logins
        self.record = record
        self._credentials = credentials
        self.client: NetworkClient | None = None
        self._connecting: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # never the credentials
        return f"Login({self.id!r}, user={self.user_id!r}, state={self.state.name})"

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def user_id(self) -> str:
        return self.record.user_id

    @property
    def remote_name(self) -> str:
        return self.record.remote_name

    @property
    def credentials(self) -> bytes | None:
        return self._credentials

    @property
    def metadata(self) -> dict[str, Any]:
        return self.record.metadata

    @property
    def state(self) -> LoginState:
        return self.record.state

    @property
    def connected(self) -> bool:
        return self.client is not None and self.state is LoginState.CONNECTED

    async def set_state(self, state: LoginState, message: str = "") -> None:
        if state is self.state and not message:
            return
        self.record = attrs.evolve(self.record, state=state)
        await self._logins.stored(self)
        await self._logins.tell(self, state, message)
        if state is LoginState.TRANSIENT_DISCONNECT:
            self.reconnect(delay=_BACKOFF_FIRST)

    def reconnect(self, delay: float = 0.0) -> None:
        """Connect in the background (unless a connect is under way), with backoff."""
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.create_task(self._keep_connecting(delay))

    async def _keep_connecting(self, delay: float) -> None:
        backoff = _BACKOFF_FIRST
        await asyncio.sleep(delay)
        while self.client is not None and not self._logins.stopping:
            try:
                await self.client.connect()
                return
            except LoginRefused as exc:
                await self.set_state(LoginState.BAD_CREDENTIALS, str(exc))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the network: try again later
                log.warning("login %s: connecting failed: %s", self.id, _reason(exc))
                self.record = attrs.evolve(self.record, state=LoginState.TRANSIENT_DISCONNECT)
                await self._logins.stored(self)
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(_BACKOFF_MAX, backoff * 2)

    async def close(self) -> None:
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        client, self.client = self.client, None
        if client is not None:
            try:
                await client.disconnect()
            except Exception as exc:
                log.warning("login %s: disconnecting failed: %s", self.id, _reason(exc))


class Logins:
    """The logins of one bridge, loaded from the store and kept connected."""

    def __init__(
        self,
        app: AppService,
        connector: NetworkConnector,
        tell: Callable[[str, str], Any] | None = None,
    ) -> None:
        self.app = app
        self.connector = connector
        self.sealer = Sealer(app.config.encryption.pickle_key)
        self.stopping = False
        self._loaded: dict[str, Login] = {}
        self._tell = tell

    def get(self, login_id: str) -> Login | None:
        return self._loaded.get(login_id)

    def of_user(self, user_id: str) -> list[Login]:
        """The user's logins, the connected ones first."""
        found = [login for login in self._loaded.values() if login.user_id == user_id]
        return sorted(found, key=lambda login: (not login.connected, login.id))

    def all(self) -> list[Login]:
        return list(self._loaded.values())

    async def load_all(self) -> None:
        """Load every stored login (except the logged-out) and connect each."""
        for record in await self.app.store.logins():
            if record.state is LoginState.LOGGED_OUT:
                continue
            credentials = self.sealer.unseal(record.id, record.credentials)
            self._start(Login(self, record, credentials))

    async def add(
        self, user_id: str, info: LoginInfo, *, management_room: str | None = None
    ) -> Login:
        """Store a new login (replacing one with its id) and connect it."""
        old = self._loaded.pop(info.id, None)
        if old is not None:
            await old.close()
        metadata = dict(info.metadata)
        if management_room is not None:
            metadata[MANAGEMENT_ROOM] = management_room
        record = LoginRecord(
            info.id,
            user_id,
            remote_name=info.remote_name,
            state=LoginState.CONNECTING,
            credentials=info.credentials,
            metadata=metadata,
        )
        login = Login(self, record, info.credentials)
        await self.stored(login)
        self._start(login)
        return login

    async def remove(self, login: Login, *, remote_logout: bool = True) -> None:
        """Log out: disconnect (and log out remotely) and forget the login."""
        self._loaded.pop(login.id, None)
        client = login.client
        if remote_logout and client is not None:
            try:
                await client.logout()
            except Exception as exc:
                log.warning("login %s: remote logout failed: %s", login.id, _reason(exc))
        await login.close()
        await self.app.store.delete_login(login.id)

    def _start(self, login: Login) -> None:
        login.client = self.connector.load_login(login)
        self._loaded[login.id] = login
        login.reconnect()

    async def stored(self, login: Login) -> None:
        record = attrs.evolve(
            login.record, credentials=self.sealer.seal(login.id, login.credentials)
        )
        await self.app.store.put_login(record)

    async def tell(self, login: Login, state: LoginState, message: str) -> None:
        room = login.metadata.get(MANAGEMENT_ROOM)
        text = f"{login.remote_name or login.id}: {state.name.lower().replace('_', ' ')}"
        if message:
            text += f" ({message})"
        log.info("login %s: %s", login.id, text)
        if isinstance(room, str) and self._tell is not None:
            try:
                await self._tell(room, text)
            except BridgeKitError as exc:
                log.warning("could not tell %s about login %s: %s", room, login.id, exc)

    async def close_all(self) -> None:
        self.stopping = True
        logins, self._loaded = list(self._loaded.values()), {}
        for login in logins:
            await login.close()


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
