"""What ``join_many`` and ``sync_profiles`` came to: :class:`JoinResult`,
:class:`ProfileResult`, and :class:`RunProgress` snapshots while they run.

Both results share :class:`RunResult`: invalid input (never sent) and refusals,
each with its reason (the first :data:`~bridge_kit.puppets.results.KEPT_PROBLEMS`
kept; ``on_problem`` sees every one), how the run ended, and the throttling of
each endpoint family (``register``, ``join``, ``profile``), which adapts on its own.
"""

from __future__ import annotations

from typing import Any

import attrs

from bridge_kit.puppets.results import KEPT_PROBLEMS
from bridge_kit.types.converter import converter

__all__ = ["JoinResult", "ProfileResult", "RunProgress", "RunResult"]

Rows = list[tuple[str, int]]


@attrs.frozen
class RunProgress:
    """A snapshot of a running ``join_many`` or ``sync_profiles``, for progress displays.

    ``done`` counts input items dealt with; ``counts`` are the run's counts so far
    and ``concurrency`` the limit of each endpoint family now.
    """

    done: int
    total: int | None
    elapsed: float
    counts: tuple[tuple[str, int], ...]
    concurrency: tuple[tuple[str, int], ...]

    @property
    def rate(self) -> float:
        """Items dealt with per second, since the start."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate, when the total is known."""
        if self.total is None or self.rate <= 0:
            return None
        return max(self.total - self.done, 0) / self.rate

    def counts_text(self) -> str:
        """The counts and the concurrency of each family, for a log line."""
        counts = ", ".join(f"{count:,} {label}" for label, count in self.counts)
        limits = ", ".join(f"{family} {limit}" for family, limit in self.concurrency)
        return f"{counts}; concurrency {limits}"


@attrs.define
class RunResult:
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

    def add_invalid(self, item: str, reason: str) -> None:
        """Count an invalid item; keep its reason if fewer than the limit are kept."""
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


@attrs.define
class JoinResult(RunResult):
    """What a ``join_many`` run did, per distinct (puppet, room) pair.

    ``joined`` (this run joined it; ``invited`` of them needed the bot's
    invite first), ``skipped_known`` (the store knew it joined: nothing sent),
    ``invalid`` (a bad localpart or room, never sent) and ``failed`` (refused,
    reason in ``failures``, keyed ``"localpart room"``) partition the pairs.
    ``unresolved_aliases`` counts the distinct aliases that did not resolve (their
    reasons in ``alias_failures``); each of their pairs counts as failed.
    """

    joined: int = 0
    invited: int = 0
    skipped_known: int = 0
    unresolved_aliases: int = 0
    alias_failures: dict[str, str] = attrs.field(factory=dict)

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
