"""``AppService``: the registration, the store, the homeserver client, the puppet
engine and the HTTP routes, tied together with a lifecycle and handler registration.

    app = AppService.from_config(Config.load("config.yaml"))

    @app.on_event("m.room.message")
    async def on_message(event: Event) -> None: ...

    async with app:
        await app.intent("alice").send_text(room_id, "hello")
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from bridge_kit.client import HomeserverClient, RetryPolicy
from bridge_kit.config import Config
from bridge_kit.diagnose import homeserver_domain, ping_homeserver
from bridge_kit.errors import BridgeKitError
from bridge_kit.ids import localpart_problem, split_user_id
from bridge_kit.intent import Intent
from bridge_kit.metrics import Metrics
from bridge_kit.progress import plain_line
from bridge_kit.puppets import BulkProgress, BulkResult, PuppetRegistrar, localparts_from_lines
from bridge_kit.registration import Registration
from bridge_kit.server import ThirdPartyHandlers, create_app, serve_app
from bridge_kit.store import Store, open_store
from bridge_kit.types import Event, Transaction

log = logging.getLogger("bridge_kit.appservice")

EventHandler = Callable[[Event], Awaitable[None]]
QueryHook = Callable[[str], Awaitable[bool]]
INTENT_CACHE_SIZE = 10_000


class AppService:
    """A running appservice: serve the homeserver's pushes and act as puppets.

    Use it as an async context manager. On enter it opens (and migrates) the
    store, asks the homeserver who we are (which also proves the registration
    is loaded), starts listening, and has the homeserver ping us. On exit it
    stops accepting, lets in-flight transactions finish and flushes the store.
    """

    def __init__(
        self,
        registration: Registration,
        *,
        homeserver_url: str,
        domain: str | None = None,
        store: Store | str = "sqlite:///bridge_kit.db",
        host: str = "127.0.0.1",
        port: int = 29333,
        max_body_bytes: int = 10 * 1024 * 1024,
        concurrency: int = 16,
        provision_on_query: bool = True,
        preregister: Path | None = None,
        ping: bool = True,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.registration = registration
        self.domain = domain
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.concurrency = concurrency
        self.provision_on_query = provision_on_query
        self.preregister = preregister
        self.ping = ping
        self.thirdparty = ThirdPartyHandlers()
        self.metrics = Metrics()
        self.store = open_store(store) if isinstance(store, str) else store
        self.client = HomeserverClient(
            homeserver_url, registration.as_token, retry=retry or RetryPolicy()
        )
        self.client.observers.append(self.metrics)
        self._handlers: dict[str | None, list[EventHandler]] = defaultdict(list)
        self._ephemeral_handlers: dict[str | None, list[EventHandler]] = defaultdict(list)
        self._user_query: QueryHook | None = None
        self._alias_query: QueryHook | None = None
        self._registrar: PuppetRegistrar | None = None
        self._runner: web.AppRunner | None = None
        self._preregister_task: asyncio.Task[BulkResult] | None = None
        self._intents: OrderedDict[str, Intent] = OrderedDict()
        self._bot: Intent | None = None
        self._started_at: float | None = None

    @classmethod
    def from_config(cls, config: Config) -> AppService:
        """Build an AppService from a :class:`bridge_kit.Config`."""
        registration = Registration.load(config.registration_path)
        return cls(
            registration,
            homeserver_url=config.homeserver.url,
            domain=config.homeserver.domain,
            store=config.appservice.store,
            host=config.appservice.host,
            port=config.appservice.port,
            max_body_bytes=config.appservice.max_body_bytes,
            concurrency=config.puppets.concurrency,
            provision_on_query=config.puppets.provision_on_query,
            preregister=config.preregister_path,
        )

    # -- handler registration ------------------------------------------------

    def on_event(self, event_type: str | None = None) -> Callable[[EventHandler], EventHandler]:
        """Decorate a handler for timeline events of ``event_type`` (every event if None).

        Handlers run in the order events arrive. A handler that raises makes the
        whole transaction fail, so the homeserver retries it: nothing is lost.
        """
        return self._decorator(self._handlers, event_type)

    def on_ephemeral(self, event_type: str | None = None) -> Callable[[EventHandler], EventHandler]:
        """Decorate a handler for ephemeral events (typing, receipts, presence)."""
        return self._decorator(self._ephemeral_handlers, event_type)

    @staticmethod
    def _decorator(
        table: dict[str | None, list[EventHandler]], event_type: str | None
    ) -> Callable[[EventHandler], EventHandler]:
        def register(handler: EventHandler) -> EventHandler:
            table[event_type].append(handler)
            return handler

        return register

    def on_user_query(self, hook: QueryHook) -> QueryHook:
        """Decorate ``async (user_id) -> bool``: does this remote user exist?

        A yes registers the puppet. Only IDs in our exclusive user namespace
        with a valid localpart reach the hook.
        """
        self._user_query = hook
        return hook

    def on_alias_query(self, hook: QueryHook) -> QueryHook:
        """Decorate ``async (alias) -> bool``; the hook creates the room and alias on a yes."""
        self._alias_query = hook
        return hook

    # -- acting ----------------------------------------------------------------

    @property
    def puppets(self) -> PuppetRegistrar:
        """The puppet engine: ``ensure_registered`` and ``register_many``."""
        if self._registrar is None:
            raise BridgeKitError("the AppService is not started: use 'async with app:'")
        return self._registrar

    @property
    def bot(self) -> Intent:
        """The appservice's own user (``sender_localpart``); it needs no registration."""
        if self._bot is None:
            user_id = self.registration.sender_user_id(self.puppets.domain)
            self._bot = Intent(self.client, user_id, None)
        return self._bot

    def intent(self, localpart: str) -> Intent:
        """The puppet with this localpart; it is registered on first use.

        Raises :class:`InvalidLocalpart` or :class:`NotInNamespace` at once.
        """
        intent = self._intents.get(localpart)
        if intent is not None:
            self._intents.move_to_end(localpart)
            return intent
        registrar = self.puppets
        intent = Intent(
            self.client,
            registrar.user_id(localpart),
            lambda: registrar.ensure_registered(localpart),
        )
        self._intents[localpart] = intent
        # A bridge may touch millions of puppets; keep only the recently used
        # intents (a dropped one costs one store lookup when it comes back).
        if len(self._intents) > INTENT_CACHE_SIZE:
            self._intents.popitem(last=False)
        return intent

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> AppService:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the store, check the homeserver, listen, ping, start preregistration."""
        await self.store.open()
        try:
            domain = await homeserver_domain(self.client, self.registration)
            self.domain = self.domain or domain
            self._registrar = PuppetRegistrar(
                self.client, self.store, self.registration, self.domain
            )
            await self._listen()
            if self.registration.url is None:
                log.warning("the registration's url is null: the homeserver will send us nothing")
            elif self.ping:
                await ping_homeserver(self.client, self.registration)
        except BaseException:
            await self.stop()
            raise
        self._started_at = time.monotonic()
        if self.preregister is not None:
            self._preregister_task = asyncio.create_task(
                self._run_preregistration(self.preregister)
            )
            self._preregister_task.add_done_callback(_log_preregistration_failure)

    async def stop(self) -> None:
        """Stop accepting, finish in-flight transactions, flush and close. Safe to call twice."""
        if self._preregister_task is not None:
            self.puppets.cancel()
            # Its failure, if any, was logged when it happened.
            await asyncio.gather(self._preregister_task, return_exceptions=True)
            self._preregister_task = None
        if self._runner is not None:
            # cleanup() stops the listener first, then waits for handlers in flight.
            await self._runner.cleanup()
            self._runner = None
        await self.client.close()
        await self.store.close()

    async def _listen(self) -> None:
        app = create_app(
            hs_token=self.registration.hs_token,
            store=self.store,
            on_transaction=self._dispatch,
            on_user_query=self._answer_user_query,
            on_alias_query=self._answer_alias_query,
            thirdparty=self.thirdparty,
            max_body_bytes=self.max_body_bytes,
            metrics=self.metrics,
            health=self._health,
        )
        self._runner = await serve_app(app, self.host, self.port)
        log.info("listening on http://%s:%d", self.host, self.port)

    async def _run_preregistration(self, path: Path) -> BulkResult:
        log.info("pre-registering the puppets listed in %s", path)
        with path.open(encoding="utf-8") as lines:
            result = await self.puppets.register_many(
                localparts_from_lines(lines), concurrency=self.concurrency, progress=_ProgressLog()
            )
        log.info("pre-registration finished: %s", result.summary())
        return result

    # -- what the routes call --------------------------------------------------

    async def _dispatch(self, transaction: Transaction) -> None:
        for event in transaction.events:
            for handler in self._handlers_for(self._handlers, event.type):
                await handler(event)
        for event in transaction.ephemeral:
            for handler in self._handlers_for(self._ephemeral_handlers, event.type):
                await handler(event)

    @staticmethod
    def _handlers_for(
        table: dict[str | None, list[EventHandler]], event_type: str
    ) -> Iterable[EventHandler]:
        yield from table.get(event_type, ())
        yield from table.get(None, ())

    async def _answer_user_query(self, user_id: str) -> bool:
        localpart = self._provisionable_localpart(user_id)
        if localpart is None:
            return False
        if self._user_query is not None:
            if not await self._user_query(user_id):
                return False
        elif not self.provision_on_query:
            return False
        try:
            await self.puppets.ensure_registered(localpart)
        except BridgeKitError as exc:
            # The homeserver asked, so it must get an answer; "no such user" is the true one.
            log.warning("could not provision %s on query: %s", user_id, exc)
            return False
        return True

    def _provisionable_localpart(self, user_id: str) -> str | None:
        try:
            localpart, domain = split_user_id(user_id)
        except ValueError:
            return None
        if domain != self.puppets.domain or localpart_problem(localpart, domain):
            return None
        if not self.registration.is_user_in_namespace(user_id, exclusive_only=True):
            return None
        return localpart

    async def _answer_alias_query(self, alias: str) -> bool:
        if self._alias_query is None:
            return False
        if not self.registration.is_alias_in_namespace(alias):
            return False
        return await self._alias_query(alias)

    def _health(self) -> dict[str, Any]:
        started = self._started_at
        return {
            "status": "ok" if started is not None else "starting",
            "appservice_id": self.registration.id,
            "user_id": self.bot.user_id if self._registrar else None,
            "uptime_seconds": round(time.monotonic() - started, 1) if started else 0,
        }


def _log_preregistration_failure(task: asyncio.Task[BulkResult]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        expected = isinstance(error, BridgeKitError | OSError)
        log.error("pre-registration failed: %s", error, exc_info=None if expected else error)


class _ProgressLog:
    """Log pre-registration progress at most every ``interval`` seconds."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last = time.monotonic()

    def __call__(self, progress: BulkProgress) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log.info("pre-registration: %s", plain_line(progress))
