"""Dead letters: events set aside because their handler kept failing or they were malformed.

:class:`DeadLetters` is what ``app.dead_letters`` and ``bridge-kit dead-letters``
use: list them, put them back in the inbox (after fixing the handler), or
drop them for good. A replayed event goes to the end of its room's lane, with
no attempts counted and the handlers that had succeeded for it marked done; a
running daemon picks it up within its poll interval. Retention
(:mod:`bridge_kit.store.retention`) drops the oldest beyond a cap and an age.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from bridge_kit.inbox.records import DeadLetter
from bridge_kit.store.concerns import DeadLetterStore

__all__ = ["DeadLetter", "DeadLetters"]


class DeadLetters:
    """The dead letters in ``store``; ``on_replayed()`` runs after a replay (to wake the inbox)."""

    def __init__(
        self, store: DeadLetterStore, on_replayed: Callable[[], object] | None = None
    ) -> None:
        self.store = store
        self._on_replayed = on_replayed

    async def list(self, limit: int | None = None) -> list[DeadLetter]:
        """The dead letters, oldest first."""
        return await self.store.dead_letters(limit)

    async def replay(
        self, ids: Collection[int] | None = None, *, all_handlers: bool = False
    ) -> int:
        """Put these dead letters (every one with ``None``) back in the inbox; how many.

        The handlers that had succeeded for a letter's event (``letter.done_handlers``)
        are not run again, so a handler that posted to the remote network does not
        post twice; ``all_handlers=True`` runs every handler again."""
        count = await self.store.replay_dead_letters(ids, all_handlers=all_handlers)
        if count and self._on_replayed is not None:
            self._on_replayed()
        return count

    async def drop(self, ids: Collection[int] | None = None) -> int:
        """Delete these dead letters (every one with ``None``); how many."""
        return await self.store.drop_dead_letters(ids)
