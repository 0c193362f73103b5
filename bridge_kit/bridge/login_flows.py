"""Logging in step by step: the flows a connector offers and the processes they start.

The same process serves the provisioning API (``/v3/login/start/{flowID}`` and
the ``/v3/login/step/...`` calls, in the shape of mautrix-go's bridgev2) and the
management room's ``login`` command. A connector that offers flows lists them
(:class:`LoginFlow`) and starts a :class:`LoginProcess` for one; the process
answers each submission with the next :class:`LoginStep`, until a step of type
``complete`` carries what the layer stores (the connector's ``LoginInfo``).

:class:`LoginSessions` keeps the processes under way, each with its owner and
its expected step, so that a client can only submit the step it was shown, and
an abandoned process is cancelled after :attr:`LoginSessions.idle_timeout`.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override

from bridge_kit.errors import InvalidInput, UnknownLogin, WrongLoginStep
from bridge_kit.types import converter

__all__ = [
    "CookieField",
    "CookiesParams",
    "DisplayParams",
    "DisplayType",
    "FieldType",
    "InputField",
    "LoginFlow",
    "LoginProcess",
    "LoginSessions",
    "LoginStep",
    "OffersLoginFlows",
    "StepType",
    "login_with_args",
]

log = logging.getLogger(__name__)

Info = TypeVar("Info")


class StepType(enum.Enum):
    """What the client does with a step (the provisioning API's ``type``)."""

    USER_INPUT = "user_input"
    COOKIES = "cookies"
    DISPLAY_AND_WAIT = "display_and_wait"
    COMPLETE = "complete"


class FieldType(enum.Enum):
    """How a client shows a :class:`InputField` (bridgev2's field types)."""

    USERNAME = "username"
    PHONE_NUMBER = "phone_number"
    EMAIL = "email"
    PASSWORD = "password"  # noqa: S105 - a field type, not a secret
    TWO_FACTOR_CODE = "2fa_code"
    TOKEN = "token"  # noqa: S105 - a field type, not a secret
    URL = "url"
    DOMAIN = "domain"
    SELECT = "select"


class DisplayType(enum.Enum):
    """What a ``display_and_wait`` step shows while the process waits."""

    QR = "qr"
    EMOJI = "emoji"
    CODE = "code"
    NOTHING = "nothing"


@attrs.frozen
class LoginFlow:
    """One way to log in, as ``GET /v3/login/flows`` lists it."""

    id: str
    name: str
    description: str


@attrs.frozen
class InputField:
    """A value the user types. ``optional`` fields may be left empty (the
    management room's ``login`` takes them as trailing arguments)."""

    type: FieldType
    id: str
    name: str
    description: str = ""
    default_value: str | None = None
    pattern: str | None = None
    options: tuple[str, ...] = ()
    optional: bool = False


@attrs.frozen
class CookieField:
    """A cookie (or other stored value) the client extracts from a web login."""

    type: str
    name: str
    cookie_domain: str | None = None
    request_url_regex: str | None = None


@attrs.frozen
class CookiesParams:
    url: str
    fields: tuple[CookieField, ...]
    user_agent: str | None = None
    wait_for_url_pattern: str | None = None


@attrs.frozen
class DisplayParams:
    type: DisplayType
    data: str | None = None
    image_url: str | None = None


@attrs.frozen
class LoginStep(Generic[Info]):
    """One step of a login process; build it with the class methods.

    ``step_id`` names the step for clients (``"org.example.password"``);
    ``info`` is set on a ``complete`` step only: the connector's login (its
    ``LoginInfo``), which the layer stores and connects.
    """

    type: StepType
    step_id: str
    instructions: str = ""
    fields: tuple[InputField, ...] = ()
    cookies: CookiesParams | None = None
    display: DisplayParams | None = None
    info: Info | None = None
    #: On a ``complete`` step returned by :class:`LoginSessions`: the stored login's id.
    login_id: str | None = None
    #: Set by :class:`LoginSessions`: submitting again with this id returns the step
    #: after it once more, instead of failing (a client's safe retry).
    txn_id: str = ""

    @classmethod
    def user_input(
        cls, step_id: str, fields: Sequence[InputField], instructions: str = ""
    ) -> LoginStep[Any]:
        if not fields:
            raise ValueError("a user_input step needs at least one field")
        return LoginStep(StepType.USER_INPUT, step_id, instructions, fields=tuple(fields))

    @classmethod
    def cookies_step(
        cls, step_id: str, params: CookiesParams, instructions: str = ""
    ) -> LoginStep[Any]:
        return LoginStep(StepType.COOKIES, step_id, instructions, cookies=params)

    @classmethod
    def display_and_wait(
        cls, step_id: str, params: DisplayParams, instructions: str = ""
    ) -> LoginStep[Any]:
        return LoginStep(StepType.DISPLAY_AND_WAIT, step_id, instructions, display=params)

    @classmethod
    def complete(cls, step_id: str, info: Info, instructions: str = "") -> LoginStep[Info]:
        return LoginStep(StepType.COMPLETE, step_id, instructions, info=info)


class LoginProcess(abc.ABC, Generic[Info]):
    """One user's login under way, started by the connector for one flow.

    :meth:`start` returns the first step; each submission returns the next one.
    A method for a step type the process never shows may stay unimplemented.
    Raise :class:`~bridge_kit.errors.InvalidInput` with a one-line message for
    input that will not do: the login fails and the user sees the message.
    """

    @abc.abstractmethod
    async def start(self) -> LoginStep[Info]:
        """The first step."""

    async def submit_user_input(self, values: Mapping[str, str]) -> LoginStep[Info]:
        raise InvalidInput("this login takes no typed input")

    async def submit_cookies(self, values: Mapping[str, str]) -> LoginStep[Info]:
        raise InvalidInput("this login takes no cookies")

    async def wait(self) -> LoginStep[Info]:
        """The next step after a ``display_and_wait`` one (e.g. once a QR code was scanned)."""
        raise InvalidInput("this login has nothing to wait for")

    async def cancel(self) -> None:
        """The user gave up, or the process timed out: release what it holds."""
        return None


@runtime_checkable
class OffersLoginFlows(Protocol[Info]):
    """A connector that logs users in step by step (bridgev2's ``GetLoginFlows`` and
    ``CreateLogin``): the provisioning API and the ``login`` command drive it."""

    def login_flows(self) -> Sequence[LoginFlow]:
        """The flows, the preferred first."""
        ...

    async def create_login(self, user_id: str, flow_id: str) -> LoginProcess[Info] | None:
        """A new process of ``flow_id`` for ``user_id``; ``None`` for an unknown flow."""
        ...


@attrs.define
class _Session(Generic[Info]):
    id: str
    user_id: str
    flow_id: str
    process: LoginProcess[Info]
    step: LoginStep[Info]
    relogin: str | None
    management_room: str | None
    touched: float
    previous: LoginStep[Info] | None = None
    lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)


#: ``finish(user_id, info, relogin, management_room)``: store and connect the finished
#: login (replacing ``relogin``; telling its states in ``management_room``); its id.
Finish = Callable[[str, Info, str | None, str | None], Awaitable[str]]
#: ``create(user_id, flow_id)``: a new process for the flow, or ``None`` if the
#: flow is unknown.
Create = Callable[[str, str], Awaitable["LoginProcess[Info] | None"]]


class LoginSessions(Generic[Info]):
    """The login processes under way, by the id the client gets (``login_id``).

    ``create`` starts a connector's process, ``finish`` turns a completed one
    into a stored, connecting login and returns the login's id (the layer's
    ``add_login``). A step that takes more than ``step_timeout`` seconds (a
    ``display_and_wait`` nobody completes) ends its process; one untouched for
    ``idle_timeout`` seconds is
    cancelled; at most ``per_user`` run at once for one user (the oldest is
    cancelled), so a client looping on ``start`` holds no unbounded memory.
    """

    def __init__(
        self,
        create: Create[Info],
        finish: Finish[Info],
        *,
        idle_timeout: float = 600.0,
        step_timeout: float = 300.0,
        per_user: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._create = create
        self._finish = finish
        self.idle_timeout = idle_timeout
        self.step_timeout = step_timeout
        """Seconds one step may take (a QR code never scanned): then the process ends."""
        self.per_user = per_user
        self._clock = clock
        self._sessions: dict[str, _Session[Info]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    async def start(
        self,
        user_id: str,
        flow_id: str,
        relogin: str | None = None,
        *,
        management_room: str | None = None,
    ) -> tuple[str, LoginStep[Info]]:
        """Start ``flow_id`` for ``user_id``: the process id and its first step.

        ``relogin``: the id of a login this one replaces; ``management_room``:
        where the finished login's state changes are told.

        Raises :class:`~bridge_kit.errors.UnknownLogin` for an unknown flow.
        """
        await self._expire()
        process = await self._create(user_id, flow_id)
        if process is None:
            raise UnknownLogin(f"no login flow {flow_id!r}")
        await self._make_room_for(user_id)
        session = _Session(
            id=secrets.token_urlsafe(16),
            user_id=user_id,
            flow_id=flow_id,
            process=process,
            step=LoginStep(StepType.USER_INPUT, "", fields=()),
            relogin=relogin,
            management_room=management_room,
            touched=self._clock(),
        )
        self._sessions[session.id] = session
        async with session.lock:
            step = await self._advance(session, process.start())
        return session.id, step

    async def submit(
        self,
        user_id: str,
        process_id: str,
        step_id: str,
        step_type: StepType,
        values: Mapping[str, str] | None = None,
        txn_id: str = "",
    ) -> LoginStep[Info]:
        """Submit ``values`` (or nothing, to wait) to the step the process is at.

        Raises :class:`~bridge_kit.errors.UnknownLogin` for a process that is
        not this user's (or no longer exists),
        :class:`~bridge_kit.errors.WrongLoginStep` when ``step_id`` or
        ``step_type`` is not the current step's, and
        :class:`~bridge_kit.errors.InvalidInput` when the connector refuses the
        input (the process is then over).
        """
        session = self._owned(user_id, process_id)
        async with session.lock:
            if self._sessions.get(process_id) is not session:
                raise _process_not_found()
            current, previous = session.step, session.previous
            if txn_id and previous is not None and previous.txn_id == txn_id:
                return current  # the client did not get our answer: the same again
            if current.step_id != step_id or current.type is not step_type:
                raise WrongLoginStep(
                    f"the login is at step {current.step_id!r} ({current.type.value}), "
                    f"not {step_id!r} ({step_type.value})"
                )
            session.touched = self._clock()
            return await self._advance(session, self._submission(session, values or {}))

    def current(self, user_id: str, process_id: str) -> LoginStep[Info]:
        """The step a process is at (for the management room's next prompt)."""
        return self._owned(user_id, process_id).step

    def of_user(self, user_id: str) -> list[str]:
        """The ids of ``user_id``'s processes under way, oldest first."""
        return [s.id for s in self._sessions.values() if s.user_id == user_id]

    async def cancel(self, user_id: str, process_id: str) -> None:
        """Cancel a process of ``user_id``; :class:`~bridge_kit.errors.UnknownLogin`
        if there is none."""
        session = self._owned(user_id, process_id)
        await self._drop(session)

    async def close(self) -> None:
        """Cancel every process (the bridge stops)."""
        for session in list(self._sessions.values()):
            await self._drop(session)

    # -- inside --------------------------------------------------------------

    def _owned(self, user_id: str, process_id: str) -> _Session[Info]:
        session = self._sessions.get(process_id)
        # Another user's process id is answered as unknown: ids are no secret in logs.
        if session is None or session.user_id != user_id or self._expired(session):
            raise _process_not_found()
        return session

    def _submission(
        self, session: _Session[Info], values: Mapping[str, str]
    ) -> Awaitable[LoginStep[Info]]:
        process, step = session.process, session.step
        if step.type is StepType.USER_INPUT:
            _check_fields(step.fields, values)
            return process.submit_user_input(values)
        if step.type is StepType.COOKIES:
            return process.submit_cookies(values)
        return process.wait()

    async def _advance(
        self, session: _Session[Info], next_step: Awaitable[LoginStep[Info]]
    ) -> LoginStep[Info]:
        """Await the process's next step; a failure or a completion ends the session."""
        try:
            try:
                step = await asyncio.wait_for(next_step, self.step_timeout)
            except TimeoutError:
                raise UnknownLogin("Login process timed out") from None
            if step.type is StepType.COMPLETE:
                if step.info is None:
                    raise ValueError("a complete login step needs the login's info")
                login_id = await self._finish(
                    session.user_id, step.info, session.relogin, session.management_room
                )
                self._sessions.pop(session.id, None)
                return attrs.evolve(step, login_id=login_id)
        except BaseException:
            await self._drop(session)
            raise
        step = attrs.evolve(step, txn_id=secrets.token_urlsafe(12))
        session.previous, session.step = session.step, step
        return step

    async def _drop(self, session: _Session[Info]) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        try:
            await session.process.cancel()
        except Exception:
            # Cancelling is best effort: the session is gone for the client either way.
            log.exception("cancelling login process %s (%s) failed", session.id, session.flow_id)

    def _expired(self, session: _Session[Info]) -> bool:
        return self._clock() - session.touched > self.idle_timeout

    async def _expire(self) -> None:
        for session in [s for s in self._sessions.values() if self._expired(s)]:
            await self._drop(session)

    async def _make_room_for(self, user_id: str) -> None:
        mine = [s for s in self._sessions.values() if s.user_id == user_id]
        for session in mine[: max(0, len(mine) - self.per_user + 1)]:
            await self._drop(session)


async def login_with_args(
    sessions: LoginSessions[Info],
    user_id: str,
    flow_id: str,
    args: Sequence[str],
    *,
    management_room: str | None = None,
) -> LoginStep[Info]:
    """Drive a flow from a command's arguments (the management room's ``login``).

    Each ``user_input`` step takes the next arguments, one per field in order
    (optional fields may be left out at the end). Returns the step where the
    arguments ran out: ``complete``, or a step the command cannot fill
    (``display_and_wait``, ``cookies``, or more fields), whose process is then
    cancelled. :class:`~bridge_kit.errors.InvalidInput` says what was wrong.
    """
    process_id, step = await sessions.start(user_id, flow_id, management_room=management_room)
    remaining = list(args)
    while step.type is StepType.USER_INPUT:
        required = [f for f in step.fields if not f.optional]
        if len(remaining) < len(required):
            await sessions.cancel(user_id, process_id)
            names = ", ".join(f.name for f in required[len(remaining) :])
            raise InvalidInput(f"missing {names}")
        values = dict(zip((f.id for f in step.fields), remaining, strict=False))
        remaining = remaining[len(values) :]
        step = await sessions.submit(user_id, process_id, step.step_id, step.type, values)
    if step.type is not StepType.COMPLETE:
        await sessions.cancel(user_id, process_id)
    return step


def _process_not_found() -> UnknownLogin:
    return UnknownLogin("Login not found")


def _check_fields(fields: Sequence[InputField], values: Mapping[str, str]) -> None:
    """The values must be strings, and every field that is not optional must have one."""
    for key, value in values.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInput("every submitted value must be a string")
    missing = [f.id for f in fields if not f.optional and not values.get(f.id)]
    if missing:
        raise InvalidInput(f"missing value for {', '.join(missing)}")


def configure_converter(conv: cattrs.Converter) -> None:
    """Wire shapes of the steps and flows: empty optional parts are left out."""
    for cls in (LoginFlow, CookieField, CookiesParams, DisplayParams):
        conv.register_unstructure_hook(
            cls, make_dict_unstructure_fn(cls, conv, _cattrs_omit_if_default=True)
        )
    # ``optional`` is ours (the management room's trailing arguments), not the wire's.
    conv.register_unstructure_hook(
        InputField,
        make_dict_unstructure_fn(
            InputField, conv, _cattrs_omit_if_default=True, optional=override(omit=True)
        ),
    )


configure_converter(converter)
