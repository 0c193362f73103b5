"""The engine under every bulk run: streamed, adaptive per endpoint family, resumable.

A :class:`BulkJob` says what one kind of run does (register puppets, join them
to rooms, set their profiles); a :class:`BulkEngine` does the rest, the same
for all of them:

- the input is read in chunks of :data:`CHUNK_SIZE` (any iterable or async
  iterable: a million items are never held at once), and the job's
  :meth:`~BulkJob.prepare` screens each chunk and asks the store about it in
  one round trip, dispatching only what still needs requests;
- the work goes through the job's :class:`Stage`\\ s in order (e.g. register,
  then join), each with its own queue, its own workers and its own
  :class:`~bridge_kit.puppets._concurrency.AimdLimiter`, keyed by endpoint
  family: a 429 on joins halves the join concurrency and leaves registrations
  alone, and a stage held back does not hold the others' workers;
- what the homeserver confirmed is persisted by the job's
  :meth:`~BulkJob.flush` every :data:`FLUSH_INTERVAL` seconds and at the end,
  so a re-run (or a resume after a crash) skips it without a request;
- cancelling stops issuing requests, lets those in flight finish, flushes and
  returns the result with ``cancelled`` set; an error no retry can fix (the
  homeserver gone, the as_token refused, or what a job's stage raises as
  :class:`~bridge_kit.errors.RegistrationAborted`) stops the run at once with a
  diagnosis.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any, Final, Generic, Protocol, TypeVar

from bridge_kit.client.homeserver import ClientObserver, HomeserverClient
from bridge_kit.errors import HomeserverUnreachable, RegistrationAborted, UnknownToken
from bridge_kit.puppets._concurrency import AimdLimiter
from bridge_kit.puppets.results import diagnose_abort

__all__ = [
    "CHUNK_SIZE",
    "FLUSH_INTERVAL",
    "BulkEngine",
    "BulkJob",
    "Dispatch",
    "RunOutcome",
    "Stage",
    "chunks",
]

log = logging.getLogger(__name__)

#: Input items screened, and looked up in the store, per round trip.
CHUNK_SIZE: Final = 1000
#: Confirmed work is written to the store in one batch this often (seconds).
FLUSH_INTERVAL: Final = 0.5

In = TypeVar("In")
T = TypeVar("T")


class RunOutcome(Protocol):
    """What the engine sets on a job's result when the run ends early."""

    aborted: str | None
    cancelled: bool


class Stage(abc.ABC):
    """One step every item it gets goes through: one or a few requests of one family."""

    #: The endpoint family whose limiter bounds this stage: ``"register"``, ``"join"``...
    family: str

    @abc.abstractmethod
    async def send(self, item: Any) -> bool:
        """Do the item's requests; True passes it on to the next stage (and counts as a
        success for the limiter). A refusal of this item is counted by the job and
        returns False; :class:`RegistrationAborted` or :class:`HomeserverUnreachable`
        stop the run."""


#: ``await dispatch(stage_index, item)``: queue an item for a stage (waits when it is full).
Dispatch = Callable[[int, Any], Any]


R = TypeVar("R", bound=RunOutcome)


class BulkJob(abc.ABC, Generic[In, R]):
    """What one kind of bulk run does; see :class:`BulkEngine` for what it gets for free."""

    #: The run's result; the engine sets ``aborted`` and ``cancelled``.
    result: R

    @property
    @abc.abstractmethod
    def stages(self) -> Sequence[Stage]:
        """The stages, in the order an item goes through them."""

    @abc.abstractmethod
    async def prepare(self, chunk: list[In], dispatch: Dispatch) -> None:
        """Screen a chunk of input, ask the store about it, count what needs nothing,
        and ``await dispatch(stage, item)`` the rest, each to the stage it starts at."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Persist what was confirmed since the last flush (keep it for the next on failure)."""

    @abc.abstractmethod
    def family_of(self, method: str, endpoint: str) -> str | None:
        """The endpoint family a request belongs to, for its 429s (None: not this run's)."""

    @abc.abstractmethod
    def snapshot(self, elapsed: float, limiters: Mapping[str, AimdLimiter]) -> Any:
        """A progress snapshot for the ``progress`` callback."""

    @abc.abstractmethod
    def finish(
        self, elapsed: float, limiters: Mapping[str, AimdLimiter], rate_limited: Mapping[str, int]
    ) -> None:
        """Record the run's time and throttling in the result, once, at the end."""


class BulkEngine(Generic[In]):
    """Runs one :class:`BulkJob`: ``concurrency`` workers per stage, at most ``concurrency``
    requests in flight per endpoint family (fewer while the homeserver answers 429).

    ``progress`` is called about twice a second with the job's snapshot. With
    ``send`` False (a dry run) the input is screened and looked up, nothing is sent.
    """

    def __init__(
        self,
        client: HomeserverClient,
        job: BulkJob[In, Any],
        *,
        concurrency: int,
        progress: Callable[[Any], None] | None = None,
        send: bool = True,
    ) -> None:
        self.client = client
        self.job = job
        self.progress = progress
        stages = job.stages
        self.limiters = {stage.family: AimdLimiter(concurrency) for stage in stages}
        self.rate_limited = dict.fromkeys(self.limiters, 0)
        self.started = time.monotonic()
        self.stopping = False
        self.error: BaseException | None = None
        size = max(2 * CHUNK_SIZE, concurrency)
        self.queues: list[asyncio.Queue[Any]] = [asyncio.Queue(maxsize=size) for _ in stages]
        self.worker_count = concurrency if send else 0
        self.finished = asyncio.Event()
        self.producer: asyncio.Task[None] | None = None
        self.workers: list[asyncio.Task[None]] = []

    async def execute(self, items: Iterable[In] | AsyncIterable[In]) -> None:
        """Run to the end, a cancellation or an abort; raise what no result can report."""
        watch = _RateLimitWatch(self)
        self.client.observers.append(watch)
        self.producer = asyncio.create_task(self._produce(items))
        stages = range(len(self.queues))
        crews = [
            [asyncio.create_task(self._work(i)) for _ in range(self.worker_count)] for i in stages
        ]
        self.workers = [worker for crew in crews for worker in crew]
        lines = [asyncio.create_task(self._end_stage(i, crew)) for i, crew in enumerate(crews)]
        flusher = asyncio.create_task(self._flush_periodically())
        try:
            await self._wait_for(lines)
        finally:
            self.finished.set()
            with contextlib.suppress(ValueError):
                self.client.observers.remove(watch)
            await self._shutdown(lines, flusher)
        if self.error is not None:
            raise self.error

    async def _wait_for(self, lines: list[asyncio.Task[None]]) -> None:
        tasks = [*lines, *([self.producer] if self.producer is not None else [])]
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

    async def _shutdown(self, lines: list[asyncio.Task[None]], flusher: asyncio.Task[None]) -> None:
        """Stop every task of the run and persist what was confirmed; runs even when cancelled."""
        for task in (*lines, *self.workers, self.producer):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*lines, *self.workers, flusher, return_exceptions=True)
        if self.producer is not None:
            await asyncio.gather(self.producer, return_exceptions=True)
        await self.job.flush()
        self.job.finish(time.monotonic() - self.started, self.limiters, self.rate_limited)
        self._report_progress()

    def stop(self, *, cancelled: bool = False, aborted: str | None = None) -> None:
        """Stop issuing requests; the workers exit after the requests in flight."""
        outcome = self.job.result
        if aborted is not None and outcome.aborted is None:
            outcome.aborted = aborted
        if cancelled and outcome.aborted is None:
            outcome.cancelled = True
        if self.stopping:
            return
        self.stopping = True
        producer = self.producer
        if producer is not None and not producer.done() and producer is not asyncio.current_task():
            producer.cancel()
        # Unblock idle workers: drop what is queued (it was never sent) and wake them.
        for queue in self.queues:
            while not queue.empty():
                queue.get_nowait()
            for _ in range(self.worker_count):
                queue.put_nowait(None)

    def _fail(self, error: BaseException) -> None:
        """A broken input, store or job ends the run; the first error is raised at the end."""
        if self.error is None:
            self.error = error
        self.stop()

    # -- producer --------------------------------------------------------------

    async def _produce(self, items: Iterable[In] | AsyncIterable[In]) -> None:
        try:
            async for chunk in chunks(items, CHUNK_SIZE):
                await self.job.prepare(chunk, self._dispatch)
                if self.stopping:
                    return
        except _ABORTS as error:  # a job's prepare may ask the homeserver (aliases)
            self._abort(error)
            return
        except Exception as error:
            self._fail(error)
            return
        for _ in range(self.worker_count):
            await self.queues[0].put(None)

    async def _dispatch(self, stage: int, item: Any) -> None:
        if not self.stopping:
            await self.queues[stage].put(item)

    # -- stages and their workers ------------------------------------------------

    async def _end_stage(self, index: int, workers: list[asyncio.Task[None]]) -> None:
        """Wait for a stage's input to end and its workers to finish; then end the next
        stage's input."""
        if self.producer is not None and index == 0:
            await asyncio.wait([self.producer])
        if workers:
            await asyncio.wait(workers)
        if index + 1 < len(self.queues) and not self.stopping:
            for _ in range(self.worker_count):
                await self.queues[index + 1].put(None)

    def _abort(self, error: BaseException) -> None:
        diagnosis = (
            error.diagnosis if isinstance(error, RegistrationAborted) else diagnose_abort(error)
        )
        self.stop(aborted=diagnosis or str(error))

    async def _work(self, index: int) -> None:
        try:
            await self._send_queued(index)
        except _ABORTS as error:
            self._abort(error)
        except Exception as error:  # unexpected: end the run rather than leave it hanging
            self._fail(error)

    async def _send_queued(self, index: int) -> None:
        stage = self.job.stages[index]
        queue, limiter = self.queues[index], self.limiters[stage.family]
        following = self.queues[index + 1] if index + 1 < len(self.queues) else None
        send = stage.send
        while True:
            item = await queue.get()
            if item is None or self.stopping:
                return
            await limiter.acquire()
            success = False
            try:
                if self.stopping:
                    return
                success = await send(item)
            finally:
                limiter.release(success=success)
            if success and following is not None and not self.stopping:
                await following.put(item)

    # -- persisting and reporting ------------------------------------------------

    async def _flush_periodically(self) -> None:
        while not self.finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.finished.wait(), FLUSH_INTERVAL)
            try:
                await self.job.flush()
            except Exception as error:  # a broken store ends the run
                self._fail(error)
            if not self.finished.is_set():
                self._report_progress()

    def _report_progress(self) -> None:
        if self.progress is None:
            return
        try:
            self.progress(self.job.snapshot(time.monotonic() - self.started, self.limiters))
        except Exception:
            log.exception("the progress callback failed; no more progress reports")
            self.progress = None


#: What stops a run with a diagnosis instead of raising.
_ABORTS = (RegistrationAborted, HomeserverUnreachable, UnknownToken)


class _RateLimitWatch(ClientObserver):
    """Feeds the 429s of a run's own endpoint families into their limiters.

    The client is shared: a 429 on another endpoint (a puppet sending messages)
    says nothing about this run, and a 429 on joins says nothing about
    registrations, so each slows down only its own family.
    """

    def __init__(self, engine: BulkEngine[Any]) -> None:
        self._engine = engine

    def on_response(
        self, method: str, endpoint: str, status: int, errcode: str | None, seconds: float
    ) -> None:
        if status != 429:
            return
        engine = self._engine
        family = engine.job.family_of(method, endpoint)
        limiter = engine.limiters.get(family) if family is not None else None
        if limiter is None or family is None:
            return
        engine.rate_limited[family] += 1
        # 429s of requests already in flight at the cut arrive within about one
        # round trip; like TCP, cut at most once per round trip.
        limiter.congestion(seconds)


async def chunks(items: Iterable[T] | AsyncIterable[T], size: int) -> AsyncIterator[list[T]]:
    """Lists of up to ``size`` items from a sync or async iterable, yielding to the loop."""
    if isinstance(items, AsyncIterable):
        chunk: list[T] = []
        async for item in items:
            chunk.append(item)
            if len(chunk) >= size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
        return
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
        await asyncio.sleep(0)
