"""How the inbox's lane workers pace their steps: the commit they share after each
handled event, and the handler timeout (see :mod:`bridge_kit.inbox.lanes`)."""

from __future__ import annotations

import asyncio
import contextlib

from bridge_kit.store.base import Store

__all__ = ["GroupCommit", "StepDeadline"]


class GroupCommit:
    """One committer shared by every lane: a lane hands in the item it handled and
    waits until that item's removal is committed before it starts its next event.

    Whatever was handed in while a commit ran goes into the next one, so the lanes
    working at once share one store trip (a group commit) with no delay added, and a
    crash re-runs at most the one event each lane was running or waiting to commit.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def complete(self, item_id: int) -> None:
        """Every handler returned for this item: remove it from the inbox, and return
        once that is committed. Raises the store's error if the commit failed (the
        item then stays, to be handled again). A caller cancelled while it waits does
        not stop the commit: it waits until the commit landed or failed, then takes the
        cancellation."""
        done = asyncio.get_running_loop().create_future()
        self._pending.append((item_id, done))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._commit_pending(), name="bridge_kit commits")
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            # A stop or a lost lease: the worker releases its lane next, and before the
            # commit lands another worker (here or in another process) would read the
            # handled item and run it again. The commit is under way; wait for it.
            while not done.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([done])
            raise

    async def _commit_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._store.complete_items([item_id for item_id, _ in batch])
            except Exception as exc:
                _settle(batch, exc)
            except BaseException:
                # Cancelled (the loop shuts down): its waiters must not wait for it.
                for _, done in [*batch, *self._pending]:
                    done.cancel()
                self._pending = []
                raise
            else:
                _settle(batch, None)

    async def flush(self) -> None:
        """Wait until what was handed in is committed (or failed), e.g. before the store
        closes; a worker cancelled while it waited leaves its commit running."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def _settle(batch: list[tuple[int, asyncio.Future[None]]], error: Exception | None) -> None:
    for _, done in batch:
        if done.done():  # its waiter was cancelled
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


class StepDeadline:
    """The handler timeout of one lane worker's steps, with one timer per timeout
    period instead of one per step: the timer, when it fires, cancels the worker
    only if the step running then is past its deadline, and otherwise waits for
    that step's deadline. A lane runs a step per handler per event; a timer each
    (``asyncio.timeout``) cost more than a quick handler itself."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._cancelling = 0
        self.expired = False

    def start(self) -> None:
        """A step starts: it may run for the timeout from now."""
        self._deadline = self._loop.time() + self._timeout
        self.expired = False
        if self._task is not None:
            self._cancelling = self._task.cancelling()
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._check)

    def end(self) -> None:
        self._deadline = None

    def timed_out(self) -> bool:
        """After a step raised CancelledError: whether it was this deadline's (then the
        cancellation is taken back, as ``asyncio.timeout`` does) or someone else's."""
        if not self.expired or self._task is None:
            return False
        return self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._deadline is None:
            return  # between steps: the next step arms a new timer
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._check)
            return
        self.expired = True
        if self._task is not None:
            self._task.cancel()
