"""Whether the homeserver still reaches the bridge: ``BRIDGE_UNREACHABLE`` and back.

A bridge that started fine can stop receiving anything later: its address
changed behind a proxy, a firewall rule, a homeserver that gave up retrying.
Nothing fails on the bridge's side, so nothing would say so. Every
``bridge.ping_interval`` seconds a :class:`ReachabilityWatch` asks the
homeserver to ping the appservice (``POST /_matrix/client/v1/appservice/{id}/ping``,
spec v1.7): a failed ping makes the bridge's state ``BRIDGE_UNREACHABLE`` with
the homeserver's reason, the next good one makes it ``RUNNING`` again. A bridge
that cannot reach the homeserver at all is ``BRIDGE_UNREACHABLE`` too: the
homeserver's events do not reach its users either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from bridge_kit.bridge.status import StateEvent, StatusReporter
from bridge_kit.client.homeserver import HomeserverClient
from bridge_kit.errors import HomeserverUnreachable, LimitExceeded, MatrixRequestError

log = logging.getLogger(__name__)


class ReachabilityWatch:
    """Has the homeserver ping the appservice every ``interval`` seconds and keeps
    the bridge's state in ``status`` in step: ``BRIDGE_UNREACHABLE`` after a failed
    ping, ``RUNNING`` after a good one that follows it.

    Only a bridge that is ``RUNNING`` (or was made unreachable here) is touched: a
    bridge still starting is left to its start.
    """

    def __init__(
        self,
        client: HomeserverClient,
        appservice_id: str,
        status: StatusReporter,
        interval: float,
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._appservice_id = appservice_id
        self._status = status
        self.interval = interval
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> None:
        """Ping once and set the bridge's state from the answer."""
        current = self._status.bridge.state_event
        if current not in (StateEvent.RUNNING, StateEvent.BRIDGE_UNREACHABLE):
            return
        try:
            await self._client.ping_appservice(self._appservice_id)
        except LimitExceeded:
            return  # the homeserver's limit says nothing about the path to us
        except MatrixRequestError as exc:
            await self._unreachable(f"the homeserver cannot reach the bridge: {exc}")
        except HomeserverUnreachable as exc:
            await self._unreachable(f"the bridge cannot reach the homeserver: {exc}")
        else:
            if current is StateEvent.BRIDGE_UNREACHABLE:
                log.info("the homeserver reaches the bridge again")
                await self._status.set_bridge(StateEvent.RUNNING)

    async def _unreachable(self, message: str) -> None:
        if self._status.bridge.message != message:
            log.warning("%s", message)
        await self._status.set_bridge(StateEvent.BRIDGE_UNREACHABLE, message)

    def start(self) -> None:
        """Start pinging in the background (``interval`` 0: never)."""
        if self.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="reachability watch")

    async def close(self) -> None:
        """Stop pinging."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await self._sleep(self.interval)
            try:
                await self.check()
            except Exception:  # one bad round must not end the watch
                log.exception("the reachability check failed")
