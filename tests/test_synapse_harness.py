"""The Synapse harness itself: it starts, loads our registration, and its helpers tell the truth."""

from __future__ import annotations

import aiohttp

from tests.conftest import TestHomeserver


async def test_synapse_loaded_our_registration(synapse: TestHomeserver) -> None:
    headers = {"Authorization": f"Bearer {synapse.as_token}"}
    url = f"{synapse.url}/_matrix/client/v3/account/whoami"
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["user_id"] == "@_bk_bot:test.local"


async def test_user_helpers_see_created_users(synapse: TestHomeserver, unique: str) -> None:
    assert not await synapse.user_exists(f"@harness{unique}:test.local")
    await synapse.create_user(f"harness{unique}")
    assert await synapse.user_exists(f"@harness{unique}:test.local")
    assert await synapse.count_users(f"harness{unique}") == 1
