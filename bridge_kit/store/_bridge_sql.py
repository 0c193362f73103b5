"""Placeholder SQL hooks for the bridge layer's records, until schema v6 lands: every
hook refuses with a StoreError, so the SQL stores stay instantiable meanwhile."""

from __future__ import annotations

from typing import Any, NoReturn

from bridge_kit.errors import StoreError


def _not_yet(*_args: Any) -> NoReturn:
    raise StoreError("the bridge layer's records need schema version 6 (not yet in this build)")


class BridgeSQLHooks:
    """Every BridgeRecordStore hook, refusing (see the module)."""

    async def _portal(self, *args: Any) -> Any:
        _not_yet()

    async def _portal_by_room(self, *args: Any) -> Any:
        _not_yet()

    async def _portals(self, *args: Any) -> Any:
        _not_yet()

    async def _put_portal(self, *args: Any) -> Any:
        _not_yet()

    async def _claim_portal_room(self, *args: Any) -> Any:
        _not_yet()

    async def _delete_portal(self, *args: Any) -> Any:
        _not_yet()

    async def _ghosts_among(self, *args: Any) -> Any:
        _not_yet()

    async def _put_ghosts(self, *args: Any) -> Any:
        _not_yet()

    async def _login(self, *args: Any) -> Any:
        _not_yet()

    async def _logins(self, *args: Any) -> Any:
        _not_yet()

    async def _put_login(self, *args: Any) -> Any:
        _not_yet()

    async def _delete_login(self, *args: Any) -> Any:
        _not_yet()

    async def _messages(self, *args: Any) -> Any:
        _not_yet()

    async def _message_by_event(self, *args: Any) -> Any:
        _not_yet()

    async def _put_messages(self, *args: Any) -> Any:
        _not_yet()

    async def _claim_event(self, *args: Any) -> Any:
        _not_yet()

    async def _delete_messages(self, *args: Any) -> Any:
        _not_yet()

    async def _latest_messages(self, *args: Any) -> Any:
        _not_yet()

    async def _reaction(self, *args: Any) -> Any:
        _not_yet()

    async def _reaction_by_event(self, *args: Any) -> Any:
        _not_yet()

    async def _put_reaction(self, *args: Any) -> Any:
        _not_yet()

    async def _delete_reaction(self, *args: Any) -> Any:
        _not_yet()
