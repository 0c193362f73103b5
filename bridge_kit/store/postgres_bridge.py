"""The bridge layer's records in PostgreSQL: the version 6 schema; the statements are
shared, in :mod:`bridge_kit.store._bridge_sql`.

The key columns collate as ``"C"`` (by code point, as the other stores sort, and
whatever the database's locale); times are seconds, as ``DOUBLE PRECISION``.
"""

from __future__ import annotations

V6 = (
    "CREATE TABLE bridge_kit_portals ("
    ' portal_id TEXT COLLATE "C" NOT NULL,'
    ' receiver TEXT COLLATE "C" NOT NULL,'
    " room_id TEXT UNIQUE,"
    " name TEXT,"
    " topic TEXT,"
    " avatar_mxc TEXT,"
    " is_direct BOOLEAN NOT NULL,"
    " relay_login TEXT,"
    " metadata TEXT NOT NULL,"
    " PRIMARY KEY (portal_id, receiver))",
    "CREATE TABLE bridge_kit_ghosts ("
    ' ghost_id TEXT COLLATE "C" PRIMARY KEY NOT NULL,'
    " user_id TEXT NOT NULL,"
    " name TEXT,"
    " avatar_mxc TEXT,"
    " metadata TEXT NOT NULL)",
    "CREATE TABLE bridge_kit_logins ("
    ' login_id TEXT COLLATE "C" PRIMARY KEY NOT NULL,'
    " user_id TEXT NOT NULL,"
    " remote_name TEXT NOT NULL,"
    " state TEXT NOT NULL,"
    " credentials BYTEA,"
    " metadata TEXT NOT NULL)",
    "CREATE INDEX bridge_kit_logins_by_user ON bridge_kit_logins (user_id)",
    "CREATE TABLE bridge_kit_messages ("
    ' event_id TEXT COLLATE "C" PRIMARY KEY NOT NULL,'
    ' portal_id TEXT COLLATE "C" NOT NULL,'
    ' receiver TEXT COLLATE "C" NOT NULL,'
    ' remote_id TEXT COLLATE "C" NOT NULL,'
    ' part TEXT COLLATE "C" NOT NULL,'
    " room_id TEXT NOT NULL,"
    ' sender TEXT COLLATE "C" NOT NULL,'
    " sender_mxid TEXT NOT NULL,"
    " ts DOUBLE PRECISION NOT NULL,"
    " pending BOOLEAN NOT NULL)",
    # A remote part maps to one event; pending rows (no remote id yet) are left out.
    "CREATE UNIQUE INDEX bridge_kit_messages_by_part"
    " ON bridge_kit_messages (portal_id, receiver, remote_id, part) WHERE NOT pending",
    "CREATE INDEX bridge_kit_messages_by_time ON bridge_kit_messages (portal_id, receiver, ts)",
    "CREATE TABLE bridge_kit_reactions ("
    ' portal_id TEXT COLLATE "C" NOT NULL,'
    ' receiver TEXT COLLATE "C" NOT NULL,'
    ' remote_id TEXT COLLATE "C" NOT NULL,'
    ' part TEXT COLLATE "C" NOT NULL,'
    ' sender TEXT COLLATE "C" NOT NULL,'
    ' reaction_key TEXT COLLATE "C" NOT NULL,'
    ' event_id TEXT COLLATE "C" NOT NULL UNIQUE,'
    " room_id TEXT NOT NULL,"
    " sender_mxid TEXT NOT NULL,"
    " ts DOUBLE PRECISION NOT NULL,"
    " PRIMARY KEY (portal_id, receiver, remote_id, part, sender, reaction_key))",
)
