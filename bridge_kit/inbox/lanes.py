"""The durable inbox: events wait in the store until every handler for them returned.

An accepted transaction's events are written to the store in one commit and
acknowledged at once (see :mod:`bridge_kit.inbox.transactions`). :class:`Inbox` then
works through them in *lanes*: one lane per room, handled strictly in order,
one event at a time; different lanes run concurrently, up to
``handler_concurrency``. A failing handler is retried with jittered
exponential backoff; after ``handler_attempts`` failures its event becomes a
dead letter and the lane moves on. A lane waiting for a retry holds no worker,
so it never blocks other rooms.

A lane's handled item is removed from the store before the lane starts its next
event, so a crash (even SIGKILL) runs again at most the event each lane was
running. The removals of all lanes share commits: one committer takes whatever
the lanes handed in while its previous commit ran (see
:class:`~bridge_kit.inbox._lane_worker.GroupCommit`).

Several processes may share a PostgreSQL store: each works only on the lanes
it holds a lease on, renews the leases while it works, and a lane whose
process died is taken over once its lease runs out.

Items are room events, ephemeral events, to-device events, device-list changes
and one-time-key counts (:class:`~bridge_kit.inbox.records.ItemKind`); each is
parsed into its model (:mod:`bridge_kit.inbox.items`) before its handlers run.

The seam for bridge_kit's own layers (encryption):

- :meth:`Inbox.add_preprocessor` adds ``async (item, record) -> item`` for a kind.
  Preprocessors run in the order added, on every attempt, before any handler;
  each gets the previous one's result (``record`` is the stored
  :class:`~bridge_kit.inbox.records.InboxItem`: its ``id`` is stable across the
  attempts, to key a cache) and the handlers are routed by the last result's type.
  So a decryptor turns ``m.room.encrypted`` into the event handlers see. A
  preprocessor that raises fails the attempt like a handler (retries, then a dead
  letter naming it).
- A preprocessor or a handler that raises :class:`~bridge_kit.inbox.signals.NotReady`
  defers its item: tried again after ``retry_after`` seconds with no attempt
  counted, its lane's later items waiting behind it; a dead letter with the
  reason once ``give_up_after`` seconds passed since it was first deferred.
- A preprocessor or a handler that raises :class:`~bridge_kit.inbox.signals.Park` parks
  its item outside its lane (see :mod:`bridge_kit.inbox.parking`): the lane goes on at
  once; :meth:`Inbox.unpark` puts the item back at the end of its lane (so it is
  handled after its room's later items), :meth:`Inbox.give_up_parked` makes it a
  dead letter, and so does its ``give_up_after`` running out, checked every second
  (or ``poll``, if longer) even when no new events come.
- Internal subscribers that run before the bridge's handlers, with retries and
  progress like them: :meth:`bridge_kit.inbox.handlers.HandlerRegistry.add_internal`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import attrs
import cattrs

from bridge_kit import defaults
from bridge_kit.errors import StoreError
from bridge_kit.inbox._lane_worker import GroupCommit, StepDeadline
from bridge_kit.inbox.delivery import handling
from bridge_kit.inbox.items import MODELS, Item, describe_item, item_event_id, item_type, parse_item
from bridge_kit.inbox.parking import ParkedItems, dead_letter
from bridge_kit.inbox.records import InboxItem, InboxStats, ItemKind
from bridge_kit.inbox.signals import NotHere, NotReady, Park
from bridge_kit.metrics import Metrics
from bridge_kit.store.base import Store
from bridge_kit.types import describe_error

__all__ = [
    "HandlerRoute",
    "Inbox",
    "InboxSettings",
    "ItemHandler",
    "Preprocessor",
    "handler_name",
]

log = logging.getLogger(__name__)

#: A handler of any kind of item (its model: see :mod:`bridge_kit.inbox.items`).
ItemHandler = Callable[[Any], Awaitable[None]]
#: Which handlers an item gets, in order: ``route(kind, event_type)`` (``None`` for
#: the kinds without a type: device lists, key counts).
HandlerRoute = Callable[[ItemKind, str | None], Sequence[ItemHandler]]
#: ``async (item, record) -> item``: what the next preprocessor, and the handlers, get.
Preprocessor = Callable[[Any, InboxItem], Awaitable[Any]]

_BATCH = 50
_STATS_INTERVAL = 1.0
_DUE_MARGIN = 0.01  # seconds past an item's retry time at which its lane is looked at
#: A lane is worked on only until this share of the lease after the last claim or
#: renewal: past it the lease may run out and another process take the lane.
_LEASE_SHARE = 0.5
#: How often, as a share of the lease, leases are renewed and deadlines enforced.
_RENEW_SHARE = 0.25
#: After a stop's grace, how long cancelled handlers may take to finish unwinding.
_UNWIND_SECONDS = 5.0
_EVENT_KINDS = frozenset((ItemKind.EVENT, ItemKind.EPHEMERAL))


@attrs.define
class _Lane:
    """A lane this process works on: its worker, and until when (monotonic) it may."""

    task: asyncio.Task[None]
    held_until: float


@attrs.frozen
class InboxSettings:
    """How the inbox runs handlers; the config's ``appservice`` section sets these."""

    concurrency: int = defaults.HANDLER_CONCURRENCY
    attempts: int = defaults.HANDLER_ATTEMPTS
    backoff: float = defaults.RETRY_BACKOFF
    backoff_max: float = defaults.RETRY_BACKOFF_MAX
    timeout: float = defaults.HANDLER_TIMEOUT
    lease: float = defaults.LANE_LEASE
    poll: float = defaults.INBOX_POLL

    def retry_delay(self, failures: int, rng: random.Random) -> float:
        """Jittered exponential backoff after the ``failures``-th failure (1-based)."""
        # The exponent is capped: 2 ** 1024 is no float, and the cap is reached long before.
        ceiling = min(self.backoff_max, self.backoff * 2 ** min(failures - 1, 62))
        return rng.uniform(ceiling / 2, ceiling)


def handler_name(handler: Callable[..., Any]) -> str:
    """The name a handler is recorded under: its module and qualified name.

    It must be the same in every process (it keys the handler's progress and
    its sends' transaction IDs), so it never contains a memory address: a
    ``functools.partial`` is named after its function, a callable object after
    its class.
    """
    target: Any = handler
    while isinstance(target, functools.partial):
        target = target.func
    if not hasattr(target, "__qualname__"):
        target = type(target)
    return f"{target.__module__}.{target.__qualname__}"


class Inbox:
    """Runs the handlers for the events in the store's inbox, lane by lane.

    ``route`` says which handlers an item gets. :meth:`wake` tells the inbox new
    items arrived; it also looks by itself every ``settings.poll`` seconds, for
    items that other processes accepted or an operator replayed.
    """

    def __init__(
        self,
        store: Store,
        route: HandlerRoute,
        *,
        appservice_id: str,
        settings: InboxSettings = InboxSettings(),
        metrics: Metrics | None = None,
        event_types: Callable[[], Collection[str]] | None = None,
    ) -> None:
        """``event_types()`` names the types handlers are registered for; the
        handler-time metric labels other types ``other``, so senders cannot grow it."""
        self.store = store
        self.route = route
        self.appservice_id = appservice_id
        self.settings = settings
        self.metrics = metrics
        self.owner = f"{appservice_id}/{uuid.uuid4().hex[:12]}"
        self.stats = InboxStats(depth=0, oldest_received_at=None, dead_letters=0)
        self.parked_events = 0
        self._event_types = event_types
        self._lanes: dict[str, _Lane] = {}
        self._cooling: dict[str, tuple[float, int]] = {}
        #: Lanes left to another process (an item raised NotHere): when to look again.
        self._set_aside: dict[str, float] = {}
        self._wakeup = asyncio.Event()
        #: Wake-ups at the retry times of failed or deferred items, so a lane is
        #: looked at again when its item is due, not at the next poll.
        self._retry_wakeups: set[asyncio.TimerHandle] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self._stopping = False
        self._preprocessors: dict[ItemKind, list[Preprocessor]] = {k: [] for k in ItemKind}
        self.parked = ParkedItems(store, metrics, self.wake)
        self._commits = GroupCommit(store)
        self._deadlines: dict[asyncio.Task[Any], StepDeadline] = {}

    def add_preprocessor(self, kind: ItemKind, preprocessor: Preprocessor) -> None:
        """Run ``preprocessor`` on every item of ``kind`` before its handlers (see the
        module's docstring); preprocessors run in the order added."""
        self._preprocessors[kind].append(preprocessor)

    # -- life cycle --------------------------------------------------------------

    async def start(self) -> None:
        """Start working through the inbox (it resumes whatever a previous run left)."""
        await self.refresh_stats()
        self._scheduler = asyncio.create_task(self._schedule(), name="bridge_kit inbox")
        self._renewer = asyncio.create_task(self._keep_leases(), name="bridge_kit leases")

    async def stop(self, grace: float = 10.0) -> None:
        """Take no more lanes or events, give running handlers ``grace`` seconds, then
        cancel them. Leases are kept renewed meanwhile.

        An event whose handler was cancelled stays in the inbox and is handled
        again on the next start, with the same transaction IDs for its sends.
        """
        self._stopping = True
        for wakeup in self._retry_wakeups:
            wakeup.cancel()
        self._retry_wakeups.clear()
        await _cancelled(self._scheduler)
        workers = [lane.task for lane in self._lanes.values()]
        if workers:
            _, pending = await asyncio.wait(workers, timeout=grace)
            for task in pending:
                task.cancel()
            _, stuck = await asyncio.wait(workers, timeout=_UNWIND_SECONDS)
            if stuck:
                log.error("%d handlers ignored their cancellation; abandoned", len(stuck))
        await self._commits.flush()
        await _cancelled(self._renewer)

    def wake(self) -> None:
        """New items arrived: look for lanes to work on now."""
        self._wakeup.set()

    def _wake_after(self, delay: float) -> None:
        """Look for lanes again in ``delay`` seconds, when an item put off until then is due."""
        if self._stopping:
            return

        def wake_up() -> None:
            self._retry_wakeups.discard(handle)
            self.wake()

        # The store compares not_before with the wall clock: a hair later, the item is due.
        handle = asyncio.get_running_loop().call_later(delay + _DUE_MARGIN, wake_up)
        self._retry_wakeups.add(handle)

    async def unpark(self, key: str) -> int:
        """What the items parked under ``key`` waited for came: put them back at the end
        of their lanes, in the order they first arrived; return how many."""
        return await self.parked.unpark(key)

    async def give_up_parked(self, key: str, reason: str) -> int:
        """What the items parked under ``key`` wait for will never come: make them dead
        letters with ``reason`` as their error; return how many."""
        return await self.parked.give_up(key, reason)

    @property
    def busy_lanes(self) -> int:
        """How many lanes are being worked on in this process."""
        return len(self._lanes)

    async def refresh_stats(self) -> InboxStats:
        """Read the depth, oldest item, dead-letter and parked counts; update the metrics."""
        self.stats = await self.store.inbox_stats()
        self.parked_events = await self.store.count_parked()
        if self.metrics is not None:
            self.metrics.set_inbox(self.stats, self.parked_events)
        return self.stats

    # -- scheduling --------------------------------------------------------------

    async def _schedule(self) -> None:
        last_stats = 0.0
        while True:
            try:
                await self._claim_free_lanes()
                # Counting the inbox costs a scan; once a second is plenty for gauges.
                if time.monotonic() - last_stats >= _STATS_INTERVAL:
                    await self.parked.expire()
                    await self.refresh_stats()
                    last_stats = time.monotonic()
            except StoreError as exc:  # an outage, not a bug: one line, no traceback
                log.error("the inbox could not read the store (trying again shortly): %s", exc)
            except Exception:
                log.exception("the inbox could not read the store; trying again shortly")
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives as the wake-up completes, and stop() would hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll):
                    await self._wakeup.wait()
            self._wakeup.clear()

    async def _claim_free_lanes(self) -> None:
        free = self.settings.concurrency - len(self._lanes)
        if free <= 0 or self._stopping:
            return
        now = time.monotonic()
        self._cooling = {k: v for k, v in self._cooling.items() if v[0] > now}
        self._set_aside = {k: v for k, v in self._set_aside.items() if v > now}
        exclude = (*self._lanes, *self._cooling, *self._set_aside)
        claimed_at = time.monotonic()
        lanes = await self.store.claim_lanes(self.owner, self.settings.lease, free, exclude)
        held_until = claimed_at + self.settings.lease * _LEASE_SHARE
        for lane in lanes:
            task = asyncio.create_task(self._work_lane(lane))
            self._lanes[lane] = _Lane(task, held_until)

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease * _RENEW_SHARE)
            await self._renew()
            self._enforce_deadlines()

    async def _renew(self) -> None:
        lanes = dict(self._lanes)
        if not lanes:
            return
        started = time.monotonic()
        try:
            held = await self.store.renew_lanes(self.owner, tuple(lanes), self.settings.lease)
        except StoreError as exc:  # an outage, not a bug: one line, no traceback
            log.error("could not renew the inbox leases (trying again shortly): %s", exc)
            return
        except Exception:
            log.exception("could not renew the inbox leases; trying again shortly")
            return
        for name, lane in lanes.items():
            if name in held:
                lane.held_until = max(lane.held_until, started + self.settings.lease * _LEASE_SHARE)
            elif not lane.task.done():
                # Another process took the lane over (our lease ran out): stop at once,
                # or both would run its handlers.
                log.warning("lost the lease on lane %s; another process handles it now", name)
                lane.task.cancel()

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for name, lane in self._lanes.items():
            if now > lane.held_until and not lane.task.done():
                log.warning("could not renew the lease on lane %s in time; stopping it", name)
                lane.task.cancel()

    def _holds(self, lane: str) -> bool:
        held = self._lanes.get(lane)
        return held is not None and time.monotonic() < held.held_until

    # -- one lane ----------------------------------------------------------------

    async def _work_lane(self, lane: str) -> None:
        deadline = StepDeadline(self.settings.timeout)
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = deadline
        try:
            while await self._work_batch(lane):
                pass
            self._cooling.pop(lane, None)
        except asyncio.CancelledError:
            raise
        except StoreError as exc:  # an outage, not a bug: one line, no traceback
            log.error("the inbox could not work on lane %s (store failure; trying again "
                      "later): %s", lane, exc)  # fmt: skip
            self._cool_down(lane)
        except Exception:
            log.exception("the inbox could not work on lane %s; trying again later", lane)
            self._cool_down(lane)
        finally:
            deadline.close()
            del self._deadlines[task]
            await self._release(lane)

    async def _release(self, lane: str) -> None:
        # Release first, forget second: until the release is done the scheduler must
        # not claim the lane again, or the release could delete the new lease.
        try:
            with contextlib.suppress(Exception):
                await self.store.release_lane(self.owner, lane)
        finally:
            held = self._lanes.get(lane)
            if held is not None and held.task is asyncio.current_task():
                del self._lanes[lane]
            self.wake()

    def _cool_down(self, lane: str) -> None:
        """The store failed for this lane: leave it alone for a while (backing off)."""
        failures = self._cooling.get(lane, (0.0, 0))[1] + 1
        delay = self.settings.retry_delay(failures, self._rng)
        self._cooling[lane] = (time.monotonic() + delay, failures)

    async def _work_batch(self, lane: str) -> bool:
        """Handle the lane's next items in order; False when the lane is done for now.

        Each handled item's removal is committed before the next item starts (see
        :class:`GroupCommit`), so the next read never holds an item handled already."""
        items = await self.store.lane_items(lane, _BATCH)
        for item in items:
            if self._stopping or not self._holds(lane) or item.not_before > time.time():
                return False
            if not await self._handle(item):
                return False
        return len(items) == _BATCH

    async def _handle(self, item: InboxItem) -> bool:
        """Run the item's preprocessors and handlers; True when the lane may go on.

        A handled item's removal is committed before this returns, so the store never
        shows a later item's failure, deferral or dead letter while an earlier,
        handled one still waits, and a crash re-runs at most the item running."""
        try:
            parsed = parse_item(item.kind, item.event_json)
        except (ValueError, TypeError, cattrs.BaseValidationError) as exc:
            what = "event" if item.kind in _EVENT_KINDS else f"{item.kind.value} item"
            await self._bury(item, None, f"invalid {what}: {describe_error(exc)}", item.attempts)
            return True
        # The sends' transaction IDs derive from the event as received, decrypted or not.
        key = item_event_id(parsed) or f"inbox:{item.id}"
        done = list(item.done_handlers)
        name = ""
        try:
            for preprocessor, name in _named(self._preprocessors[item.kind]):
                step = functools.partial(preprocessor, parsed, item)
                result, failure = await self._attempt(name, key, step)
                if failure is None and not isinstance(result, MODELS[item.kind]):
                    wanted = MODELS[item.kind].__name__
                    failure = f"TypeError: {name} returned {type(result).__name__}, not {wanted}"
                if failure is not None:
                    return await self._failed(item, parsed, name, done, failure)
                parsed = result
            for handler, name in _named(self.route(item.kind, item_type(parsed))):
                if name in done:
                    continue
                if (failure := await self._run(handler, name, key, parsed, item)) is not None:
                    return await self._failed(item, parsed, name, done, failure)
                done.append(name)
        except NotReady as not_ready:
            return await self._defer(item, parsed, name, done, not_ready)
        except Park as park:
            await self.parked.park(item, parsed, name, done, park)
            return True
        await self._commits.complete(item.id)
        return True

    async def _run(
        self, handler: ItemHandler, name: str, key: str, parsed: Item, item: InboxItem
    ) -> str | None:
        """Run one handler; the failure with its traceback, or None when it returned."""
        started = time.perf_counter()
        try:
            return (await self._attempt(name, key, functools.partial(handler, parsed)))[1]
        finally:
            if self.metrics is not None:
                label = self._type_label(item_type(parsed), item.kind)
                self.metrics.observe_handler(label, time.perf_counter() - started)

    async def _attempt(
        self, name: str, key: str, step: Callable[[], Awaitable[Any]]
    ) -> tuple[Any, str | None]:
        """Await one step (a handler or preprocessor) with the handler timeout: its
        result and None, or None and its failure with the traceback. NotReady and Park pass."""
        task = asyncio.current_task()
        deadline = self._deadlines.get(task) if task is not None else None
        if deadline is None:  # not on a lane worker (never, but then: a timer of its own)
            return await self._attempt_alone(name, key, step)
        deadline.start()
        try:
            with handling(self.appservice_id, key, name):
                return await step(), None
        except (NotReady, Park):
            raise
        except asyncio.CancelledError:
            if deadline.timed_out():
                return None, self._ran_past()
            if task is not None and task.cancelling():
                raise  # this worker is being stopped
            return None, traceback.format_exc()  # e.g. a sub-task it awaited was cancelled
        except Exception:
            return None, traceback.format_exc()  # the handler's own TimeoutError too
        finally:
            deadline.end()

    async def _attempt_alone(
        self, name: str, key: str, step: Callable[[], Awaitable[Any]]
    ) -> tuple[Any, str | None]:
        timeout = asyncio.timeout(self.settings.timeout)
        try:
            with handling(self.appservice_id, key, name):
                async with timeout:
                    return await step(), None
        except (NotReady, Park):
            raise
        except TimeoutError:
            if timeout.expired():
                return None, self._ran_past()
            return None, traceback.format_exc()
        except Exception:
            return None, traceback.format_exc()

    def _ran_past(self) -> str:
        return f"TimeoutError: the handler ran past {self.settings.timeout:g} s"

    def _type_label(self, event_type: str | None, kind: ItemKind) -> str:
        if event_type is None:
            return kind.value  # device lists, key counts: one label each
        known = self._event_types() if self._event_types is not None else ()
        return event_type if event_type in known else "other"

    async def _failed(
        self, item: InboxItem, parsed: Item, name: str, done: list[str], failure: str
    ) -> bool:
        attempts = item.attempts + 1
        summary = failure.strip().splitlines()[-1]
        if attempts >= self.settings.attempts:
            log.error(
                "handler %s failed %d times for %s in %s; it is now a dead letter: %s",
                name, attempts, describe_item(parsed), item.lane, summary,
            )  # fmt: skip
            await self._bury(item, name, failure, attempts, parsed, done=done)
            return True
        delay = self.settings.retry_delay(attempts, self._rng)
        log.warning(
            "handler %s failed for %s in %s (attempt %d of %d); retrying in %.1f s: %s",
            name, describe_item(parsed), item.lane, attempts, self.settings.attempts,
            delay, summary,
        )  # fmt: skip
        if self.metrics is not None:
            self.metrics.count_handler_retry()
        await self.store.fail_item(item.id, done, time.time() + delay)
        self._wake_after(delay)
        return False

    async def _defer(
        self, item: InboxItem, parsed: Item, name: str, done: list[str], not_ready: NotReady
    ) -> bool:
        """``name`` said the item is not ready: try it again later (its lane waits), or
        bury it once it waited ``give_up_after`` seconds. True when the lane may go on."""
        now = time.time()
        first = item.first_failed_at if item.first_failed_at is not None else now
        left = first + not_ready.give_up_after - now
        if left <= 0:
            log.error(
                "%s waited %.1f s for %s in %s; it is now a dead letter: %s",
                describe_item(parsed), now - first, name, item.lane, not_ready.reason,
            )  # fmt: skip
            await self._bury(
                item, name, not_ready.reason, item.attempts, parsed, "not_ready", done=done
            )
            return True
        delay = min(not_ready.retry_after, left)
        log.debug(
            "%s in %s is not ready for %s (%s); trying again in %.1f s",
            describe_item(parsed), item.lane, name, not_ready.reason, delay,
        )  # fmt: skip
        await self.store.fail_item(item.id, done, now + delay, count_attempt=False)
        if isinstance(not_ready, NotHere):
            # Past the item's due time by two polls: another process polling finds it
            # due and free; if none takes it by then, this one tries again.
            self._set_aside[item.lane] = time.monotonic() + delay + 2 * self.settings.poll
        self._wake_after(delay)
        return False

    async def _bury(
        self,
        item: InboxItem,
        handler: str | None,
        error: str,
        attempts: int,
        parsed: Item | None = None,
        reason: str | None = None,
        *,
        done: Sequence[str] = (),
    ) -> None:
        """Make the item a dead letter; ``done`` names the handlers that succeeded for
        it, which a replay does not run again."""
        letter = dead_letter(item, handler, error, attempts, parsed, done)
        await self.store.bury_item(item.id, letter)
        if self.metrics is not None:
            self.metrics.count_dead_letter(reason or ("handler" if handler else "invalid"))


async def _cancelled(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _named(handlers: Sequence[Callable[..., Any]]) -> list[tuple[Any, str]]:
    """Each handler with the name its progress is recorded under; a name that
    repeats (two lambdas, one function registered twice) gets ``#2``, ``#3``...

    Remembered per sequence of handlers (every event asks); a route that makes new
    handler objects each time only fills the small memory, which then starts over."""
    key = tuple(handlers)
    try:
        named = _NAMES.get(key)
    except TypeError:  # a callable object that cannot be hashed
        return _name_all(key)
    if named is None:
        if len(_NAMES) >= _NAMES_KEPT:
            _NAMES.clear()
        named = _NAMES[key] = _name_all(key)
    return named


def _name_all(handlers: Sequence[Callable[..., Any]]) -> list[tuple[Any, str]]:
    seen: dict[str, int] = {}
    named = []
    for handler in handlers:
        name = handler_name(handler)
        seen[name] = seen.get(name, 0) + 1
        named.append((handler, name if seen[name] == 1 else f"{name}#{seen[name]}"))
    return named


_NAMES_KEPT = 256
_NAMES: dict[tuple[Callable[..., Any], ...], list[tuple[Any, str]]] = {}
