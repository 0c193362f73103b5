"""``bridge-kit demo``: the whole loop against a real Synapse, in a temporary directory.

It generates a registration, starts Synapse and the appservice, registers
puppets in bulk, and has a real user talk to a puppet that answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from bridge_kit._extras import install_extra
from bridge_kit.app.runner import ExitCode
from bridge_kit.app.service import AppService
from bridge_kit.client.homeserver import HomeserverClient
from bridge_kit.config import AppServiceConfig, Config, HomeserverConfig
from bridge_kit.errors import BridgeKitError
from bridge_kit.intent import Intent
from bridge_kit.puppets.progress import ProgressReporter, Steps, format_summary
from bridge_kit.registration import generate_registration
from bridge_kit.testing.synapse import SynapseServer, free_port, synapse_installed
from bridge_kit.types import Event

SERVER_NAME = "demo.local"
ECHO_PUPPET = "_demo_echo"
REPLY_TIMEOUT = 60.0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole loop against a throw-away Synapse",
        description=(
            "Start a real Synapse in a temporary directory, generate a registration, run the "
            "appservice, bulk-register puppets, and exchange a message with a puppet."
        ),
    )
    parser.add_argument("--puppets", type=int, default=1000, help="how many puppets to register")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    if not synapse_installed():
        raise BridgeKitError(
            f"the demo needs Synapse: {install_extra('demo')}; scripts/demo does it"
        )
    workdir = Path(tempfile.mkdtemp(prefix="bridge-kit-demo-"))
    try:
        return asyncio.run(Demo(workdir, args.puppets, progress=not args.no_progress).run())
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up")
        return ExitCode.SIGINT
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


class Demo:
    """One demo run; every step prints one line: what it did and how long it took."""

    def __init__(self, workdir: Path, puppets: int, *, progress: bool = True) -> None:
        self.workdir = workdir
        self.puppet_count = puppets
        self.progress = progress
        self.port = free_port()
        self.steps = Steps(sys.stdout)
        self.step = self.steps.step
        self._started = time.monotonic()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.invited: asyncio.Future[str] = loop.create_future()
        self.replied: asyncio.Future[str] = loop.create_future()
        self.received: asyncio.Future[Event] = loop.create_future()
        print(f"bridge_kit demo in {self.workdir}")
        with self.step("generate a registration (tokens from secrets, mode 0600)"):
            registration_path = self._write_registration()
        with self.step("start Synapse (SQLite) with the registration loaded"):
            synapse = SynapseServer(
                self.workdir / "synapse", registrations=[registration_path], server_name=SERVER_NAME
            )
            await synapse.start()
        try:
            async with self._appservice(synapse, registration_path) as app:
                await self._bulk_register(app)
                await self._conversation(synapse, app)
        finally:
            await synapse.stop()
        print(f"demo finished in {time.monotonic() - self._started:.1f} s")
        return 0

    def _write_registration(self) -> Path:
        registration = generate_registration(
            id="bridge_kit_demo",
            url=f"http://127.0.0.1:{self.port}",
            domain=SERVER_NAME,
            user_prefix="_demo_",
            sender_localpart="demo_bridge",
        )
        path = self.workdir / "registration.yaml"
        registration.write(path)
        return path

    @contextlib.asynccontextmanager
    async def _appservice(
        self, synapse: SynapseServer, registration_path: Path
    ) -> AsyncIterator[AppService]:
        config = Config(
            homeserver=HomeserverConfig(url=synapse.url),
            appservice=AppServiceConfig(
                registration=str(registration_path),
                store=f"sqlite:///{self.workdir / 'bridge_kit.db'}",
                port=self.port,
            ),
        )
        app = AppService(config)
        app.on_event("m.room.member")(self._on_member)
        app.on_event("m.room.message")(self._on_message)
        with self.step("start the appservice; whoami and the homeserver's ping succeed") as notes:
            await app.start()
            notes.append(f"serving http://127.0.0.1:{self.port} as {app.bot.user_id}")
        self.app = app
        try:
            yield app
        finally:
            with self.step("stop the appservice (in-flight transactions finished, store flushed)"):
                await app.stop()

    async def _bulk_register(self, app: AppService) -> None:
        localparts = (f"_demo_puppet_{i:05d}" for i in range(self.puppet_count))
        what = f"bulk-register {self.puppet_count:,} puppets"
        with self.step(what) as notes:
            # On a terminal the bar is drawn on the step's own line, which the
            # step rewrites when it ends; a pipe gets the summary only.
            reporter = ProgressReporter(
                sys.stdout,
                total=self.puppet_count,
                enabled=self.progress and self.steps.tty,
                prefix=f"{Steps.running(what)}  ",
            )
            result = await app.puppets.register_many(localparts, progress=reporter)
            reporter.close(end_line=False)
            notes.extend(format_summary(result).splitlines())
        if not result.ok:
            raise BridgeKitError(f"bulk registration failed: {result.summary()}")
        with self.step(
            "run it again: every puppet is known to the store, no request sent"
        ) as notes:
            sent = app.client.request_count
            again = await app.puppets.register_many(
                f"_demo_puppet_{i:05d}" for i in range(self.puppet_count)
            )
            notes.append(
                f"{again.skipped_known:,} skipped, {app.client.request_count - sent} requests"
            )

    async def _conversation(self, synapse: SynapseServer, app: AppService) -> None:
        with self.step("create the real user @alice (admin shared secret)"):
            token = await synapse.create_user("alice")
        async with HomeserverClient(synapse.url, token) as alice_client:
            alice = Intent(alice_client, f"@alice:{SERVER_NAME}", None)
            echo_id = f"@{ECHO_PUPPET}:{SERVER_NAME}"
            with self.step(f"alice creates a room and invites {echo_id} (not yet registered)"):
                room_id = await alice.create_room(name="bridge_kit demo")
                await alice.invite(room_id, echo_id)
            with self.step("Synapse queried /users, the puppet was provisioned and joined"):
                await asyncio.wait_for(asyncio.shield(self.invited), REPLY_TIMEOUT)
            with self.step(
                "alice says hello; the handler gets it in a transaction; the puppet answers"
            ) as notes:
                await alice.send_text(room_id, "hello, bridge")
                event = await asyncio.wait_for(asyncio.shield(self.received), REPLY_TIMEOUT)
                reply_id = await asyncio.wait_for(asyncio.shield(self.replied), REPLY_TIMEOUT)
                body = event.content.get("body")
                notes.append(f"received {event.event_id} from {event.sender}: {body!r}")
                notes.append(f"{echo_id} answered with {reply_id}")

    async def _on_member(self, event: Event) -> None:
        if event.state_key == f"@{ECHO_PUPPET}:{SERVER_NAME}" and (
            event.content.get("membership") == "invite"
        ):
            assert event.room_id is not None
            await self.app.intent(ECHO_PUPPET).join_room(event.room_id)
            if not self.invited.done():
                self.invited.set_result(event.room_id)

    async def _on_message(self, event: Event) -> None:
        if event.sender is None or self.app.registration.is_user_in_namespace(event.sender):
            return
        assert event.room_id is not None
        if not self.received.done():
            self.received.set_result(event)
        body = event.content.get("body", "")
        reply_id = await self.app.intent(ECHO_PUPPET).send_text(event.room_id, f"echo: {body}")
        if not self.replied.done():
            self.replied.set_result(reply_id)
