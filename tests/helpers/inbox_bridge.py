"""A bridge the inbox tests run as a subprocess: it records every handler run to a file.

    python tests/helpers/inbox_bridge.py CONFIG RECORD_FILE

Every ``m.room.message`` from a user outside the namespace is appended to
RECORD_FILE as ``<process name> <room> <event id> <body>`` (one write, so lines
of two processes sharing the file never mix). Bodies starting with ``echo``
are answered by the puppet named in ``BK_TEST_PUPPET``; a body starting with
``crash`` is answered and then, the first time, the process kills itself (SIGKILL)
before its event is marked done. A body starting with ``fail`` raises until
a file RECORD_FILE with the suffix ``.fixed`` exists. ``BK_TEST_DELAY`` is the seconds each
handler sleeps; ``BK_TEST_NAME`` names the process in the record. With
``BK_TEST_STALL_AFTER=N`` the handler that records the N-th line never returns, so a
kill finds that event running and every later one still in the inbox, however busy
the machine is.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from bridge_kit import AppService, Config, Event, configure_logging, run_app


def build(config: Config, record: Path) -> AppService:
    app = AppService(config)
    name = os.environ.get("BK_TEST_NAME", "bridge")
    delay = float(os.environ.get("BK_TEST_DELAY", "0"))
    puppet = os.environ.get("BK_TEST_PUPPET", "")
    stall_after = int(os.environ.get("BK_TEST_STALL_AFTER", "0"))
    crash_marker = record.with_suffix(".crashed")
    recorded = 0

    @app.on_event("m.room.message")
    async def on_message(event: Event) -> None:
        nonlocal recorded
        if app.registration.is_user_in_namespace(event.sender or ""):
            return
        body = str(event.content.get("body", ""))
        if body.startswith("fail") and not record.with_suffix(".fixed").exists():
            raise RuntimeError("the remote network refuses this message")
        line = f"{name}\t{event.room_id}\t{event.event_id}\t{body}\n".encode()
        fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        recorded += 1
        if recorded == stall_after:
            await asyncio.Event().wait()  # until the test kills this process
        if body.startswith(("echo", "crash")):
            await app.intent(puppet).send_text(event.room_id or "", f"re: {body}")
        if body.startswith("crash") and not crash_marker.exists():
            crash_marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)  # after the send, before the event is done
        await asyncio.sleep(delay)

    return app


def main() -> int:
    config = Config.load(sys.argv[1])
    configure_logging(config.logging.level, config.logging.format)
    return run_app(build(config, Path(sys.argv[2])))


if __name__ == "__main__":
    raise SystemExit(main())
