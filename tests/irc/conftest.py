"""Fixtures of the IRC bridge's tests: a real miniircd, the bridge's package importable."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import pytest

from tests.conftest import missing_service
from tests.helpers.daemons import ROOT
from tests.helpers.ircd import Miniircd, miniircd_path, running_miniircd

# The bridge is an example, not a part of bridge_kit: its package lives in examples/.
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))


@pytest.fixture(scope="module")
async def ircd(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Miniircd]:
    """One miniircd per test module (use unique nicks and channels)."""
    if miniircd_path() is None:
        missing_service("miniircd is not installed (pip install -e '.[test]')")
    async with running_miniircd(tmp_path_factory.mktemp("ircd")) as server:
        yield server
