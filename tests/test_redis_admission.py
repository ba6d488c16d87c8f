"""Limits and budgets shared by replicas through a real Redis (RELIABILITY 13, issue 8): each
check-and-reserve is atomic across replicas, so a limit holds exactly however the load is split."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal

import grpc
import pytest

from routesvc.client import RouterClient
from routesvc.config import TenantConfig
from routesvc.errors import LimitExceeded
from routesvc.redis_admission import RedisAdmission
from routesvc.server import Server
from routesvc.testing import FakeProvider, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import default_config, live_environ, settings_from, user_chat
from tests.redis_server import running_redis


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server for this module."""
    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


_prefixes = iter(range(10_000))


@pytest.fixture
def prefix() -> str:
    """A key prefix of its own per test, so tests share the server but not counts."""
    return f"test{next(_prefixes)}:"


async def _replicas(url: str, prefix: str, tenant: TenantConfig, count: int = 2) -> list[RedisAdmission]:
    return [RedisAdmission(url, {"t": tenant}, prefix=prefix) for _ in range(count)]


class TestSharedLimits:
    async def test_requests_per_minute_hold_exactly_across_replicas(self, redis_url: str, prefix: str) -> None:
        """100 concurrent admissions split over two replicas of a 50-rpm tenant: exactly 50 pass."""
        replicas = await _replicas(redis_url, prefix, TenantConfig(requests_per_minute=50))

        async def one(index: int) -> str:
            try:
                await replicas[index % 2].admit("t")
            except LimitExceeded as error:
                return error.reason
            return "ok"

        results = await asyncio.gather(*[one(i) for i in range(100)])
        for replica in replicas:
            await replica.aclose()
        assert (results.count("ok"), results.count("RATE_LIMITED")) == (50, 50)

    async def test_budgets_settle_across_replicas(self, redis_url: str, prefix: str) -> None:
        """Spend settled on one replica counts on the other; reservations count until settled."""
        first, second = await _replicas(redis_url, prefix, TenantConfig(daily_budget_usd=Decimal(1)))
        held = await first.admit("t", cost=Decimal("0.7"))
        with pytest.raises(LimitExceeded) as caught:
            await second.admit("t", cost=Decimal("0.4"))
        assert caught.value.reason == "BUDGET_EXCEEDED"
        await held.settle(10, Decimal("0.2"))
        await held.settle(10, Decimal("0.2"))  # settling twice counts once
        assert await second.spent("t") == Decimal("0.2")
        await (await second.admit("t", cost=Decimal("0.4"))).settle(10, Decimal("0.4"))
        assert await first.spent("t") == Decimal("0.6")
        for replica in (first, second):
            await replica.aclose()

    async def test_concurrency_and_tokens_are_shared_and_rejections_reserve_nothing(
        self, redis_url: str, prefix: str
    ) -> None:
        """One slot in flight across replicas; a refused request takes no tokens."""
        first, second = await _replicas(redis_url, prefix, TenantConfig(max_concurrent=1, tokens_per_minute=100))
        held = await first.admit("t", tokens=60)
        for _ in range(3):
            with pytest.raises(LimitExceeded) as caught:
                await second.admit("t", tokens=10)
            assert caught.value.reason == "CONCURRENCY_LIMITED"
        await held.settle(30, Decimal(0))
        await (await second.admit("t", tokens=70)).settle(70, Decimal(0))
        with pytest.raises(LimitExceeded) as caught:
            await first.admit("t", tokens=1)
        assert caught.value.reason == "TOKEN_RATE_LIMITED"
        for replica in (first, second):
            await replica.aclose()


@pytest.fixture
async def two_servers(
    redis_url: str, prefix: str, fake: FakeProvider
) -> AsyncIterator[tuple[RouterClient, RouterClient]]:
    config = default_config()
    config["tenants"] = {"acme": {"requests_per_minute": 10}}
    config["shared_state"] = {"redis_url": redis_url, "key_prefix": prefix}
    settings = settings_from(config, live_environ(fake))
    async with (
        Server(settings, port=0) as one,
        Server(settings, port=0) as two,
        RouterClient(one.target) as first,
        RouterClient(two.target) as second,
    ):
        yield first, second


class TestReplicasOverGrpc:
    async def test_a_tenant_limit_holds_across_two_servers(
        self, two_servers: tuple[RouterClient, RouterClient], fake: FakeProvider
    ) -> None:
        """Two servers sharing Redis, a 10-rpm tenant, 20 calls alternating: 10 served, 10 refused."""
        fake.set_default(Script(chunk_count=2))
        outcomes = []
        for index in range(20):
            client = two_servers[index % 2]
            try:
                async for _ in client.complete(user_chat("hi"), pb.RoutingContext(tenant="acme")):
                    pass
                outcomes.append("ok")
            except grpc.aio.AioRpcError as error:
                outcomes.append(error.code().name)
        assert (outcomes.count("ok"), outcomes.count("RESOURCE_EXHAUSTED")) == (10, 10)
        assert len(fake.requests) == 10
