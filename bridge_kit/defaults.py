"""Every default value of bridge_kit, in one place.

The config sections (:mod:`bridge_kit.config`), the CLI and the library all
take their defaults from here, so they cannot disagree.
"""

from __future__ import annotations

from typing import Final

CONFIG_FILE: Final = "config.yaml"
REGISTRATION_FILE: Final = "registration.yaml"

HOST: Final = "127.0.0.1"
PORT: Final = 29333
STORE_URL: Final = "sqlite:///bridge_kit.db"
#: The largest request body accepted. It must fit the largest transaction Synapse sends
#: (synapse/appservice/scheduler.py): 100 events of at most 64 KiB each (MAX_PDU_SIZE),
#: which the serialisation for appservices may double with ``unsigned`` (a state event's
#: ``prev_content``, an invite's stripped state): 12.5 MiB; 100 ephemeral events and 100
#: to-device messages, budgeted at 64 KiB each: 12.5 MiB; one-time-key counts of up to
#: MAX_TRANSACTION_KEY_COUNTS devices (about 230 bytes each): 11 MiB. About 36 MiB in
#: all; 64 MiB leaves headroom. A body past it gets 413, which Synapse resends forever.
#: Only requests with the hs_token are read, so a stranger cannot make the bridge
#: buffer this much.
MAX_BODY_BYTES: Final = 64 * 1024 * 1024

#: Puppet registrations in flight at most in a bulk run (429s lower it).
CONCURRENCY: Final = 16
MAX_CONCURRENCY: Final = 1024
PROVISION_ON_QUERY: Final = True
#: Puppets registered because the homeserver asked about them (GET /users), per minute at
#: most; each one may count against the homeserver's monthly-active-user quota.
PROVISION_PER_MINUTE: Final = 60
#: ... and per day at most (a rolling day): at 60 a minute, anyone could otherwise make
#: the bridge register 86,400 accounts a day against that quota.
PROVISION_PER_DAY: Final = 1000

LOG_LEVEL: Final = "INFO"
LOG_FORMAT: Final = "text"

#: Transaction dedup records kept, and how often (in transactions) the rest are pruned.
DEDUP_KEEP: Final = 10_000
DEDUP_PRUNE_EVERY: Final = 1000
#: Seconds a transaction dedup record is kept at most. A record only matters when the
#: homeserver resends a transaction whose 200 it did not see; Synapse retries every
#: 2..512 s while it runs, and after a crash of its own resends once it is back, so a
#: week covers a homeserver down over a long weekend and more.
DEDUP_MAX_AGE: Final = 7 * 24 * 3600.0
#: Seconds between prunes of the dedup records at most, however few transactions come.
DEDUP_PRUNE_INTERVAL: Final = 3600.0

#: Events and ephemeral events one transaction may carry. Synapse sends at most 100
#: of each; a body of 64 MiB could otherwise hold 30 million invalid items, each a dead
#: letter (measured: 80 s of blocking CPU and 1.8 GB for 4 million). Past this the
#: transaction is refused (413 M_TOO_LARGE): a homeserver that really sent that much
#: would be stuck resending it, but none does, and accepting would let one request
#: stall the bridge.
MAX_TRANSACTION_ITEMS: Final = 10_000

#: Devices whose one-time-key counts one transaction may carry (they do not count
#: towards MAX_TRANSACTION_ITEMS). Synapse sends the counts of every device of every
#: appservice user in the rooms of a transaction's events, so a portal room with
#: thousands of puppets with devices legitimately sends thousands; refusing them would
#: stop delivery for good. A Synapse-shaped body of 50,000 devices takes about 11.5 MB
#: (measured: 2.3 MB per 10,000), within MAX_BODY_BYTES; the bound keeps a body of
#: nothing but minimal counts to about 1.3 s of parsing (26 us each).
MAX_TRANSACTION_KEY_COUNTS: Final = 50_000

#: Seconds a stopping app waits for in-flight requests before closing them.
SHUTDOWN_TIMEOUT: Final = 60.0

#: Seconds AppService.stop() may take in all. The listener (SHUTDOWN_TIMEOUT) and the
#: inbox's grace for running handlers (10 s) fit in it; past it, whatever step is
#: still running is cancelled, so a daemon stops before a service manager kills it
#: (systemd's default is 90 s). Unfinished events stay in the inbox for next time.
STOP_TIMEOUT: Final = 75.0

#: Puppet intents kept in memory; a dropped one costs one store lookup when it comes back.
INTENT_CACHE_SIZE: Final = 10_000

#: The durable inbox (see bridge_kit.inbox.lanes): rooms handled at once, attempts per
#: event before it becomes a dead letter, the retry backoff (doubling, capped),
#: the time a handler may run, a process's lease on a room, and how often it
#: looks for work others left (replays, another daemon's accepted transactions).
HANDLER_CONCURRENCY: Final = 32
HANDLER_ATTEMPTS: Final = 5
RETRY_BACKOFF: Final = 1.0
RETRY_BACKOFF_MAX: Final = 300.0
HANDLER_TIMEOUT: Final = 60.0
LANE_LEASE: Final = 30.0
INBOX_POLL: Final = 2.0

#: The homeserver's start-up ping: attempts, and the first wait (doubling: 1 + 2 + 4 + 8
#: = 15 s in all). A restart can race the homeserver's own retry of queued transactions.
PING_ATTEMPTS: Final = 5
PING_BACKOFF: Final = 1.0

#: Seconds an encrypted event waits for its room key (parked, outside its room's lane)
#: before it becomes a dead letter ("no room key"); a key sent together with the
#: message usually arrives in the same or the next transaction.
KEY_WAIT: Final = 10.0

#: Retention (see bridge_kit.store.retention), run every RETENTION_INTERVAL seconds by the
#: daemon: dead letters kept at most (the newest) and for how long after their last
#: failure; how much of a dead letter's traceback is kept; how long Megolm replay
#: records (one per decrypted message index) and sealed to-device payloads (kept so
#: a retry or replay decrypts again) live. A sealed payload an inbox item or a dead
#: letter may still need is kept however old.
RETENTION_INTERVAL: Final = 300.0
DEAD_LETTERS_KEEP: Final = 10_000
DEAD_LETTERS_MAX_AGE: Final = 30 * 86_400.0
DEAD_LETTER_ERROR_CHARS: Final = 16_000
REPLAY_RECORDS_MAX_AGE: Final = 30 * 86_400.0
SEALED_PAYLOADS_MAX_AGE: Final = 7 * 86_400.0
#: SQLite's synchronous pragma: "normal" (WAL, fast; a power cut can lose the last
#: commits) or "full" (every commit synced).
STORE_SYNC: Final = "normal"

#: Seconds (jittered by a quarter either way) between two looks of a daemon on a shared
#: store at its bridge logins' leases: how soon a standby daemon connects a login
#: whose holder died or let go.
LOGIN_LEASE_RETRY: Final = 10.0

#: Seconds between two homeserver pings of a running bridge (``bridge.ping_interval``).
BRIDGE_PING_INTERVAL: Final = 60.0
