"""Join many puppets to many rooms: what :meth:`PuppetRegistrar.join_many` runs.

A :class:`JoinRun` is a job of the bulk engine (:mod:`bridge_kit.puppets.engine`)
over ``(localpart, room_id_or_alias)`` pairs. Per chunk of input it drops
repeated pairs and screens the rest locally, resolves each alias once (the
answer is kept for the run), asks the store which pairs are joined already
(skipped without a request) and which puppets are registered, and sends the
rest through two stages, each with its own AIMD limiter: ``register`` (only
for puppets neither the store nor this run registered) and ``join``. A join the
homeserver refuses with 403 falls back to what ``Intent.ensure_joined`` does:
when the puppet has no membership in a room entered by invite, the appservice's
bot invites it and it joins again; a banned puppet fails with the ban
(``JoinResult.banned``) and is never unbanned unless the run was asked to.
Every confirmed join is recorded in the room-state store in batches, so a
re-run sends nothing for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from bridge_kit.client.homeserver import REGISTER_ENDPOINT, HomeserverClient, quote_segment
from bridge_kit.errors import (
    Banned,
    MatrixRequestError,
    NotFound,
    UnexpectedReply,
    UnknownToken,
)
from bridge_kit.intent.convenience import about_the_room, let_in
from bridge_kit.intent.state_store import membership_event
from bridge_kit.puppets._concurrency import AimdLimiter, SeenSet
from bridge_kit.puppets.bulk import REGISTER, RegisterStage, puppet_problem
from bridge_kit.puppets.engine import BulkEngine, BulkJob, Dispatch, Stage
from bridge_kit.puppets.profiles import PROFILE, is_profile_update, put_profile_field
from bridge_kit.puppets.results import JoinResult, ProblemCallback, RunProgress, describe_failure
from bridge_kit.registration import Registration
from bridge_kit.store.base import Store
from bridge_kit.types.room import MembershipRequest
from bridge_kit.types.room_state import Member

if TYPE_CHECKING:
    from bridge_kit.intent import Intent

__all__ = ["JOIN", "JoinRun", "room_problem"]

#: The endpoint family of joins (and the bot's invites and unbans that let puppets in).
JOIN: Final = "join"
_CLIENT: Final = "/_matrix/client/v3"
_JOIN_ENDPOINT: Final = _CLIENT + "/join/{roomIdOrAlias}"
_JOIN_FAMILY: Final = frozenset(
    {_JOIN_ENDPOINT, _CLIENT + "/rooms/{roomId}/invite", _CLIENT + "/rooms/{roomId}/unban"}
)
#: Aliases resolved at once, per chunk of input.
_RESOLVING: Final = 16
_MAX_ID_BYTES: Final = 255
#: Localparts and rooms whose check is remembered, at most (each).
_REMEMBERED: Final = 65_536
#: A check not made yet (None means: nothing wrong).
_UNCHECKED: Final = "unchecked"


class _Pair(NamedTuple):
    """One pair on its way: the puppet, and the room (resolved) with servers to join via."""

    user_id: str
    localpart: str
    room_id: str
    via: tuple[str, ...]
    given: str  # the room as the input named it (an ID or an alias)

    @property
    def key(self) -> str:
        """How reports name the pair."""
        return f"{self.localpart} {self.given}"


def room_problem(room: object) -> str | None:
    """Why ``room`` is neither a room ID (``!…``) nor a room alias (``#…:server``), or None."""
    if not isinstance(room, str) or not room:
        return "no room given"
    if len(room.encode("utf-8", "surrogatepass")) > _MAX_ID_BYTES:
        return f"longer than {_MAX_ID_BYTES} bytes"
    if room.startswith("!") and len(room) > 1:
        return None
    if room.startswith("#") and ":" in room[2:]:
        return None
    return "not a room ID (!…) or room alias (#…:server)"


#: A screened pair with its room ID: (room_id, user_id, localpart, via, given); the
#: first two are how the store keys a membership.
_Target = tuple[str, str, str, tuple[str, ...], str]


class _Resolved(NamedTuple):
    room_id: str | None
    via: tuple[str, ...]
    reason: str | None


class _Profile(Stage):
    """Set the puppet's profile fields that differ from the store's, right before its join."""

    family = PROFILE

    def __init__(self, run: JoinRun) -> None:
        self._run = run

    async def send(self, item: _Pair) -> bool:
        run = self._run
        for field, value in run.profile_fields.pop(item.user_id, ()):
            failure = await put_profile_field(run.client, item.user_id, field, value)
            if failure is not None:
                run.failed(item.key, failure)
                return False
            run.profiles_set.append((item.user_id, field, value))
        return True


class _Join(Stage):
    """Join as the puppet; on 403, have the bot let it in and join again."""

    family = JOIN

    def __init__(self, run: JoinRun) -> None:
        self._run = run
        self._request = run.client.request

    async def send(self, item: _Pair) -> bool:
        run, result = self._run, self._run.result
        try:
            await self._join(item)
        except UnknownToken:
            raise
        except MatrixRequestError as error:
            if not about_the_room(error) or run.bot is None:
                run.failed(item.key, describe_failure(error))
                return False
            invited = await self._let_in_and_join(item, error)
            if invited is None:
                return False
            if invited:
                result.invited += 1
        except UnexpectedReply as error:
            run.failed(item.key, describe_failure(error))
            return False
        result.joined += 1
        run.confirmed.append((item.room_id, item.user_id))
        return True

    async def _join(self, item: _Pair) -> None:
        query = {"via": list(item.via), "server_name": list(item.via)} if item.via else None
        profile = self._run.member_profiles.get(item.localpart)
        body = (
            MembershipRequest()
            if profile is None
            else MembershipRequest(displayname=profile.displayname, avatar_url=profile.avatar_url)
        )
        await self._request(
            "POST",
            f"{_CLIENT}/join/{quote_segment(item.room_id)}",
            body=body,
            query=query,
            user_id=item.user_id,
            endpoint=_JOIN_ENDPOINT,
        )

    async def _let_in_and_join(self, item: _Pair, refusal: MatrixRequestError) -> bool | None:
        """Whether the bot invited the puppet before it joined; None: it did not join."""
        run = self._run
        assert run.bot is not None  # checked by the caller
        bot = run.bot()
        try:
            invited = await let_in(bot, item.room_id, item.user_id, refusal, unban=run.unban)
            await self._join(item)
        except UnknownToken:
            raise
        except Banned as ban:
            run.banned(item.key, ban)
            return None
        except (MatrixRequestError, UnexpectedReply) as error:
            reason = (
                f"not allowed to join, and the bot could not let it in: {describe_failure(error)}"
            )
            run.failed(item.key, reason)
            return None
        return invited


class JoinRun(BulkJob[tuple[str, str], JoinResult]):
    """The state of one :meth:`PuppetRegistrar.join_many` call.

    ``bot`` returns the appservice's bot (resolving aliases, letting refused
    puppets in); without it a refused join fails and aliases cannot be used.
    ``unban``: the bot lifts a puppet's ban (off by default: moderators decide).
    ``member_profiles``: the name and avatar a puppet (by localpart) joins with; the
    fields the store does not know as set are set as its global profile first (a
    stage between registering and joining), and its member event carries them.
    """

    def __init__(
        self,
        client: HomeserverClient,
        store: Store,
        registration: Registration,
        domain: str,
        *,
        bot: Callable[[], Intent] | None,
        concurrency: int,
        progress: Callable[[RunProgress], None] | None,
        total: int | None,
        on_problem: ProblemCallback | None = None,
        unban: bool = False,
        member_profiles: Mapping[str, Member] | None = None,
    ) -> None:
        self.client = client
        self.unban = unban
        self.member_profiles: Mapping[str, Member] = member_profiles or {}
        self.store = store
        self.registration = registration
        self.domain = domain
        self.bot = bot
        self.total = total
        self.on_problem = on_problem
        self.result = JoinResult()
        self.confirmed: list[tuple[str, str]] = []  # (room_id, user_id) joined, not yet stored
        #: The profile fields to set per puppet (user ID), and those set, not yet stored.
        self.profile_fields: dict[str, tuple[tuple[str, str], ...]] = {}
        self.profiles_set: list[tuple[str, str, str | None]] = []
        self._seen = SeenSet()
        self._aliases: dict[str, _Resolved] = {}
        self._puppet_problems: dict[str, str | None] = {}
        self._room_problems: dict[str, str | None] = {}
        self._registering = RegisterStage(client, store, self._puppet_refused)
        profile = (_Profile(self),) if self.member_profiles else ()
        self._stages: tuple[Stage, ...] = (self._registering, *profile, _Join(self))
        self.engine = BulkEngine(client, self, concurrency=concurrency, progress=progress)

    @property
    def stages(self) -> Sequence[Stage]:
        return self._stages

    def failed(self, key: str, reason: str) -> None:
        """Count a refused pair and tell ``on_problem``."""
        self.result.add_failure(key, reason)
        if self.on_problem is not None:
            self.on_problem("failed", key, reason)

    def banned(self, key: str, ban: Banned) -> None:
        """Count a pair whose puppet is banned from the room: failed, with the ban."""
        self.result.add_ban(ban)
        self.failed(key, f"banned, not unbanned: {ban.message}")

    def _invalid(self, key: str, reason: str) -> None:
        self.result.add_invalid(key, reason)
        if self.on_problem is not None:
            self.on_problem("invalid", key, reason)

    def _puppet_refused(self, item: _Pair, reason: str) -> None:
        self.failed(item.key, reason)

    # -- screen, resolve, ask the store --------------------------------------------

    async def prepare(self, chunk: list[tuple[str, str]], dispatch: Dispatch) -> None:
        screened, aliases = self._screen(chunk)
        if aliases:
            await self._resolve(aliases)
        targets = self._with_rooms(screened)
        if not targets:
            return
        # Only the pairs the store does not know as joined become _Pairs: on a re-run
        # that is none of them, and this is the whole cost of a known pair.
        joined = await self.store.joined_among([target[:2] for target in targets])
        waiting = [
            _Pair(user_id, localpart, room_id, via, given)
            for room_id, user_id, localpart, via, given in targets
            if (room_id, user_id) not in joined
        ]
        self.result.skipped_known += len(targets) - len(waiting)
        if not waiting:
            return
        registered = await self.store.registered_among({p.user_id for p in waiting})
        if self.member_profiles:
            await self._profile_changes(waiting)
        registering = self._registering
        for pair in waiting:
            known = pair.user_id in registered or registering.knows(pair.user_id)
            # A registered puppet with no profile to set goes straight to its join.
            profile = pair.user_id in self.profile_fields
            await dispatch(0 if not known else 1 if profile else len(self._stages) - 1, pair)

    async def _profile_changes(self, waiting: list[_Pair]) -> None:
        """Note the profile fields of ``waiting``'s puppets that the store does not know
        as set (once per puppet: its first pair sets them)."""
        given = self.member_profiles
        users = {p.user_id: given[p.localpart] for p in waiting if p.localpart in given}
        stored = await self.store.profiles_among(users)
        for user_id, member in users.items():
            have = stored.get(user_id, {})
            wanted = (("displayname", member.displayname), ("avatar_url", member.avatar_url))
            fields = tuple((f, v) for f, v in wanted if v and have.get(f) != v)
            if fields and user_id not in self.profile_fields:
                self.profile_fields[user_id] = fields

    def _screen(self, chunk: list[tuple[str, str]]) -> tuple[list[tuple[str, str, str]], list[str]]:
        """The new, valid pairs of ``chunk`` as (user_id, localpart, room), and the aliases
        among their rooms; counts the others. The per-pair hot path of a re-run."""
        result, add, domain = self.result, self._seen.add, self.domain
        puppets, rooms = self._puppet_problems, self._room_problems
        fresh: list[tuple[str, str, str]] = []
        aliases: list[str] = []
        for pair in chunk:
            if type(pair) is tuple and len(pair) == 2:
                localpart, room = pair
                if type(localpart) is not str or type(room) is not str:
                    localpart, room = _unpack(pair)
            else:
                localpart, room = _unpack(pair)
            if not add((localpart, room)):  # a tuple: a pair may come as a list
                result.duplicates += 1
                continue
            problem = puppets.get(localpart, _UNCHECKED)
            if problem is _UNCHECKED:
                problem = self._check_puppet(localpart)
            if problem is None:
                problem = rooms.get(room, _UNCHECKED)
                if problem is _UNCHECKED:
                    problem = self._check_room(room)
            if problem is not None:
                self._invalid(f"{localpart} {room}", problem)
                continue
            fresh.append((f"@{localpart}:{domain}", localpart, room))
            if room[0] == "#":
                aliases.append(room)
        return fresh, aliases

    def _check_puppet(self, localpart: str) -> str | None:
        """What is wrong with a localpart, remembered: a puppet is usually in many pairs."""
        puppets = self._puppet_problems
        if len(puppets) >= _REMEMBERED:
            puppets.clear()  # bounded memory; what goes is checked again
        problem = puppets[localpart] = puppet_problem(localpart, self.domain, self.registration)
        return problem

    def _check_room(self, room: str) -> str | None:
        """What is wrong with a room, remembered: a room is usually in very many pairs."""
        rooms = self._room_problems
        if len(rooms) >= _REMEMBERED:
            rooms.clear()
        problem = rooms[room] = room_problem(room)
        return problem

    async def _resolve(self, aliases: list[str]) -> None:
        """Resolve the aliases not resolved before, a few at once; remember the answers."""
        new = [alias for alias in dict.fromkeys(aliases) if alias not in self._aliases]
        for start in range(0, len(new), _RESOLVING):
            batch = new[start : start + _RESOLVING]
            answers = await asyncio.gather(*(self._resolve_one(alias) for alias in batch))
            self._aliases.update(zip(batch, answers, strict=True))

    async def _resolve_one(self, alias: str) -> _Resolved:
        if self.bot is None:
            reason = "aliases need the appservice's bot to resolve them"
        else:
            try:
                found = await self.bot().resolve_alias(alias)
                return _Resolved(found.room_id, tuple(found.servers), None)
            except UnknownToken:
                raise
            except NotFound:
                reason = "no such alias (404)"
            except (MatrixRequestError, UnexpectedReply) as error:
                reason = describe_failure(error)
        self.result.add_alias_failure(alias, reason)
        return _Resolved(None, (), reason)

    def _with_rooms(self, screened: list[tuple[str, str, str]]) -> list[_Target]:
        """The screened pairs with their room IDs; pairs of an unresolved alias fail, and
        an alias pair whose room this run has for that puppet already is a duplicate."""
        targets: list[_Target] = []
        for user_id, localpart, room in screened:
            if room[0] != "#":
                targets.append((room, user_id, localpart, (), room))
                continue
            resolved = self._aliases[room]
            if resolved.room_id is None:
                self.failed(f"{localpart} {room}", f"alias not resolved: {resolved.reason}")
            elif not self._seen.add((localpart, resolved.room_id)):
                # The room was named by its ID (or another alias) for this puppet too:
                # one membership, one join. Keyed as a by-ID pair is, so either order works.
                self.result.duplicates += 1
            else:
                targets.append((resolved.room_id, user_id, localpart, resolved.via, room))
        return targets

    # -- persisting and reporting ------------------------------------------------

    async def flush(self) -> None:
        await self._registering.flush()
        profiles = self.profiles_set[:]
        del self.profiles_set[:]
        if profiles:
            try:
                await self.store.set_profiles(profiles)
            except BaseException:
                self.profiles_set.extend(profiles)
                raise
        batch = self.confirmed[:]
        del self.confirmed[:]
        if not batch:
            return
        try:
            await self._record(batch)
        except BaseException:
            self.confirmed.extend(batch)  # kept for the final flush
            raise

    async def _record(self, batch: list[tuple[str, str]]) -> None:
        """Record the joins in the room-state store, with the profile this bridge set
        (as ``Intent.join_room`` does: the homeserver puts it in the member event), or
        the one the join gave."""
        given = {f"@{lp}:{self.domain}": member for lp, member in self.member_profiles.items()}
        profiles = await self.store.profiles_among({u for _, u in batch if u not in given})
        by_room: dict[str, list[str]] = {}
        for room_id, user_id in batch:
            by_room.setdefault(room_id, []).append(user_id)
        for room_id, users in by_room.items():
            events = [
                membership_event(
                    room_id, user, user, "join", given.get(user) or _member(profiles.get(user))
                )
                for user in users
            ]
            await self.store.apply_state(room_id, events)

    def family_of(self, method: str, endpoint: str) -> str | None:
        if endpoint == REGISTER_ENDPOINT:
            return REGISTER
        if self.member_profiles and is_profile_update(method, endpoint):
            return PROFILE
        return JOIN if method == "POST" and endpoint in _JOIN_FAMILY else None

    def snapshot(self, elapsed: float, limiters: Mapping[str, AimdLimiter]) -> RunProgress:
        result = self.result
        return RunProgress(
            done=result.done,
            total=self.total,
            elapsed=elapsed,
            counts=tuple(result.outcome_rows()),
            concurrency=tuple((family, limiter.limit) for family, limiter in limiters.items()),
        )

    def finish(
        self, elapsed: float, limiters: Mapping[str, AimdLimiter], rate_limited: Mapping[str, int]
    ) -> None:
        result = self.result
        result.elapsed = elapsed
        result.registered = self._registering.registered
        result.already_existed = self._registering.already_existed
        result.lowest_concurrency = {family: lim.lowest for family, lim in limiters.items()}
        result.rate_limited = dict(rate_limited)


def _unpack(pair: Any) -> tuple[str, str]:
    """A pair from the input; anything else is a bug in the caller, said plainly."""
    try:
        localpart, room = pair
    except (TypeError, ValueError):
        raise TypeError(
            f"join_many takes (localpart, room_id_or_alias) pairs, not {pair!r:.100}"
        ) from None
    if not (isinstance(localpart, str) and isinstance(room, str)):
        raise TypeError(f"join_many takes pairs of strings, not {pair!r:.100}")
    return localpart, room


def _member(profile: Mapping[str, str | None] | None) -> Member | None:
    if not profile:
        return None
    return Member(profile.get("displayname"), profile.get("avatar_url"))
