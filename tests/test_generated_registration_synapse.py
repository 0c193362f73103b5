"""A registration made by `bridge-kit generate-registration` works in a real Synapse as is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from bridge_kit import RegisterRequest, Registration
from bridge_kit.testing.synapse import SynapseServer, free_port, synapse_installed
from tests.conftest import missing_service


def generate(path: Path, *extra: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "bridge_kit", "generate-registration", "--id", "gen_test",
         "--url", f"http://127.0.0.1:{free_port()}", "--domain", "gen.local",
         "--user-prefix", "_gen_", "--alias-prefix", "_gen_", "-o", str(path), *extra],
        check=True, capture_output=True,
    )  # fmt: skip


@pytest.mark.slow
async def test_synapse_loads_a_generated_registration_and_registers_with_its_token(
    tmp_path: Path,
) -> None:
    if not synapse_installed():
        missing_service("matrix-synapse is not installed")
    path = tmp_path / "registration.yaml"
    generate(path, "--receive-ephemeral", "--protocol", "gen")
    assert path.stat().st_mode & 0o777 == 0o600
    registration = Registration.load(path)
    async with (
        SynapseServer(tmp_path / "hs", registrations=[path], server_name="gen.local") as hs,
        aiohttp.ClientSession() as http,
    ):
        request = RegisterRequest.for_puppet("_gen_alice")
        headers = {"Authorization": f"Bearer {registration.as_token}"}
        url = f"{hs.url}/_matrix/client/v3/register"
        async with http.post(url, json=request.body(), headers=headers) as resp:
            body = await resp.json()
        assert resp.status == 200, body
        assert body["user_id"] == "@_gen_alice:gen.local"
        assert "access_token" not in body  # inhibit_login: no device, no token
        async with http.post(
            url, json=RegisterRequest.for_puppet("alice").body(), headers=headers
        ) as resp:
            outside = await resp.json()
        assert (resp.status, outside["errcode"]) == (400, "M_EXCLUSIVE")


@pytest.mark.parametrize("flag", [[], ["--force"]])
def test_keep_tokens_output_still_loads(tmp_path: Path, flag: list[str]) -> None:
    path = tmp_path / "registration.yaml"
    generate(path)
    before = Registration.load(path)
    generate(path, "--keep-tokens", *flag)
    after = Registration.load(path)
    assert (after.id, after.as_token, after.hs_token) == (
        before.id,
        before.as_token,
        before.hs_token,
    )
