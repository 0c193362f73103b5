"""Issue 10, defect 12: provisioning on user queries has a limit (``puppets.provision_per_minute``).

The token bucket is tested with a fake clock (no sleeping); the limit itself
through the real ``GET /_matrix/app/v1/users/{userId}`` route of a running
``AppService``, against the fake homeserver of ``tests/helpers/fault_homeserver.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp
import pytest
import yarl

from bridge_kit import AppService
from bridge_kit.app.ratelimit import TokenBucket
from bridge_kit.config import AppServiceConfig, Config, HomeserverConfig, PuppetsConfig
from bridge_kit.errors import ConfigError
from bridge_kit.registration import generate_registration
from bridge_kit.testing.synapse import free_port
from tests.helpers.fault_homeserver import FaultHomeserver


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the token bucket -------------------------------------------------------------------


def test_a_full_bucket_allows_a_burst_then_refuses() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3, 60.0, clock=clock)
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]


def test_tokens_come_back_at_the_rate_and_never_beyond_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, 60.0, clock=clock)  # one a second
    while bucket.try_take():
        pass
    clock.now += 0.5
    assert not bucket.try_take()
    clock.now += 0.5
    assert bucket.try_take()
    assert not bucket.try_take()
    clock.now += 3600
    assert bucket.available == 60
    assert sum(bucket.try_take() for _ in range(100)) == 60


def test_a_smaller_burst_is_kept() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, 60.0, burst=2, clock=clock)
    clock.now += 600
    assert [bucket.try_take() for _ in range(3)] == [True, True, False]


def test_a_clock_stepping_back_adds_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1, 60.0, clock=clock)
    assert bucket.try_take()
    clock.now -= 3600
    assert not bucket.try_take()
    clock.now += 3600 + 59
    assert not bucket.try_take()  # caught up, less than a period since the take
    clock.now += 1
    assert bucket.try_take()


@pytest.mark.parametrize(("rate", "period", "burst"), [(0, 60, None), (1, 0, None), (5, 60, 0.5)])
def test_a_bucket_that_could_never_give_a_token_is_refused(
    rate: float, period: float, burst: float | None
) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(rate, period, burst=burst)


# -- the configuration -------------------------------------------------------------------


def test_the_limit_defaults_to_60_and_must_be_positive() -> None:
    assert PuppetsConfig().provision_per_minute == 60
    with pytest.raises(ConfigError, match="provision_per_minute must be at least 1"):
        PuppetsConfig(provision_per_minute=0)
    text = "homeserver: {url: http://hs}\nappservice: {registration: r.yaml}\n"
    loaded = Config.loads(text + "puppets: {provision_per_minute: 5}\n", check_files=False)
    assert loaded.puppets.provision_per_minute == 5


# -- through the real route -------------------------------------------------------------


@pytest.fixture
async def limited_app() -> AsyncIterator[tuple[AppService, FaultHomeserver]]:
    registration = generate_registration("bk", None, "test.local", "_bk_")
    homeserver = FaultHomeserver(
        as_token=registration.as_token, sender_localpart=registration.sender_localpart
    )
    async with homeserver:
        config = Config(
            homeserver=HomeserverConfig(url=homeserver.url),
            appservice=AppServiceConfig(registration="unused", store="memory://", port=free_port()),
            puppets=PuppetsConfig(provision_per_minute=2),
        )
        app = AppService(config, registration=registration, ping=False)
        async with app:
            yield app, homeserver


async def get(app: AppService, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{app.config.appservice.port}{path}"
    auth = {"Authorization": f"Bearer {app.registration.hs_token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(yarl.URL(url, encoded=True), headers=auth) as response,
    ):
        return response.status, await response.text()


async def query(app: AppService, localpart: str) -> int:
    user_id = quote(f"@{localpart}:test.local", safe="")
    status, _ = await get(app, f"/_matrix/app/v1/users/{user_id}")
    return status


def refused_total(metrics_text: str) -> float:
    [line] = [
        line
        for line in metrics_text.splitlines()
        if line.startswith("bridge_kit_provisioning_refused_total ")
    ]
    return float(line.split()[1])


async def test_queries_beyond_the_limit_get_404_and_are_counted(
    limited_app: tuple[AppService, FaultHomeserver],
) -> None:
    app, homeserver = limited_app
    clock = FakeClock()
    app.provisioning = TokenBucket(2, 60.0, clock=clock)

    statuses = [await query(app, f"_bk_user{n}") for n in range(4)]
    assert statuses == [200, 200, 404, 404]
    assert homeserver.registered == {"_bk_user0", "_bk_user1"}
    _, metrics = await get(app, "/metrics")
    assert refused_total(metrics) == 2

    # A puppet already registered costs no token: the homeserver may ask again.
    assert await query(app, "_bk_user0") == 200
    clock.now += 30  # half a minute: one new puppet
    assert [await query(app, "_bk_user2"), await query(app, "_bk_user3")] == [200, 404]
    assert homeserver.registered == {"_bk_user0", "_bk_user1", "_bk_user2"}
    _, metrics = await get(app, "/metrics")
    assert refused_total(metrics) == 3


async def test_the_limit_holds_when_a_hook_says_yes(
    limited_app: tuple[AppService, FaultHomeserver],
) -> None:
    app, homeserver = limited_app
    asked: list[str] = []

    @app.on_user_query
    async def everyone_exists(user_id: str) -> bool:
        asked.append(user_id)
        return True

    statuses = [await query(app, f"_bk_hooked{n}") for n in range(3)]
    assert statuses == [200, 200, 404]
    assert len(asked) == 3
    assert homeserver.registered == {"_bk_hooked0", "_bk_hooked1"}


async def test_the_configured_limit_is_the_one_applied(
    limited_app: tuple[AppService, FaultHomeserver],
) -> None:
    app, homeserver = limited_app  # the bucket built from the config: 2 a minute
    assert [await query(app, f"_bk_cfg{n}") for n in range(3)] == [200, 200, 404]
    assert len(homeserver.registered) == 2
