"""The bridge layer's records in SQLite: the version 6 schema; the statements are
shared, in :mod:`bridge_kit.store._bridge_sql`.

Booleans are 0/1 integers, and the text columns compare as bytes (``BINARY``), so
rows sort by code point as in the other stores.
"""

from __future__ import annotations

V6 = (
    "CREATE TABLE bridge_kit_portals ("
    " portal_id TEXT NOT NULL,"
    " receiver TEXT NOT NULL,"
    " room_id TEXT UNIQUE,"
    " name TEXT,"
    " topic TEXT,"
    " avatar_mxc TEXT,"
    " is_direct INTEGER NOT NULL,"
    " relay_login TEXT,"
    " metadata TEXT NOT NULL,"
    " PRIMARY KEY (portal_id, receiver))",
    "CREATE TABLE bridge_kit_ghosts ("
    " ghost_id TEXT PRIMARY KEY NOT NULL,"
    " user_id TEXT NOT NULL,"
    " name TEXT,"
    " avatar_mxc TEXT,"
    " metadata TEXT NOT NULL)",
    "CREATE TABLE bridge_kit_logins ("
    " login_id TEXT PRIMARY KEY NOT NULL,"
    " user_id TEXT NOT NULL,"
    " remote_name TEXT NOT NULL,"
    " state TEXT NOT NULL,"
    " credentials BLOB,"
    " metadata TEXT NOT NULL)",
    "CREATE INDEX bridge_kit_logins_by_user ON bridge_kit_logins (user_id)",
    "CREATE TABLE bridge_kit_messages ("
    " event_id TEXT PRIMARY KEY NOT NULL,"
    " portal_id TEXT NOT NULL,"
    " receiver TEXT NOT NULL,"
    " remote_id TEXT NOT NULL,"
    " part TEXT NOT NULL,"
    " room_id TEXT NOT NULL,"
    " sender TEXT NOT NULL,"
    " sender_mxid TEXT NOT NULL,"
    " ts REAL NOT NULL,"
    " pending INTEGER NOT NULL) WITHOUT ROWID",
    # A remote part maps to one event; pending rows (no remote id yet) are left out.
    "CREATE UNIQUE INDEX bridge_kit_messages_by_part"
    " ON bridge_kit_messages (portal_id, receiver, remote_id, part) WHERE NOT pending",
    "CREATE INDEX bridge_kit_messages_by_time ON bridge_kit_messages (portal_id, receiver, ts)",
    "CREATE TABLE bridge_kit_reactions ("
    " portal_id TEXT NOT NULL,"
    " receiver TEXT NOT NULL,"
    " remote_id TEXT NOT NULL,"
    " part TEXT NOT NULL,"
    " sender TEXT NOT NULL,"
    " reaction_key TEXT NOT NULL,"
    " event_id TEXT NOT NULL UNIQUE,"
    " room_id TEXT NOT NULL,"
    " sender_mxid TEXT NOT NULL,"
    " ts REAL NOT NULL,"
    " PRIMARY KEY (portal_id, receiver, remote_id, part, sender, reaction_key))",
)
