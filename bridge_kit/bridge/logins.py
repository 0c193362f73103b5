"""Logins: Matrix users' accounts on the remote network, each with its client.

A login's state follows bridgev2's names (:class:`~bridge_kit.bridge.records.LoginState`).
The layer connects each stored login at start and again after a
``TRANSIENT_DISCONNECT``, with jittered exponential backoff; after
``BAD_CREDENTIALS`` (the client raised :class:`~bridge_kit.errors.LoginRefused`)
or ``LOGGED_OUT`` it waits for the user. Each change is stored and, for a login
made in a management room, told to its user there.

A login is connected only while this daemon holds its lease
(:meth:`~bridge_kit.store.concerns.LoginLeaseStore.take_login_lease`), so daemons
sharing a PostgreSQL store connect each login once. A login another daemon holds
is on *standby* here: loaded, without a client. Every ``LOGIN_LEASE_RETRY``
seconds (jittered) a daemon on a shared store checks its leases (a lost one
disconnects its login), loads the logins other daemons added, forgets those they
logged out, and tries to take each standby login's lease: the first daemon to
get it after the holder died or let go connects it, with its stored credentials.

Credentials are sealed (AES-256-GCM, a key derived from ``encryption.pickle_key``)
before they are stored when a pickle key is configured; never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import attrs

from bridge_kit import defaults
from bridge_kit.app.service import AppService
from bridge_kit.bridge.connector import LoginInfo, NetworkClient, NetworkConnector
from bridge_kit.bridge.records import LoginRecord, LoginState
from bridge_kit.errors import (
    BridgeKitError,
    ConfigError,
    LoginRefused,
    StoreError,
    WrongPickleKey,
)
from bridge_kit.store.login_leases import LoginLease

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
        self.lease: LoginLease | None = None
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

    @property
    def standby(self) -> bool:
        """Loaded without its lease: another daemon connects it (or will)."""
        return self.lease is None

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
        """Disconnect, then let go of the lease (never the other way round: two daemons
        would be connected at once)."""
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        client, self.client = self.client, None
        try:
            if client is not None:
                try:
                    await client.disconnect()
                except Exception as exc:
                    log.warning("login %s: disconnecting failed: %s", self.id, _reason(exc))
        finally:
            lease, self.lease = self.lease, None
            if lease is not None:
                try:
                    await lease.release()
                except StoreError as exc:
                    log.warning("login %s: releasing its lease failed: %s", self.id, exc)


StateObserver = Callable[["Login", LoginState, str], Awaitable[None]]


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
        #: Seconds between two looks at the leases on a shared store (jittered).
        self.lease_retry = defaults.LOGIN_LEASE_RETRY
        self._loaded: dict[str, Login] = {}
        # add, remove and the sync with the store take turns: the sync must not
        # read a login list that an add or a remove is changing.
        self._changing = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._tell = tell
        self.observers: list[StateObserver] = []
        """Awaited with each new state of a login, ``LOGGED_OUT`` on removal included
        (the bridge state reporter); one that fails is logged."""

    def get(self, login_id: str) -> Login | None:
        return self._loaded.get(login_id)

    def of_user(self, user_id: str) -> list[Login]:
        """The user's logins, the connected ones first."""
        found = [login for login in self._loaded.values() if login.user_id == user_id]
        return sorted(found, key=lambda login: (not login.connected, login.id))

    def all(self) -> list[Login]:
        return list(self._loaded.values())

    @property
    def shared(self) -> bool:
        """Whether other daemons share the store's logins (PostgreSQL)."""
        return self.app.store.login_leases_shared

    async def load_all(self) -> None:
        """Load every stored login (except the logged-out) and connect each whose lease
        this daemon gets; on a shared store, start watching the others."""
        async with self._changing:
            for record in await self.app.store.logins():
                if record.state is LoginState.LOGGED_OUT:
                    continue
                credentials = self.sealer.unseal(record.id, record.credentials)
                await self._start(Login(self, record, credentials))
        if self.shared and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="bridge_kit login leases")

    async def add(
        self, user_id: str, info: LoginInfo, *, management_room: str | None = None
    ) -> Login:
        """Store a new login (replacing one with its id) and connect it (if another
        daemon holds its lease, that daemon keeps it connected, with the credentials
        it loaded, until it lets go)."""
        async with self._changing:
            return await self._add(user_id, info, management_room)

    async def _add(self, user_id: str, info: LoginInfo, management_room: str | None) -> Login:
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
        await self._start(login)
        return login

    async def remove(self, login: Login, *, remote_logout: bool = True) -> None:
        """Log out: disconnect (and log out remotely) and forget the login. A login on
        standby here is logged out remotely by the daemon holding it, which finds
        its record gone."""
        async with self._changing:
            await self._remove(login, remote_logout=remote_logout)

    async def _remove(self, login: Login, *, remote_logout: bool) -> None:
        self._loaded.pop(login.id, None)
        client = login.client
        if remote_logout and client is not None:
            try:
                await client.logout()
            except Exception as exc:
                log.warning("login %s: remote logout failed: %s", login.id, _reason(exc))
        await login.close()
        await self.app.store.delete_login(login.id)
        await self._observe(login, LoginState.LOGGED_OUT, "")

    async def _start(self, login: Login) -> None:
        """Load ``login``; connect it if its lease is this daemon's, else keep it on standby."""
        self._loaded[login.id] = login
        await self._connect_if_free(login)

    async def _connect_if_free(self, login: Login, *, taking_over: bool = False) -> bool:
        """Take the lease and connect; ``taking_over``: the stored state is the last
        holder's, so a CONNECTED one reads CONNECTING until this daemon's client connects."""
        try:
            lease = await self.app.store.take_login_lease(login.id)
        except StoreError as exc:
            if not self.shared:
                raise
            log.warning("login %s: could not take its lease (trying later): %s", login.id, exc)
            return False
        if lease is None:
            # Said once: a standby login is tried again every lease_retry seconds.
            (log.debug if taking_over else log.info)(
                "login %s: another daemon holds it; on standby here", login.id
            )
            return False
        login.lease = lease
        if taking_over and login.state is LoginState.CONNECTED:
            login.record = attrs.evolve(login.record, state=LoginState.CONNECTING)
        login.client = self.connector.load_login(login)
        login.reconnect()
        return True

    # -- on a store other daemons share ---------------------------------------------------

    async def _watch(self) -> None:
        while not self.stopping:
            await asyncio.sleep(random.uniform(0.75, 1.25) * self.lease_retry)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except StoreError as exc:  # an outage: one line, tried again next time
                log.warning("could not look at the login leases (trying later): %s", exc)
            except Exception:
                log.exception("could not look at the login leases; trying later")

    async def sync(self) -> None:
        """Catch up with the other daemons: drop the logins whose lease was lost, follow
        the stored logins (added or logged out elsewhere), connect the standby logins
        whose lease is free now. The watcher calls it every ``lease_retry`` seconds."""
        async with self._changing:
            if self.stopping:
                return
            await self.app.store.check_login_leases()
            for login in self.all():
                if login.lease is not None and not login.lease.held:
                    log.warning(
                        "login %s: its lease was lost (the store's connection failed); "
                        "disconnected, on standby here",
                        login.id,
                    )
                    await login.close()
                    # Not stored: the login is another daemon's to report on now.
                    state = LoginState.TRANSIENT_DISCONNECT
                    login.record = attrs.evolve(login.record, state=state)
            stored = {record.id: record for record in await self.app.store.logins()}
            for login in self.all():
                record = stored.get(login.id)
                if record is None:
                    await self._logged_out_elsewhere(login)
                elif login.standby and record.state is LoginState.LOGGED_OUT:
                    self._loaded.pop(login.id, None)  # as load_all leaves it
                elif login.standby:
                    login.record = record
                    if not await self._reload_credentials(login):
                        continue
                    await self._connect_if_free(login, taking_over=True)
            await self._load_new(stored.values())

    async def discover(self, user_id: str) -> bool:
        """On a shared store, load the logins of ``user_id`` that another daemon added
        since the last :meth:`sync` (connected here if their lease is free); whether
        there were any. For a Matrix event of a user with no login loaded here."""
        if not self.shared:
            return False
        async with self._changing:
            if self.stopping:
                return False
            return await self._load_new(await self.app.store.logins(user_id))

    async def _load_new(self, records: Iterable[LoginRecord]) -> bool:
        """Load the records not loaded yet (nor logged out); whether there were any."""
        found = False
        for record in records:
            if record.id in self._loaded or record.state is LoginState.LOGGED_OUT:
                continue
            login = Login(self, record, None)
            if await self._reload_credentials(login):
                self._loaded[login.id] = login
                await self._connect_if_free(login, taking_over=True)
                found = True
        return found

    async def _reload_credentials(self, login: Login) -> bool:
        try:
            login._credentials = self.sealer.unseal(login.id, login.record.credentials)
        except WrongPickleKey as exc:
            log.warning("login %s: cannot load it: %s", login.id, exc)
            return False
        return True

    async def _logged_out_elsewhere(self, login: Login) -> None:
        """Another daemon logged ``login`` out (its record is gone): forget it here, and
        log it out remotely if this daemon holds it (the other could not)."""
        self._loaded.pop(login.id, None)
        client = login.client
        if client is not None and login.lease is not None:
            log.info("login %s: logged out by another daemon; logging out here", login.id)
            try:
                await client.logout()
            except Exception as exc:
                log.warning("login %s: remote logout failed: %s", login.id, _reason(exc))
        await login.close()

    async def stored(self, login: Login) -> None:
        record = attrs.evolve(
            login.record, credentials=self.sealer.seal(login.id, login.credentials)
        )
        await self.app.store.put_login(record)

    async def _observe(self, login: Login, state: LoginState, message: str) -> None:
        for observer in self.observers:
            try:
                await observer(login, state, message)
            except Exception:
                log.exception("login %s: an observer of its state failed", login.id)

    async def tell(self, login: Login, state: LoginState, message: str) -> None:
        await self._observe(login, state, message)
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
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        logins, self._loaded = list(self._loaded.values()), {}
        for login in logins:
            await login.close()


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
