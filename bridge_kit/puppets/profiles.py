"""Set many puppets' profiles: what :meth:`PuppetRegistrar.sync_profiles` runs.

A :class:`ProfileRun` is a job of the bulk engine (:mod:`bridge_kit.puppets.engine`)
over ``(localpart, displayname, avatar_mxc)`` items. An empty or ``None`` field
leaves that value alone. Per chunk of input it asks the store (in one query)
what this bridge last set for each puppet and keeps only the fields that
differ; a puppet with nothing left to change is skipped without a request.
The rest go through two stages, each with its own AIMD limiter: ``register``
(for puppets the store does not know) and ``profile`` (one ``PUT`` per field).
What the homeserver confirmed is recorded in the store in batches, so a re-run
sends nothing for it.

Like ``Intent.set_displayname``, the store only knows what this bridge set: a
change made outside the bridge goes unseen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple

from bridge_kit.client.homeserver import REGISTER_ENDPOINT, HomeserverClient, quote_segment
from bridge_kit.errors import MatrixRequestError, UnexpectedReply, UnknownToken
from bridge_kit.puppets._concurrency import AimdLimiter, SeenSet
from bridge_kit.puppets.bulk import REGISTER, RegisterStage, puppet_problem
from bridge_kit.puppets.engine import BulkEngine, BulkJob, Dispatch, Stage
from bridge_kit.puppets.results import ProblemCallback, ProfileResult, RunProgress, describe_failure
from bridge_kit.registration import Registration
from bridge_kit.store.base import Store
from bridge_kit.types.room import AvatarUrlUpdate, DisplaynameUpdate

__all__ = ["PROFILE", "ProfileRun", "is_profile_update", "put_profile_field"]

#: The endpoint family of profile updates.
PROFILE: Final = "profile"
_CLIENT: Final = "/_matrix/client/v3"
_ENDPOINTS: Final = {
    "displayname": _CLIENT + "/profile/{userId}/displayname",
    "avatar_url": _CLIENT + "/profile/{userId}/avatar_url",
}


def is_profile_update(method: str, endpoint: str) -> bool:
    """Whether a request (method, endpoint template) sets a profile field."""
    return method == "PUT" and endpoint in _ENDPOINTS.values()


async def put_profile_field(
    client: HomeserverClient, user_id: str, field: str, value: str
) -> str | None:
    """``PUT`` one profile field (``displayname``, ``avatar_url``) as the puppet; what
    went wrong, in a line, or None. :class:`UnknownToken` is raised: nothing can work."""
    body = DisplaynameUpdate(value) if field == "displayname" else AvatarUrlUpdate(value)
    path = f"{_CLIENT}/profile/{quote_segment(user_id)}/{field}"
    try:
        await client.request("PUT", path, body=body, user_id=user_id, endpoint=_ENDPOINTS[field])
    except UnknownToken:
        raise
    except (MatrixRequestError, UnexpectedReply) as error:
        return f"setting {field}: {describe_failure(error)}"
    return None


_MAX_FIELD_BYTES: Final = 65_536  # no profile field comes near this; a bigger one is a mistake

#: (localpart, displayname, avatar_mxc): the input items.
ProfileItem = tuple[str, str | None, str | None]


class _Change(NamedTuple):
    """One puppet whose profile needs the ``fields`` (name, value) set."""

    user_id: str
    localpart: str
    fields: tuple[tuple[str, str], ...]


class _SetProfile(Stage):
    """``PUT`` each changed field as the puppet."""

    family = PROFILE

    def __init__(self, run: ProfileRun) -> None:
        self._run = run

    async def send(self, item: _Change) -> bool:
        run, result = self._run, self._run.result
        for field, value in item.fields:
            failure = await put_profile_field(run.client, item.user_id, field, value)
            if failure is not None:
                run.failed(item.localpart, failure)
                return False
            if field == "displayname":
                result.displaynames_set += 1
            else:
                result.avatars_set += 1
            run.confirmed.append((item.user_id, field, value))
        result.updated += 1
        return True


class ProfileRun(BulkJob[ProfileItem, ProfileResult]):
    """The state of one :meth:`PuppetRegistrar.sync_profiles` call."""

    def __init__(
        self,
        client: HomeserverClient,
        store: Store,
        registration: Registration,
        domain: str,
        *,
        concurrency: int,
        progress: Callable[[RunProgress], None] | None,
        total: int | None,
        on_problem: ProblemCallback | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.registration = registration
        self.domain = domain
        self.total = total
        self.on_problem = on_problem
        self.result = ProfileResult()
        self.confirmed: list[tuple[str, str, str | None]] = []  # (user, field, value) set
        self._seen = SeenSet()
        self._registering = RegisterStage(client, store, self._puppet_refused)
        self._stages = (self._registering, _SetProfile(self))
        self.engine = BulkEngine(client, self, concurrency=concurrency, progress=progress)

    @property
    def stages(self) -> Sequence[Stage]:
        return self._stages

    def failed(self, localpart: str, reason: str) -> None:
        """Count a refused puppet and tell ``on_problem``."""
        self.result.add_failure(localpart, reason)
        if self.on_problem is not None:
            self.on_problem("failed", localpart, reason)

    def _puppet_refused(self, item: _Change, reason: str) -> None:
        self.failed(item.localpart, reason)

    # -- screen, ask the store ------------------------------------------------------

    async def prepare(self, chunk: list[ProfileItem], dispatch: Dispatch) -> None:
        wanted = self._screen(chunk)
        if not wanted:
            return
        stored = await self.store.profiles_among(user_id for user_id, _, _ in wanted)
        changes: list[_Change] = []
        for user_id, localpart, fields in wanted:
            have = stored.get(user_id, {})
            fresh = tuple((f, v) for f, v in fields if f not in have or have[f] != v)
            if fresh:
                changes.append(_Change(user_id, localpart, fresh))
            else:
                self.result.skipped_known += 1
        if not changes:
            return
        registered = await self.store.registered_among({change.user_id for change in changes})
        for change in changes:
            known = change.user_id in registered or self._registering.knows(change.user_id)
            await dispatch(1 if known else 0, change)

    def _screen(
        self, chunk: list[ProfileItem]
    ) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
        """The new, valid items of ``chunk`` with the fields they give; counts the others."""
        result, seen = self.result, self._seen
        wanted: list[tuple[str, str, tuple[tuple[str, str], ...]]] = []
        for item in chunk:
            localpart, displayname, avatar = _unpack(item)
            if not seen.add(localpart):
                result.duplicates += 1
                continue
            problem = puppet_problem(localpart, self.domain, self.registration)
            if problem is None:
                problem = _value_problem(displayname, avatar)
            if problem is not None:
                result.add_invalid(localpart, problem)
                if self.on_problem is not None:
                    self.on_problem("invalid", localpart, problem)
                continue
            fields = (("displayname", displayname), ("avatar_url", avatar))
            given = tuple((field, value) for field, value in fields if value)
            if given:
                wanted.append((f"@{localpart}:{self.domain}", localpart, given))
            else:
                result.skipped_known += 1  # nothing to set: every field is left alone
        return wanted

    # -- persisting and reporting ------------------------------------------------

    async def flush(self) -> None:
        await self._registering.flush()
        batch = self.confirmed[:]
        del self.confirmed[:]
        if not batch:
            return
        try:
            await self.store.set_profiles(batch)
        except BaseException:
            self.confirmed.extend(batch)
            raise

    def family_of(self, method: str, endpoint: str) -> str | None:
        if endpoint == REGISTER_ENDPOINT:
            return REGISTER
        return PROFILE if is_profile_update(method, endpoint) else None

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


def _unpack(item: Any) -> ProfileItem:
    """An item from the input; anything else is a bug in the caller, said plainly."""
    if not isinstance(item, tuple | list) or len(item) != 3:
        raise TypeError(
            f"sync_profiles takes (localpart, displayname, avatar_mxc) items, not {item!r:.100}"
        )
    localpart, displayname, avatar = item
    if not isinstance(localpart, str) or not all(
        value is None or isinstance(value, str) for value in (displayname, avatar)
    ):
        raise TypeError(f"sync_profiles takes strings (or None), not {item!r:.100}")
    return localpart, displayname, avatar


def _value_problem(displayname: str | None, avatar: str | None) -> str | None:
    """Why the values cannot be set, or None."""
    for name, value in (("display name", displayname), ("avatar", avatar)):
        if value and len(value.encode("utf-8", "surrogatepass")) > _MAX_FIELD_BYTES:
            return f"{name} longer than {_MAX_FIELD_BYTES} bytes"
    if avatar and not avatar.startswith("mxc://"):
        return f"avatar is not an mxc:// URI: {avatar[:100]!r}"
    return None
