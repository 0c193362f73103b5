"""``AppService``: the registration, the store, the homeserver client, the puppet
engine and the HTTP routes, tied together with a lifecycle and handler registration.

    app = AppService(Config.load("config.yaml"))

    @app.on_event("m.room.message")
    async def on_message(event: Event) -> None: ...

    async with app:
        await app.intent("alice").send_text(room_id, "hello")

or ``run_app(app)`` (:mod:`bridge_kit.app.runner`) to serve until SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import attrs
from aiohttp import web

from bridge_kit import defaults
from bridge_kit.app.encryption import start_encryption
from bridge_kit.app.ratelimit import TokenBucket
from bridge_kit.checks.homeserver import homeserver_domain, ping_homeserver
from bridge_kit.client.homeserver import HomeserverClient, RetryPolicy
from bridge_kit.config import AppServiceConfig, Config
from bridge_kit.errors import BridgeKitError, ConfigError, LifecycleError
from bridge_kit.ids import localpart_problem, split_user_id
from bridge_kit.inbox.dead_letters import DeadLetters
from bridge_kit.inbox.handlers import (
    DeviceListHandler,
    EventHandler,
    HandlerRegistry,
    OtkCountsHandler,
    ToDeviceHandler,
)
from bridge_kit.inbox.lanes import Inbox, InboxSettings
from bridge_kit.inbox.records import ItemKind
from bridge_kit.inbox.transactions import TransactionProcessor
from bridge_kit.intent import Intent
from bridge_kit.intent.double_puppet import DoublePuppetClient
from bridge_kit.intent.state_store import STATE_TYPES, RoomStateStore
from bridge_kit.logs import LogLimiter
from bridge_kit.metrics import Metrics
from bridge_kit.puppets import BulkProgress, BulkResult, PuppetRegistrar, localparts_from_lines
from bridge_kit.puppets.progress import plain_line
from bridge_kit.registration import Registration
from bridge_kit.registration.files import secret_config_problem
from bridge_kit.server.appservice_api import (
    PROCESSOR_KEY,
    QueryHook,
    ThirdPartyHandlers,
    abort_requests,
    create_app,
    serve_app,
)
from bridge_kit.store import Store, open_store, redact_store_url
from bridge_kit.store.retention import Retention, RetentionSettings

if TYPE_CHECKING:
    from bridge_kit.crypto.bridge import BridgeEncryption

log = logging.getLogger(__name__)

_DAY = 86_400.0


class AppLifecycle(enum.Enum):
    """Where an :class:`AppService` is in its life; it runs once, in this order."""

    CREATED = 1
    STARTING = 2
    RUNNING = 3
    STOPPING = 4
    STOPPED = 5


class AppService:
    """A running appservice: serve the homeserver's pushes and act as puppets.

    Use it as an async context manager. On enter it opens (and migrates) the
    store, asks the homeserver who we are (which also proves the registration
    is loaded), starts listening, and has the homeserver ping us. On exit it
    stops accepting, lets in-flight transactions finish and flushes the store.
    """

    def __init__(
        self,
        config: Config,
        *,
        registration: Registration | None = None,
        store: Store | None = None,
        retry: RetryPolicy | None = None,
        ping: bool = True,
    ) -> None:
        """Build the app from its configuration; nothing is opened until :meth:`start`.

        ``registration`` defaults to the file ``config.registration_path`` names,
        ``store`` to the one ``config.appservice.store`` names. ``ping=False``
        skips the homeserver's start-up ping (for a homeserver that cannot reach us).
        """
        self.config = config
        self.registration = registration or Registration.load(config.registration_path)
        self.domain = config.homeserver.domain
        self.ping = ping
        self.state = AppLifecycle.CREATED
        self.thirdparty = ThirdPartyHandlers()
        self.web_apps: dict[str, Callable[[], web.Application]] = {}
        """More HTTP APIs on the appservice's listener: a path prefix -> a factory of the
        aiohttp application mounted there on start (e.g. the bridge's provisioning API)."""
        self.metrics = Metrics()
        self.store = store or open_store(config.appservice.store, sync=config.appservice.store_sync)
        # Said on start, so an operator sees which file a relative path became.
        self._store_label = (
            redact_store_url(config.appservice.store) if store is None else repr(store)
        )
        self.client = HomeserverClient(
            config.homeserver.url, self.registration.as_token, retry=retry or RetryPolicy()
        )
        self.client.observers.append(self.metrics)
        self.handlers = HandlerRegistry(LogLimiter(log, logging.DEBUG, what="events handled"))
        """Which handlers each inbox item gets (the decorators below add to it)."""
        self.inbox = Inbox(
            self.store,
            self.handlers.route,
            appservice_id=self.registration.id,
            settings=inbox_settings(config.appservice),
            metrics=self.metrics,
            event_types=self.handlers.handled_types,
        )
        self.dead_letters = DeadLetters(self.store, on_replayed=self.inbox.wake)
        self.retention = Retention(self.store, retention_settings(config))
        """Prunes dead letters and crypto records every ``appservice.retention_interval``."""
        self.room_state = RoomStateStore(self.store, lambda: self.bot)
        """Room membership, power levels and encryption from the store (``app.state``
        is taken: it is the AppService's life-cycle state)."""
        for state_type in STATE_TYPES:
            # First, so the bridge's handlers of this event see the store with it applied;
            # from the inbox, so a room's state changes in the order its events came.
            self.handlers.add_internal(ItemKind.EVENT, self.room_state.observe_event, state_type)
        """The events set aside: ``list()``, ``replay(ids)``, ``drop(ids)``."""
        self.provisioning = TokenBucket(config.puppets.provision_per_minute, 60.0)
        """The limit on puppets registered because of user queries (replaceable, e.g. in tests)."""
        self.provisioning_daily = TokenBucket(config.puppets.provision_per_day, _DAY)
        """The daily cap on those registrations (a rolling day; replaceable like the above)."""
        self._provision_approval: QueryHook | None = None
        self._refusing = False  # refused the last query: log only the first of a burst
        self._user_query: QueryHook | None = None
        self._alias_query: QueryHook | None = None
        self._registrar: PuppetRegistrar | None = None
        self._running = contextlib.AsyncExitStack()
        self._intents: OrderedDict[str, Intent] = OrderedDict()
        self._bot: Intent | None = None
        self._double_puppets: dict[str, Intent] = {}
        self._processor: TransactionProcessor | None = None  # set when listening
        self.encryption: BridgeEncryption | None = None
        """End-to-end encryption (the bot's device), when ``encryption.enabled``."""
        self._started_at: float | None = None
        self.stop_timeout = defaults.STOP_TIMEOUT
        """Seconds :meth:`stop` may take in all (see :data:`~bridge_kit.defaults.STOP_TIMEOUT`)."""

    @classmethod
    def from_config(cls, config: Config) -> AppService:
        """The same as ``AppService(config)``."""
        return cls(config)

    # -- handler registration ------------------------------------------------

    def on_event(self, event_type: str | None = None) -> Callable[[EventHandler], EventHandler]:
        """Decorate a handler for timeline events of ``event_type`` (every event if None).

        Events come from the durable inbox: one room's events one at a time, in
        order; a handler that raises is retried, and after ``handler_attempts``
        failures its event becomes a dead letter. See :mod:`bridge_kit.inbox.lanes`.
        """
        return self.handlers.decorator(ItemKind.EVENT, event_type)

    def on_ephemeral(self, event_type: str | None = None) -> Callable[[EventHandler], EventHandler]:
        """Decorate a handler for ephemeral events (typing, receipts, presence)."""
        return self.handlers.decorator(ItemKind.EPHEMERAL, event_type)

    def on_to_device(
        self, event_type: str | None = None
    ) -> Callable[[ToDeviceHandler], ToDeviceHandler]:
        """Decorate a handler for to-device events (every type if None) sent to our
        users' devices: a :class:`~bridge_kit.types.ToDeviceEvent`, in order per device."""
        return self.handlers.decorator(ItemKind.TO_DEVICE, event_type)

    def on_device_lists(self, handler: DeviceListHandler) -> DeviceListHandler:
        """Decorate a handler for device-list changes of users sharing a room with ours:
        a :class:`~bridge_kit.types.DeviceListUpdate`, in order."""
        return self.handlers.decorator(ItemKind.DEVICE_LISTS)(handler)

    def on_otk_counts(self, handler: OtkCountsHandler) -> OtkCountsHandler:
        """Decorate a handler for the one-time-key counts of our users' devices: an
        :class:`~bridge_kit.types.OtkCounts` per device, in order per device."""
        return self.handlers.decorator(ItemKind.OTK_COUNTS)(handler)

    def on_user_query(self, hook: QueryHook) -> QueryHook:
        """Decorate ``async (user_id) -> bool``: does this remote user exist?

        A yes registers the puppet. Only IDs in our exclusive user namespace
        with a valid localpart reach the hook.
        """
        self._user_query = hook
        return hook

    def on_provision_approval(self, hook: QueryHook) -> QueryHook:
        """Decorate ``async (user_id) -> bool``: may this new puppet be registered?

        Asked before provisioning on query registers a puppet the store does not
        know, after the namespace, ``on_user_query`` and the limits
        (``puppets.provision_per_minute`` and ``provision_per_day``) let it through;
        a no answers the homeserver "no such user" and costs none of the day's
        registrations (a query it refuses still counts towards the minute's). For a
        policy (an allow-list, an operator's approval), where ``on_user_query`` says
        whether the remote user exists. An error in the hook counts as a no, and is
        logged.
        """
        self._provision_approval = hook
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
            raise LifecycleError(
                f"the AppService is {self.state.name.lower()}, not running: "
                "use 'async with app:' or run_app(app)"
            )
        return self._registrar

    @property
    def bot(self) -> Intent:
        """The appservice's own user (``sender_localpart``); it needs no registration."""
        if self._bot is None:
            user_id = self.registration.sender_user_id(self.puppets.domain)
            self._bot = Intent(
                self.client,
                user_id,
                None,
                self.room_state,
                device_management=self.registration.device_management,
            )
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
            self.room_state,
            device_management=self.registration.device_management,
        )
        intent.encryption = self.encryption
        self._intents[localpart] = intent
        # A bridge may touch millions of puppets; keep only the recently used ones.
        if len(self._intents) > defaults.INTENT_CACHE_SIZE:
            self._intents.popitem(last=False)
        return intent

    def double_puppet(self, user_id: str, as_token: str) -> Intent:
        """The real user ``user_id`` acting through their own account (double puppeting).

        ``as_token`` is that of a second registration, loaded by the user's homeserver,
        whose user namespace (``exclusive: false``) holds ``user_id``. The intent logs
        in once, keeps the access token in the store (a restart reuses it: no new
        device), and logs in again once if the homeserver forgot the token. Raises
        :class:`~bridge_kit.errors.DoublePuppetError` when the login is refused.
        """
        split_user_id(user_id)  # a ValueError now rather than a 400 later
        intent = self._double_puppets.get(user_id)
        if intent is None:
            self.puppets  # noqa: B018 - raises LifecycleError unless running
            client = DoublePuppetClient(
                self.config.homeserver.url,
                as_token,
                user_id,
                self.store,
                retry=self.client.retry,
                # The stored token is sealed like the crypto state.
                sealing_secret=self.config.encryption.pickle_key or self.registration.as_token,
            )
            client.observers.append(self.metrics)
            intent = Intent(client, user_id, None, self.room_state)
            intent.encryption = self.encryption
            self._double_puppets[user_id] = intent
        return intent

    async def _close_double_puppets(self) -> None:
        intents, self._double_puppets = self._double_puppets, {}
        for intent in intents.values():
            await intent.client.close()

    # -- lifecycle -------------------------------------------------------------

    def _check_config_mode(self) -> None:
        """Refuse a config file every user may read when it holds a secret (the pickle
        key opens the stored keys and tokens); warn when its group may."""
        source = self.config.source
        for key in self.config.secrets_in_file if source is not None else ():
            problem = secret_config_problem(str(source), key)
            if problem is None:
                continue
            world, message = problem
            if world:
                raise ConfigError(message)
            log.warning("%s", message)

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
        """Open the store, check the homeserver, listen, ping, start preregistration.

        Runs once: a second call raises :class:`LifecycleError` and leaves the
        running app alone. If a step fails (or the start is cancelled), what
        the earlier steps opened is closed again, in reverse order.
        """
        if self.state is not AppLifecycle.CREATED:
            raise LifecycleError(f"cannot start an AppService that is {self.state.name.lower()}")
        self.state = AppLifecycle.STARTING
        try:
            async with contextlib.AsyncExitStack() as steps:
                await self._start_steps(steps)
                self._running = steps.pop_all()
        except BaseException:
            self.state = AppLifecycle.STOPPED
            raise
        self.state = AppLifecycle.RUNNING
        self._started_at = time.monotonic()

    async def _start_steps(self, steps: contextlib.AsyncExitStack) -> None:
        steps.push_async_callback(self.client.close)
        self._check_config_mode()
        await self.store.open()
        steps.push_async_callback(self.store.close)
        log.info("store: %s", self._store_label)
        await self.store.lock_for_daemon()
        steps.push_async_callback(self._close_double_puppets)
        domain = await homeserver_domain(self.client, self.registration)
        self.domain = self.domain or domain
        self._registrar = PuppetRegistrar(
            self.client, self.store, self.registration, self.domain, room_state=self.room_state
        )
        # Listening before the bot's device and keys change: the homeserver pushes at
        # once, and a push that finds no listener marks the appservice down, after
        # which Synapse drops every to-device message (room keys) until its next
        # retry. Items accepted meanwhile wait in the store for the inbox.
        runner = await self._listen()
        try:
            # Before the inbox: its seams decrypt the first items it handles.
            self.encryption = await start_encryption(self.config.encryption, self)
            self.bot.encryption = self.encryption
            await self.inbox.start()
        except BaseException:
            await self._listen_stopped(runner)
            raise
        # The inbox stops after the listener: events accepted until the last moment
        # are still handled (or left in the inbox).
        steps.push_async_callback(self.inbox.stop)
        self.retention.start()
        steps.push_async_callback(self.retention.stop)
        steps.push_async_callback(self._listen_stopped, runner)
        if self.registration.url is None:
            log.warning("the registration's url is null: the homeserver will send us nothing")
        elif self.ping:
            duration_ms = await ping_homeserver(self.client, self.registration)
            log.info("the homeserver reached %s in %d ms", self.registration.url, duration_ms)
        preregister = self.config.preregister_path
        if preregister is not None:
            steps.push_async_callback(self._stop_preregistration, self._preregister(preregister))

    async def stop(self, deadline: float | None = None) -> None:
        """Stop accepting, finish in-flight transactions, flush and close.

        Every step runs even if an earlier one fails (the first failure is
        raised at the end). Safe to call twice, and on an app never started.
        The whole stop takes at most ``deadline`` seconds (default
        :attr:`stop_timeout`): past it, each step still running is cancelled.
        Requests to the homeserver are no longer retried once stopping began.
        """
        if self.state is AppLifecycle.STARTING:
            raise LifecycleError("the AppService is still starting; cancel the start instead")
        if self.state is not AppLifecycle.RUNNING:
            self.state = AppLifecycle.STOPPED
            return
        self.state = AppLifecycle.STOPPING
        # A retry's wait (a 429 may ask for minutes) is not worth holding the stop for.
        self.client.abort_retries()
        for intent in self._double_puppets.values():
            intent.client.abort_retries()
        try:
            await finish_within(
                self._running.aclose(), self.stop_timeout if deadline is None else deadline
            )
        finally:
            self.state = AppLifecycle.STOPPED

    async def _listen(self) -> web.AppRunner:
        section = self.config.appservice
        app = create_app(
            hs_token=self.registration.hs_token,
            store=self.store,
            on_accepted=self.inbox.wake,
            on_user_query=self._answer_user_query,
            on_alias_query=self._answer_alias_query,
            thirdparty=self.thirdparty,
            max_body_bytes=section.max_body_bytes,
            metrics=self.metrics,
            health=self._health,
            prune_keep=section.dedup_keep,
            prune_max_age=section.dedup_max_age,
        )
        self._processor = app[PROCESSOR_KEY]
        for prefix, make_app in self.web_apps.items():
            app.add_subapp(prefix, make_app())
        runner = await serve_app(app, section.host, section.port)
        log.info("listening on http://%s:%d", section.host, section.port)
        return runner

    @staticmethod
    async def _listen_stopped(runner: web.AppRunner) -> None:
        # cleanup() stops the listener first, then waits for handlers in flight.
        cleanup = asyncio.ensure_future(runner.cleanup())
        try:
            await asyncio.shield(cleanup)
        except asyncio.CancelledError:
            # The stop is past its deadline: end the requests still being handled,
            # so that the cleanup (shielded, still running) finishes now.
            abort_requests(runner.app)
            await asyncio.wait({cleanup}, timeout=1.0)
            raise

    def _preregister(self, path: Path) -> asyncio.Task[BulkResult]:
        task = asyncio.create_task(self._run_preregistration(path))
        task.add_done_callback(_log_preregistration_failure)
        return task

    async def _stop_preregistration(self, task: asyncio.Task[BulkResult]) -> None:
        self.puppets.cancel()
        # Its failure, if any, was logged when it happened.
        await asyncio.gather(task, return_exceptions=True)

    async def _run_preregistration(self, path: Path) -> BulkResult:
        log.info("pre-registering the puppets listed in %s", path)
        with path.open(encoding="utf-8") as lines:
            result = await self.puppets.register_many(
                localparts_from_lines(lines),
                concurrency=self.config.puppets.concurrency,
                progress=_ProgressLog(),
            )
        log.info("pre-registration finished: %s", result.summary())
        return result

    # -- what the routes call --------------------------------------------------

    async def _answer_user_query(self, user_id: str) -> bool:
        localpart = self._provisionable_localpart(user_id)
        if localpart is None:
            return False
        if self._user_query is not None:
            if not await self._user_query(user_id):
                return False
        elif not self.config.puppets.provision_on_query:
            return False
        if not await self._may_provision(user_id):
            return False
        try:
            await self.puppets.ensure_registered(localpart)
        except BridgeKitError as exc:
            # The homeserver asked, so it must get an answer; "no such user" is the true one.
            log.warning("could not provision %s on query: %s", user_id, exc)
            return False
        return True

    async def _may_provision(self, user_id: str) -> bool:
        """Take a token for a new registration, then ask the approval hook; a puppet
        the store knows costs none.

        The limits hold whether or not a hook said yes: anyone on the homeserver
        can make it ask about any ID in our namespace, by inviting it. The
        per-minute limit comes before the approval hook, so that a flood of queries
        never reaches it; the daily cap counts only the puppets the hook let
        through, so that queries it refuses cannot use up the day's registrations.
        """
        if await self.store.is_registered(user_id):
            return True
        limit = self._provision_limit_reached()
        if limit is None:
            self._refusing = False
            if not await self._approved(user_id):
                return False
            if self.provisioning_daily.try_take():
                return True
            limit = self._daily_limit()  # taken meanwhile by queries approved concurrently
        self._refuse_provisioning(user_id, limit)
        return False

    def _provision_limit_reached(self) -> str | None:
        """Which limit refuses one more registration now (None: neither; a token of
        the per-minute limit taken, the daily one only looked at)."""
        if self.provisioning_daily.available < 1:
            return self._daily_limit()
        if not self.provisioning.try_take():
            return f"puppets.provision_per_minute ({self.config.puppets.provision_per_minute})"
        return None

    def _daily_limit(self) -> str:
        return f"puppets.provision_per_day ({self.config.puppets.provision_per_day})"

    def _refuse_provisioning(self, user_id: str, limit: str) -> None:
        self.metrics.count_provisioning_refused()
        if not self._refusing:
            self._refusing = True
            log.warning(
                "provisioning on query refused for %s and what follows: more new puppets "
                "were asked for than %s allows",
                user_id,
                limit,
            )

    async def _approved(self, user_id: str) -> bool:
        if self._provision_approval is None:
            return True
        try:
            return await self._provision_approval(user_id)
        except Exception:
            # The homeserver asked and must get an answer; "no such user" is the safe one.
            log.exception("the on_provision_approval hook failed for %s: refused", user_id)
            return False

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
            "status": "ok" if self.state is AppLifecycle.RUNNING else self.state.name.lower(),
            "appservice_id": self.registration.id,
            "user_id": self.bot.user_id if self._registrar else None,
            "uptime_seconds": round(time.monotonic() - started, 1) if started else 0,
            "inbox_events": self.inbox.stats.depth,
            "dead_letters": self.inbox.stats.dead_letters,
            "parked_events": self.inbox.parked_events,
            **self._refusal_health(),
        }

    def _refusal_health(self) -> dict[str, Any]:
        """Transactions refused with 413: the homeserver is stuck resending the last."""
        processor = self._processor
        last = None if processor is None else processor.last_refusal
        return {
            "refused_transactions": 0 if processor is None else processor.refusals,
            "last_refused": None if last is None else attrs.asdict(last),
        }


def inbox_settings(section: AppServiceConfig) -> InboxSettings:
    """The inbox's settings from the config's ``appservice`` section."""
    return InboxSettings(
        concurrency=section.handler_concurrency,
        attempts=section.handler_attempts,
        backoff=section.retry_backoff,
        backoff_max=section.retry_backoff_max,
        timeout=section.handler_timeout,
        lease=section.lane_lease,
    )


def retention_settings(config: Config) -> RetentionSettings:
    """Retention's settings from the config's ``appservice`` and ``encryption`` sections."""
    section, encryption = config.appservice, config.encryption
    return RetentionSettings(
        interval=section.retention_interval,
        dead_letters_keep=section.dead_letters_keep,
        dead_letters_max_age=section.dead_letters_max_age,
        replay_records_max_age=encryption.replay_records_max_age,
        sealed_payloads_max_age=encryption.sealed_payloads_max_age,
    )


#: After the deadline, how long each remaining step of a stop gets before it is cancelled.
_CANCEL_STEP = 0.1
#: And how many such cancellations there are at most (a step may refuse them).
_CANCEL_ROUNDS = 50


async def finish_within(closing: Coroutine[Any, Any, None], seconds: float) -> None:
    """Await ``closing`` for at most about ``seconds``; then cancel it again and again.

    One cancellation would only end the step it is in: an exit stack goes on to
    the next steps, and those may wait too. Each is cancelled in turn after
    :data:`_CANCEL_STEP`, so every step still runs (the store is closed, the
    client too) and the whole ends soon. A failing step's error is raised.
    """
    task = asyncio.ensure_future(closing)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if not done:
            log.error(
                "stopping took more than %g s; cancelling what is still running "
                "(events not yet handled stay in the inbox)",
                seconds,
            )
        for _ in range(_CANCEL_ROUNDS):
            if task.done():
                break
            task.cancel()
            await asyncio.wait({task}, timeout=_CANCEL_STEP)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task.done() and not task.cancelled():
        task.result()


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
