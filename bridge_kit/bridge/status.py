"""Bridge state: where the bridge and each login stand, in bridgev2's JSON shape.

A :class:`BridgeState` is what mautrix-go's bridges post to their status
endpoint (``bridgev2/status``): ``state_event``, a ``timestamp`` in Unix
seconds, a ``ttl``, and for a login its ``user_id``, ``remote_id`` and
``remote_name``. :class:`StatusReporter` keeps the bridge's own state
(``STARTING``, ``RUNNING``, ``BRIDGE_UNREACHABLE``) and each login's; on a
change it updates the metrics (how many logins are in each state), tells the
bridge's listeners (the management-room notice) and posts the state to the
optional ``bridge.status_endpoint``, retrying with backoff, newest first: a
state not yet delivered is replaced by a newer one for the same login.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override
from prometheus_client import Gauge

from bridge_kit.bridge.records import LoginState
from bridge_kit.metrics import Metrics
from bridge_kit.types import converter

__all__ = [
    "BRIDGE_STATES",
    "BridgeState",
    "RemoteProfile",
    "StateEvent",
    "StatusReporter",
    "describe",
]

log = logging.getLogger(__name__)

#: bridgev2's ttl: how long a receiver trusts a state (shorter for an error).
_TTL = 21600
_ERROR_TTL = 3600
_BACKOFF_FIRST, _BACKOFF_MAX = 2.0, 64.0
_POST_TIMEOUT = 30.0
#: The key of the bridge's own state among the logins' (no login id is empty).
_BRIDGE = ""


class StateEvent(enum.Enum):
    """bridgev2's state names: the bridge's own first, then a login's."""

    STARTING = "STARTING"
    UNCONFIGURED = "UNCONFIGURED"
    RUNNING = "RUNNING"
    BRIDGE_UNREACHABLE = "BRIDGE_UNREACHABLE"
    CONNECTING = "CONNECTING"
    BACKFILLING = "BACKFILLING"
    CONNECTED = "CONNECTED"
    TRANSIENT_DISCONNECT = "TRANSIENT_DISCONNECT"
    BAD_CREDENTIALS = "BAD_CREDENTIALS"
    UNKNOWN_ERROR = "UNKNOWN_ERROR"
    LOGGED_OUT = "LOGGED_OUT"

    @classmethod
    def of_login(cls, state: LoginState) -> StateEvent:
        return cls(state.value)


BRIDGE_STATES = frozenset(
    {StateEvent.STARTING, StateEvent.UNCONFIGURED, StateEvent.RUNNING}
    | {StateEvent.BRIDGE_UNREACHABLE}
)
"""The states of the bridge itself; the others are a login's."""

_ERRORS = frozenset({StateEvent.BAD_CREDENTIALS, StateEvent.UNKNOWN_ERROR})


@attrs.frozen
class RemoteProfile:
    """The logged-in account's profile on the remote network (empty parts left out)."""

    phone: str = ""
    email: str = ""
    username: str = ""
    name: str = ""
    avatar: str = ""


@attrs.frozen
class BridgeState:
    """One state, as posted to the status endpoint and shown in ``/v3/whoami``."""

    state_event: StateEvent
    timestamp: int
    ttl: int = _TTL
    source: str = "bridge"
    error: str = ""
    message: str = ""
    user_id: str = ""
    remote_id: str = ""
    remote_name: str = ""
    remote_profile: RemoteProfile = RemoteProfile()
    reason: str = ""
    info: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def now(
        cls,
        event: StateEvent,
        *,
        error: str = "",
        message: str = "",
        clock: Callable[[], float] = time.time,
        **login: Any,
    ) -> BridgeState:
        """A state stamped now; ``login`` holds ``user_id``, ``remote_id``, ``remote_name``."""
        ttl = _ERROR_TTL if error or event in _ERRORS else _TTL
        return cls(event, int(clock()), ttl, error=error, message=message, **login)

    def same_news(self, other: BridgeState) -> bool:
        """Whether ``other`` says nothing new (bridgev2 does not post such a state twice)."""
        return (self.state_event, self.error, self.message, self.remote_name, self.info) == (
            other.state_event,
            other.error,
            other.message,
            other.remote_name,
            other.info,
        )


def describe(state: BridgeState) -> str:
    """The management-room notice for a login's new state."""
    who = state.remote_name or state.remote_id
    text = f"State of your login {who}: {state.state_event.value}"
    if state.error:
        text += f" ({state.error})"
    return f"{text}: {state.message}" if state.message else text


Listener = Callable[[BridgeState], Awaitable[None]]


class StatusReporter:
    """The current state of the bridge and of each login, told to whoever needs it.

    ``endpoint`` (``bridge.status_endpoint``), when set, gets every new state
    as ``POST`` JSON with ``Authorization: Bearer <token>`` (the as_token, as
    in bridgev2). ``metrics`` gets the gauges ``bridge_state{state}`` (1 for the
    bridge's state) and ``login_states{state}`` (logins in each state).
    ``listeners`` are awaited for each new login state (not the bridge's), e.g.
    to send the management-room notice; one that fails is logged, not retried.
    """

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        token: str = "",
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        backoff: tuple[float, float] = (_BACKOFF_FIRST, _BACKOFF_MAX),
    ) -> None:
        self.endpoint = endpoint
        self.backoff = backoff
        """The first wait after a failed post, and the longest (doubling in between)."""
        self._token = token
        self._clock = clock
        self.listeners: list[Listener] = []
        self._states: dict[str, BridgeState] = {
            _BRIDGE: BridgeState.now(StateEvent.STARTING, clock=clock)
        }
        self._unsent: dict[str, BridgeState] = {}
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._gauges = _Gauges(metrics) if metrics is not None else None
        self._count()

    @property
    def bridge(self) -> BridgeState:
        """The bridge's own state."""
        return self._states[_BRIDGE]

    def login(self, login_id: str) -> BridgeState | None:
        """The last state of ``login_id``, or ``None`` if it has none (or logged out)."""
        return self._states.get(login_id) if login_id else None

    async def set_bridge(self, event: StateEvent, message: str = "") -> None:
        if event not in BRIDGE_STATES:
            raise ValueError(f"{event.value} is a login's state, not the bridge's")
        await self._update(_BRIDGE, BridgeState.now(event, message=message, clock=self._clock))

    async def set_login(
        self,
        user_id: str,
        login_id: str,
        event: StateEvent | LoginState,
        *,
        remote_name: str = "",
        error: str = "",
        message: str = "",
    ) -> None:
        """Record a login's new state; ``LOGGED_OUT`` is told, then the login forgotten."""
        if isinstance(event, LoginState):
            event = StateEvent.of_login(event)
        if event in BRIDGE_STATES or not login_id:
            raise ValueError(f"not a login's state: {event.value} for {login_id!r}")
        state = BridgeState.now(
            event,
            error=error,
            message=message,
            clock=self._clock,
            user_id=user_id,
            remote_id=login_id,
            remote_name=remote_name,
        )
        await self._update(login_id, state)
        if event is StateEvent.LOGGED_OUT:
            self._states.pop(login_id, None)
            self._count()

    async def start(self) -> None:
        """Start posting to the endpoint (nothing to do without one)."""
        if self.endpoint and self._sender is None:
            self._unsent.setdefault(_BRIDGE, self._states[_BRIDGE])  # STARTING, at first
            self._wake.set()
            self._session = aiohttp.ClientSession()
            self._sender = asyncio.create_task(self._send_loop(), name="bridge state sender")

    async def close(self) -> None:
        """Stop posting; a state not yet delivered is dropped (a receiver trusts ttl)."""
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- inside --------------------------------------------------------------

    async def _update(self, key: str, state: BridgeState) -> None:
        previous = self._states.get(key)
        if previous is not None and previous.same_news(state):
            return
        self._states[key] = state
        self._count()
        if self.endpoint:
            self._unsent[key] = state
            self._wake.set()
        if key != _BRIDGE:
            await self._tell_listeners(state)

    async def _tell_listeners(self, state: BridgeState) -> None:
        for listener in self.listeners:
            try:
                await listener(state)
            except Exception:
                log.exception("telling %s of its state failed", state.remote_id)

    def _count(self) -> None:
        if self._gauges is not None:
            self._gauges.set(self._states)

    async def _send_loop(self) -> None:
        first, longest = self.backoff
        delay = first
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._unsent:
                key, state = next(iter(self._unsent.items()))
                try:
                    delivered = await self._post(state)
                except Exception:
                    # A state that cannot even be sent (a bad info value): drop it, go on.
                    log.exception("cannot post the bridge state %s", state.state_event.value)
                    delivered = True
                if delivered:
                    # Only if no newer state for the key came while it was posted.
                    if self._unsent.get(key) is state:
                        del self._unsent[key]
                    delay = first
                    continue
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)

    async def _post(self, state: BridgeState) -> bool:
        assert self._session is not None and self.endpoint is not None
        body = converter.unstructure(state)
        if state.state_event is StateEvent.BRIDGE_UNREACHABLE:
            body["stateEvent"] = state.state_event.value  # bridgev2's legacy key for this one
        headers = {"Authorization": f"Bearer {self._token}"}
        try:
            async with self._session.post(
                self.endpoint,
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=_POST_TIMEOUT),
            ) as response:
                if 200 <= response.status < 300:
                    return True
                log.warning("the status endpoint answered %d to a bridge state", response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("cannot post the bridge state to the status endpoint: %s", exc)
        return False


class _Gauges:
    def __init__(self, metrics: Metrics) -> None:
        self.bridge = Gauge(
            "bridge_state",
            "The bridge's own state (1 for the current one)",
            ["state"],
            namespace="bridge_kit",
            registry=metrics.registry,
        )
        self.logins = Gauge(
            "login_states",
            "Logins in each state (bridgev2's state names)",
            ["state"],
            namespace="bridge_kit",
            registry=metrics.registry,
        )

    def set(self, states: dict[str, BridgeState]) -> None:
        counts = dict.fromkeys(StateEvent, 0)
        for key, state in states.items():
            if key != _BRIDGE:
                counts[state.state_event] += 1
        for event, count in counts.items():
            if event in BRIDGE_STATES:
                self.bridge.labels(event.value).set(int(states[_BRIDGE].state_event is event))
            else:
                self.logins.labels(event.value).set(count)


def configure_converter(conv: cattrs.Converter) -> None:
    """Empty optional parts are left out, as bridgev2's ``omitempty`` does."""
    conv.register_unstructure_hook(
        RemoteProfile, make_dict_unstructure_fn(RemoteProfile, conv, _cattrs_omit_if_default=True)
    )
    always = override(omit_if_default=False)  # bridgev2 always sends these two
    conv.register_unstructure_hook(
        BridgeState,
        make_dict_unstructure_fn(
            BridgeState, conv, _cattrs_omit_if_default=True, ttl=always, source=always
        ),
    )


configure_converter(converter)
