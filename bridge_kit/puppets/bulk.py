"""One streamed, resumable bulk registration: what :meth:`PuppetRegistrar.register_many` runs.

A :class:`BulkRun` streams its input in chunks, drops duplicates and screens
each localpart locally, looks the store up per chunk, sends the rest through a
pool of workers whose concurrency halves on every 429 and grows back slowly
(AIMD), and persists outcomes in batches. Errors that no retry can fix
(unknown token, forbidden, resource limit, homeserver gone) stop the whole run
at once with a diagnosis in plain words. :func:`localparts_from_lines` turns a
file of localparts into such an input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from itertools import islice
from typing import Final

from bridge_kit.client import REGISTER_ENDPOINT, ClientObserver, HomeserverClient
from bridge_kit.errors import HomeserverUnreachable, MatrixRequestError, UnexpectedReply, UserInUse
from bridge_kit.ids import localpart_problem
from bridge_kit.puppets._concurrency import AimdLimiter, SeenSet
from bridge_kit.puppets.results import (
    BulkProgress,
    BulkResult,
    ProblemCallback,
    ProgressCallback,
    describe_failure,
    diagnose_abort,
)
from bridge_kit.registration import Registration
from bridge_kit.store.base import Store
from bridge_kit.types.register import RegisterRequest

__all__ = ["CHUNK_SIZE", "FLUSH_INTERVAL", "BulkRun", "localparts_from_lines"]

log = logging.getLogger(__name__)

#: Localparts screened, and looked up in the store, per round trip.
CHUNK_SIZE: Final = 1000
#: Confirmed registrations are written to the store in one batch this often (seconds).
FLUSH_INTERVAL: Final = 0.5

_NOT_IN_NAMESPACE: Final = "not in this appservice's user namespaces"

_Item = tuple[str, str]  # (user_id, localpart)


class BulkRun:
    """The state of one :meth:`PuppetRegistrar.register_many` call.

    The registrar's ``client``, ``store``, ``registration`` and ``domain`` do
    the work; the keyword arguments are those of ``register_many``.
    """

    def __init__(
        self,
        client: HomeserverClient,
        store: Store,
        registration: Registration,
        domain: str,
        *,
        concurrency: int,
        progress: ProgressCallback | None,
        dry_run: bool,
        total: int | None,
        on_problem: ProblemCallback | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.registration = registration
        self.domain = domain
        self.concurrency = concurrency
        self.progress = progress
        self.dry_run = dry_run
        self.total = total
        self.on_problem = on_problem
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
        """Run to the end, a cancellation or an abort; raise what no result can report."""
        watch = _RateLimitWatch(self.limiter, self.result)
        self.client.observers.append(watch)
        self.producer = asyncio.create_task(self._produce(localparts))
        worker_count = 0 if self.dry_run else self.concurrency
        self.workers = [asyncio.create_task(self._work()) for _ in range(worker_count)]
        flusher = asyncio.create_task(self._flush_periodically())
        try:
            await self._wait_for_tasks()
        finally:
            self.finished.set()
            with contextlib.suppress(ValueError):
                self.client.observers.remove(watch)
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
        seen = SeenSet()
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

    def _screen(self, chunk: list[str], seen: SeenSet) -> list[_Item]:
        """The new, valid, in-namespace localparts of ``chunk``; counts the others."""
        result = self.result
        domain = self.domain
        in_namespace = self.registration.is_user_in_namespace
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
            result.add_invalid(localpart, problem)
            if self.on_problem is not None:
                self.on_problem("invalid", localpart, problem)
        return fresh

    async def _dispatch(self, fresh: list[_Item]) -> None:
        known = await self.store.registered_among([user_id for user_id, _ in fresh])
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
        register = self.client.register
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
                except (MatrixRequestError, UnexpectedReply) as error:
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

    def _refused(self, localpart: str, error: MatrixRequestError | UnexpectedReply) -> None:
        diagnosis = diagnose_abort(error)
        if diagnosis is not None:
            self.stop(aborted=diagnosis)
            return
        reason = describe_failure(error)
        self.result.add_failure(localpart, reason)
        if self.on_problem is not None:
            self.on_problem("failed", localpart, reason)

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
            await self.store.mark_registered(batch)
        except BaseException:
            self.confirmed.extend(batch)  # keep them for the final flush
            raise

    def _report_progress(self) -> None:
        if self.progress is None:
            return
        try:
            self.progress(self._snapshot())
        except Exception:
            log.exception("the progress callback failed; no more progress reports")
            self.progress = None

    def _snapshot(self) -> BulkProgress:
        result = self.result
        return BulkProgress(
            done=result.done,
            total=self.total,
            elapsed=time.monotonic() - self.started,
            registered=result.registered,
            already_existed=result.already_existed,
            skipped_known=result.skipped_known,
            invalid=result.invalid,
            failed=result.failed,
            concurrency=self.limiter.limit,
        )


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
