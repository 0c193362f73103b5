"""The bridge layer's records (portals, ghosts, logins, the message map): the hooks
both SQL backends share, written once over :class:`~bridge_kit.store._sql.Query`.
Each backend keeps its version 6 schema (``sqlite_bridge``, ``postgres_bridge``),
where the column types differ.

Atomic steps run in one transaction: on SQLite under ``BEGIN IMMEDIATE`` (one writer
at a time), on PostgreSQL through ``INSERT ... ON CONFLICT``, which waits for a
concurrent insert of the same key to commit and then sees its row.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from bridge_kit.bridge.records import (
    GhostRecord,
    LoginRecord,
    LoginState,
    MessageRecord,
    PortalKey,
    PortalRecord,
    ReactionRecord,
)
from bridge_kit.store._clean import metadata_json
from bridge_kit.store._sql import Query
from bridge_kit.store.base import room_taken

_T = TypeVar("_T")

#: Ids per ghost lookup: below SQLite's variable limit and PostgreSQL's (32767).
_LOOKUP_CHUNK: Final = 500

_PORTAL_COLUMNS: Final = (
    "portal_id, receiver, room_id, name, topic, avatar_mxc, is_direct, relay_login, metadata"
)
_GHOST_COLUMNS: Final = "ghost_id, user_id, name, avatar_mxc, metadata"
_LOGIN_COLUMNS: Final = "login_id, user_id, remote_name, state, credentials, metadata"
_MESSAGE_COLUMNS: Final = (
    "portal_id, receiver, remote_id, event_id, room_id, part, sender, sender_mxid, ts, pending"
)
_REACTION_COLUMNS: Final = (
    "portal_id, receiver, remote_id, sender, reaction_key, event_id, room_id, part, sender_mxid, ts"
)

_UPSERT_PORTAL: Final = (
    f"INSERT INTO bridge_kit_portals ({_PORTAL_COLUMNS})"  # noqa: S608 (constants only)
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    " ON CONFLICT (portal_id, receiver) DO UPDATE SET"
    " room_id = excluded.room_id, name = excluded.name, topic = excluded.topic,"
    " avatar_mxc = excluded.avatar_mxc, is_direct = excluded.is_direct,"
    " relay_login = excluded.relay_login, metadata = excluded.metadata"
)
# As _UPSERT_PORTAL, but a portal that has a room keeps its row (no row comes back).
_PUT_ROOMLESS_PORTAL: Final = (
    f"INSERT INTO bridge_kit_portals ({_PORTAL_COLUMNS})"  # noqa: S608 (constants only)
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    " ON CONFLICT (portal_id, receiver) DO UPDATE SET"
    " name = excluded.name, topic = excluded.topic,"
    " avatar_mxc = excluded.avatar_mxc, is_direct = excluded.is_direct,"
    " relay_login = excluded.relay_login, metadata = excluded.metadata"
    " WHERE bridge_kit_portals.room_id IS NULL"
    " RETURNING portal_id"
)
# The WHERE keeps a room once set: the loser of a race gets no row back, and reads the winner's.
_CLAIM_ROOM: Final = (
    "INSERT INTO bridge_kit_portals (portal_id, receiver, room_id, is_direct, metadata)"
    " VALUES ($1, $2, $3, $4, '{}')"
    " ON CONFLICT (portal_id, receiver) DO UPDATE SET room_id = excluded.room_id"
    " WHERE bridge_kit_portals.room_id IS NULL"
    " RETURNING room_id"
)
_ROOM_OWNER: Final = (
    "SELECT portal_id, receiver FROM bridge_kit_portals"
    " WHERE room_id = $1 AND NOT (portal_id = $2 AND receiver = $3)"
)
_UPSERT_GHOST: Final = (
    f"INSERT INTO bridge_kit_ghosts ({_GHOST_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"  # noqa: S608
    " ON CONFLICT (ghost_id) DO UPDATE SET user_id = excluded.user_id, name = excluded.name,"
    " avatar_mxc = excluded.avatar_mxc, metadata = excluded.metadata"
)
_UPSERT_LOGIN: Final = (
    f"INSERT INTO bridge_kit_logins ({_LOGIN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"  # noqa: S608
    " ON CONFLICT (login_id) DO UPDATE SET user_id = excluded.user_id,"
    " remote_name = excluded.remote_name, state = excluded.state,"
    " credentials = excluded.credentials, metadata = excluded.metadata"
)
_INSERT_MESSAGE: Final = (
    f"INSERT INTO bridge_kit_messages ({_MESSAGE_COLUMNS})"  # noqa: S608
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)
_UPSERT_MESSAGE: Final = (
    f"{_INSERT_MESSAGE} ON CONFLICT (event_id) DO UPDATE SET"
    " portal_id = excluded.portal_id, receiver = excluded.receiver,"
    " remote_id = excluded.remote_id, room_id = excluded.room_id, part = excluded.part,"
    " sender = excluded.sender, sender_mxid = excluded.sender_mxid, ts = excluded.ts,"
    " pending = excluded.pending"
)
# No conflict target: an event id in the map, or (for a record that is not pending)
# a remote part mapped to another event, both mean "claimed already".
_CLAIM_EVENT: Final = f"{_INSERT_MESSAGE} ON CONFLICT DO NOTHING RETURNING event_id"
# The remote part a record maps, when another event has it: the record takes it over.
_DELETE_OTHER_PART: Final = (
    "DELETE FROM bridge_kit_messages WHERE portal_id = $1 AND receiver = $2"
    " AND remote_id = $3 AND part = $4 AND NOT pending AND event_id <> $5"
)
_UPSERT_REACTION: Final = (
    f"INSERT INTO bridge_kit_reactions ({_REACTION_COLUMNS})"  # noqa: S608
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    " ON CONFLICT (portal_id, receiver, remote_id, part, sender, reaction_key) DO UPDATE SET"
    " event_id = excluded.event_id, room_id = excluded.room_id,"
    " sender_mxid = excluded.sender_mxid, ts = excluded.ts"
)
_OF_PORTAL: Final = "portal_id = $1 AND receiver = $2"
_OF_MESSAGE: Final = f"{_OF_PORTAL} AND remote_id = $3"
_DELETE_MESSAGE_PARTS: Final = (
    f"DELETE FROM bridge_kit_messages WHERE {_OF_MESSAGE} AND NOT pending"  # noqa: S608
)
_DELETE_MESSAGE_REACTIONS: Final = f"DELETE FROM bridge_kit_reactions WHERE {_OF_MESSAGE}"  # noqa: S608


class BridgeSQLHooks(abc.ABC):
    """A mixin of the SQL backends: :class:`~bridge_kit.store.concerns.BridgeRecordStore`'s
    hooks, before ``Store`` in their bases (as
    :class:`~bridge_kit.store._shared_sql.SharedSQLHooks`)."""

    @abc.abstractmethod
    async def _query(self, operation: Callable[[Query], Awaitable[_T]]) -> _T:
        """Run ``operation`` on the database (each statement commits on its own)."""

    @abc.abstractmethod
    async def _query_in_transaction(self, operation: Callable[[Query], Awaitable[_T]]) -> _T:
        """Run ``operation`` on the database in one transaction."""

    # -- portals ----------------------------------------------------------------

    async def _portal(self, key: PortalKey) -> PortalRecord | None:
        sql = f"SELECT {_PORTAL_COLUMNS} FROM bridge_kit_portals WHERE {_OF_PORTAL}"  # noqa: S608
        rows = await self._query(lambda q: q.rows(sql, key.id, key.receiver))
        return _portal_of(rows[0]) if rows else None

    async def _portal_by_room(self, room_id: str) -> PortalRecord | None:
        sql = f"SELECT {_PORTAL_COLUMNS} FROM bridge_kit_portals WHERE room_id = $1"  # noqa: S608
        rows = await self._query(lambda q: q.rows(sql, room_id))
        return _portal_of(rows[0]) if rows else None

    async def _portals(self) -> list[PortalRecord]:
        sql = f"SELECT {_PORTAL_COLUMNS} FROM bridge_kit_portals ORDER BY portal_id, receiver"  # noqa: S608
        return [_portal_of(row) for row in await self._query(lambda q: q.rows(sql))]

    async def _put_portal(self, record: PortalRecord) -> None:
        async def put(q: Query) -> None:
            if record.room_id is not None:
                await _refuse_taken_room(q, record.room_id, record.key)
            await q.run(_UPSERT_PORTAL, *_portal_row(record))

        await self._query_in_transaction(put)

    async def _claim_portal_room(self, key: PortalKey, room_id: str) -> str:
        async def claim(q: Query) -> str:
            await _refuse_taken_room(q, room_id, key)
            won = await q.rows(_CLAIM_ROOM, key.id, key.receiver, room_id, False)
            if won:
                return str(won[0][0])
            sql = f"SELECT room_id FROM bridge_kit_portals WHERE {_OF_PORTAL}"  # noqa: S608
            return str((await q.rows(sql, key.id, key.receiver))[0][0])

        return await self._query_in_transaction(claim)

    async def _put_roomless_portal(self, record: PortalRecord) -> bool:
        row = _portal_row(record)
        return bool(await self._query(lambda q: q.rows(_PUT_ROOMLESS_PORTAL, *row)))

    async def _delete_portal(self, key: PortalKey) -> None:
        async def delete(q: Query) -> None:
            for table in ("bridge_kit_reactions", "bridge_kit_messages", "bridge_kit_portals"):
                await q.run(f"DELETE FROM {table} WHERE {_OF_PORTAL}", key.id, key.receiver)  # noqa: S608

        await self._query_in_transaction(delete)

    # -- ghosts -----------------------------------------------------------------

    async def _ghosts_among(self, ids: list[str]) -> dict[str, GhostRecord]:
        async def lookup(q: Query) -> dict[str, GhostRecord]:
            found: dict[str, GhostRecord] = {}
            for start in range(0, len(ids), _LOOKUP_CHUNK):
                batch = ids[start : start + _LOOKUP_CHUNK]
                marks = ", ".join(f"${n}" for n in range(1, len(batch) + 1))
                # Only numbered marks are interpolated; the ids travel as parameters.
                sql = f"SELECT {_GHOST_COLUMNS} FROM bridge_kit_ghosts WHERE ghost_id IN ({marks})"  # noqa: S608
                found.update((row[0], _ghost_of(row)) for row in await q.rows(sql, *batch))
            return found

        return await self._query(lookup)

    async def _put_ghosts(self, records: list[GhostRecord]) -> None:
        rows = [(r.id, r.user_id, r.name, r.avatar_mxc, metadata_json(r.metadata)) for r in records]
        if rows:
            await self._query_in_transaction(lambda q: q.many(_UPSERT_GHOST, rows))

    # -- logins -----------------------------------------------------------------

    async def _login(self, login_id: str) -> LoginRecord | None:
        sql = f"SELECT {_LOGIN_COLUMNS} FROM bridge_kit_logins WHERE login_id = $1"  # noqa: S608
        rows = await self._query(lambda q: q.rows(sql, login_id))
        return _login_of(rows[0]) if rows else None

    async def _logins(self, user_id: str | None) -> list[LoginRecord]:
        select = f"SELECT {_LOGIN_COLUMNS} FROM bridge_kit_logins"  # noqa: S608
        if user_id is None:
            rows = await self._query(lambda q: q.rows(f"{select} ORDER BY login_id"))
        else:
            sql = f"{select} WHERE user_id = $1 ORDER BY login_id"
            rows = await self._query(lambda q: q.rows(sql, user_id))
        return [_login_of(row) for row in rows]

    async def _put_login(self, record: LoginRecord) -> None:
        row = (
            record.id, record.user_id, record.remote_name, record.state.value,
            record.credentials, metadata_json(record.metadata),
        )  # fmt: skip
        await self._query(lambda q: q.run(_UPSERT_LOGIN, *row))

    async def _delete_login(self, login_id: str) -> None:
        sql = "DELETE FROM bridge_kit_logins WHERE login_id = $1"
        await self._query(lambda q: q.run(sql, login_id))

    # -- the message map --------------------------------------------------------

    async def _messages(self, portal: PortalKey, remote_id: str) -> list[MessageRecord]:
        sql = (
            f"SELECT {_MESSAGE_COLUMNS} FROM bridge_kit_messages"  # noqa: S608
            f" WHERE {_OF_MESSAGE} AND NOT pending ORDER BY part"
        )
        rows = await self._query(lambda q: q.rows(sql, portal.id, portal.receiver, remote_id))
        return [_message_of(row) for row in rows]

    async def _message_by_event(self, event_id: str) -> MessageRecord | None:
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM bridge_kit_messages WHERE event_id = $1"  # noqa: S608
        rows = await self._query(lambda q: q.rows(sql, event_id))
        return _message_of(rows[0]) if rows else None

    async def _put_messages(self, records: list[MessageRecord]) -> None:
        async def put(q: Query) -> None:
            # One by one, in order: a later record of the batch may take an earlier one's part.
            for record in records:
                if not record.pending:
                    key = (record.portal.id, record.portal.receiver, record.remote_id)
                    await q.run(_DELETE_OTHER_PART, *key, record.part, record.event_id)
                await q.run(_UPSERT_MESSAGE, *_message_row(record))

        if records:
            await self._query_in_transaction(put)

    async def _claim_event(self, record: MessageRecord) -> bool:
        rows = await self._query(lambda q: q.rows(_CLAIM_EVENT, *_message_row(record)))
        return bool(rows)

    async def _release_event(self, event_id: str) -> None:
        sql = "DELETE FROM bridge_kit_messages WHERE event_id = $1 AND pending"
        await self._query(lambda q: q.run(sql, event_id))

    async def _delete_messages(self, portal: PortalKey, remote_id: str) -> None:
        async def delete(q: Query) -> None:
            key = (portal.id, portal.receiver, remote_id)
            await q.run(_DELETE_MESSAGE_PARTS, *key)
            await q.run(_DELETE_MESSAGE_REACTIONS, *key)

        await self._query_in_transaction(delete)

    async def _latest_messages(self, portal: PortalKey, limit: int) -> list[MessageRecord]:
        # A tie in time goes by event id, so every backend picks the same rows.
        sql = (
            f"SELECT {_MESSAGE_COLUMNS} FROM bridge_kit_messages"  # noqa: S608
            f" WHERE {_OF_PORTAL} AND NOT pending ORDER BY ts DESC, event_id DESC LIMIT $3"
        )
        rows = await self._query(lambda q: q.rows(sql, portal.id, portal.receiver, limit))
        return [_message_of(row) for row in reversed(rows)]

    async def _reaction(
        self, portal: PortalKey, remote_id: str, part: str, sender: str, key: str
    ) -> ReactionRecord | None:
        sql = (
            f"SELECT {_REACTION_COLUMNS} FROM bridge_kit_reactions"  # noqa: S608
            f" WHERE {_OF_MESSAGE} AND part = $4 AND sender = $5 AND reaction_key = $6"
        )
        rows = await self._query(
            lambda q: q.rows(sql, portal.id, portal.receiver, remote_id, part, sender, key)
        )
        return _reaction_of(rows[0]) if rows else None

    async def _reaction_by_event(self, event_id: str) -> ReactionRecord | None:
        sql = f"SELECT {_REACTION_COLUMNS} FROM bridge_kit_reactions WHERE event_id = $1"  # noqa: S608
        rows = await self._query(lambda q: q.rows(sql, event_id))
        return _reaction_of(rows[0]) if rows else None

    async def _put_reaction(self, record: ReactionRecord) -> None:
        async def put(q: Query) -> None:
            # The event may have stood for another reaction: it stands for this one now.
            await q.run("DELETE FROM bridge_kit_reactions WHERE event_id = $1", record.event_id)
            await q.run(_UPSERT_REACTION, *_reaction_row(record))

        await self._query_in_transaction(put)

    async def _delete_reaction(self, event_id: str) -> None:
        sql = "DELETE FROM bridge_kit_reactions WHERE event_id = $1"
        await self._query(lambda q: q.run(sql, event_id))


async def _refuse_taken_room(q: Query, room_id: str, key: PortalKey) -> None:
    """:func:`~bridge_kit.store.base.room_taken` if another portal has ``room_id``
    (the unique index refuses it too, but with each database's own words)."""
    owners = await q.rows(_ROOM_OWNER, room_id, key.id, key.receiver)
    if owners:
        raise room_taken(room_id, PortalKey(owners[0][0], owners[0][1]))


def _portal_row(r: PortalRecord) -> tuple[object, ...]:
    return (
        r.key.id, r.key.receiver, r.room_id, r.name, r.topic, r.avatar_mxc, r.is_direct,
        r.relay_login, metadata_json(r.metadata),
    )  # fmt: skip


def _portal_of(row: Sequence[Any]) -> PortalRecord:
    return PortalRecord(
        PortalKey(row[0], row[1]), room_id=row[2], name=row[3], topic=row[4],
        avatar_mxc=row[5], is_direct=bool(row[6]), relay_login=row[7],
        metadata=json.loads(row[8]),
    )  # fmt: skip


def _ghost_of(row: Sequence[Any]) -> GhostRecord:
    return GhostRecord(row[0], row[1], name=row[2], avatar_mxc=row[3], metadata=json.loads(row[4]))


def _login_of(row: Sequence[Any]) -> LoginRecord:
    credentials = None if row[4] is None else bytes(row[4])
    return LoginRecord(
        row[0], row[1], remote_name=row[2], state=LoginState(row[3]),
        credentials=credentials, metadata=json.loads(row[5]),
    )  # fmt: skip


def _message_row(r: MessageRecord) -> tuple[object, ...]:
    return (
        r.portal.id, r.portal.receiver, r.remote_id, r.event_id, r.room_id, r.part, r.sender,
        r.sender_mxid, r.timestamp, r.pending,
    )  # fmt: skip


def _message_of(row: Sequence[Any]) -> MessageRecord:
    return MessageRecord(
        PortalKey(row[0], row[1]), row[2], row[3], row[4], part=row[5], sender=row[6],
        sender_mxid=row[7], timestamp=float(row[8]), pending=bool(row[9]),
    )  # fmt: skip


def _reaction_row(r: ReactionRecord) -> tuple[object, ...]:
    return (
        r.portal.id, r.portal.receiver, r.remote_id, r.sender, r.key, r.event_id, r.room_id,
        r.part, r.sender_mxid, r.timestamp,
    )  # fmt: skip


def _reaction_of(row: Sequence[Any]) -> ReactionRecord:
    return ReactionRecord(
        PortalKey(row[0], row[1]), row[2], row[3], row[4], row[5], row[6], part=row[7],
        sender_mxid=row[8], timestamp=float(row[9]),
    )  # fmt: skip
