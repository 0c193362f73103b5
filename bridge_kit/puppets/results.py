"""What the puppet runs came to: progress snapshots, results and diagnoses.

:class:`BulkProgress` is a snapshot of a running bulk registration, for progress
displays; :class:`BulkResult` is what the run did, with every count and
reason. :func:`diagnose_abort` tells the errors that doom every registration
(and so stop a run at once) apart from those that concern one puppet, which
:func:`describe_failure` words for :attr:`BulkResult.failures`.

``join_many`` and ``sync_profiles`` come to a :class:`JoinResult` or a
:class:`ProfileResult`, with :class:`RunProgress` snapshots while they run.
Both share :class:`RunResult`: invalid input (never sent) and refusals, each
with its reason (the first :data:`KEPT_PROBLEMS` kept; ``on_problem`` sees every
one), how the run ended, and the throttling of each endpoint family
(``register``, ``join``, ``profile``), which adapts on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Literal

import attrs

from bridge_kit.errors import (
    Banned,
    Exclusive,
    Forbidden,
    HomeserverUnreachable,
    LimitExceeded,
    MatrixRequestError,
    ResourceLimitExceeded,
    UnexpectedReply,
    UnknownToken,
)
from bridge_kit.types.converter import converter

__all__ = [
    "KEPT_PROBLEMS",
    "Ban",
    "BulkProgress",
    "BulkResult",
    "JoinResult",
    "ProblemCallback",
    "ProfileResult",
    "ProgressCallback",
    "RunProgress",
    "RunResult",
    "describe_failure",
    "diagnose_abort",
]

#: Invalid localparts, and refusals, that a :class:`BulkResult` keeps with their
#: reasons (each); a run over millions must not grow without limit. The counts
#: cover all of them, and ``on_problem`` sees every one.
KEPT_PROBLEMS: Final = 1000

ProblemKind = Literal["invalid", "failed"]
#: ``on_problem(kind, localpart, reason)``: called for every invalid or refused localpart.
ProblemCallback = Callable[[ProblemKind, str, str], None]


class _Paced:
    """The rate and time left that every bulk run's progress shows; the attrs progress
    classes declare the fields."""

    done: int
    total: int | None
    elapsed: float

    @property
    def rate(self) -> float:
        """Items (localparts, pairs) dealt with per second, since the start."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate, when the total is known."""
        if self.total is None or self.rate <= 0:
            return None
        return max(self.total - self.done, 0) / self.rate


@attrs.frozen
class BulkProgress(_Paced):
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

    def counts_text(self) -> str:
        """The counts so far and the concurrency, for a log line."""
        return (
            f"{self.registered:,} registered, {self.already_existed:,} already existed, "
            f"{self.skipped_known:,} skipped, {self.invalid:,} invalid, "
            f"{self.failed:,} failed; concurrency {self.concurrency}"
        )


ProgressCallback = Callable[[BulkProgress], None]


class _CountsProblems:
    """The problem counting that every bulk result shares: counts all, keeps the first
    :data:`KEPT_PROBLEMS` reasons. The attrs result classes declare the fields."""

    invalid: int
    failed: int
    invalid_reasons: dict[str, str]
    failures: dict[str, str]
    aborted: str | None
    cancelled: bool

    def add_invalid(self, item: str, reason: str) -> None:
        """Count an invalid item (a localpart, a pair); keep its reason if fewer than
        the limit are kept."""
        self.invalid += 1
        if len(self.invalid_reasons) < KEPT_PROBLEMS:
            self.invalid_reasons[item] = reason

    def add_failure(self, item: str, reason: str) -> None:
        """Count a refused item; keep its reason if fewer than the limit are kept."""
        self.failed += 1
        if len(self.failures) < KEPT_PROBLEMS:
            self.failures[item] = reason

    @property
    def ok(self) -> bool:
        """True when the run completed with nothing invalid, failed, aborted or cancelled."""
        return not (self.invalid or self.failed or self.aborted or self.cancelled)


@attrs.define
class BulkResult(_CountsProblems):
    """What a :meth:`PuppetRegistrar.register_many` run did.

    The five counts partition the distinct localparts dealt with:
    ``registered`` (newly created), ``already_existed`` (the homeserver had
    them: ``M_USER_IN_USE``), ``skipped_known`` (the store knew them; nothing
    sent), ``invalid`` (refused locally, never sent; reason in
    ``invalid_reasons``) and ``failed`` (the homeserver refused; reason in
    ``failures``). ``duplicates`` counts repeated input lines, ignored.
    ``invalid_reasons`` and ``failures`` hold the first :data:`KEPT_PROBLEMS`
    each (``invalid`` and ``failed`` count them all; ``register_many``'s
    ``on_problem`` gets every one).

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

    def rows(self) -> list[tuple[str, int]]:
        """The five counts, then duplicates and a dry run's count when they apply."""
        rows = [
            ("registered", self.registered),
            ("already existed", self.already_existed),
            ("skipped (known)", self.skipped_known),
            ("invalid", self.invalid),
            ("failed", self.failed),
        ]
        if self.duplicates:
            rows.append(("duplicates ignored", self.duplicates))
        if self.dry_run:
            rows.append(("would register", self.would_register))
        return rows

    def throttling(self) -> list[str]:
        """How the homeserver's rate limiting slowed the run, if it did."""
        if not self.rate_limited:
            return []
        return [
            f"rate limited {self.rate_limited:,} times; "
            f"concurrency went down to {self.lowest_concurrency}"
        ]

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


def describe_failure(error: MatrixRequestError | UnexpectedReply) -> str:
    """Why the homeserver refused one puppet, for :attr:`BulkResult.failures`."""
    if isinstance(error, UnexpectedReply):
        return f"{error} (a success status, but not a register reply)"
    detail = f"{error.status} {error.errcode or 'no errcode'}: {error.message or 'no message'}"
    if isinstance(error, Exclusive):
        return (
            f"{detail} (the ID is reserved by another appservice's exclusive namespace, "
            "or outside the namespaces the homeserver loaded for us)"
        )
    if isinstance(error, LimitExceeded):
        return f"{detail} (still rate limited after the client's retries)"
    return detail


Rows = list[tuple[str, int]]


@attrs.frozen
class RunProgress(_Paced):
    """A snapshot of a running ``join_many`` or ``sync_profiles``, for progress displays.

    ``done`` counts input items dealt with; ``counts`` are the run's counts so far
    and ``concurrency`` the limit of each endpoint family now.
    """

    done: int
    total: int | None
    elapsed: float
    counts: tuple[tuple[str, int], ...]
    concurrency: tuple[tuple[str, int], ...]

    def counts_text(self) -> str:
        """The counts and the concurrency of each family, for a log line."""
        counts = ", ".join(f"{count:,} {label}" for label, count in self.counts)
        limits = ", ".join(f"{family} {limit}" for family, limit in self.concurrency)
        return f"{counts}; concurrency {limits}"


@attrs.define
class RunResult(_CountsProblems):
    """The counts and reasons every bulk run beyond registration keeps."""

    invalid: int = 0
    failed: int = 0
    duplicates: int = 0
    registered: int = 0
    already_existed: int = 0
    invalid_reasons: dict[str, str] = attrs.field(factory=dict)
    failures: dict[str, str] = attrs.field(factory=dict)
    aborted: str | None = None
    cancelled: bool = False
    rate_limited: dict[str, int] = attrs.field(factory=dict)
    lowest_concurrency: dict[str, int] = attrs.field(factory=dict)
    elapsed: float = 0.0

    def outcome_rows(self) -> Rows:
        """The counts that partition the distinct input items (the run's own first)."""
        return [("invalid", self.invalid), ("failed", self.failed)]

    def detail_rows(self) -> Rows:
        """Further counts, shown when not zero."""
        return [
            ("duplicates ignored", self.duplicates),
            ("puppets registered", self.registered),
            ("puppets already existed", self.already_existed),
        ]

    def rows(self) -> Rows:
        """What a summary lists: the partition, then the non-zero details."""
        return self.outcome_rows() + [row for row in self.detail_rows() if row[1]]

    @property
    def done(self) -> int:
        """Input items dealt with, duplicates included."""
        return sum(count for _, count in self.outcome_rows()) + self.duplicates

    def throttling(self) -> list[str]:
        """One line per endpoint family the homeserver rate-limited."""
        return [
            f"{family}: rate limited {count:,} times; concurrency went down to "
            f"{self.lowest_concurrency.get(family, 0)}"
            for family, count in self.rate_limited.items()
            if count
        ]

    def summary(self) -> str:
        """One line with the counts, and how the run ended if not normally."""
        line = ", ".join(f"{count} {label}" for label, count in self.rows())
        line += f" in {self.elapsed:.1f} s"
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


@attrs.frozen
class Ban:
    """A puppet ``join_many`` found banned from a room, and left so."""

    room_id: str
    user_id: str
    banner: str | None
    reason: str | None


@attrs.define
class JoinResult(RunResult):
    """What a ``join_many`` run did, per distinct (puppet, room) pair.

    ``joined`` (this run joined it; ``invited`` of them needed the bot's
    invite first), ``skipped_known`` (the store knew it joined: nothing sent),
    ``invalid`` (a bad localpart or room, never sent) and ``failed`` (refused,
    reason in ``failures``, keyed ``"localpart room"``) partition the pairs.
    ``unresolved_aliases`` counts the distinct aliases that did not resolve (their
    reasons in ``alias_failures``); each of their pairs counts as failed.
    ``banned`` counts the failed pairs whose puppet is banned from the room (not
    unbanned: moderators decide); ``bans`` keeps the first of them as :class:`Ban`
    (room, puppet, banner, reason: what :class:`~bridge_kit.errors.Banned` says),
    for telling the remote side.
    """

    joined: int = 0
    invited: int = 0
    skipped_known: int = 0
    unresolved_aliases: int = 0
    alias_failures: dict[str, str] = attrs.field(factory=dict)
    banned: int = 0
    bans: list[Ban] = attrs.field(factory=list)

    def add_ban(self, ban: Banned) -> None:
        """Count a puppet banned from a room; keep the ban up to the limit."""
        self.banned += 1
        if len(self.bans) < KEPT_PROBLEMS:
            self.bans.append(Ban(ban.room_id, ban.user_id, ban.banner, ban.reason))

    def add_alias_failure(self, alias: str, reason: str) -> None:
        """Count an alias that did not resolve; keep its reason up to the limit."""
        self.unresolved_aliases += 1
        if len(self.alias_failures) < KEPT_PROBLEMS:
            self.alias_failures[alias] = reason

    def outcome_rows(self) -> Rows:
        return [
            ("joined", self.joined),
            ("skipped (known joined)", self.skipped_known),
            *super().outcome_rows(),
        ]

    def detail_rows(self) -> Rows:
        return [
            ("joined after the bot's invite", self.invited),
            ("banned (not unbanned)", self.banned),
            ("aliases not resolved", self.unresolved_aliases),
            *super().detail_rows(),
        ]


@attrs.define
class ProfileResult(RunResult):
    """What a ``sync_profiles`` run did, per distinct puppet.

    ``updated`` (at least one field set), ``skipped_known`` (the store says every
    given value is set already, or none was given: nothing sent), ``invalid``
    and ``failed`` partition the puppets; ``displaynames_set`` and
    ``avatars_set`` count the fields sent.
    """

    updated: int = 0
    skipped_known: int = 0
    displaynames_set: int = 0
    avatars_set: int = 0

    def outcome_rows(self) -> Rows:
        return [
            ("updated", self.updated),
            ("skipped (already set)", self.skipped_known),
            *super().outcome_rows(),
        ]

    def detail_rows(self) -> Rows:
        return [
            ("display names set", self.displaynames_set),
            ("avatars set", self.avatars_set),
            *super().detail_rows(),
        ]
