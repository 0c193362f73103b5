"""Room events decrypted by a process that dies: the crash test of replay records in
test_crypto_safety runs this as a subprocess.

    python tests/helpers/decrypt_crasher.py STORE_URL EVENTS_FILE

EVENTS_FILE is JSON: the room, the sender, its session key, and a list of
``[event_id, content]``. The process takes in the key as the sender's, decrypts
each event, prints its event ID once it is decrypted, and SIGKILLs itself right
after the last one: no close, no later step of any kind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import vodozemac

from bridge_kit.crypto import CryptoVault, InboundGroupSessions, derive_pickle_key
from bridge_kit.store import open_store

OWNER, PICKLE_KEY = "@bot:test.local|BOTDEV", derive_pickle_key("decrypt crasher")


async def main(url: str, events_file: str) -> None:
    given = json.loads(Path(events_file).read_text())
    store = open_store(url)
    await store.open()
    inbound = InboundGroupSessions(CryptoVault(store, OWNER, PICKLE_KEY))
    session = vodozemac.InboundGroupSession(vodozemac.SessionKey(given["session_key"]))
    sender, room = given["sender"], given["room"]
    await inbound.add(room, session, sender, given["sender_key"], "ed25519")
    for event_id, content in given["events"]:
        await inbound.decrypt(room, event_id, sender, content)
        print(event_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    try:
        asyncio.run(main(*sys.argv[1:3]))
    except BaseException:
        traceback.print_exc()
        os._exit(1)  # at once: the store's thread, never closed, would keep the process
