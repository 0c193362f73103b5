"""Registering puppets: one on demand, or a million in one streamed, resumable run.

:class:`PuppetRegistrar` checks every localpart locally (grammar, length,
namespace) before anything is sent, asks the store before the homeserver, and
records what the homeserver confirmed, so a puppet is never sent twice once it
is known::

    registrar = PuppetRegistrar(client, store, registration, "example.org")
    await registrar.ensure_registered("_bridge_alice")          # one puppet
    result = await registrar.register_many(localparts)          # a bulk run
    print(result.summary())

A bulk run streams its input in chunks, looks the store up per chunk, sends
the rest through a pool of workers whose concurrency halves on every 429 and
grows back slowly (AIMD), and persists outcomes in batches. Errors that no
retry can fix (unknown token, forbidden, resource limit, homeserver gone) stop
the whole run at once with a diagnosis in plain words.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from array import array
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Sized,
)
from itertools import islice
from typing import Any, Final

import attrs

from bridge_kit.client import REGISTER_ENDPOINT, ClientObserver, HomeserverClient
from bridge_kit.errors import (
    Exclusive,
    Forbidden,
    HomeserverUnreachable,
    InvalidLocalpart,
    LimitExceeded,
    MatrixRequestError,
    NotInNamespace,
    RegistrationAborted,
    ResourceLimitExceeded,
    UnknownToken,
    UserInUse,
)
from bridge_kit.ids import localpart_problem
from bridge_kit.registration import Registration
from bridge_kit.store.base import Store
from bridge_kit.types.converter import converter
from bridge_kit.types.register import RegisterRequest

__all__ = [
    "AimdLimiter",
    "BulkProgress",
    "BulkResult",
    "PuppetRegistrar",
    "diagnose_abort",
    "localparts_from_lines",
]

log = logging.getLogger(__name__)

#: Localparts screened, and looked up in the store, per round trip.
CHUNK_SIZE: Final = 1000
#: Confirmed registrations are written to the store in one batch this often (seconds).
FLUSH_INTERVAL: Final = 0.5

_NOT_IN_NAMESPACE: Final = "not in this appservice's user namespaces"

ProgressCallback = Callable[["BulkProgress"], None]


# -- results ------------------------------------------------------------------


@attrs.frozen
class BulkProgress:
    """A snapshot of a running :meth:`PuppetRegistrar.register_many`, for progress displays.

    ``done`` counts input localparts dealt with (duplicates included); ``total``
    is known only when the input has a length (or one was given).
    """

    done: int
    total: int | None
    elapsed: float
    registered: int
    already_existed: int
    skipped_known: int
    invalid: int
    failed: int
    concurrency: int

    @property
    def rate(self) -> float:
        """Localparts dealt with per second, since the start."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate, when the total is known."""
        if self.total is None or self.rate <= 0:
            return None
        return max(self.total - self.done, 0) / self.rate


@attrs.define
class BulkResult:
    """What a :meth:`PuppetRegistrar.register_many` run did.

    The five counts partition the distinct localparts dealt with:
    ``registered`` (newly created), ``already_existed`` (the homeserver had
    them: ``M_USER_IN_USE``), ``skipped_known`` (the store knew them; nothing
    sent), ``invalid`` (refused locally, never sent; reason in
    ``invalid_reasons``) and ``failed`` (the homeserver refused; reason in
    ``failures``). ``duplicates`` counts repeated input lines, ignored.

    ``aborted`` holds the diagnosis when an error no retry can fix stopped the
    run; ``cancelled`` is true when it was cancelled. Either way a re-run
    resumes where this one stopped. In a dry run, nothing is sent and
    ``would_register`` counts what would have been.
    """

    registered: int = 0
    already_existed: int = 0
    skipped_known: int = 0
    invalid: int = 0
    failed: int = 0
    duplicates: int = 0
    would_register: int = 0
    invalid_reasons: dict[str, str] = attrs.field(factory=dict)
    failures: dict[str, str] = attrs.field(factory=dict)
    aborted: str | None = None
    cancelled: bool = False
    dry_run: bool = False
    rate_limited: int = 0
    lowest_concurrency: int = 0
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the run completed with nothing invalid, failed, aborted or cancelled."""
        return not (self.invalid or self.failed or self.aborted or self.cancelled)

    @property
    def done(self) -> int:
        """Input localparts dealt with, duplicates included."""
        return (
            self.registered
            + self.already_existed
            + self.skipped_known
            + self.invalid
            + self.failed
            + self.duplicates
            + self.would_register
        )

    def summary(self) -> str:
        """One line with the five counts, and how the run ended if not normally."""
        parts = [
            f"{self.registered} registered",
            f"{self.already_existed} already existed",
            f"{self.skipped_known} skipped (known)",
            f"{self.invalid} invalid",
            f"{self.failed} failed",
        ]
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates ignored")
        if self.dry_run:
            parts.append(f"{self.would_register} would be registered (dry run)")
        line = ", ".join(parts) + f" in {self.elapsed:.1f} s"
        if self.aborted:
            line += f"; ABORTED: {self.aborted}"
        elif self.cancelled:
            line += "; cancelled (run again to resume)"
        return line

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data: every count, reason and failure, plus ``ok``."""
        data: dict[str, Any] = converter.unstructure(self)
        data["ok"] = self.ok
        return data

    def _progress(self, total: int | None, started: float, concurrency: int) -> BulkProgress:
        return BulkProgress(
            done=self.done,
            total=total,
            elapsed=time.monotonic() - started,
            registered=self.registered,
            already_existed=self.already_existed,
            skipped_known=self.skipped_known,
            invalid=self.invalid,
            failed=self.failed,
            concurrency=concurrency,
        )


# -- diagnoses ------------------------------------------------------------------


def diagnose_abort(error: BaseException) -> str | None:
    """A plain-words diagnosis when ``error`` dooms every registration, else ``None``."""
    if isinstance(error, UnknownToken):
        return (
            "the homeserver does not accept this appservice's as_token (401 M_UNKNOWN_TOKEN): "
            "the homeserver has not loaded this registration: is it listed in "
            "app_service_config_files, and was the homeserver restarted since? "
            "Also check that the as_token in the file is the one the homeserver loaded."
        )
    if isinstance(error, Forbidden):
        return (
            f"the homeserver forbids this appservice to register users (403 M_FORBIDDEN: "
            f"{error.message or 'no reason given'}): check that the as_token belongs to "
            "this registration and that the homeserver allows its appservices to register"
        )
    if isinstance(error, ResourceLimitExceeded):
        contact = error.body.get("admin_contact")
        where = f" (admin contact: {contact})" if isinstance(contact, str) else ""
        return (
            f"the homeserver has reached a resource limit (M_RESOURCE_LIMIT_EXCEEDED: "
            f"{error.message or 'no reason given'}), usually its monthly-active-user cap; "
            f"no more users can be created until it is raised{where}"
        )
    if isinstance(error, HomeserverUnreachable):
        return (
            f"the homeserver could not be reached ({error}): check the homeserver URL "
            "and that it is running, then run again to resume"
        )
    return None


def describe_failure(error: MatrixRequestError) -> str:
    """Why the homeserver refused one puppet, for :attr:`BulkResult.failures`."""
    detail = f"{error.status} {error.errcode or 'no errcode'}: {error.message or 'no message'}"
    if isinstance(error, Exclusive):
        return (
            f"{detail} (the ID is reserved by another appservice's exclusive namespace, "
            "or outside the namespaces the homeserver loaded for us)"
        )
    if isinstance(error, LimitExceeded):
        return f"{detail} (still rate limited after the client's retries)"
    return detail


# -- the engine -----------------------------------------------------------------


class PuppetRegistrar:
    """Registers an appservice's puppets on its homeserver, remembering them in ``store``.

    ``domain`` is the homeserver's server name (the part after ``:`` in user
    IDs; :meth:`HomeserverClient.whoami` on the sender tells it). The store
    must be open. One registrar can serve any number of concurrent callers.
    """

    def __init__(
        self,
        client: HomeserverClient,
        store: Store,
        registration: Registration,
        domain: str,
    ) -> None:
        self.client = client
        self.store = store
        self.registration = registration
        self.domain = domain
        self._in_flight: dict[str, asyncio.Task[bool]] = {}
        self._runs: set[_BulkRun] = set()

    def __repr__(self) -> str:
        return f"<PuppetRegistrar {self.registration.id} on {self.domain}>"

    def user_id(self, localpart: str) -> str:
        """The full user ID of a puppet, after the local checks.

        Raises :class:`InvalidLocalpart` or :class:`NotInNamespace`.
        """
        problem = localpart_problem(localpart, self.domain)
        if problem is not None:
            raise InvalidLocalpart(localpart, problem)
        user_id = f"@{localpart}:{self.domain}"
        if not self.registration.is_user_in_namespace(user_id):
            raise NotInNamespace(user_id)
        return user_id

    async def ensure_registered(self, localpart: str) -> bool:
        """Make sure the puppet exists; True if this call created it.

        Checks the localpart and namespace locally first (raising
        :class:`InvalidLocalpart` / :class:`NotInNamespace` without sending
        anything), then the store. ``M_USER_IN_USE`` counts as success.
        Concurrent calls for one puppet share one request. Raises
        :class:`RegistrationAborted` when the homeserver refuses this
        appservice as a whole, and :class:`MatrixRequestError` (e.g.
        :class:`Exclusive`) when it refuses this puppet.
        """
        user_id = self.user_id(localpart)
        task = self._in_flight.get(user_id)
        if task is None:
            task = asyncio.create_task(self._ensure(user_id, localpart))
            self._in_flight[user_id] = task
            task.add_done_callback(lambda _: self._in_flight.pop(user_id, None))
        # One caller giving up must not cancel the request the others wait on.
        return await asyncio.shield(task)

    async def _ensure(self, user_id: str, localpart: str) -> bool:
        if await self.store.is_registered(user_id):
            return False
        try:
            await self.client.register(RegisterRequest.for_puppet(localpart))
            created = True
        except UserInUse:
            created = False
        except (UnknownToken, Forbidden, ResourceLimitExceeded) as error:
            raise RegistrationAborted(diagnose_abort(error) or str(error), error) from error
        await self.store.mark_registered([user_id])
        return created

    async def register_many(
        self,
        localparts: Iterable[str] | AsyncIterable[str],
        *,
        concurrency: int = 16,
        progress: ProgressCallback | None = None,
        dry_run: bool = False,
        total: int | None = None,
    ) -> BulkResult:
        """Register many puppets, streaming ``localparts`` (any iterable or async iterable).

        At most ``concurrency`` register requests are in flight; a 429 halves
        that, successes grow it back. ``progress`` is called about twice a
        second with a :class:`BulkProgress`. ``dry_run`` checks everything and
        asks the store, but sends nothing. ``total`` (the input length) helps
        progress displays when ``localparts`` has no ``len()``.

        Cancelling (:meth:`cancel`, or cancelling the task) stops issuing
        requests, lets those in flight finish, flushes the store and returns
        the result with ``cancelled`` set. Raises for a broken store or input,
        and re-raises an exception no part of bridge_kit expects (a bug) once the
        run is stopped; whatever the homeserver answers, and its being unreachable
        or not a homeserver at all, ends up in the :class:`BulkResult`.
        """
        if isinstance(localparts, str | bytes):
            raise TypeError("register_many takes an iterable of localparts, not one string")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if total is None and isinstance(localparts, Sized):
            total = len(localparts)
        run = _BulkRun(self, concurrency, progress, dry_run, total)
        self._runs.add(run)
        try:
            return await run.execute(localparts)
        finally:
            self._runs.discard(run)

    def cancel(self) -> None:
        """Stop every running :meth:`register_many` gracefully; safe in a signal handler."""
        for run in list(self._runs):
            run.stop(cancelled=True)


# -- AIMD concurrency -------------------------------------------------------------


class AimdLimiter:
    """A semaphore whose size adapts: halved on congestion, +1 per ``limit`` successes.

    Congestion signals that arrive within ``pause`` seconds of the last cut
    (the requests already in flight then) count once.
    """

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.lowest = maximum
        self._holders = 0
        self._successes = 0
        self._quiet_until = 0.0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Wait for a free slot."""
        if self._holders < self.limit and not self._waiters:
            self._holders += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(success=False)  # the slot was handed over as we were cancelled
            else:
                self._waiters.remove(waiter)
            raise

    def release(self, *, success: bool) -> None:
        """Give a slot back; a success counts towards growing the limit."""
        self._holders -= 1
        if success and self.limit < self.maximum:
            self._successes += 1
            if self._successes >= self.limit:
                self.limit += 1
                self._successes = 0
        self._wake()

    def congestion(self, pause: float = 0.0) -> None:
        """The homeserver asked us to slow down: halve the limit (at most once per ``pause``)."""
        now = time.monotonic()
        if now < self._quiet_until:
            return
        self._quiet_until = now + max(pause, 0.05)
        self.limit = max(1, self.limit // 2)
        self.lowest = min(self.lowest, self.limit)
        self._successes = 0

    def _wake(self) -> None:
        while self._waiters and self._holders < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._holders += 1
                waiter.set_result(None)


class _RateLimitWatch(ClientObserver):
    """Feeds the 429s of register requests into a run's limiter.

    The client is shared: a 429 on another endpoint (a puppet sending messages)
    says nothing about registration, so it does not slow the run down.
    """

    def __init__(self, limiter: AimdLimiter, result: BulkResult) -> None:
        self._limiter = limiter
        self._result = result

    def on_response(
        self, method: str, endpoint: str, status: int, errcode: str | None, seconds: float
    ) -> None:
        if status != 429 or method != "POST" or endpoint != REGISTER_ENDPOINT:
            return
        self._result.rate_limited += 1
        # 429s of requests already in flight at the cut arrive within about one
        # round trip; like TCP, cut at most once per round trip.
        self._limiter.congestion(seconds)


# -- duplicate detection in bounded memory --------------------------------------


class _SeenSet:
    """Remembers strings by their 64-bit hash in an open-addressing ``array``.

    16 bytes per entry instead of ~80 for a set of strings or boxed ints, so a
    million localparts fit in 16-32 MB. Two different localparts share a
    hash with probability ~n²/2⁶⁵ (3e-8 for a million); Python salts string
    hashes per process, so such a puppet is registered by the next run.
    """

    __slots__ = ("_count", "_mask", "_slots")

    def __init__(self, capacity: int = 1 << 12) -> None:
        self._slots = array("q", bytes(8 * capacity))
        self._mask = capacity - 1
        self._count = 0

    def add(self, item: str) -> bool:
        """Remember ``item``; False if it was seen before."""
        key = hash(item) or 1  # 0 marks an empty slot
        slots, mask = self._slots, self._mask
        index = key & mask
        while True:
            found = slots[index]
            if found == 0:
                slots[index] = key
                self._count += 1
                if self._count * 2 > mask:
                    self._grow()
                return True
            if found == key:
                return False
            index = (index + 1) & mask

    def _grow(self) -> None:
        old = self._slots
        capacity = 2 * len(old)
        slots = self._slots = array("q", bytes(8 * capacity))
        mask = self._mask = capacity - 1
        for key in old:
            if key:
                index = key & mask
                while slots[index]:
                    index = (index + 1) & mask
                slots[index] = key


# -- one bulk run ------------------------------------------------------------------

_Item = tuple[str, str]  # (user_id, localpart)


class _BulkRun:
    """The state of one :meth:`PuppetRegistrar.register_many` call."""

    def __init__(
        self,
        registrar: PuppetRegistrar,
        concurrency: int,
        progress: ProgressCallback | None,
        dry_run: bool,
        total: int | None,
    ) -> None:
        self.registrar = registrar
        self.concurrency = concurrency
        self.progress = progress
        self.dry_run = dry_run
        self.total = total
        self.result = BulkResult(dry_run=dry_run, lowest_concurrency=concurrency)
        self.limiter = AimdLimiter(concurrency)
        self.started = time.monotonic()
        self.stopping = False
        self.error: BaseException | None = None
        self.confirmed: list[str] = []
        self.queue: asyncio.Queue[_Item | None] = asyncio.Queue(
            maxsize=max(2 * CHUNK_SIZE, concurrency)
        )
        self.finished = asyncio.Event()
        self.producer: asyncio.Task[None] | None = None
        self.workers: list[asyncio.Task[None]] = []

    async def execute(self, localparts: Iterable[str] | AsyncIterable[str]) -> BulkResult:
        watch = _RateLimitWatch(self.limiter, self.result)
        self.registrar.client.observers.append(watch)
        self.producer = asyncio.create_task(self._produce(localparts))
        worker_count = 0 if self.dry_run else self.concurrency
        self.workers = [asyncio.create_task(self._work()) for _ in range(worker_count)]
        flusher = asyncio.create_task(self._flush_periodically())
        try:
            await self._wait_for_tasks()
        finally:
            self.finished.set()
            with contextlib.suppress(ValueError):
                self.registrar.client.observers.remove(watch)
            await self._shutdown(flusher)
        if self.error is not None:
            raise self.error
        return self.result

    async def _wait_for_tasks(self) -> None:
        tasks: list[asyncio.Task[None]] = [*self.workers]
        if self.producer is not None:
            tasks.append(self.producer)
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            # Cancelling the run means: stop issuing, let requests in flight finish,
            # flush, report. A second cancellation interrupts even that.
            self.stop(cancelled=True)
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await asyncio.wait(tasks)

    async def _shutdown(self, flusher: asyncio.Task[None]) -> None:
        """Stop every task of the run and persist what was confirmed; runs even when cancelled."""
        for task in (*self.workers, self.producer):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*self.workers, flusher, return_exceptions=True)
        if self.producer is not None:
            await asyncio.gather(self.producer, return_exceptions=True)
        await self._flush()
        self.result.elapsed = time.monotonic() - self.started
        self.result.lowest_concurrency = self.limiter.lowest
        self._report_progress()

    def stop(self, *, cancelled: bool = False, aborted: str | None = None) -> None:
        """Stop issuing requests; the workers exit after the requests in flight."""
        if aborted is not None and self.result.aborted is None:
            self.result.aborted = aborted
        if cancelled and self.result.aborted is None:
            self.result.cancelled = True
        if self.stopping:
            return
        self.stopping = True
        producer = self.producer
        if producer is not None and not producer.done() and producer is not asyncio.current_task():
            producer.cancel()
        # Unblock idle workers: drop what is queued (it was never sent) and wake them.
        while not self.queue.empty():
            self.queue.get_nowait()
        for _ in self.workers:
            self.queue.put_nowait(None)

    # -- producer: screen, deduplicate, ask the store --------------------------

    async def _produce(self, localparts: Iterable[str] | AsyncIterable[str]) -> None:
        seen = _SeenSet()
        try:
            async for chunk in _chunks(localparts, CHUNK_SIZE):
                fresh = self._screen(chunk, seen)
                if fresh:
                    await self._dispatch(fresh)
                if self.stopping:
                    return
        except Exception as error:  # a broken input or store ends the run
            if self.error is None:
                self.error = error
            self.stop()
            return
        for _ in self.workers:
            await self.queue.put(None)

    def _screen(self, chunk: list[str], seen: _SeenSet) -> list[_Item]:
        """The new, valid, in-namespace localparts of ``chunk``; counts the others."""
        result = self.result
        domain = self.registrar.domain
        in_namespace = self.registrar.registration.is_user_in_namespace
        fresh: list[_Item] = []
        for localpart in chunk:
            if not seen.add(localpart):
                result.duplicates += 1
                continue
            problem = localpart_problem(localpart, domain)
            if problem is None:
                user_id = f"@{localpart}:{domain}"
                if in_namespace(user_id):
                    fresh.append((user_id, localpart))
                    continue
                problem = _NOT_IN_NAMESPACE
            result.invalid += 1
            result.invalid_reasons[localpart] = problem
        return fresh

    async def _dispatch(self, fresh: list[_Item]) -> None:
        known = await self.registrar.store.registered_among([user_id for user_id, _ in fresh])
        result = self.result
        queue = self.queue
        for item in fresh:
            if item[0] in known:
                result.skipped_known += 1
            elif self.dry_run:
                result.would_register += 1
            elif self.stopping:
                return
            else:
                await queue.put(item)

    # -- workers: send ---------------------------------------------------------

    async def _work(self) -> None:
        try:
            await self._send_queued()
        except Exception as error:  # unexpected: end the run rather than leave it hanging
            if self.error is None:
                self.error = error
            self.stop()

    async def _send_queued(self) -> None:
        queue, limiter = self.queue, self.limiter
        register = self.registrar.client.register
        result, confirmed = self.result, self.confirmed
        while True:
            item = await queue.get()
            if item is None or self.stopping:
                return
            await limiter.acquire()
            success = False
            try:
                if self.stopping:
                    return
                user_id, localpart = item
                try:
                    await register(RegisterRequest.for_puppet(localpart))
                except UserInUse:
                    result.already_existed += 1
                except MatrixRequestError as error:
                    self._refused(localpart, error)
                    continue
                except HomeserverUnreachable as error:
                    self.stop(aborted=diagnose_abort(error))
                    return
                else:
                    result.registered += 1
                confirmed.append(user_id)
                success = True
            finally:
                limiter.release(success=success)

    def _refused(self, localpart: str, error: MatrixRequestError) -> None:
        diagnosis = diagnose_abort(error)
        if diagnosis is not None:
            self.stop(aborted=diagnosis)
            return
        self.result.failed += 1
        self.result.failures[localpart] = describe_failure(error)

    # -- persisting and reporting ------------------------------------------------

    async def _flush_periodically(self) -> None:
        while not self.finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.finished.wait(), FLUSH_INTERVAL)
            await self._flush_or_stop()
            if not self.finished.is_set():
                self._report_progress()

    async def _flush_or_stop(self) -> None:
        try:
            await self._flush()
        except Exception as error:  # a broken store ends the run
            if self.error is None:
                self.error = error
            self.stop()

    async def _flush(self) -> None:
        batch = self.confirmed[:]
        # Cleared in place: the workers hold this very list.
        del self.confirmed[:]
        if not batch:
            return
        try:
            await self.registrar.store.mark_registered(batch)
        except BaseException:
            self.confirmed.extend(batch)  # keep them for the final flush
            raise

    def _report_progress(self) -> None:
        if self.progress is None:
            return
        snapshot = self.result._progress(self.total, self.started, self.limiter.limit)
        try:
            self.progress(snapshot)
        except Exception:
            log.exception("the progress callback failed; no more progress reports")
            self.progress = None


async def _chunks(
    localparts: Iterable[str] | AsyncIterable[str], size: int
) -> AsyncIterator[list[str]]:
    """Lists of up to ``size`` items from a sync or async iterable, yielding to the loop."""
    if isinstance(localparts, AsyncIterable):
        chunk: list[str] = []
        async for localpart in localparts:
            chunk.append(localpart)
            if len(chunk) >= size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
        return
    iterator = iter(localparts)
    while chunk := list(islice(iterator, size)):
        yield chunk
        await asyncio.sleep(0)


def localparts_from_lines(lines: Iterable[str]) -> Iterator[str]:
    """Localparts from text lines, stripped; blank lines and ``#`` comments skipped."""
    for line in lines:
        localpart = line.strip()
        if localpart and not localpart.startswith("#"):
            yield localpart
