"""Limits and budgets shared by replicas through a real Redis (RELIABILITY 13, issue 8): each
check-and-reserve is atomic across replicas, so a limit holds exactly however the load is split."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import socket
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
import redis.asyncio
from structlog.testing import capture_logs

from routesvc import redis_admission
from routesvc.auth import key_digest
from routesvc.client import RouterClient
from routesvc.config import TenantConfig
from routesvc.errors import LimitExceeded, RequestTooLarge, SharedStateUnavailable
from routesvc.redis_admission import RedisAdmission
from routesvc.server import Server
from routesvc.testing import BatchOutcome, FakeProvider, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import default_config, free_port, live_environ, settings_from, user_chat
from tests.redis_server import running_redis
from tests.test_batches import budget_config, submit
from tests.test_classifier import llm_classifier_config
from tests.test_limits import (
    PRECHECKED,
    Clock,
    budgets_held_in_flight_ask_for_a_short_wait,
    budgets_refuse_as_waiting_would_help,
    extends_within_the_budget,
    give_back_and_charge_in_their_periods,
    precheck_tokens_and_cost,
    tokens_per_minute_follow_settles_and_the_window,
)
from tests.test_tls import make_pki
from tests.test_validation import error_info


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


def _mid_january() -> Clock:
    """A wall clock at 2030-01-15 12:00 UTC: half a day to the next day, 16.5 days to the next month."""
    clock = Clock()
    clock.now = datetime.datetime(2030, 1, 15, 12, tzinfo=datetime.UTC).timestamp()
    return clock


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

    async def test_route_calls_per_minute_hold_exactly_across_replicas(self, redis_url: str, prefix: str) -> None:
        """60 concurrent Route calls split over two replicas of a tenant allowed 20 a minute:
        exactly 20 pass, and they use none of its requests per minute."""
        replicas = await _replicas(redis_url, prefix, TenantConfig(route_requests_per_minute=20, requests_per_minute=1))

        async def one(index: int) -> LimitExceeded | None:
            try:
                await replicas[index % 2].count_route("t")
            except LimitExceeded as error:
                return error
            return None

        results = await asyncio.gather(*[one(i) for i in range(60)])
        refused = [error for error in results if error is not None]
        reservation = await replicas[1].admit("t")
        await reservation.settle(0, Decimal(0))
        for replica in replicas:
            await replica.aclose()
        assert (len(results) - len(refused), len(refused)) == (20, 40)
        assert {error.reason for error in refused} == {"RATE_LIMITED"}
        assert all("20 Route calls per minute" in str(error) for error in refused)
        assert all(0 < (error.retry_after or 0) <= 60 for error in refused)

    async def test_a_retry_delay_is_never_longer_than_the_window(self, redis_url: str, prefix: str) -> None:
        """Windows scored by clocks 5 s apart (given clocks; an older replica's own): the one
        behind is told to retry within 60 s, not in 65: each window's delay is capped at the
        window."""
        ahead, behind = Clock(), Clock()
        ahead.now, behind.now = 1_005.0, 1_000.0
        limits = {"t": TenantConfig(route_requests_per_minute=1, requests_per_minute=1)}
        first = RedisAdmission(redis_url, limits, prefix=prefix, clock=ahead)
        second = RedisAdmission(redis_url, limits, prefix=prefix, clock=behind)
        await first.count_route("t")
        await (await first.admit("t")).settle(0, Decimal(0))
        with pytest.raises(LimitExceeded) as route:
            await second.count_route("t")
        with pytest.raises(LimitExceeded) as complete:
            await second.admit("t")
        for replica in (first, second):
            await replica.aclose()
        assert (route.value.retry_after, complete.value.retry_after) == (60.0, 60.0)

    async def test_a_route_call_given_back_frees_its_place_on_every_replica(self, redis_url: str, prefix: str) -> None:
        """A Route call refused before it cost anything gives its count back: of a tenant's two
        Route calls a minute, one counted and given back on one replica leaves two for the other."""
        first, second = await _replicas(redis_url, prefix, TenantConfig(route_requests_per_minute=2))
        give_back = await first.count_route("t")
        await first.count_route("t")
        give_back()
        await first.aclose()  # waits for the give-back, made in the background
        await second.count_route("t")
        with pytest.raises(LimitExceeded) as caught:
            await second.count_route("t")
        await second.aclose()
        assert caught.value.reason == "RATE_LIMITED"

    async def test_windows_are_scored_by_the_clock_of_redis(self, redis_url: str, prefix: str) -> None:
        """Two replicas whose clocks are 90 s apart share a tenant of 10 requests and 10 Route
        calls a minute: 10 of 30 of each pass (scored by each replica's clock, the one ahead took
        the other's 10 for over a minute old, and 20 passed)."""
        behind, ahead = Clock(), Clock()
        behind.now, ahead.now = time.time() - 45, time.time() + 45
        limits = {"t": TenantConfig(requests_per_minute=10, route_requests_per_minute=10)}
        replicas = [RedisAdmission(redis_url, limits, prefix=prefix, wall_clock=clock) for clock in (behind, ahead)]
        admitted = routed = 0
        for replica in replicas:
            for _ in range(15):
                with contextlib.suppress(LimitExceeded):
                    await replica.admit("t")
                    admitted += 1
                with contextlib.suppress(LimitExceeded):
                    await replica.count_route("t")
                    routed += 1
        for replica in replicas:
            await replica.aclose()
        assert (admitted, routed) == (10, 10)

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

    async def test_a_charge_from_one_replica_counts_for_every_replica(self, redis_url: str, prefix: str) -> None:
        """A charge (money spent outside a reservation) is added in the background; once it lands
        both replicas see it, and the next admission past the budget is refused everywhere."""
        first, second = await _replicas(redis_url, prefix, TenantConfig(daily_budget_usd=Decimal(1)))
        first.charge("t", Decimal("0.6"))
        first.charge("t", Decimal("0.5"))
        first.charge("unlimited", Decimal(3))
        await first.aclose()  # waits for the charges on their way
        assert await second.spent("t") == Decimal("1.1")
        assert await second.spent("unlimited") == 0
        with pytest.raises(LimitExceeded):
            await second.admit("t")
        assert await second.exhausted("t") == "tenant 't' has spent or reserved its daily budget"
        assert await second.exhausted("unlimited") == ""
        await second.aclose()

    async def test_a_charge_given_back_or_dated_counts_in_its_periods(self, redis_url: str, prefix: str) -> None:
        """As in one process: a negative charge gives money back, a dated one counts in its day."""
        clock = _mid_january()
        first, second = [
            RedisAdmission(redis_url, {"t": TenantConfig(daily_budget_usd=Decimal(1))}, prefix=prefix, wall_clock=clock)
            for _ in range(2)
        ]
        give_back_and_charge_in_their_periods(first, clock.now)
        await first.aclose()  # waits for the charges on their way
        assert await second.spent("t") == Decimal("0.2")
        clock.now -= 86_400
        assert await second.spent("t") == Decimal("0.2")
        await second.aclose()

    async def test_precheck_sees_every_replica_and_reserves_nothing(self, redis_url: str, prefix: str) -> None:
        """A 2-rpm tenant: prechecks take no slot; after two admissions on one replica the other
        replica's precheck refuses."""
        first, second = await _replicas(redis_url, prefix, TenantConfig(requests_per_minute=2))
        for _ in range(3):
            await second.precheck("t")
        await (await first.admit("t")).settle(0, Decimal(0))
        await (await first.admit("t")).settle(0, Decimal(0))
        with pytest.raises(LimitExceeded) as caught:
            await second.precheck("t")
        assert caught.value.reason == "RATE_LIMITED"
        await first.aclose()
        await second.aclose()

    async def test_precheck_checks_tokens_and_cost_across_replicas(self, redis_url: str, prefix: str) -> None:
        """Tokens and spend admitted on one replica refuse the other replica's precheck of a
        request that would pass them; the precheck reserves neither."""
        first, second = await _replicas(redis_url, prefix, PRECHECKED)
        await precheck_tokens_and_cost(second, first)
        await first.aclose()
        await second.aclose()

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

    async def test_tokens_per_minute_follow_settles_and_the_window(self, redis_url: str, prefix: str) -> None:
        """As per process, across replicas: see ``tokens_per_minute_follow_settles_and_the_window``."""
        clock = Clock()
        first, second = [
            RedisAdmission(redis_url, {"t": TenantConfig(tokens_per_minute=100)}, prefix=prefix, clock=clock)
            for _ in range(2)
        ]
        await tokens_per_minute_follow_settles_and_the_window(first, clock)
        with pytest.raises(LimitExceeded):
            await second.admit("t", tokens=1)
        for replica in (first, second):
            await replica.aclose()

    async def test_a_token_rate_check_reads_no_reservation_of_the_minute(self, redis_url: str, prefix: str) -> None:
        """A tenant with 1,000 reservations in its minute: its admissions read none of them (the
        script summed every one, HVALS, in Redis's one thread, its cost growing with the tenant's
        rate, until a busy tenant made Redis time out for every tenant), and the limit still
        holds exactly."""
        clock = Clock()
        limits = {"t": TenantConfig(tokens_per_minute=5 * 1_011)}
        admission = RedisAdmission(redis_url, limits, prefix=prefix, clock=clock)
        for _ in range(1_000):
            await (await admission.admit("t", tokens=5)).settle(5, Decimal(0))
        direct = redis.asyncio.Redis.from_url(redis_url)
        before = (await direct.info("commandstats")).get("cmdstat_hvals", {}).get("calls", 0)
        for _ in range(11):
            await (await admission.admit("t", tokens=5)).settle(5, Decimal(0))
        after = (await direct.info("commandstats")).get("cmdstat_hvals", {}).get("calls", 0)
        with pytest.raises(LimitExceeded) as caught:
            await admission.admit("t", tokens=1)
        await direct.aclose()
        await admission.aclose()
        assert after == before
        assert caught.value.reason == "TOKEN_RATE_LIMITED"

    async def test_a_request_larger_than_the_token_rate_is_too_large(self, redis_url: str, prefix: str) -> None:
        """As per process: an estimate over the tenant's tokens per minute is REQUEST_TOO_LARGE,
        with no retry delay, and the daily budget's refusal says "daily"."""
        (admission,) = await _replicas(
            redis_url, prefix, TenantConfig(tokens_per_minute=500, daily_budget_usd=Decimal(1)), count=1
        )
        with pytest.raises(RequestTooLarge) as too_large:
            await admission.admit("t", tokens=600)
        assert too_large.value.retry_after is None
        await admission.admit("t", tokens=10, cost=Decimal("0.6"))
        with pytest.raises(LimitExceeded) as over_budget:
            await admission.admit("t", tokens=10, cost=Decimal("0.6"))
        assert "its daily budget of 1 USD" in over_budget.value.message
        await admission.aclose()

    async def test_budgets_refuse_as_waiting_would_help(self, redis_url: str, prefix: str) -> None:
        """As per process: an estimate over a budget alone is REQUEST_TOO_LARGE without a retry
        delay; a request both budgets block retries at the later boundary, the next month's."""
        clock = _mid_january()
        budgets = TenantConfig(daily_budget_usd=Decimal(1), monthly_budget_usd=Decimal(2))
        admission = RedisAdmission(redis_url, {"t": budgets}, prefix=prefix, wall_clock=clock)
        await budgets_refuse_as_waiting_would_help(admission, clock)
        await admission.aclose()

    async def test_a_budget_too_large_to_reach_is_counted_as_any_other(self, redis_url: str, prefix: str) -> None:
        """Budgets of 1e16 USD a month and 1e30 a day (a "no real cap" the config accepts): the
        tenant is admitted, extended, settled and checked as per process (every admission raised
        decimal.InvalidOperation, formatting the budget with 12 places in 28 digits: INTERNAL)."""
        budgets = TenantConfig(daily_budget_usd=Decimal("1e30"), monthly_budget_usd=Decimal("1e16"))
        admission = RedisAdmission(redis_url, {"t": budgets}, prefix=prefix)
        await admission.precheck("t", tokens=10, cost=Decimal("0.5"))
        reservation = await admission.admit("t", tokens=10, cost=Decimal("0.5"))
        await reservation.extend(Decimal("0.25"))
        await reservation.settle(10, Decimal("0.6"))
        exhausted = await admission.exhausted("t", Decimal("1e15"))
        spent = await admission.spent("t")
        await admission.admit("t", cost=Decimal("6e15"))
        with pytest.raises(LimitExceeded) as caught:
            await admission.admit("t", cost=Decimal("6e15"))
        await admission.aclose()
        assert (exhausted, spent) == ("", Decimal("0.6"))
        assert "monthly budget of 10000000000000000 USD" in caught.value.message

    async def test_budgets_held_in_flight_ask_for_a_short_wait(self, redis_url: str, prefix: str) -> None:
        """As per process: see ``budgets_held_in_flight_ask_for_a_short_wait``."""
        clock = _mid_january()
        budgets = TenantConfig(daily_budget_usd=Decimal(1), monthly_budget_usd=Decimal(2))
        admission = RedisAdmission(redis_url, {"t": budgets}, prefix=prefix, wall_clock=clock)
        await budgets_held_in_flight_ask_for_a_short_wait(admission, clock)
        await admission.aclose()

    async def test_sums_within_the_budget_in_decimals_are_within_it_in_redis(self, redis_url: str, prefix: str) -> None:
        """A 0.3 USD budget: 0.1 spent, then 0.2 more is admitted, as ``LocalAdmission`` admits it
        (the doubles in Redis sum to a hair over 0.3), and so is an extension to 0.3; a millionth
        of a dollar more is still refused."""
        (admission,) = await _replicas(redis_url, prefix, TenantConfig(daily_budget_usd=Decimal("0.3")), count=1)
        await (await admission.admit("t", cost=Decimal("0.1"))).settle(0, Decimal("0.1"))
        await (await admission.admit("t", cost=Decimal("0.2"))).settle(0, Decimal(0))
        held = await admission.admit("t", cost=Decimal("0.1"))
        await held.extend(Decimal("0.1"))
        with pytest.raises(LimitExceeded) as caught:
            await held.extend(Decimal("0.100001"))
        assert caught.value.reason == "BUDGET_EXCEEDED"
        await held.settle(0, Decimal("0.2"))
        with pytest.raises(LimitExceeded):
            await admission.admit("t", cost=Decimal("0.000001"))
        await admission.aclose()


class TestExtensions:
    async def test_an_extension_reserves_as_it_does_in_one_process(self, redis_url: str, prefix: str) -> None:
        """The scenario ``LocalAdmission`` passes: an extension counts against the budget, one past
        it is refused and reserves nothing, the settle releases it all; a tenant without limits
        extends with nothing to check."""
        (admission,) = await _replicas(redis_url, prefix, TenantConfig(daily_budget_usd=Decimal(1)), count=1)
        await extends_within_the_budget(admission)
        await (await admission.admit("unlimited")).extend(Decimal(100))
        await admission.aclose()

    async def test_an_extension_is_refused_across_replicas_as_an_admission_is(
        self, redis_url: str, prefix: str
    ) -> None:
        """A $1 monthly budget: 0.25 admitted and extended by 0.5 on one replica leaves the other
        0.25; an extension past it is refused with the admission's reason, message and retry
        delay (to the next month, as what the request holds itself is never freed for it); an
        admission on the other replica, which only what that request holds refuses, is told to
        retry in a second; and a reservation admitted on the other replica fills it."""
        clock = _mid_january()
        first, second = [
            RedisAdmission(
                redis_url, {"t": TenantConfig(monthly_budget_usd=Decimal(1))}, prefix=prefix, wall_clock=clock
            )
            for _ in range(2)
        ]
        held = await first.admit("t", cost=Decimal("0.25"))
        await held.extend(Decimal("0.5"))
        with pytest.raises(LimitExceeded) as admitting:
            await second.admit("t", cost=Decimal("0.3"))
        with pytest.raises(LimitExceeded) as extending:
            await held.extend(Decimal("0.3"))
        expected = ("BUDGET_EXCEEDED", "tenant 't' would exceed its monthly budget of 1 USD", 16.5 * 86400)
        assert expected == (extending.value.reason, extending.value.message, extending.value.retry_after)
        held_message = f"{expected[1]} with what its requests in flight have reserved; retry once they end"
        assert (expected[0], held_message, 1.0) == (
            admitting.value.reason,
            admitting.value.message,
            admitting.value.retry_after,
        )
        other = await second.admit("t", cost=Decimal("0.25"))
        assert await second.exhausted("t") == "tenant 't' has spent or reserved its monthly budget"
        await held.settle(0, Decimal("0.5"))
        await other.settle(0, Decimal("0.25"))
        assert await first.exhausted("t") == ""
        for replica in (first, second):
            await replica.aclose()


class _Proxy:
    """A TCP proxy to Redis on loopback that can hold every reply for ``delay`` seconds (requests
    pass at once; settable), can cut every connection it carries, can be down for a while (``down``
    and ``up``: it cuts every connection and closes new ones at once), can lose the next reply
    (``lose_reply``: the command has run in Redis, and its connection is closed instead of
    answered), can cut the connection that next carries some bytes before they reach Redis
    (``cut_before``), or every connection that carries some bytes until ``up`` (``cut_each``),
    and can hold what the connections open now send (``hold``: not lost, as TCP holds a segment
    it retransmits) until ``deliver`` passes it on, after their client gave up, or close the
    connection that next carries some bytes and hold them for ``deliver`` (``cut_and_hold``: a
    proxy that still delivers a request it read before its client's side was reset). With
    ``tls``, its clients connect over TLS (``rediss://``), and ``cut_before`` can leave the other
    connections open then unanswered, their TLS close notices too (``silence_others``)."""

    def __init__(self, upstream: str, delay: float = 0.0, *, tls: ssl.SSLContext | None = None) -> None:
        parsed = urllib.parse.urlparse(upstream)
        self._host, self._port = str(parsed.hostname), int(parsed.port or 6379)
        self.delay = delay
        self._tls = tls
        self._writers: list[asyncio.StreamWriter] = []
        self._clients: list[asyncio.StreamWriter] = []  # the clients' sides of the connections
        self._silencing = False
        self._silenced: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self._losing = False
        self._down = False
        self._cutting = b""
        self._cutting_and_holding = b""
        self._cutting_each: tuple[bytes, ...] = ()
        self._cut: list[bytes] = []  # what the connections cut carried
        self._cut_more = asyncio.Event()
        self._slowing = b""
        self._slow: set[asyncio.StreamWriter] = set()  # connections whose replies wait ``delay``
        self._requests_slowed: tuple[bytes, float] = (b"", 0.0)  # ``slow_requests``
        self._hurried = asyncio.Event()  # set by ``hurry``: replies waiting ``delay`` pass at once
        self._carried: list[bytes] = []  # what was passed on to Redis
        self._carried_more = asyncio.Event()
        self._held: dict[asyncio.StreamWriter, bytearray] = {}  # upstream writer -> what waits
        self._replied: dict[asyncio.StreamWriter, asyncio.Event] = {}  # upstream writer -> a reply came

    def down(self) -> None:
        """Cut every connection, and close new ones at once until ``up``."""
        self._down = True
        for writer in self._writers:
            writer.close()

    def up(self) -> None:
        """Carry new connections, and what ``cut_each`` cut, again."""
        self._down = False
        self._cutting_each = ()

    def lose_reply(self) -> None:
        """Close the connection that the next reply comes back on, instead of passing it on."""
        self._losing = True

    def cut_before(self, marker: bytes, *, silence_others: bool = False) -> None:
        """Close the connection that next carries ``marker`` to Redis, instead of passing it on;
        with ``silence_others``, read nothing more then from the other connections open (not even
        a TLS close notice: the host they reach stopped answering). New connections are carried."""
        self._cutting, self._silencing = marker, silence_others

    def cut_and_hold(self, marker: bytes) -> None:
        """Close the client's side of the connection that next carries ``marker``, and hold what it
        carried, to Redis's side, until ``deliver``."""
        self._cutting_and_holding = marker

    def cut_each(self, *markers: bytes) -> None:
        """Close each connection that carries one of ``markers`` to Redis, instead of passing it
        on, until ``up``: Redis is away for what they send (after it was sent)."""
        self._cutting_each = markers

    async def has_cut(self, marker: bytes) -> None:
        """Wait until a connection that carried ``marker`` has been cut."""
        while not any(marker in data for data in self._cut):
            self._cut_more.clear()
            await self._cut_more.wait()

    def slow_after(self, marker: bytes, delay: float) -> None:
        """Hold each reply ``delay`` seconds on the connections that carry ``marker`` from now."""
        self._slowing, self.delay = marker, delay

    def slow_requests(self, marker: bytes, delay: float) -> None:
        """Hold each request that carries ``marker`` ``delay`` seconds before passing it on to
        Redis (a replica far from Redis), from now on."""
        self._requests_slowed = (marker, delay)

    def hurry(self) -> None:
        """Pass on at once the replies waiting their ``delay``, and every reply from now on."""
        self.delay = 0.0
        self._hurried.set()

    async def has_carried(self, marker: bytes) -> None:
        """Wait until ``marker`` has been passed on to Redis."""
        while not any(marker in data for data in self._carried):
            self._carried_more.clear()
            await self._carried_more.wait()

    def hold(self) -> None:
        """Hold what the connections open now send, until ``deliver``."""
        self._held = {writer: bytearray() for writer in self._replied if not writer.is_closing()}

    async def deliver(self, *, close: bool = True) -> None:
        """Pass on to Redis what was held, and wait for Redis's replies to it; then close the
        connections that carried it (their client gave up), unless ``close`` is false."""
        held, self._held = self._held, {}
        for writer, data in held.items():
            if data:
                self._replied[writer].clear()
                writer.write(bytes(data))
                await writer.drain()
                await self._replied[writer].wait()
            if close:
                writer.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        scheme = "redis" if self._tls is None else "rediss"
        return f"{scheme}://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> _Proxy:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", 0, ssl=self._tls)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cut()

    def cut(self) -> None:
        """Close the listening socket and every carried connection."""
        if self._server is not None:
            self._server.close()
        for writer in self._silenced:
            writer.transport.abort()  # its TLS close would wait for the client, unread
        for writer in self._writers:
            writer.close()

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._writers += [writer, up_writer]
        self._clients.append(writer)
        self._replied[up_writer] = asyncio.Event()

        async def requests() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(65536):
                    if up_writer in self._held:
                        self._held[up_writer] += data
                        continue
                    if self._cutting_and_holding and self._cutting_and_holding in data:
                        self._cutting_and_holding = b""
                        self._held[up_writer] = bytearray(data)
                        writer.close()
                        break
                    if self._cutting and self._cutting in data:
                        self._cutting = b""
                        writer.close()
                        if self._silencing:
                            self._silencing = False
                            self._silenced = [other for other in self._clients if other is not writer]
                            for other in self._silenced:
                                other.transport.pause_reading()
                        break
                    if any(marker in data for marker in self._cutting_each):
                        self._cut.append(data)
                        self._cut_more.set()
                        writer.close()
                        break
                    if self._slowing and self._slowing in data:
                        self._slow.add(up_writer)
                    slowed, slowed_for = self._requests_slowed
                    if slowed and slowed in data:
                        await asyncio.sleep(slowed_for)
                    up_writer.write(data)
                    self._carried.append(data)
                    self._carried_more.set()
                    await up_writer.drain()
            if up_writer not in self._held:  # what is held is delivered later, on this connection
                up_writer.close()

        async def replies() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await up_reader.read(65536):
                    self._replied[up_writer].set()
                    if not self._slowing or up_writer in self._slow:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self.delay):
                                await self._hurried.wait()
                    if self._losing:
                        self._losing = False
                        break
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(requests(), replies())


@contextlib.contextmanager
def _port_that_never_answers() -> Iterator[int]:
    """A port on loopback whose connects time out: its listener never accepts, and its backlog
    is full, so (on Linux) the SYNs of further connects go unanswered, as those to a host gone."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    held = [listener]
    try:
        while True:  # fill the backlog until a connect times out
            held.append(socket.socket())
            held[-1].settimeout(0.1)
            try:
                held[-1].connect(listener.getsockname())
            except TimeoutError:
                break
        yield listener.getsockname()[1]
    finally:
        for held_socket in held:
            held_socket.close()


async def _acme_refused(
    config: dict[str, object], fake: FakeProvider, prompt: str = "hi", *, timeout: float | None = None
) -> grpc.aio.AioRpcError:
    """The error that refuses tenant acme's Complete on a server of ``config`` (providers at ``fake``)."""
    async with (
        Server(settings_from(config, live_environ(fake)), port=0) as server,
        RouterClient(server.target) as client,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in client.complete(user_chat(prompt), pb.RoutingContext(tenant="acme"), timeout=timeout):
                pass
    return caught.value


class TestStoreFailures:
    async def test_a_settle_cancelled_on_its_way_still_frees_the_slot(self, redis_url: str, prefix: str) -> None:
        """A request's settle is cancelled while it connects to Redis (a second cancellation of
        the request's task): it still runs, so the tenant's one in-flight slot is free again
        (it was held until the lease ended, and a later settle did nothing)."""
        admission = RedisAdmission(redis_url, {"t": TenantConfig(max_concurrent=1)}, prefix=prefix)
        reservation = await admission.admit("t")
        # No idle connection: the settle has to connect first, and is cancelled meanwhile.
        await admission._redis.connection_pool.disconnect()
        settling = asyncio.ensure_future(reservation.settle(0, Decimal(0)))
        await asyncio.sleep(0)
        settling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await settling
        async with asyncio.timeout(10):
            while admission._undoing:  # noqa: ASYNC110 - the settle's own task, awaited by aclose too
                await asyncio.sleep(0.01)
        again = await admission.admit("t")
        await again.settle(0, Decimal(0))
        await admission.aclose()

    async def test_an_admission_cancelled_before_its_reply_reserves_nothing(self, redis_url: str, prefix: str) -> None:
        """The reserve script has run in Redis but its reply is held back when the caller is
        cancelled: the reservation is undone by id, so the tenant's one slot and its budget are
        free again."""
        tenants = {"t": TenantConfig(max_concurrent=1, daily_budget_usd=Decimal(1))}
        direct = redis.asyncio.Redis.from_url(redis_url)
        async with _Proxy(redis_url, delay=0.3) as slow:
            admission = RedisAdmission(slow.url, tenants, prefix=prefix)
            attempt = asyncio.ensure_future(admission.admit("t", cost=Decimal("0.6")))
            while not await direct.zcard(f"{prefix}t:inflight"):  # noqa: ASYNC110 - Redis has no event to wait on
                await asyncio.sleep(0.01)
            attempt.cancel()
            with pytest.raises(asyncio.CancelledError):
                await attempt
            await admission.aclose()  # waits for the undo
        assert await direct.zcard(f"{prefix}t:inflight") == 0
        await direct.aclose()
        again = RedisAdmission(redis_url, tenants, prefix=prefix)
        await (await again.admit("t", cost=Decimal("0.6"))).settle(0, Decimal(0))
        await again.aclose()

    async def test_a_route_count_cancelled_before_its_reply_is_given_back(self, redis_url: str, prefix: str) -> None:
        """The Route-count script has run in Redis but its reply is held back when the caller is
        cancelled (the Route's deadline): the count is given back by its id, so the tenant's one
        Route call a minute is free again (it was kept for a call that never had a decision)."""
        tenants = {"t": TenantConfig(route_requests_per_minute=1)}
        direct = redis.asyncio.Redis.from_url(redis_url)
        async with _Proxy(redis_url, delay=0.3) as slow:
            admission = RedisAdmission(slow.url, tenants, prefix=prefix)
            attempt = asyncio.ensure_future(admission.count_route("t"))
            while not await direct.zcard(f"{prefix}t:route"):  # noqa: ASYNC110 - Redis has no event to wait on
                await asyncio.sleep(0.01)
            attempt.cancel()
            with pytest.raises(asyncio.CancelledError):
                await attempt
            await admission.aclose()  # waits for the give-back
        assert await direct.zcard(f"{prefix}t:route") == 0
        await direct.aclose()
        again = RedisAdmission(redis_url, tenants, prefix=prefix)
        await again.count_route("t")
        await again.aclose()

    async def test_a_store_that_fails_at_settle_leaves_the_answer_alone(
        self, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Admitted, then the connection to Redis is cut before the settle: settling raises
        nothing (the request was answered) and says so in a log line naming the tenant."""
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, {"t": TenantConfig(max_concurrent=5)}, prefix=prefix)
            reservation = await admission.admit("t", tokens=10)
            proxy.cut()
            await reservation.settle(10, Decimal("0.01"))
            await admission.aclose()
        out = capsys.readouterr().out
        assert "admission_settle_failed" in out
        assert "tenant=t" in out

    async def test_the_status_of_an_answered_call_does_not_wait_for_its_settle(
        self, redis_url: str, prefix: str, fake: FakeProvider, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Redis holds the settle's reply (a slow store) once a call is answered: the call ends
        OK without waiting for it (it waited up to the 1 s command timeout, the settle failed and
        was left to a retry first, and a deadline shorter than that ended a call answered and
        billed DEADLINE_EXCEEDED); the settle then completes on its first try, counting the cost
        once and freeing the tenant's one slot for its next call."""
        fake.set_default(Script(chunk_count=3))
        async with _Proxy(redis_url) as proxy:
            config = default_config()
            config["tenants"] = {"acme": {"max_concurrent": 1, "daily_budget_usd": 1}}
            config["shared_state"] = {"redis_url": proxy.url, "key_prefix": prefix}
            async with (
                Server(settings_from(config, live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                admission = server.router.admission
                proxy.slow_after(admission._settle_script.sha.encode(), 60.0)
                context = pb.RoutingContext(tenant="acme")
                first = [event async for event in client.complete(user_chat("hi"), context)]
                assert "admission_settle_failed" not in capsys.readouterr().out
                proxy.hurry()
                second = [event async for event in client.complete(user_chat("hi"), context)]
                spent = await admission.spent("acme")
        assert "admission_settle_failed" not in capsys.readouterr().out
        costs = [Decimal(events[-1].completion.cost_usd) for events in (first, second)]
        assert spent == sum(costs)

    async def test_a_settle_not_waited_for_is_seen_by_the_next_admission_of_its_tenant(
        self, redis_url: str, prefix: str
    ) -> None:
        """A settle on its way, not waited for (a realtime call's end), is held up on the network:
        the tenant's next admission in the process waits for it, so the tenant's one slot, freed
        by it, admits the next request (it is not refused CONCURRENCY_LIMITED meanwhile)."""
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, {"t": TenantConfig(max_concurrent=1)}, prefix=prefix)
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            reservation = await admission.admit("t")
            proxy.hold()
            await reservation.settle(0, Decimal(0), wait_at_most=0)
            again = asyncio.ensure_future(admission.admit("t"))
            done, _ = await asyncio.wait({again}, timeout=0.2)
            await proxy.deliver(close=False)
            await (await again).settle(0, Decimal(0))
            await admission.aclose()
        assert done == set()

    async def test_a_settle_redis_does_not_answer_refuses_the_next_admission_of_its_tenant_at_once(
        self, redis_url: str, prefix: str
    ) -> None:
        """Redis stops answering (its writes paused) as a request's settle is on its way: the
        tenant's next admission waits for that settle, which times out within the store's one
        second, and is refused SHARED_STATE_UNAVAILABLE at once, under a caller's 1.5 s
        bound (it waited up to 1 s for the settle, then 1 s more for its own script: the caller's
        deadline came first, DEADLINE_EXCEEDED instead of the documented UNAVAILABLE)."""
        admission = RedisAdmission(redis_url, {"t": TenantConfig(max_concurrent=2)}, prefix=prefix)
        pauser = redis.asyncio.Redis.from_url(redis_url)
        try:
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            reservation = await admission.admit("t")
            await pauser.execute_command("CLIENT", "PAUSE", "4000", "WRITE")
            await reservation.settle(0, Decimal(0), wait_at_most=0)
            with pytest.raises(SharedStateUnavailable):
                async with asyncio.timeout(1.5):  # the caller's deadline
                    await admission.admit("t")
        finally:
            await pauser.execute_command("CLIENT", "UNPAUSE")
            await pauser.aclose()
            await admission.aclose()

    async def test_a_budget_check_after_a_settle_redis_does_not_answer_names_the_stores_error(
        self, redis_url: str, prefix: str
    ) -> None:
        """Redis stops answering writes as a request's settle is on its way: the tenant's budget
        check (``exhausted``, whose reason an LLM classifier or an escalation not asked gives the
        client) says the store failed with a timeout, as it says without a settle on its way (it
        named our own error, "SharedStateUnavailable")."""
        admission = RedisAdmission(redis_url, {"t": TenantConfig(daily_budget_usd=Decimal(1))}, prefix=prefix)
        pauser = redis.asyncio.Redis.from_url(redis_url)
        try:
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            reservation = await admission.admit("t", cost=Decimal("0.1"))
            await pauser.execute_command("CLIENT", "PAUSE", "4000", "WRITE")
            await reservation.settle(0, Decimal("0.1"), wait_at_most=0)
            reason = await admission.exhausted("t")
        finally:
            await pauser.execute_command("CLIENT", "UNPAUSE")
            await pauser.aclose()
            await admission.aclose()
        assert reason == "the shared state store failed (TimeoutError)"

    async def test_a_slow_redis_answers_the_settle_and_the_next_admission_each_within_its_second(
        self, redis_url: str, prefix: str
    ) -> None:
        """Redis answers every command in 0.7 s (within the store's 1 s timeout): a request's
        settle is on its way, not waited for, when the tenant's next admission comes; that
        admission waits for the settle, then has its own second for its script, and is admitted
        (both under one second, it was refused SHARED_STATE_UNAVAILABLE: a client calling one at
        a time had every second call refused)."""
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, {"t": TenantConfig(max_concurrent=2)}, prefix=prefix)
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            reservation = await admission.admit("t")
            proxy.delay = 0.7
            await reservation.settle(0, Decimal(0), wait_at_most=0)
            again = await admission.admit("t")
            proxy.hurry()
            await again.settle(0, Decimal(0))
            await admission.aclose()

    async def test_a_slow_redis_answers_a_settle_sent_again_on_a_new_connection_and_the_next_admission(
        self, redis_url: str, prefix: str
    ) -> None:
        """Redis answers every command in 0.3 s (within the store's 1 s timeout) and has dropped its
        clients as a request's settle, not waited for, is sent: the settle is sent once more on a
        new connection (its connect, greeting and script each within its second, more than one
        second in all), and the tenant's next admission and a reservation's extension (a
        fallback's) wait for it and are granted, the settle landed (they waited at most 1 s and
        were refused SHARED_STATE_UNAVAILABLE "(TimeoutError)" though no command timed out)."""
        tenants = {"t": TenantConfig(max_concurrent=2, daily_budget_usd=Decimal(1))}
        direct = redis.asyncio.Redis.from_url(redis_url)
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, tenants, prefix=prefix)
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            held = await admission.admit("t", cost=Decimal("0.1"))
            reservation = await admission.admit("t")
            proxy.delay = 0.3  # the settle takes ~1.3 s: over the 1 s it was given, under its 2 s limit
            proxy.cut_before(admission._settle_script.sha.encode())
            started = time.monotonic()
            await reservation.settle(0, Decimal(0), wait_at_most=0)
            await held.extend(Decimal("0.1"))
            again = await admission.admit("t")
            waited = time.monotonic() - started
            in_flight = await direct.zcard(f"{prefix}t:inflight")
            proxy.hurry()
            for settling in (held, again):
                await settling.settle(0, Decimal(0))
            await admission.aclose()
        await direct.aclose()
        assert (in_flight, waited > 1) == (2, True)

    async def test_a_settle_redis_closed_and_then_does_not_answer_refuses_the_next_admission_within_its_timeouts(
        self, redis_url: str, prefix: str
    ) -> None:
        """Redis has dropped its clients as a request's settle is sent, and answers nothing more
        (its replies held): the settle's new connection is not greeted within its second, and the
        tenant's next admission, which waits for the settle, is refused SHARED_STATE_UNAVAILABLE
        with the store's error within the caller's 1.5 s, nothing sent."""
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, {"t": TenantConfig(max_concurrent=2)}, prefix=prefix)
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            reservation = await admission.admit("t")
            proxy.delay = 60.0
            proxy.cut_before(admission._settle_script.sha.encode())
            await reservation.settle(0, Decimal(0), wait_at_most=0)
            with pytest.raises(SharedStateUnavailable) as refused:
                async with asyncio.timeout(1.5):  # the caller's deadline
                    await admission.admit("t")
            proxy.hurry()
            await admission.aclose()
        assert refused.value.store_error == "TimeoutError"

    async def test_a_settle_retried_on_a_slow_redis_holds_the_next_admission_two_seconds_at_most(
        self, redis_url: str, prefix: str
    ) -> None:
        """Redis answers each command in 0.9 s (within its second) and closes the connection the
        settle's reply should come back on: the settle, not waited for, is sent once more on a new
        connection, whose greeting and script take their 0.9 s each. The tenant's next admission
        waits for it 2 s at most from its send (the settle's limit, pool waits included), then is
        refused SHARED_STATE_UNAVAILABLE "(TimeoutError)" within a caller's 2.3 s, the settle left
        to the retry loop (bounded only by each step's second, it waited for the settle to land,
        2.7 s and more, and the caller got DEADLINE_EXCEEDED, not UNAVAILABLE)."""
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, {"t": TenantConfig(max_concurrent=2)}, prefix=prefix)
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            reservation = await admission.admit("t")
            proxy.delay = 0.9
            proxy.lose_reply()
            started = time.monotonic()
            await reservation.settle(0, Decimal(0), wait_at_most=0)
            with pytest.raises(SharedStateUnavailable) as refused:
                async with asyncio.timeout(2.3):  # the caller's deadline
                    await admission.admit("t")
            waited = time.monotonic() - started
            waiting = [resend.operation for resend in admission._resends]
            proxy.hurry()
            await admission.aclose()
        assert (refused.value.store_error, waiting, 1.9 < waited < 2.3) == ("TimeoutError", ["settle"], True)

    async def test_a_settle_not_waited_for_that_fails_by_a_fault_of_ours_is_logged(
        self, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A realtime call's settle runs on after the call ended; a failure that is no store's (a
        fault of ours, injected here in the script call) is an ``admission_settle_crashed`` error
        naming the tenant and the error type, not left to asyncio's "exception was never
        retrieved" at collection, and the tenant's next admission is still answered."""
        admission = RedisAdmission(redis_url, {"t": TenantConfig(max_concurrent=2)}, prefix=prefix)
        try:
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            reservation = await admission.admit("t")

            async def crash(**_: object) -> object:
                raise ZeroDivisionError

            with monkeypatch.context() as patch:
                patch.setattr(admission, "_settle_script", crash)
                with capture_logs() as logs:
                    await reservation.settle(0, Decimal(0), wait_at_most=0)
                    await admission.admit("t")
        finally:
            await admission.aclose()
        crashed = [
            (e["log_level"], e["tenant"], e["error_type"]) for e in logs if e["event"] == "admission_settle_crashed"
        ]
        assert crashed == [("error", "t", "ZeroDivisionError")]

    async def test_an_admission_on_a_connection_redis_closed_is_tried_once_more(
        self, redis_url: str, prefix: str
    ) -> None:
        """The pooled connections an admission and a precheck draw turn out closed under their
        scripts (as those left from before Redis restarted): each is tried once more on a new
        connection and answered (both were refused SHARED_STATE_UNAVAILABLE though Redis was
        there); the admission is retried under its own id, so the tenant's one slot is held once."""
        tenants = {"t": TenantConfig(max_concurrent=1, daily_budget_usd=Decimal(1))}
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, tenants, prefix=prefix)
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            admit_script = admission._admit.sha.encode()
            proxy.cut_before(admit_script)
            await admission.precheck("t", cost=Decimal("0.5"))
            proxy.cut_before(admit_script)
            reservation = await admission.admit("t", cost=Decimal("0.5"))
            async with asyncio.timeout(10):
                while admission._undoing:  # the first try's undo
                    await asyncio.wait(set(admission._undoing))
            with pytest.raises(LimitExceeded) as refused:
                await admission.admit("t")
            await reservation.settle(0, Decimal("0.1"))
            await (await admission.admit("t", cost=Decimal("0.9"))).settle(0, Decimal(0))
            await admission.aclose()
        assert refused.value.reason == "CONCURRENCY_LIMITED"

    @pytest.mark.parametrize("operation", ["admit", "precheck"])
    async def test_over_tls_a_retry_on_a_new_connection_does_not_wait_for_the_idle_ones_to_close(
        self, redis_url: str, prefix: str, tmp_path: Path, operation: str
    ) -> None:
        """rediss://: the pooled connection an admission or a precheck draws is closed under its
        script, and the host the pool's idle connections reach stops answering (a failover): the
        idle ones are dropped without waiting for their TLS close notices, and the retry on a new
        connection is answered (dropping them waited 1 s for the notice, and redis-py's
        "Timed out closing connection" escaped raw: INTERNAL, logged as our bug)."""
        pki = make_pki(tmp_path)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(pki / "server.pem", pki / "server.key")
        async with _Proxy(redis_url, tls=tls) as proxy:
            url = f"{proxy.url}/0?ssl_ca_certs={pki / 'ca.pem'}"
            admission = RedisAdmission(url, {"t": TenantConfig(max_concurrent=5)}, prefix=prefix)
            held = await asyncio.gather(*(admission.admit("t") for _ in range(3)))  # 3 connections
            for reservation in held:
                await reservation.settle(0, Decimal(0))
            proxy.cut_before(admission._admit.sha.encode(), silence_others=True)
            started = time.monotonic()
            if operation == "admit":
                await (await admission.admit("t")).settle(0, Decimal(0))
            else:
                await admission.precheck("t")
            took = time.monotonic() - started
            proxy.cut()
            await admission.aclose()
        assert took < 0.5

    async def test_route_calls_and_budget_look_ups_on_a_connection_redis_closed_are_tried_once_more(
        self, redis_url: str, prefix: str
    ) -> None:
        """The pooled connections a Route call's count, a budget check (``exhausted``) and a spend
        look-up draw turn out closed under their commands (as those left from before Redis
        restarted): each is tried once more on a new connection and answered (the Route call was
        refused SHARED_STATE_UNAVAILABLE though Redis was there, the budget check said the store
        failed); a Route call whose first try counted it (only the reply lost) is counted once, its
        retry under the same id (the third of three in the minute: refused by itself)."""
        tenants = {"t": TenantConfig(route_requests_per_minute=3, daily_budget_usd=Decimal(1))}
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, tenants, prefix=prefix)
            await admission.count_route("t")  # connected, scripts loaded
            proxy.cut_before(admission._count_route_script.sha.encode())
            await admission.count_route("t")
            proxy.lose_reply()  # counted in Redis, the reply lost with the connection
            await admission.count_route("t")
            proxy.cut_before(b"MGET")
            exhausted = await admission.exhausted("t")
            proxy.cut_before(b"$3\r\nGET\r\n")
            spent = await admission.spent("t")
            with pytest.raises(LimitExceeded) as refused:
                await admission.count_route("t")
            await admission.aclose()
        assert (exhausted, spent, refused.value.reason) == ("", Decimal(0), "RATE_LIMITED")

    async def test_an_admission_whose_reply_redis_lost_with_its_connection_is_admitted_once(
        self, redis_url: str, prefix: str
    ) -> None:
        """The admission script runs in Redis and its reply is lost with the connection (a proxy's
        reset, a failover killing clients): the retry, under the same id, finds it reserved and is
        admitted, holding the tenant's one slot once (under a new id it was refused
        CONCURRENCY_LIMITED by its own first try); nothing undoes it, so its settle frees it."""
        tenants = {"t": TenantConfig(max_concurrent=1, requests_per_minute=3)}
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, tenants, prefix=prefix)
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            proxy.lose_reply()
            reservation = await admission.admit("t")
            async with asyncio.timeout(10):
                while admission._undoing:
                    await asyncio.wait(set(admission._undoing))
            checking = redis.asyncio.Redis.from_url(redis_url)
            in_flight = await checking.zcard(f"{prefix}t:inflight")
            requests = await checking.zcard(f"{prefix}t:req")
            await checking.aclose()
            with pytest.raises(LimitExceeded) as refused:
                await admission.admit("t")
            await reservation.settle(0, Decimal(0))
            await (await admission.admit("t")).settle(0, Decimal(0))
            await admission.aclose()
        assert (in_flight, requests, refused.value.reason) == (1, 2, "CONCURRENCY_LIMITED")

    async def test_a_retried_admissions_first_try_reaching_redis_after_its_settle_reserves_nothing(
        self, redis_url: str, prefix: str
    ) -> None:
        """An admission's connection is reset while its first try is still on its way (a proxy
        that read it delivers it late): the admission is retried on a new connection, admitted,
        and settled; then the first try reaches Redis and reserves nothing, as the settle of a
        retried admission leaves its marker, so the tenant's one slot is free (it was held for the
        hour's lease, and the request counted twice in the minute)."""
        tenants = {"t": TenantConfig(max_concurrent=1, requests_per_minute=5)}
        checking = redis.asyncio.Redis.from_url(redis_url)
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, tenants, prefix=prefix)
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            proxy.cut_and_hold(admission._admit.sha.encode())
            await (await admission.admit("t")).settle(0, Decimal(0))
            await proxy.deliver()
            in_flight = await checking.zcard(f"{prefix}t:inflight")
            requests = await checking.zcard(f"{prefix}t:req")
            await (await admission.admit("t")).settle(0, Decimal(0))
            await admission.aclose()
        await checking.aclose()
        assert (in_flight, requests) == (0, 2)

    async def test_an_admission_refused_on_its_retry_is_undone_once(self, redis_url: str, prefix: str) -> None:
        """The first try's connection is cut before the script reaches Redis; the retry, under the
        same id, is refused (the tenant's one slot is held): one undo of that id waits (in case
        the first try still arrives), and the slot, once its holder settles, admits again."""
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, {"t": TenantConfig(max_concurrent=1)}, prefix=prefix)
            holder = await admission.admit("t")  # connected, scripts loaded
            proxy.cut_before(admission._admit.sha.encode())
            with pytest.raises(LimitExceeded) as refused:
                await admission.admit("t")
            waiting = [(resend.operation, resend.args[0]) for resend in admission._resends]
            await holder.settle(0, Decimal(0))
            await (await admission.admit("t")).settle(0, Decimal(0))
            await admission.aclose()
        assert refused.value.reason == "CONCURRENCY_LIMITED"
        assert [operation for operation, _ in waiting] == ["undo"]

    async def test_a_settle_whose_reply_is_lost_counts_its_cost_once(self, redis_url: str, prefix: str) -> None:
        """The settle script runs in Redis and its reply is lost with the connection: the settle
        is tried again, and the retry, finding the reservation settled, counts nothing, so the
        day's spend is the cost once."""
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, {"t": TenantConfig(daily_budget_usd=Decimal(1))}, prefix=prefix)
            await (await admission.admit("t", cost=Decimal("0.1"))).settle(5, Decimal("0.1"))  # scripts loaded
            reservation = await admission.admit("t", cost=Decimal("0.3"))
            proxy.lose_reply()
            await reservation.settle(10, Decimal("0.25"))
            await admission.aclose()
        checking = RedisAdmission(redis_url, {"t": TenantConfig(daily_budget_usd=Decimal(1))}, prefix=prefix)
        assert await checking.spent("t") == Decimal("0.35")
        await checking.aclose()

    async def test_a_settle_on_a_connection_redis_closed_is_sent_once_more_before_the_next_admission(
        self, redis_url: str, prefix: str
    ) -> None:
        """The pooled connection a request's settle draws turns out closed (Redis dropped its
        clients: a failover, a proxy's reset), once before the script reaches Redis, once after it
        ran (its reply lost): each time the settle is sent once more at once on a new connection,
        so the same client's next request, admitted right after, finds the tenant's one slot free
        (it was refused CONCURRENCY_LIMITED by its own finished request until the retry loop's
        resend), and the cost is counted once."""
        tenants = {"t": TenantConfig(max_concurrent=1, daily_budget_usd=Decimal(1))}
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, tenants, prefix=prefix)
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            proxy.cut_before(admission._settle_script.sha.encode())
            await (await admission.admit("t", cost=Decimal("0.2"))).settle(0, Decimal("0.1"))
            reservation = await admission.admit("t", cost=Decimal("0.2"))
            proxy.lose_reply()
            await reservation.settle(0, Decimal("0.1"))
            await (await admission.admit("t")).settle(0, Decimal(0))
            waiting = list(admission._resends)
            spent = await admission.spent("t")
            await admission.aclose()
        assert (waiting, spent) == ([], Decimal("0.2"))

    async def test_a_settle_that_fails_is_retried_once_redis_is_back(self, redis_url: str, prefix: str) -> None:
        """Redis is unreachable while a request of a tenant with one in-flight slot settles: once
        Redis is back the settle is tried again, so the slot is free (it was held for the hour's
        lease) and the request's cost is spent once."""
        tenants = {"t": TenantConfig(max_concurrent=1, daily_budget_usd=Decimal(1))}
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, tenants, prefix=prefix)
            reservation = await admission.admit("t", cost=Decimal("0.2"))
            proxy.down()
            await reservation.settle(0, Decimal("0.1"))
            proxy.up()
            async with asyncio.timeout(10):
                while admission._undoing:  # the retry in the background
                    await asyncio.wait(set(admission._undoing))
            await (await admission.admit("t")).settle(0, Decimal(0))
            assert await admission.spent("t") == Decimal("0.1")
            await admission.aclose()

    async def test_a_settle_held_up_past_its_retry_counts_its_cost_once(self, redis_url: str, prefix: str) -> None:
        """A settle's first try is held up on the network (not lost) past its 1 s timeout; its retry
        settles the reservation on a new connection; then the first try reaches Redis: it counts
        nothing, so the day's spend is the cost once (it was counted twice)."""
        tenants = {"t": TenantConfig(daily_budget_usd=Decimal(1))}
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, tenants, prefix=prefix)
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            reservation = await admission.admit("t", cost=Decimal("0.2"))
            proxy.hold()
            await reservation.settle(0, Decimal("0.1"))
            async with asyncio.timeout(10):
                while admission._undoing:  # the retry, on a new connection
                    await asyncio.wait(set(admission._undoing))
            await proxy.deliver()
            spent = await admission.spent("t")
            await admission.aclose()
        assert spent == Decimal("0.1")

    async def test_an_admission_held_up_past_its_undo_reserves_nothing(self, redis_url: str, prefix: str) -> None:
        """An admission is held up on the network past its 1 s timeout: it is refused
        SHARED_STATE_UNAVAILABLE and undone; then it reaches Redis, after its undo, and reserves
        nothing, so the tenant's one in-flight slot and its budget are free (they were held for
        the hour's lease)."""
        tenants = {"t": TenantConfig(max_concurrent=1, daily_budget_usd=Decimal(1))}
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, tenants, prefix=prefix)
            await (await admission.admit("t")).settle(0, Decimal(0))  # connected, scripts loaded
            proxy.hold()
            with pytest.raises(SharedStateUnavailable):
                await admission.admit("t", cost=Decimal("0.5"))
            async with asyncio.timeout(10):
                while admission._undoing:  # the undo, on a new connection
                    await asyncio.wait(set(admission._undoing))
            await proxy.deliver()
            await (await admission.admit("t", cost=Decimal("0.9"))).settle(0, Decimal(0))
            await admission.aclose()

    async def test_a_refused_connection_leaves_nothing_to_undo(self) -> None:
        """Redis refuses connections: each admission is refused SHARED_STATE_UNAVAILABLE having
        sent nothing, so none leaves work behind (each left an undo retrying for the hour's
        lease)."""
        admission = RedisAdmission(f"redis://127.0.0.1:{free_port()}", {"t": TenantConfig(max_concurrent=5)})
        for _ in range(20):
            with pytest.raises(SharedStateUnavailable):
                await admission.admit("t", tokens=10, cost=Decimal("0.01"))
        left = len(admission._undoing)
        await admission.aclose()
        assert left == 0

    @pytest.mark.parametrize("failure", ["a host that does not answer", "a user Redis does not know"])
    async def test_a_connection_never_made_leaves_nothing_to_undo(
        self, redis_url: str, failure: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Admissions fail while their connection is made (its connect timed out, or Redis
        refused its greeting): each is refused SHARED_STATE_UNAVAILABLE having sent nothing, so
        none leaves an undo behind (each did, which wrote a marker for nothing and took a place
        a settle needs)."""
        monkeypatch.setattr(redis_admission, "_TIMEOUT_SECONDS", 0.2)
        with contextlib.ExitStack() as stack:
            if failure == "a host that does not answer":
                url = f"redis://127.0.0.1:{stack.enter_context(_port_that_never_answers())}"
            else:
                url = redis_url.replace("redis://", "redis://nobody:secret@")
            admission = RedisAdmission(url, {"t": TenantConfig(max_concurrent=5)})
            for _ in range(3):
                with pytest.raises(SharedStateUnavailable):
                    await admission.admit("t", tokens=10, cost=Decimal("0.01"))
            left = (len(admission._resends), len(admission._undoing))
            await admission.aclose()
        assert left == (0, 0)

    async def test_a_settle_is_never_dropped_for_an_undo(
        self, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Redis goes away under the scripts sent to it while undos fill the retry list (here 3
        at most): a request's settle that fails then takes the oldest undo's place, so once Redis
        is back the tenant's one in-flight slot is free and the request's cost is spent (the
        settle was dropped: the slot was held for the hour's lease, the cost never counted)."""
        monkeypatch.setattr(redis_admission, "_RETRY_MAX_PENDING", 3)
        tenants = {"t": TenantConfig(max_concurrent=1, daily_budget_usd=Decimal(1))}
        tenants["u"] = TenantConfig(max_concurrent=9)
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, tenants, prefix=prefix)
            reservation = await admission.admit("t", cost=Decimal("0.2"))
            proxy.cut_each(b"EVALSHA")
            for _ in range(3):
                with pytest.raises(SharedStateUnavailable):
                    await admission.admit("u")
            await reservation.settle(0, Decimal("0.1"))
            waiting = [resend.operation for resend in admission._resends]
            proxy.up()
            async with asyncio.timeout(10):
                while admission._undoing:  # the retry loop, ended once it sent them
                    await asyncio.wait(set(admission._undoing))
            await (await admission.admit("t")).settle(0, Decimal(0))
            spent = await admission.spent("t")
            await admission.aclose()
        assert (waiting, reservation.counted, spent) == (["undo", "undo", "settle"], True, Decimal("0.1"))

    async def test_a_settle_that_takes_the_place_of_an_undo_on_its_way_is_still_sent(
        self, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The retry loop's batch of undos is on its way to a slow Redis when a request's settle
        fails and takes the oldest undo's place in the full list (here 3 at most): once the batch
        is answered the settle is still waiting, and is sent (the loop removed the first entries
        by position, the settle among them: the tenant's slot was held for the lease and the
        request's cost never counted)."""
        monkeypatch.setattr(redis_admission, "_RETRY_MAX_PENDING", 3)
        tenants = {"t": TenantConfig(max_concurrent=1, daily_budget_usd=Decimal(1))}
        tenants["u"] = TenantConfig(max_concurrent=9)
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, tenants, prefix=prefix)
            reservation = await admission.admit("t", cost=Decimal("0.2"))
            proxy.cut_each(b"EVALSHA")
            for _ in range(3):
                with pytest.raises(SharedStateUnavailable):
                    await admission.admit("u")
            # The loop's batch is answered late (within the store's 1 s timeout).
            proxy.slow_after(admission._undo_script.sha.encode(), 0.5)
            proxy.up()
            await proxy.has_carried(admission._undo_script.sha.encode())
            proxy.cut_each(admission._settle_script.sha.encode())  # its try at once on a new connection too
            await reservation.settle(0, Decimal("0.1"))
            waiting = [resend.operation for resend in admission._resends]
            proxy.up()
            proxy.delay = 0.0
            async with asyncio.timeout(10):
                while admission._undoing:  # the retry loop, ended once it sent them
                    await asyncio.wait(set(admission._undoing))
            await (await admission.admit("t")).settle(0, Decimal(0))
            spent = await admission.spent("t")
            await admission.aclose()
        assert (waiting, spent) == (["undo", "undo", "settle"], Decimal("0.1"))

    async def test_more_commands_at_once_than_the_pool_holds_wait_for_a_connection(
        self, redis_url: str, prefix: str
    ) -> None:
        """300 admissions at once on one process, against a healthy Redis: all are admitted, the
        commands past the pool's connections waiting for one (redis-py 8's plain pool holds 100
        and refused the rest at once: 200 were SHARED_STATE_UNAVAILABLE)."""
        tenant = TenantConfig(max_concurrent=10_000, daily_budget_usd=Decimal(1000))
        admission = RedisAdmission(redis_url, {"t": tenant}, prefix=prefix)

        async def one() -> str:
            try:
                reservation = await admission.admit("t", tokens=10, cost=Decimal("0.001"))
            except SharedStateUnavailable as exc:
                return str(exc)
            await reservation.settle(10, Decimal("0.001"))
            return "admitted"

        outcomes = await asyncio.gather(*(one() for _ in range(300)))  # three times the pool
        spent = await admission.spent("t")
        await admission.aclose()
        assert (set(outcomes), spent) == ({"admitted"}, Decimal("0.3"))

    async def test_undos_while_redis_is_away_wait_in_one_bounded_loop(
        self, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Redis goes away under the scripts sent to it (each connection is cut as it carries
        one): the admissions refused SHARED_STATE_UNAVAILABLE may have reached it, and are undone
        by one retry loop that keeps at most ``_RETRY_MAX_PENDING`` of them (here 10 of 30; each
        had its own task, for the hour's lease, with no cap); once Redis is back they are sent
        and nothing is left."""
        monkeypatch.setattr(redis_admission, "_RETRY_MAX_PENDING", 10)
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, {"t": TenantConfig(max_concurrent=5)}, prefix=prefix)
            proxy.cut_each(b"EVALSHA")
            for _ in range(30):
                with pytest.raises(SharedStateUnavailable):
                    await admission.admit("t", tokens=10, cost=Decimal("0.01"))
            tasks, waiting = len(admission._undoing), len(admission._resends)
            proxy.up()
            async with asyncio.timeout(10):
                while admission._undoing:  # the retry loop, ended once it sent them
                    await asyncio.wait(set(admission._undoing))
            await (await admission.admit("t")).settle(0, Decimal(0))
            await admission.aclose()
        assert (tasks, waiting) == (1, 10)

    async def test_a_batch_job_whose_settle_is_retried_is_corrected_at_its_end(
        self, tmp_path: Path, redis_url: str, prefix: str, fake: FakeProvider
    ) -> None:
        """A batch job's settle (which counts its estimate) loses its connection on its way to
        Redis and is retried: the job is recorded as counted, so when it is cancelled its estimate
        is given back (it stayed counted for good)."""
        fake.batch_outcome = BatchOutcome.PENDING
        async with _Proxy(redis_url) as proxy:
            config = budget_config(tmp_path)
            config["shared_state"] = {"redis_url": proxy.url, "key_prefix": prefix}
            async with (
                Server(settings_from(config, live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                admission = server.router.admission
                proxy.cut_before(admission._settle_script.sha.encode())
                job = (await submit(client))[1].batch
                async with asyncio.timeout(10):
                    while admission._undoing:  # the settle's retry
                        await asyncio.wait(set(admission._undoing))
                assert await admission.spent("acme") == Decimal(job.estimated_cost_usd)
                await client.cancel_batch(job.batch_id, tenant="acme")
                async with asyncio.timeout(5):  # corrected by the poller's next round
                    while await admission.spent("acme"):  # noqa: ASYNC110 - the round has no event
                        await asyncio.sleep(0.02)

    async def test_a_batch_job_corrected_while_redis_is_away_is_corrected_once_it_is_back(
        self, tmp_path: Path, redis_url: str, prefix: str, fake: FakeProvider
    ) -> None:
        """A batch job's settle (which counts its estimate) fails, and Redis is still away when
        the job is cancelled and its estimate given back: the correction waits with the settle,
        after it, and once Redis is back both are sent, so the tenant has spent nothing (the
        correction was tried once and lost, and the retried settle counted the estimate for good)."""
        fake.batch_outcome = BatchOutcome.PENDING
        async with _Proxy(redis_url) as proxy:
            config = budget_config(tmp_path)
            config["shared_state"] = {"redis_url": proxy.url, "key_prefix": prefix}
            async with (
                Server(settings_from(config, live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                admission = server.router.admission
                settle, charge = admission._settle_script.sha.encode(), admission._charge_script.sha.encode()
                proxy.cut_each(settle, charge)
                job = (await submit(client))[1].batch
                await client.cancel_batch(job.batch_id, tenant="acme")
                async with asyncio.timeout(10):  # the correction, tried by the poller's next round
                    await proxy.has_cut(charge)
                proxy.up()
                async with asyncio.timeout(10):
                    while admission._undoing:  # the retry loop, ended once it sent them
                        await asyncio.wait(set(admission._undoing))
                spent = await admission.spent("acme")
        assert Decimal(job.estimated_cost_usd) > 0
        assert spent == 0

    async def test_a_request_refused_unavailable_uses_no_request_per_minute(self, redis_url: str, prefix: str) -> None:
        """The admit script runs but its reply comes after the command timeout: the caller is
        refused SHARED_STATE_UNAVAILABLE and the undo gives back all it took, its place in the
        requests and tokens per minute too, so the tenant's one request a minute is still free."""
        tenants = {"t": TenantConfig(requests_per_minute=1, tokens_per_minute=100, max_concurrent=1)}
        tenants["warm"] = TenantConfig(max_concurrent=9)
        async with _Proxy(redis_url) as slow:
            admission = RedisAdmission(slow.url, tenants, prefix=prefix)
            await (await admission.admit("warm")).settle(0, Decimal(0))  # connected, scripts loaded
            slow.delay = 1.5
            with pytest.raises(SharedStateUnavailable):
                await admission.admit("t", tokens=100)
            slow.delay = 0.0
            await admission.aclose()  # waits for the undo
        again = RedisAdmission(redis_url, tenants, prefix=prefix)
        await (await again.admit("t", tokens=100)).settle(100, Decimal(0))
        await again.aclose()

    async def test_a_store_that_fails_during_an_extension_is_unavailable(self, redis_url: str, prefix: str) -> None:
        """Admitted, then the connection to Redis is cut: the extension raises
        ``SharedStateUnavailable`` (the caller refuses the call it was for)."""
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, {"t": TenantConfig(daily_budget_usd=Decimal(1))}, prefix=prefix)
            reservation = await admission.admit("t", cost=Decimal("0.1"))
            proxy.cut()
            with pytest.raises(SharedStateUnavailable):
                await reservation.extend(Decimal("0.1"))
            await admission.aclose()

    async def test_an_extension_on_a_connection_redis_closed_is_tried_once_more_and_held_once(
        self, redis_url: str, prefix: str
    ) -> None:
        """The pooled connection an extension (a fallback to a dearer model) draws turns out closed
        (Redis dropped its clients), once before the script reaches Redis, once after it ran (its
        reply lost): each time the extension is tried once more on a new connection and granted
        (it was refused SHARED_STATE_UNAVAILABLE, and the fallback skipped, though Redis was
        there), and each is held once (the script finds the extension's own marker), released
        whole by the settle."""
        tenants = {"t": TenantConfig(daily_budget_usd=Decimal(1))}
        direct = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        reserved = f"{prefix}t:reserved:day:2030-01-15"
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, tenants, prefix=prefix, wall_clock=_mid_january())
            reservation = await admission.admit("t", cost=Decimal("0.2"))
            await reservation.extend(Decimal("0.1"))  # scripts loaded
            proxy.cut_before(admission._extend_script.sha.encode())
            await reservation.extend(Decimal("0.2"))
            proxy.lose_reply()
            await reservation.extend(Decimal("0.3"))
            held = Decimal(await direct.get(reserved))
            await reservation.settle(0, Decimal("0.5"))
            released = Decimal(await direct.get(reserved))
            await admission.aclose()
        await direct.aclose()
        assert (held, released) == (Decimal("0.8"), Decimal(0))

    async def test_an_extension_leaves_no_key_in_redis_once_its_request_is_settled(
        self, redis_url: str, prefix: str
    ) -> None:
        """Requests extend their reservations (fallbacks, escalations), one of them tried once more
        on a new connection, and are settled: what recorded their extensions is gone with them,
        so Redis holds no key per extension (each left one for the hour's lease, ~100 bytes to
        ~570 bytes of Redis per fallback), and the retried one was still held once."""
        tenants = {"t": TenantConfig(daily_budget_usd=Decimal(1))}
        direct = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        reserved = f"{prefix}t:reserved:day:2030-01-15"
        async with _Proxy(redis_url) as proxy:
            admission = RedisAdmission(proxy.url, tenants, prefix=prefix, wall_clock=_mid_january())
            reservations = [await admission.admit("t", cost=Decimal("0.1")) for _ in range(3)]
            for reservation in reservations:
                await reservation.extend(Decimal("0.1"))
            proxy.lose_reply()
            await reservations[0].extend(Decimal("0.1"))  # ran, its reply lost: tried once more
            held = Decimal(await direct.get(reserved))
            for reservation in reservations:
                await reservation.settle(0, Decimal(0))
            await admission.aclose()
        left = [key async for key in direct.scan_iter(f"{prefix}t:*")]
        await direct.aclose()
        assert held == Decimal("0.7")
        assert [key for key in left if "exten" in key] == []

    async def test_an_unreachable_store_is_unavailable_not_internal(self, fake: FakeProvider) -> None:
        """shared_state.redis_url points at a closed port: a limited tenant's call is refused
        UNAVAILABLE with reason SHARED_STATE_UNAVAILABLE, and nothing reaches the provider."""
        closed = free_port()
        config = default_config()
        config["tenants"] = {"acme": {"requests_per_minute": 10}}
        config["shared_state"] = {"redis_url": f"redis://127.0.0.1:{closed}"}
        refused = await _acme_refused(config, fake)
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(refused).reason == "SHARED_STATE_UNAVAILABLE"
        assert fake.requests == []

    async def test_a_store_that_never_answers_is_unavailable_within_a_second(self, fake: FakeProvider) -> None:
        """shared_state.redis_url points at a server that takes connections and never answers: a
        limited tenant's call with a 4 s deadline is refused UNAVAILABLE SHARED_STATE_UNAVAILABLE
        (it waited for redis-py's default and ended DEADLINE_EXCEEDED; older releases wait for
        ever), and nothing reaches the provider."""
        config = default_config()
        config["tenants"] = {"acme": {"requests_per_minute": 10}}
        async with _never_answering() as url:
            config["shared_state"] = {"redis_url": url}
            refused = await _acme_refused(config, fake, timeout=4.0)
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(refused).reason == "SHARED_STATE_UNAVAILABLE"
        assert fake.requests == []

    async def test_a_store_that_never_answers_refuses_a_complete_paying_to_decide_within_a_second(
        self, fake: FakeProvider
    ) -> None:
        """An LLM classifier decides the route (paid only while the tenant's budget can take it)
        and shared_state.redis_url points at a server that never answers: a Complete of a tenant
        with a budget, under a 1.5 s deadline, is refused UNAVAILABLE SHARED_STATE_UNAVAILABLE by
        its precheck within the store's one second (the budget check, asked first, took that
        second, and the precheck another: DEADLINE_EXCEEDED), and no classifier is paid."""
        config = default_config()
        config["routing"]["stages"][0] = {"kind": "classifier", "method": "llm", "model": "gpt-4o-mini"}
        config["tenants"] = {"acme": {"daily_budget_usd": 1}}
        async with _never_answering() as url:
            config["shared_state"] = {"redis_url": url}
            refused = await _acme_refused(config, fake, "what is 2+2", timeout=1.5)
        assert (refused.code(), error_info(refused).reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "SHARED_STATE_UNAVAILABLE",
        )
        assert fake.requests == []


class TestTenantsWithoutLimits:
    """A tenant whose entry sets no limit (it names its keys, allow-list or tier: with auth on every
    tenant has an entry) costs no round trip to Redis, so a store that is down never refuses it."""

    async def test_a_tenant_without_limits_leaves_nothing_in_redis(self, redis_url: str, prefix: str) -> None:
        """Every call of the admission for an entry without limits (a Route counted, a precheck, an
        admission extended and settled, a charge, the budget question) writes no key."""
        entry = TenantConfig(allowed_models=("gpt-4o-mini",), user_tier="premium")
        admission = RedisAdmission(redis_url, {"t": entry}, prefix=prefix)
        (await admission.count_route("t"))()
        await admission.precheck("t", tokens=100, cost=Decimal("0.1"))
        reservation = await admission.admit("t", tokens=100, cost=Decimal("0.1"))
        await reservation.extend(Decimal("0.2"))
        await reservation.settle(120, Decimal("0.3"))
        admission.charge("t", Decimal("0.4"))
        assert await admission.exhausted("t") == ""
        await admission.aclose()
        store = redis.asyncio.Redis.from_url(redis_url)
        assert await store.keys(f"{prefix}*") == []
        assert not reservation.counted
        await store.aclose()

    async def test_a_tenant_without_limits_is_served_while_the_store_is_down(self, fake: FakeProvider) -> None:
        """Auth on, shared_state.redis_url at a closed port: acme, whose entry has only its key, is
        routed and served; limited, with requests_per_minute, is refused UNAVAILABLE
        SHARED_STATE_UNAVAILABLE before anything reaches the provider."""
        config = default_config()
        config["auth"] = {"enabled": True}
        config["tenants"] = {
            "acme": {"api_key_sha256": [key_digest("acme-key-0001")]},
            "limited": {"api_key_sha256": [key_digest("limited-key-0002")], "requests_per_minute": 10},
        }
        config["shared_state"] = {"redis_url": f"redis://127.0.0.1:{free_port()}"}
        async with Server(settings_from(config, live_environ(fake)), port=0) as server:
            async with RouterClient(server.target, api_key="acme-key-0001") as acme:
                decision = await acme.route(user_chat("hi"))
                answers = [chunk async for chunk in acme.complete(user_chat("hi"))]
            async with RouterClient(server.target, api_key="limited-key-0002") as limited:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in limited.complete(user_chat("hi")):
                        pass
        assert answers[-1].completion.model == decision.model
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value).reason == "SHARED_STATE_UNAVAILABLE"
        assert len(fake.requests) == 1


class TestLeases:
    """A reservation whose settle never reaches Redis is released when its lease runs out."""

    async def test_a_replica_that_dies_holds_its_usd_only_until_its_leases_end(
        self, redis_url: str, prefix: str
    ) -> None:
        """A replica reserves 0.3 and extends it by 0.5 of a $1 daily budget, then dies without
        settling: the USD counts until the 30 s lease ends, then all 0.8 is free again (and no
        more than that)."""
        clock = _mid_january()
        tenants = {"t": TenantConfig(daily_budget_usd=Decimal(1))}
        dying, survivor = [
            RedisAdmission(redis_url, tenants, prefix=prefix, lease_seconds=30, clock=clock, wall_clock=clock)
            for _ in range(2)
        ]
        held = await dying.admit("t", cost=Decimal("0.3"))
        await held.extend(Decimal("0.5"))
        await dying.aclose()
        with pytest.raises(LimitExceeded):
            await survivor.precheck("t", cost=Decimal("0.8"))
        clock.now += 31
        await survivor.admit("t", cost=Decimal("0.3"))
        await survivor.admit("t", cost=Decimal("0.7"))
        with pytest.raises(LimitExceeded):
            await survivor.precheck("t", cost=Decimal("0.01"))
        await survivor.aclose()

    async def test_a_settle_that_fails_holds_the_usd_only_until_the_lease_ends(
        self, redis_url: str, prefix: str
    ) -> None:
        """The settle of a 0.6 reservation fails (connection cut): its USD counts until its
        lease ends, then the whole $1 budget may be reserved again."""
        clock = _mid_january()
        tenants = {"t": TenantConfig(daily_budget_usd=Decimal(1))}
        survivor = RedisAdmission(redis_url, tenants, prefix=prefix, lease_seconds=30, clock=clock, wall_clock=clock)
        async with _Proxy(redis_url) as proxy:
            failing = RedisAdmission(proxy.url, tenants, prefix=prefix, lease_seconds=30, clock=clock, wall_clock=clock)
            reservation = await failing.admit("t", cost=Decimal("0.6"))
            proxy.cut()
            await reservation.settle(0, Decimal("0.5"))
            await failing.aclose()
        with pytest.raises(LimitExceeded):
            await survivor.precheck("t", cost=Decimal("0.5"))
        clock.now += 31
        await survivor.admit("t", cost=Decimal(1))
        await survivor.aclose()

    async def test_a_request_that_outlives_its_lease_still_spends_what_it_cost(
        self, redis_url: str, prefix: str
    ) -> None:
        """0.5 reserved; the lease ends and another admission releases it; the request then
        settles at 0.6: the 0.6 is spent, and the released USD is not released a second time."""
        clock = _mid_january()
        first, second = [
            RedisAdmission(
                redis_url,
                {"t": TenantConfig(daily_budget_usd=Decimal(1))},
                prefix=prefix,
                lease_seconds=30,
                clock=clock,
                wall_clock=clock,
            )
            for _ in range(2)
        ]
        held = await first.admit("t", cost=Decimal("0.5"))
        clock.now += 31
        await (await second.admit("t", cost=Decimal("0.1"))).settle(0, Decimal("0.1"))
        await held.settle(0, Decimal("0.6"))
        assert await second.spent("t") == Decimal("0.7")
        await second.precheck("t", cost=Decimal("0.3"))
        with pytest.raises(LimitExceeded):
            await second.precheck("t", cost=Decimal("0.31"))
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
    async def test_a_client_calling_one_at_a_time_finds_its_last_call_settled_on_the_other_replica(
        self, redis_url: str, prefix: str, fake: FakeProvider
    ) -> None:
        """A tenant with one in-flight slot, a client making one call at a time, alternating two
        replicas, one of which reaches Redis only after 0.1 s (another zone): each call's status
        waits (briefly) for its settle, so the next call, on the other replica, finds the slot
        free. The status went before the settle, and every call on the near replica after one on
        the far one was refused CONCURRENCY_LIMITED, although no two calls were ever in flight."""
        fake.set_default(Script(chunk_count=2))
        config = default_config()
        config["tenants"] = {"acme": {"max_concurrent": 1}}
        config["shared_state"] = {"redis_url": redis_url, "key_prefix": prefix}
        async with _Proxy(redis_url) as proxy:
            far = copy.deepcopy(config)
            far["shared_state"]["redis_url"] = proxy.url
            async with (
                Server(settings_from(far, live_environ(fake)), port=0) as one,
                Server(settings_from(config, live_environ(fake)), port=0) as two,
                RouterClient(one.target) as first,
                RouterClient(two.target) as second,
            ):
                context = pb.RoutingContext(tenant="acme")
                async for _ in first.complete(user_chat("hi"), context):  # scripts loaded
                    pass
                proxy.slow_requests(one.router.admission._settle_script.sha.encode(), 0.1)
                outcomes = []
                for index in range(6):
                    try:
                        async for _ in (first, second)[index % 2].complete(user_chat("hi"), context):
                            pass
                        outcomes.append("OK")
                    except grpc.aio.AioRpcError as error:
                        outcomes.append(error.code().name)
        assert outcomes == ["OK"] * 6

    async def test_a_route_whose_deadline_passes_at_its_budget_look_up_gives_its_count_back(
        self, redis_url: str, prefix: str, fake: FakeProvider
    ) -> None:
        """A Route of a tenant allowed one Route call a minute, routed by an LLM classifier (so
        the tenant's budget is looked up in Redis before it is paid), whose deadline passes while
        that look-up waits (Redis's replies held 1.5 s): DEADLINE_EXCEEDED, nothing paid, and the
        count given back, so the tenant's next Route is answered (the cancellation passed the
        router's give-back, which took only refusals, and the minute's one call was spent)."""
        config = llm_classifier_config()
        config["tenants"] = {"acme": {"daily_budget_usd": "1", "route_requests_per_minute": 1}}
        acme = pb.RoutingContext(tenant="acme")
        fake.set_default(Script(text='{"task": "chat", "complexity": "low"}'))
        async with _Proxy(redis_url) as proxy:
            config["shared_state"] = {"redis_url": proxy.url, "key_prefix": prefix}
            async with (
                Server(settings_from(config, live_environ(fake)), port=0) as server,
                RouterClient(server.target) as client,
            ):
                await client.route(user_chat("hi"))  # opens the channel (no tenant's: not counted)
                proxy.slow_requests(b"MGET", 1.5)
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await client.route(user_chat("hi"), acme, timeout=0.6)
                paid = len(fake.requests)  # the late one's classifier: none
                proxy.slow_requests(b"MGET", 0.0)
                outcomes = []
                for _ in range(20):  # the give-back reaches Redis in the background
                    try:
                        await client.route(user_chat("hi"), acme)
                    except grpc.aio.AioRpcError as error:
                        outcomes.append(error.code().name)
                        await asyncio.sleep(0.05)
                    else:
                        outcomes.append("OK")
                        break
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert outcomes[-1] == "OK", outcomes
        assert paid == 1

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


@contextlib.asynccontextmanager
async def _never_answering() -> AsyncIterator[str]:
    """The redis:// URL of a server that accepts connections and never answers (a Redis that hangs)."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in held:
            writer.close()
