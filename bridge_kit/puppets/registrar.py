"""The front door for puppets: :class:`PuppetRegistrar`.

It checks every localpart locally (grammar, length, namespace) before anything
is sent, asks the store before the homeserver, and records what the homeserver
confirmed, so a puppet is never sent twice once it is known. One puppet is
registered on demand by :meth:`~PuppetRegistrar.ensure_registered`; many go
through :meth:`~PuppetRegistrar.register_many`, which hands them to a
:class:`~bridge_kit.puppets.bulk.BulkRun`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sized
from typing import TYPE_CHECKING, Any

from bridge_kit.client.homeserver import HomeserverClient
from bridge_kit.errors import (
    Forbidden,
    InvalidLocalpart,
    NotInNamespace,
    RegistrationAborted,
    ResourceLimitExceeded,
    UnknownToken,
    UserInUse,
)
from bridge_kit.ids import localpart_problem
from bridge_kit.puppets.bulk import BulkRun
from bridge_kit.puppets.joins import JoinRun
from bridge_kit.puppets.profiles import ProfileItem, ProfileRun
from bridge_kit.puppets.results import (
    BulkResult,
    JoinResult,
    ProblemCallback,
    ProfileResult,
    ProgressCallback,
    RunProgress,
    diagnose_abort,
)
from bridge_kit.registration import Registration
from bridge_kit.store.base import Store
from bridge_kit.types.register import RegisterRequest
from bridge_kit.types.room_state import Member

if TYPE_CHECKING:
    from bridge_kit.intent import Intent
    from bridge_kit.intent.state_store import RoomStateStore

__all__ = ["PuppetRegistrar"]


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
        *,
        room_state: RoomStateStore[Intent] | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.registration = registration
        self.domain = domain
        # The bot behind it resolves aliases and lets refused puppets in, for join_many.
        self.room_state = room_state
        self._in_flight: dict[str, asyncio.Task[bool]] = {}
        self._runs: set[_Run] = set()

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
        on_problem: ProblemCallback | None = None,
    ) -> BulkResult:
        """Register many puppets, streaming ``localparts`` (any iterable or async iterable).

        At most ``concurrency`` register requests are in flight; a 429 halves
        that, successes grow it back. ``progress`` is called about twice a
        second with a :class:`BulkProgress`. ``dry_run`` checks everything and
        asks the store, but sends nothing. ``total`` (the input length) helps
        progress displays when ``localparts`` has no ``len()``. The result keeps
        the first :data:`~bridge_kit.puppets.results.KEPT_PROBLEMS` invalid and
        refused localparts with their reasons; ``on_problem(kind, localpart,
        reason)`` (``kind`` is ``"invalid"`` or ``"failed"``) gets every one, e.g.
        to stream them to a report. It runs inline and must not raise.

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
        run = BulkRun(
            self.client,
            self.store,
            self.registration,
            self.domain,
            concurrency=concurrency,
            progress=progress,
            dry_run=dry_run,
            total=total,
            on_problem=on_problem,
        )
        self._runs.add(run)
        try:
            return await run.execute(localparts)
        finally:
            self._runs.discard(run)

    async def join_many(
        self,
        pairs: Iterable[tuple[str, str]] | AsyncIterable[tuple[str, str]],
        *,
        concurrency: int = 16,
        progress: Callable[[RunProgress], None] | None = None,
        total: int | None = None,
        on_problem: ProblemCallback | None = None,
        unban: bool = False,
        member_profiles: Mapping[str, Member] | None = None,
    ) -> JoinResult:
        """Join puppets to rooms, streaming ``(localpart, room_id_or_alias)`` pairs.

        Pairs the room-state store knows as joined are skipped without a request;
        a puppet neither the store nor this run registered is registered first;
        a join refused with 403 is retried after the appservice's bot invites the
        puppet when it has no membership in a room entered by invite, as
        :meth:`Intent.ensure_joined` does. A banned puppet fails with the ban
        (counted in ``result.banned``, the errors in ``result.bans``) unless
        ``unban=True``; any other refusal fails as it came. A puppet in
        ``member_profiles`` (localpart → :class:`Member`) gets that name and avatar
        as its global profile right before its join (only the fields the store does
        not know as set; a ``profile`` stage with its own limit), and its member
        event carries them. Each
        alias is resolved once per run. Every join is recorded in the store, so a
        re-run, or a resume after a crash, sends nothing for work already done.

        Registrations and joins each have their own limit of ``concurrency``
        requests in flight, halved on that family's 429s only. ``progress``,
        ``total``, ``on_problem`` (with ``"localpart room"`` as the item) and
        cancelling (:meth:`cancel`) work as for :meth:`register_many`.
        """
        _check_bulk_input(pairs, concurrency, "join_many")
        bot = self.room_state.bot if self.room_state is not None else None
        run = JoinRun(
            self.client,
            self.store,
            self.registration,
            self.domain,
            bot=bot,
            concurrency=concurrency,
            progress=progress,
            total=_length(pairs, total),
            on_problem=on_problem,
            unban=unban,
            member_profiles=member_profiles,
        )
        await self._execute(run, pairs)
        return run.result

    async def sync_profiles(
        self,
        items: Iterable[ProfileItem] | AsyncIterable[ProfileItem],
        *,
        concurrency: int = 16,
        progress: Callable[[RunProgress], None] | None = None,
        total: int | None = None,
        on_problem: ProblemCallback | None = None,
    ) -> ProfileResult:
        """Set puppets' profiles, streaming ``(localpart, displayname, avatar_mxc)`` items.

        An empty or ``None`` field leaves that value alone; a value the store says
        this bridge set already is not sent again, and a puppet with nothing left
        to change costs no request. Puppets the store does not know are registered
        first. What is set is recorded, so a re-run sends nothing for it. A
        localpart given twice keeps its first item. Concurrency (registrations and
        profile updates each limited on their own), ``progress``, ``total``,
        ``on_problem`` and cancelling work as for :meth:`join_many`.
        """
        _check_bulk_input(items, concurrency, "sync_profiles")
        run = ProfileRun(
            self.client,
            self.store,
            self.registration,
            self.domain,
            concurrency=concurrency,
            progress=progress,
            total=_length(items, total),
            on_problem=on_problem,
        )
        await self._execute(run, items)
        return run.result

    async def _execute(self, run: JoinRun | ProfileRun, items: Any) -> None:
        self._runs.add(run)
        try:
            await run.engine.execute(items)
        finally:
            self._runs.discard(run)

    def cancel(self) -> None:
        """Stop every running bulk run (:meth:`register_many`, :meth:`join_many`,
        :meth:`sync_profiles`) gracefully; safe in a signal handler."""
        for run in list(self._runs):
            run.engine.stop(cancelled=True)


_Run = BulkRun | JoinRun | ProfileRun


def _check_bulk_input(items: object, concurrency: int, name: str) -> None:
    if isinstance(items, str | bytes):
        raise TypeError(f"{name} takes an iterable of items, not one string")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")


def _length(items: object, total: int | None) -> int | None:
    if total is None and isinstance(items, Sized):
        return len(items)
    return total
