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
MAX_BODY_BYTES: Final = 10 * 1024 * 1024

#: Puppet registrations in flight at most in a bulk run (429s lower it).
CONCURRENCY: Final = 16
MAX_CONCURRENCY: Final = 1024
PROVISION_ON_QUERY: Final = True
#: Puppets registered because the homeserver asked about them (GET /users), per minute at
#: most; each one may count against the homeserver's monthly-active-user quota.
PROVISION_PER_MINUTE: Final = 60

LOG_LEVEL: Final = "INFO"
LOG_FORMAT: Final = "text"

#: Transaction dedup records kept, and how often (in transactions) the rest are pruned.
DEDUP_KEEP: Final = 10_000
DEDUP_PRUNE_EVERY: Final = 1000

#: Events and ephemeral events one transaction may carry. Synapse sends at most 100
#: of each; a body of 10 MB could otherwise hold 5 million invalid items, each a dead
#: letter (measured: 80 s of blocking CPU and 1.8 GB for 4 million). Past this the
#: transaction is refused (413 M_TOO_LARGE): a homeserver that really sent that much
#: would be stuck resending it, but none does, and accepting would let one request
#: stall the bridge.
MAX_TRANSACTION_ITEMS: Final = 10_000

#: Devices whose one-time-key counts one transaction may carry (they do not count
#: towards MAX_TRANSACTION_ITEMS). Synapse sends the counts of every device of every
#: appservice user in the rooms of a transaction's events, so a portal room with
#: thousands of puppets with devices legitimately sends thousands; refusing them would
#: stop delivery for good. A Synapse-shaped body of 50,000 devices is past the default
#: 10 MB body limit (measured: 2.3 MB per 10,000); the bound keeps a body of nothing
#: but minimal counts to about 1.3 s of parsing (26 us each).
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

#: The durable inbox (see bridge_kit.inbox): rooms handled at once, attempts per
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

#: Seconds an encrypted event waits in the inbox for its room key before it becomes a
#: dead letter ("no room key"); a key sent together with the message usually arrives
#: in the same or the next transaction.
KEY_WAIT: Final = 10.0
