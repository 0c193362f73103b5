"""Retention: what keeps a long-running store bounded.

Handled inbox items are deleted as they complete, and transaction records are
pruned as they are accepted; what else grows is pruned here, by
:func:`prune_store`, which the daemon (:class:`Retention`, started by the
``AppService``) runs every ``appservice.retention_interval`` seconds, beside the
inbox and never inside one of its commits:

- dead letters: all but the newest ``dead_letters_keep``, and those whose last
  failure is older than ``dead_letters_max_age`` (their tracebacks are clipped to
  :data:`~bridge_kit.defaults.DEAD_LETTER_ERROR_CHARS` when they are made);
- Megolm replay records (one per decrypted message index, to refuse the same
  index under another event): after ``replay_records_max_age``; those of our own
  outbound session also when it rotates (see
  :meth:`~bridge_kit.crypto.megolm.InboundGroupSessions.forget_replays`);
- sealed to-device payloads (each Olm-decrypted payload is kept so that a retry
  or a replayed dead letter decrypts again): after ``sealed_payloads_max_age``,
  but never one that a to-device item still in the inbox or the dead letters
  may need (any written after the oldest such item arrived, less an hour's slack).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

import attrs

from bridge_kit import defaults
from bridge_kit.errors import StoreError
from bridge_kit.store.concerns import RetentionStore

__all__ = [
    "REPLAY_RECORDS",
    "SEALED_PAYLOADS",
    "Retention",
    "RetentionReport",
    "RetentionSettings",
    "prune_store",
]

log = logging.getLogger(__name__)

#: The crypto-state kinds that retention prunes (written by bridge_kit.crypto).
REPLAY_RECORDS: Final = "megolm_seen"
SEALED_PAYLOADS: Final = "olm_decrypted"
#: A payload is sealed when its item is first decrypted, after it arrived; the slack
#: covers letters from before schema version 5, whose arrival time is their first failure.
_SEALED_SLACK: Final = 3600.0


@attrs.frozen
class RetentionSettings:
    """How long, and how many of, what retention prunes (the config sets these)."""

    interval: float = defaults.RETENTION_INTERVAL
    dead_letters_keep: int = defaults.DEAD_LETTERS_KEEP
    dead_letters_max_age: float = defaults.DEAD_LETTERS_MAX_AGE
    replay_records_max_age: float = defaults.REPLAY_RECORDS_MAX_AGE
    sealed_payloads_max_age: float = defaults.SEALED_PAYLOADS_MAX_AGE


@attrs.frozen
class RetentionReport:
    """How many of each went in one round."""

    dead_letters: int = 0
    replay_records: int = 0
    sealed_payloads: int = 0


async def prune_store(
    store: RetentionStore, settings: RetentionSettings, now: float | None = None
) -> RetentionReport:
    """One round of retention on ``store`` as of the Unix time ``now`` (default: now)."""
    now = time.time() if now is None else now
    letters = await store.prune_dead_letters(
        settings.dead_letters_keep, now - settings.dead_letters_max_age
    )
    replays = await store.prune_crypto(REPLAY_RECORDS, now - settings.replay_records_max_age)
    sealed = await store.prune_crypto(SEALED_PAYLOADS, await _sealed_cutoff(store, settings, now))
    return RetentionReport(letters, replays, sealed)


async def _sealed_cutoff(store: RetentionStore, settings: RetentionSettings, now: float) -> float:
    """Sealed payloads written before this may go: old enough, and older than what
    any to-device item still waiting could need."""
    cutoff = now - settings.sealed_payloads_max_age
    needed_since = await store.to_device_since()
    if needed_since is not None:
        cutoff = min(cutoff, needed_since - _SEALED_SLACK)
    return cutoff


class Retention:
    """Runs :func:`prune_store` every ``settings.interval`` seconds until stopped; a
    failed round is logged and the next one tries again."""

    def __init__(self, store: RetentionStore, settings: RetentionSettings) -> None:
        self.store = store
        self.settings = settings
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the rounds (the first one at once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="bridge_kit retention")

    async def stop(self) -> None:
        """Stop; a round in progress is cancelled (each of its deletes is one commit)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self.run_once()
            await asyncio.sleep(self.settings.interval)

    async def run_once(self) -> RetentionReport | None:
        """One round, logged; ``None`` if it failed."""
        try:
            report = await prune_store(self.store, self.settings)
        except StoreError as exc:  # an outage, not a bug: one line, no traceback
            log.error("retention could not prune the store (trying again later): %s", exc)
            return None
        except Exception:
            log.exception("retention could not prune the store; trying again later")
            return None
        if report != RetentionReport():
            log.info(
                "retention pruned %d dead letters, %d replay records, %d sealed payloads",
                report.dead_letters, report.replay_records, report.sealed_payloads,
            )  # fmt: skip
        return report
