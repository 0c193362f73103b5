"""An inbox that dies: the crash test in test_inbox_completions runs this as a subprocess.

    python tests/helpers/inbox_crasher.py STORE_URL RECORD_FILE CRASH_AT

It works through the store's inbox with the default settings and one handler,
which appends each event's ``content.n`` to RECORD_FILE (one write a line) and,
for the event numbered CRASH_AT, SIGKILLs the process after the write: the
handler ran, and neither its completion nor the uncommitted ones before it are
in the store.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from bridge_kit.inbox.lanes import Inbox
from bridge_kit.store import open_store
from bridge_kit.types import Event


async def main(url: str, record: str, crash_at: int) -> None:
    async def handler(event: Event) -> None:
        n = int(event.content["n"])
        fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{n}\n".encode())
        finally:
            os.close(fd)
        if n == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    async with open_store(url) as store:
        inbox = Inbox(store, lambda kind, event_type: [handler], appservice_id="crasher")
        await inbox.start()
        await asyncio.sleep(60)  # the test fails on the timeout if the kill never comes
        await inbox.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
