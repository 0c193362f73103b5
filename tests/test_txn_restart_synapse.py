"""No event is dropped when the homeserver restarts (issue 18).

Synapse on SQLite numbers appservice transactions from 1 again after a restart
(it deletes the rows of completed transactions and takes the next id from what
is left), so the txnIds after a restart are ones bridge_kit accepted before.
With dedup on the txnId alone they were answered 200 and stored nothing (4 of 8
messages lost); with the body digest they are new transactions.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import aiohttp

from bridge_kit import AppService, AppServiceConfig, Config, Event, HomeserverConfig
from tests.conftest import TestHomeserver
from tests.helpers.daemons import join_puppet, real_user
from tests.test_server import metric

TIMEOUT = 60.0


async def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


async def test_messages_after_a_synapse_restart_all_arrive(
    synapse_factory: Callable[..., AbstractAsyncContextManager[TestHomeserver]],
    tmp_path: Path,
    unique: str,
) -> None:
    async with synapse_factory() as hs:
        config = Config(
            homeserver=HomeserverConfig(url=hs.url),
            appservice=AppServiceConfig(
                registration=str(hs.registration_path),
                store=f"sqlite:///{tmp_path / 'bk.db'}",
                port=hs.appservice_port,
            ),
        )
        app = AppService(config)
        handled: list[str] = []

        @app.on_event("m.room.message")
        async def on_message(event: Event) -> None:
            handled.append(str(event.content.get("body")))

        before = [f"before {n} {unique}" for n in range(4)]
        after = [f"after {n} {unique}" for n in range(4)]
        client, alice = await real_user(hs, f"restart{unique}")
        async with app, client:
            room = await alice.create_room()
            await join_puppet(hs, room, f"_bk_restart{unique}", alice)
            for body in before:
                await alice.send_text(room, body)
            await eventually(lambda: set(before) <= set(handled), "the first messages arrived")

            # The same workdir: the same SQLite database, whose completed transactions
            # are gone, so Synapse numbers the next ones from 1 again.
            await hs.stop()
            await hs.start()
            for body in after:
                await alice.send_text(room, body)
            await eventually(
                lambda: set(after) <= set(handled),
                f"the messages sent after the restart arrived (handled: {handled})",
            )

        assert handled.count(after[-1]) == 1
        assert [body for body in handled if body in before + after] == before + after
        # The restart did reuse txnIds: this test saw the case it is about.
        assert metric(app.metrics, "bridge_kit_reused_txn_ids_total") >= 1


async def test_an_oversized_transaction_shows_in_health_and_metrics(
    synapse: TestHomeserver, tmp_path: Path
) -> None:
    config = Config(
        homeserver=HomeserverConfig(url=synapse.url),
        appservice=AppServiceConfig(
            registration=str(synapse.registration_path),
            store=f"sqlite:///{tmp_path / 'bk.db'}",
            port=synapse.appservice_port,
            max_body_bytes=4096,
        ),
    )
    app = AppService(config)
    body = json.dumps({"events": [], "padding": "x" * 8192}).encode()
    headers = {"Authorization": f"Bearer {synapse.hs_token}"}
    async with app, aiohttp.ClientSession() as http:
        url = f"{synapse.appservice_url}/_matrix/app/v1/transactions/huge"
        async with http.put(url, data=body, headers=headers) as response:
            assert response.status == 413
            assert (await response.json())["errcode"] == "M_TOO_LARGE"
        async with http.get(f"{synapse.appservice_url}/_bridge_kit/health") as response:
            health = await response.json()
        async with http.get(f"{synapse.appservice_url}/metrics") as response:
            metrics = await response.text()
    assert health["refused_transactions"] == 1
    assert health["last_refused"]["txn_id"] == "huge"
    assert health["last_refused"]["reason"] == "body"
    assert "4096" in health["last_refused"]["message"]
    assert 'bridge_kit_refused_transactions_total{reason="body"} 1.0' in metrics
