"""Running an app until it is told to stop: signals and exit codes, in one place.

:func:`run_app` does for an :class:`~bridge_kit.AppService` what
``aiohttp.web.run_app`` does for a web application::

    async def build() -> AppService:
        app = AppService(Config.load("config.yaml"))
        ...  # handlers
        return app

    raise SystemExit(run_app(build()))

Like aiohttp's app factories, the app may be given as an awaitable that builds
it, so that a bad config or a missing registration file is reported like a
failed start, rather than as a traceback from the script's first lines. It
starts the app, serves until the first SIGTERM or SIGINT, then stops it
cleanly. A signal during start-up cancels the start. A second signal exits at
once. Like ``bridge-kit run``, it logs as the config's ``logging`` section says
(unless the script configured logging itself), and a
:class:`~bridge_kit.errors.BridgeKitError` (store locked, port taken,
homeserver unreachable...) becomes one ``error:`` line on stderr and exit
status 2 rather than a traceback. The same function runs a one-off job,
``async (stop) -> int``, which decides itself what a stop request means
(``bridge-kit register`` saves its progress and returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

from bridge_kit.app.service import AppService
from bridge_kit.errors import BridgeKitError, RegistrationError
from bridge_kit.logs import configure_logging

__all__ = ["ExitCode", "StopSignals", "report_error", "run_app"]

log = logging.getLogger(__name__)

_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


class ExitCode(enum.IntEnum):
    """The exit status of every ``bridge-kit`` command (and of :func:`run_app`)."""

    #: Done: everything worked (a daemon stopped by a signal also exits 0).
    OK = 0
    #: The command ran but found problems: an invalid registration, puppets refused
    #: or invalid, a bulk run aborted midway.
    FAILED = 1
    #: The command could not run: wrong arguments, or a bad config, registration
    #: file or store, or a homeserver that is unreachable or has not loaded us.
    SETUP = 2
    #: A one-off job (``register``) cancelled by SIGINT or SIGTERM: 128 + the signal.
    SIGINT = 128 + signal.SIGINT
    SIGTERM = 128 + signal.SIGTERM
    #: A command whose reader closed the pipe (``| head``): 128 + SIGPIPE, as a
    #: command killed by SIGPIPE would give.
    SIGPIPE = 128 + signal.SIGPIPE


class StopSignals:
    """SIGTERM/SIGINT as a stop request: the first asks politely, a second exits at once.

    Use as a context manager inside a running event loop. ``received`` is the
    first signal's number (``None`` until one came); ``wait()`` returns when it
    comes; ``on_stop(callback)`` runs ``callback()`` then.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._event = asyncio.Event()
        self._callbacks: list[Callable[[], object]] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Install the handlers for the duration of the block."""
        loop = asyncio.get_running_loop()
        for signum in _SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            yield self
        finally:
            for signum in _SIGNALS:
                loop.remove_signal_handler(signum)

    def on_stop(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` on the first signal (at once if it already came)."""
        if self.received is not None:
            callback()
        else:
            self._callbacks.append(callback)

    async def wait(self) -> int:
        """Wait for the first signal; return its number."""
        await self._event.wait()
        assert self.received is not None
        return self.received

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Act as if ``signum`` arrived (for an app that decides itself to stop)."""
        self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            # The operator asked twice: whatever is still running is not worth waiting for.
            print(f"\n{name} again: exiting at once", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        log.info("%s received: stopping (send it again to exit at once)", name)
        self._event.set()
        for callback in self._callbacks:
            callback()


Job = Callable[[StopSignals], Awaitable[int]]


def run_app(app: AppService | Awaitable[AppService] | Job) -> int:
    """Run ``app`` in a new event loop until it is done; return the exit status.

    An :class:`~bridge_kit.AppService`, or an awaitable that builds one (an app
    factory's coroutine, as ``aiohttp.web.run_app`` takes), is started, served
    until SIGTERM or SIGINT, and stopped (exit status 0); its logs go to stderr
    as its config's ``logging`` section says, unless the root logger already
    has a handler. A job ``async (stop) -> int`` runs to its end and its return
    value is the status. A :class:`~bridge_kit.errors.BridgeKitError`, from the
    factory too, is reported on stderr (:func:`report_error`) and gives
    :attr:`ExitCode.SETUP`; other errors propagate, as from :func:`asyncio.run`.
    """
    try:
        return asyncio.run(_built_and_served(app))
    except BridgeKitError as exc:
        report_error(exc)
        return ExitCode.SETUP


async def _built_and_served(app: AppService | Awaitable[AppService] | Job) -> int:
    if inspect.isawaitable(app):
        app = await app
    if isinstance(app, AppService) and not logging.getLogger().handlers:
        configure_logging(app.config.logging.level, app.config.logging.format)
    return await serve(app)


def report_error(exc: BridgeKitError) -> None:
    """Say on stderr, one ``error:`` line per problem, why a command or app could not run."""
    if isinstance(exc, RegistrationError):
        where = f"{exc.source}: " if exc.source else ""
        for problem in exc.problems:
            print(f"error: {where}{problem}", file=sys.stderr)
    else:
        print(f"error: {exc}", file=sys.stderr)


async def serve(app: AppService | Job) -> int:
    """:func:`run_app` inside a running event loop."""
    stop = StopSignals()
    with stop.installed():
        if isinstance(app, AppService):
            return await _serve_app(app, stop)
        return await app(stop)


async def _serve_app(app: AppService, stop: StopSignals) -> int:
    return await serve_until_stopped(
        app.start,
        app.stop,
        stop,
        lambda: log.info("%s is ready as %s", app.registration.id, app.bot.user_id),
    )


async def serve_until_stopped(
    start: Callable[[], Awaitable[object]],
    finish: Callable[[], Awaitable[object]],
    stop: StopSignals,
    ready: Callable[[], None],
) -> int:
    """Start, say ``ready``, serve until ``stop`` fires, then ``finish``: the daemon's
    life, for an :class:`AppService` or anything built on one (a bridge)."""
    started = asyncio.ensure_future(start())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({started, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not started.done():
        # Stopped while starting (e.g. the homeserver does not answer): cancelling
        # the start unwinds whatever it had opened.
        started.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await started
        return ExitCode.OK
    started.result()  # a failed start raises here
    try:
        ready()
        await stop.wait()
        log.info("stopping: finishing in-flight work and flushing the store")
    finally:
        await finish()
    return ExitCode.OK
