"""One streamed, resumable bulk registration: what :meth:`PuppetRegistrar.register_many` runs.

A :class:`BulkRun` is the registration job of the bulk engine
(:mod:`bridge_kit.puppets.engine`): it drops duplicate localparts and screens
each locally, looks each chunk up in the store, and registers the rest through
one stage whose concurrency halves on every 429 and grows back slowly (AIMD);
confirmed puppets are persisted in batches. Errors that no retry can fix
(unknown token, forbidden, resource limit, homeserver gone) stop the whole run
at once with a diagnosis in plain words. :func:`localparts_from_lines` turns a
file of localparts into such an input.

:class:`RegisterStage` is the registration step the other bulk runs share:
``join_many`` and ``sync_profiles`` register the puppets the store does not
know before acting as them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol

from bridge_kit.client.homeserver import REGISTER_ENDPOINT, HomeserverClient
from bridge_kit.errors import MatrixRequestError, RegistrationAborted, UnexpectedReply, UserInUse
from bridge_kit.ids import localpart_problem
from bridge_kit.puppets._concurrency import AimdLimiter, SeenSet
from bridge_kit.puppets.engine import (
    CHUNK_SIZE,
    FLUSH_INTERVAL,
    BulkEngine,
    BulkJob,
    Dispatch,
    Stage,
)
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

__all__ = [
    "CHUNK_SIZE",
    "FLUSH_INTERVAL",
    "NOT_IN_NAMESPACE",
    "BulkRun",
    "RegisterStage",
    "localparts_from_lines",
]

NOT_IN_NAMESPACE: Final = "not in this appservice's user namespaces"

#: The endpoint family of registrations, with its own limiter in every run.
REGISTER: Final = "register"

_Item = tuple[str, str]  # (user_id, localpart)


class _HasPuppet(Protocol):
    """An item of a run that acts as a puppet: a pair to join, a profile to set."""

    @property
    def user_id(self) -> str: ...

    @property
    def localpart(self) -> str: ...


#: Refused puppets a :class:`RegisterStage` remembers (with the reason), at most.
_REFUSALS_KEPT: Final = 65_536

#: ``refused(item, reason)``: the homeserver would not register the item's puppet.
_Refused = Callable[[Any, str], None]


def puppet_problem(localpart: str, domain: str, registration: Registration) -> str | None:
    """Why ``localpart`` cannot be one of this appservice's puppets, or None."""
    problem = localpart_problem(localpart, domain)
    if problem is None and not registration.is_user_in_namespace(f"@{localpart}:{domain}"):
        return NOT_IN_NAMESPACE
    return problem


def registration_refused(error: MatrixRequestError | UnexpectedReply) -> str:
    """The reason a registration was refused, or :class:`RegistrationAborted` (which
    stops the run) when every one would be."""
    diagnosis = diagnose_abort(error)
    if diagnosis is not None:
        raise RegistrationAborted(
            diagnosis, error if isinstance(error, MatrixRequestError) else None
        )
    return describe_failure(error)


class _Register(Stage):
    """``register_many``'s one stage: register, count, remember for the next flush."""

    family = REGISTER

    def __init__(self, run: BulkRun) -> None:
        self._run = run
        self._register = run.client.register

    async def send(self, item: _Item) -> bool:
        run, result = self._run, self._run.result
        user_id, localpart = item
        try:
            await self._register(RegisterRequest.for_puppet(localpart))
        except UserInUse:
            result.already_existed += 1
        except (MatrixRequestError, UnexpectedReply) as error:
            reason = registration_refused(error)
            result.add_failure(localpart, reason)
            if run.on_problem is not None:
                run.on_problem("failed", localpart, reason)
            return False
        else:
            result.registered += 1
        run.confirmed.append(user_id)
        return True


class BulkRun(BulkJob[str, BulkResult]):
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
        self.dry_run = dry_run
        self.total = total
        self.on_problem = on_problem
        self.result = BulkResult(dry_run=dry_run, lowest_concurrency=concurrency)
        self.confirmed: list[str] = []
        self._seen = SeenSet()
        self._stages = (_Register(self),)
        self.engine = BulkEngine(
            client, self, concurrency=concurrency, progress=progress, send=not dry_run
        )

    async def execute(self, localparts: Iterable[str] | AsyncIterable[str]) -> BulkResult:
        """Run to the end, a cancellation or an abort; raise what no result can report."""
        await self.engine.execute(localparts)
        return self.result

    def stop(self, *, cancelled: bool = False, aborted: str | None = None) -> None:
        """Stop issuing requests; the workers exit after the requests in flight."""
        self.engine.stop(cancelled=cancelled, aborted=aborted)

    @property
    def stages(self) -> Sequence[Stage]:
        return self._stages

    # -- screen, deduplicate, ask the store --------------------------------------

    async def prepare(self, chunk: list[str], dispatch: Dispatch) -> None:
        fresh = self._screen(chunk)
        if not fresh:
            return
        known = await self.store.registered_among([user_id for user_id, _ in fresh])
        result = self.result
        for item in fresh:
            if item[0] in known:
                result.skipped_known += 1
            elif self.dry_run:
                result.would_register += 1
            else:
                await dispatch(0, item)

    def _screen(self, chunk: list[str]) -> list[_Item]:
        """The new, valid, in-namespace localparts of ``chunk``; counts the others."""
        result, seen = self.result, self._seen
        domain, registration = self.domain, self.registration
        fresh: list[_Item] = []
        for localpart in chunk:
            if not seen.add(localpart):
                result.duplicates += 1
                continue
            problem = puppet_problem(localpart, domain, registration)
            if problem is None:
                fresh.append((f"@{localpart}:{domain}", localpart))
                continue
            result.add_invalid(localpart, problem)
            if self.on_problem is not None:
                self.on_problem("invalid", localpart, problem)
        return fresh

    # -- persisting and reporting ------------------------------------------------

    async def flush(self) -> None:
        batch = self.confirmed[:]
        # Cleared in place: the stage appends to this very list.
        del self.confirmed[:]
        if not batch:
            return
        try:
            await self.store.mark_registered(batch)
        except BaseException:
            self.confirmed.extend(batch)  # keep them for the final flush
            raise

    def family_of(self, method: str, endpoint: str) -> str | None:
        return REGISTER if method == "POST" and endpoint == REGISTER_ENDPOINT else None

    def snapshot(self, elapsed: float, limiters: Mapping[str, AimdLimiter]) -> BulkProgress:
        result = self.result
        return BulkProgress(
            done=result.done,
            total=self.total,
            elapsed=elapsed,
            registered=result.registered,
            already_existed=result.already_existed,
            skipped_known=result.skipped_known,
            invalid=result.invalid,
            failed=result.failed,
            concurrency=limiters[REGISTER].limit,
        )

    def finish(
        self, elapsed: float, limiters: Mapping[str, AimdLimiter], rate_limited: Mapping[str, int]
    ) -> None:
        self.result.elapsed = elapsed
        self.result.lowest_concurrency = limiters[REGISTER].lowest
        self.result.rate_limited = rate_limited[REGISTER]


class RegisterStage(Stage):
    """Registers the puppet of an item (``item.user_id``, ``item.localpart``) the store
    did not know, once per puppet however many items name it (a refusal too: the
    puppet's later items are refused with the same reason, without a request).

    Items whose puppet this run registered already pass straight on; one whose
    puppet is being registered waits for that request. ``registered`` and
    ``already_existed`` count puppets; ``refused(item, reason)`` is told of an item
    whose puppet the homeserver refused. Confirmed puppets wait in ``confirmed``
    for the job's flush (:meth:`flush`).
    """

    family = REGISTER

    def __init__(self, client: HomeserverClient, store: Store, refused: _Refused) -> None:
        self._register = client.register
        self._store = store
        self._refused = refused
        self._done = SeenSet()
        self._pending: dict[str, asyncio.Future[str | None]] = {}
        self._refusals: dict[str, str] = {}  # user ID -> why the homeserver refused it
        self.registered = 0
        self.already_existed = 0
        self.confirmed: list[str] = []

    def knows(self, user_id: str) -> bool:
        """Whether this run registered (or found) the puppet already."""
        return user_id in self._done

    async def send(self, item: _HasPuppet) -> bool:
        user_id = item.user_id
        if user_id in self._done:
            return True
        refusal = self._refusals.get(user_id)
        if refusal is not None:  # asked once this run: the next items are refused alike
            self._refused(item, refusal)
            return False
        pending = self._pending.get(user_id)
        if pending is not None:
            reason = await asyncio.shield(pending)
        else:
            future = asyncio.get_running_loop().create_future()
            self._pending[user_id] = future
            try:
                reason = await self._register_one(user_id, item.localpart)
                future.set_result(reason)
            except BaseException as error:
                future.set_exception(error)
                future.exception()  # retrieved here: the waiters re-raise it themselves
                raise
            finally:
                del self._pending[user_id]
        if reason is not None:
            self._refused(item, reason)
            return False
        return True

    async def _register_one(self, user_id: str, localpart: str) -> str | None:
        """Register; None on success (or ``M_USER_IN_USE``), else the refusal's reason."""
        try:
            await self._register(RegisterRequest.for_puppet(localpart))
        except UserInUse:
            self.already_existed += 1
        except (MatrixRequestError, UnexpectedReply) as error:
            reason = f"registering {user_id}: {registration_refused(error)}"
            if len(self._refusals) >= _REFUSALS_KEPT:
                self._refusals.clear()  # bounded memory; a forgotten one is asked again
            self._refusals[user_id] = reason
            return reason
        else:
            self.registered += 1
        self._done.add(user_id)
        self.confirmed.append(user_id)
        return None

    async def flush(self) -> None:
        """Record the puppets confirmed since the last flush as registered."""
        batch = self.confirmed[:]
        del self.confirmed[:]
        if not batch:
            return
        try:
            await self._store.mark_registered(batch)
        except BaseException:
            self.confirmed.extend(batch)
            raise


def localparts_from_lines(lines: Iterable[str]) -> Iterator[str]:
    """Localparts from text lines, stripped; blank lines and ``#`` comments skipped."""
    for line in lines:
        localpart = line.strip()
        if localpart and not localpart.startswith("#"):
            yield localpart
