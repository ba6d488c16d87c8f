"""GetStats and `routesvc stats`: the rolling window, and savings that match a hand calculation."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import sys
import time
from dataclasses import replace
from decimal import Decimal

import grpc
import pytest

from routesvc import telemetry
from routesvc.stats import FeedbackOutcome, LateCharge, Percentiles, RequestOutcome, RoutingStats, Totals
from routesvc.telemetry import Telemetry
from routesvc.testing import FakeProvider, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import REPO, default_config, live_environ, settings_from, user_chat
from tests.observability import Observed, observed_server


def _outcome(at: float, tenant: str = "", model: str = "m", cost: str = "1", baseline: str = "3") -> RequestOutcome:
    return RequestOutcome(
        at=at,
        tenant=tenant,
        model=model,
        selected_model=model,
        strategy="rules",
        ok=True,
        cost_usd=Decimal(cost),
        baseline_cost_usd=Decimal(baseline),
        estimated_cost_usd=Decimal(cost),
        estimated_baseline_cost_usd=Decimal(baseline),
        latency_seconds=at / 100,
    )


class TestRoutingStats:
    def test_outcomes_older_than_the_window_are_dropped(self) -> None:
        """Only outcomes within window_seconds of now are counted."""
        now = [0.0]
        stats = RoutingStats(60, 1000, "base", clock=lambda: now[0])
        stats.add(_outcome(0.0))
        now[0] = 30.0
        stats.add(_outcome(30.0))
        now[0] = 70.0
        assert stats.summary().totals.requests == 1
        assert stats.summary(window_seconds=10).totals.requests == 0

    def test_the_window_keeps_at_most_max_requests(self) -> None:
        """The oldest outcomes go first when the count bound is reached."""
        stats = RoutingStats(3600, 2, "base", clock=lambda: 5.0)
        for at in (1.0, 2.0, 3.0):
            stats.add(_outcome(at))
        summary = stats.summary()
        assert summary.totals.requests == 2
        assert summary.latency == Percentiles(2.0 / 100, 3.0 / 100, 3.0 / 100)

    def test_tenant_filter_and_per_tenant_rows(self) -> None:
        """A tenant filter counts only its requests; without one every tenant has a row."""
        stats = RoutingStats(3600, 100, "base", clock=lambda: 1.0)
        stats.add(_outcome(1.0, tenant="acme", cost="1", baseline="4"))
        stats.add(_outcome(1.0, tenant="globex", cost="2", baseline="2"))
        acme = stats.summary(tenant="acme")
        assert (acme.totals.requests, acme.totals.savings_usd, acme.totals.savings_percent) == (1, Decimal(3), 75.0)
        everyone = stats.summary()
        assert [(row.tenant, row.totals.cost_usd) for row in everyone.tenants] == [
            ("acme", Decimal(1)),
            ("globex", Decimal(2)),
        ]
        assert everyone.totals.savings_usd == Decimal(3)

    def test_percentiles_are_nearest_rank(self) -> None:
        """p50/p95/p99 of 1..100 are 50, 95 and 99."""
        assert Percentiles.of(float(i) for i in range(100, 0, -1)) == Percentiles(50.0, 95.0, 99.0)

    def test_model_rows_are_ordered_by_requests_with_shares(self) -> None:
        """Per-model rows come most requests first, with their share of the window."""
        stats = RoutingStats(3600, 100, "base", clock=lambda: 1.0)
        for model in ("b", "a", "a", "c"):
            stats.add(_outcome(1.0, model=model))
        assert [(row.model, row.share) for row in stats.summary().models] == [("a", 0.5), ("b", 0.25), ("c", 0.25)]

    def test_feedback_is_averaged_per_model_within_the_window(self) -> None:
        """Feedback scores count for their model while in the window; a model with feedback only has a row."""
        now = [10.0]
        stats = RoutingStats(60, 100, "base", clock=lambda: now[0])
        stats.add(_outcome(10.0, model="a"))
        stats.add_feedback(FeedbackOutcome(10.0, "acme", "a", 1.0))
        stats.add_feedback(FeedbackOutcome(10.0, "globex", "a", 0.0))
        stats.add_feedback(FeedbackOutcome(10.0, "acme", "b", 0.5))
        rows = {
            row.model: (row.totals.requests, row.feedback_count, row.mean_feedback_score)
            for row in stats.summary().models
        }
        assert rows == {"a": (1, 2, 0.5), "b": (0, 1, 0.5)}
        acme = {row.model: row.mean_feedback_score for row in stats.summary(tenant="acme").models}
        assert acme == {"a": 1.0, "b": 0.5}
        now[0] = 100.0
        assert stats.summary().models == ()

    def test_adding_feedback_compares_no_decision_ids_of_the_window(self) -> None:
        """With 20,000 scores in the window, 200 new scores and 200 re-ratings compare their
        decision id with a handful of the stored ones (``_CountedId`` counts each comparison):
        each Feedback compared it with every stored score, on the event loop (~5 ms at
        100,000). A re-rating still replaces the score before it, and a window full of re-ratings
        keeps the latest scores of the most decisions it may hold."""
        compared = [0]
        stats = RoutingStats(3600, 20_000, "base", clock=lambda: 1.0)
        for i in range(20_000):
            stats.add_feedback(FeedbackOutcome(1.0, "acme", "a", 1.0, _CountedId(f"d{i}", compared)))
        compared[0] = 0
        for i in range(200):
            stats.add_feedback(FeedbackOutcome(1.0, "acme", "b", 1.0, _CountedId(f"new{i}", compared)))
            stats.add_feedback(FeedbackOutcome(1.0, "acme", "a", 0.0, _CountedId(f"d{19_999 - i}", compared)))
        assert compared[0] < 1_000
        rows = {row.model: (row.feedback_count, row.mean_feedback_score) for row in stats.summary().models}
        assert rows == {"a": (19_800, 19_600 / 19_800), "b": (200, 1.0)}

        small = RoutingStats(3600, 3, "base", clock=lambda: 1.0)
        for i in range(10):
            small.add_feedback(FeedbackOutcome(1.0, "acme", "a", i / 10, "same"))
        small.add_feedback(FeedbackOutcome(1.0, "acme", "b", 1.0, "other"))
        rows = {row.model: (row.feedback_count, row.mean_feedback_score) for row in small.summary().models}
        assert rows == {"a": (1, 0.9), "b": (1, 1.0)}

    def test_record_feedback_inside_an_rpc_reaches_the_window(self) -> None:
        """telemetry.record_feedback, called by the RPC receiving feedback, is counted for its model."""
        instrumentation = Telemetry(settings_from(default_config()))
        with instrumentation.server_rpc("routesvc.v1.RouterService", "Feedback", ()) as rpc:
            telemetry.record_feedback("gpt-4o-mini", 0.75, decision_id="d1", tenant="acme")
            rpc.finish("OK", 0)
        (row,) = instrumentation.stats.summary(tenant="acme").models
        assert (row.model, row.feedback_count, row.mean_feedback_score) == ("gpt-4o-mini", 1, 0.75)


# A mixed workload and its cost by hand from the catalog prices (USD per 1M tokens):
#   gpt-4o-mini 0.15 / 0.60, gpt-4o 2.50 / 10.00, claude-sonnet 3.00 / 15.00 (the default baseline).
#   3 x gpt-4o-mini, 1000 in / 100 out: 3 x (0.00015 + 0.00006)  = 0.00063; on claude 3 x 0.0045 = 0.0135
#   1 x gpt-4o,      2000 in / 300 out: 0.005 + 0.003             = 0.008;   on claude 0.006 + 0.0045 = 0.0105
#   1 x claude,       500 in /  50 out: 0.0015 + 0.00075          = 0.00225; on claude the same   = 0.00225
COST = Decimal("0.01088")
BASELINE = Decimal("0.02625")


async def _mixed_workload(observed: Observed, fake: FakeProvider) -> None:
    fake.enqueue(Script(input_tokens=1000, output_tokens=100), model="gpt-4o-mini")
    fake.enqueue(Script(input_tokens=1000, output_tokens=100), model="gpt-4o-mini")
    fake.enqueue(Script(input_tokens=1000, output_tokens=100), model="gpt-4o-mini")
    fake.enqueue(Script(input_tokens=2000, output_tokens=300), model="gpt-4o")
    fake.enqueue(Script(input_tokens=500, output_tokens=50), model="claude-sonnet-4-6")
    for context in (
        pb.RoutingContext(tenant="acme"),
        pb.RoutingContext(tenant="acme"),
        pb.RoutingContext(tenant="globex"),
        pb.RoutingContext(tenant="acme", task_hint="code_generation"),
        pb.RoutingContext(tenant="globex", task_hint="creative_writing"),
    ):
        async for _ in observed.client.complete(user_chat("hello"), context):
            pass


def _fill_with_tenants(observed: Observed, count: int, name_chars: int = 5) -> None:
    """``count`` tenants ``t0000``... (padded with ``x`` to ``name_chars``), the i-th costing i USD in
    one request, but for ``t0199``: two requests of 100 USD, as much as ``t0200`` and more requests."""
    stats = observed.server.telemetry.stats
    now = time.monotonic()
    for i in range(count):
        tenant = f"t{i:04d}".ljust(name_chars, "x")
        if i == 199:
            stats.add(_outcome(now, tenant=tenant, cost="100"))
            stats.add(_outcome(now, tenant=tenant, cost="100"))
        else:
            stats.add(_outcome(now, tenant=tenant, cost=str(i)))


@pytest.fixture
async def observed(fake: FakeProvider) -> Observed:  # type: ignore[misc]
    async with observed_server(fake) as running:
        yield running


class TestGetStats:
    async def test_savings_match_the_hand_calculation(self, observed: Observed, fake: FakeProvider) -> None:
        """After a mixed workload GetStats reports the cost, baseline cost and savings computed by hand."""
        await _mixed_workload(observed, fake)
        stats = await observed.client.get_stats()
        totals = stats.totals
        assert stats.baseline_model == "claude-sonnet"
        assert (totals.requests, totals.errors) == (5, 0)
        assert (Decimal(totals.cost_usd), Decimal(totals.baseline_cost_usd)) == (COST, BASELINE)
        assert Decimal(totals.savings_usd) == BASELINE - COST
        assert totals.savings_percent == pytest.approx(float((BASELINE - COST) / BASELINE * 100))
        assert [(m.model, m.totals.requests, m.share) for m in stats.models] == [
            ("gpt-4o-mini", 3, 0.6),
            ("claude-sonnet", 1, 0.2),
            ("gpt-4o", 1, 0.2),
        ]
        assert Decimal(stats.models[0].totals.cost_usd) == Decimal("0.00063")
        assert stats.latency.p50.ToNanoseconds() > 0
        assert stats.time_to_first_token.p99.ToNanoseconds() <= stats.latency.p99.ToNanoseconds()

    async def test_per_tenant(self, observed: Observed, fake: FakeProvider) -> None:
        """A tenant's stats count only its requests; the unfiltered answer lists each tenant."""
        await _mixed_workload(observed, fake)
        acme = await observed.client.get_stats(tenant="acme")
        assert (acme.tenant, acme.totals.requests) == ("acme", 3)
        assert Decimal(acme.totals.cost_usd) == Decimal("0.00042") + Decimal("0.008")
        everyone = await observed.client.get_stats()
        assert [(t.tenant, t.totals.requests) for t in everyone.tenants] == [("acme", 3), ("globex", 2)]

    async def test_errors_and_fallbacks_are_counted(self, observed: Observed, fake: FakeProvider) -> None:
        """A request that fails is an error; a retried one is not."""
        fake.enqueue(Script(status=400), model="gpt-4o-mini")
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in observed.client.complete(user_chat("hello")):
                pass
        fake.enqueue(Script(status=503), Script(input_tokens=10, output_tokens=1), model="gpt-4o-mini")
        async for _ in observed.client.complete(user_chat("hello")):
            pass
        stats = await observed.client.get_stats()
        assert (stats.totals.requests, stats.totals.errors) == (2, 1)

    async def test_a_negative_window_is_invalid(self, observed: Observed) -> None:
        """window < 0 is INVALID_ARGUMENT."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await observed.client.get_stats(window_seconds=-1)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


class TestAFullWindow:
    """Folding a full window (100,000 outcomes by default) takes hundreds of milliseconds; the
    server keeps answering other calls meanwhile (it folded on the event loop in one go: a caller
    polling GetStats moved Route's p50 from 2 ms to 30 ms and stalled streams for 600 ms)."""

    @staticmethod
    def _fill(observed: Observed, count: int) -> None:
        stats = observed.server.telemetry.stats
        now = time.monotonic()
        for i in range(count):
            stats.add(_outcome(now, tenant=f"t{i % 50}", model=("a", "b", "c")[i % 3]))

    async def test_routes_are_answered_while_getstats_folds_a_full_window(self, observed: Observed) -> None:
        self._fill(observed, 100_000)
        folding = asyncio.ensure_future(observed.client.get_stats())
        routed_meanwhile = 0
        while not folding.done():
            await observed.client.route(user_chat("What is 2 plus 2?"))
            routed_meanwhile += 0 if folding.done() else 1
        stats = await folding
        assert routed_meanwhile >= 5
        assert (stats.totals.requests, Decimal(stats.totals.cost_usd)) == (100_000, Decimal(100_000))
        assert [(m.model, m.totals.requests) for m in stats.models] == [("a", 33_334), ("b", 33_333), ("c", 33_333)]
        assert len(stats.tenants) == 50

    async def test_a_caller_that_gives_up_leaves_the_same_question_answered_for_another(
        self, observed: Observed
    ) -> None:
        self._fill(observed, 100_000)
        impatient = asyncio.ensure_future(observed.client.get_stats(tenant="t1"))
        patient = asyncio.ensure_future(observed.client.get_stats(tenant="t1"))
        await asyncio.sleep(0.01)
        impatient.cancel()
        stats = await patient
        assert (stats.tenant, stats.totals.requests) == ("t1", 2_000)
        with pytest.raises(asyncio.CancelledError):
            await impatient


class TestManyTenants:
    """GetStats lists at most 1,000 tenants, those with the most cost, then requests, and sums the
    others (every tenant had a row: with a few thousand tenant names of up to 1,024 characters, as
    any request may name with auth off, the answer passed gRPC's 4 MiB limit and GetStats() and
    `routesvc stats` failed RESOURCE_EXHAUSTED for the rest of the window)."""

    async def test_getstats_lists_the_1000_tenants_costing_most_and_counts_the_others(self, observed: Observed) -> None:
        """With 1,200 tenants, the 1,000 with the most cost (a tie on cost goes to the one with more
        requests) are listed by tenant id; the other 200 are counted and summed, and the rows plus
        them make the totals."""
        _fill_with_tenants(observed, 1_200)
        stats = await observed.client.get_stats()
        assert len(stats.tenants) == 1_000
        assert [row.tenant for row in stats.tenants] == ["t0199"] + [f"t{i:04d}" for i in range(201, 1_200)]
        assert [Decimal(row.totals.cost_usd) for row in stats.tenants[:2]] == [Decimal(200), Decimal(201)]
        others = stats.other_tenant_totals
        assert (stats.other_tenant_count, others.requests) == (200, 200)
        assert Decimal(others.cost_usd) == sum(range(199)) + 200
        assert (stats.totals.requests, Decimal(stats.totals.cost_usd)) == (1_201, sum(range(1_200)) + 1)
        for field in ("cost_usd", "baseline_cost_usd", "savings_usd", "estimated_cost_usd"):
            listed = sum(Decimal(getattr(row.totals, field)) for row in stats.tenants)
            assert listed + Decimal(getattr(others, field)) == Decimal(getattr(stats.totals, field)), field
        assert sum(row.totals.requests for row in stats.tenants) + others.requests == stats.totals.requests

    async def test_getstats_answers_a_window_of_5000_tenants_of_1024_characters(self, observed: Observed) -> None:
        """Five thousand tenant names of the longest length a request may give are answered (they
        made a 5.4 MB message), in 1,000 rows."""
        _fill_with_tenants(observed, 5_000, name_chars=1_024)
        stats = await observed.client.get_stats()
        assert (len(stats.tenants), stats.other_tenant_count) == (1_000, 4_000)
        assert stats.ByteSize() < 1_500_000

    async def test_every_tenant_is_listed_up_to_1000(self, observed: Observed) -> None:
        """1,000 tenants are each listed, by tenant id, and none is left out."""
        _fill_with_tenants(observed, 1_000)
        stats = await observed.client.get_stats()
        assert [row.tenant for row in stats.tenants] == [f"t{i:04d}" for i in range(1_000)]
        assert (stats.other_tenant_count, stats.other_tenant_totals.requests) == (0, 0)
        assert Decimal(stats.other_tenant_totals.cost_usd) == 0


class TestTheSummaryInSlices:
    """A fold's last step, summing it up (picking the tenant rows, the latency percentiles), is
    sliced as its scan is: with 100,000 tenants it held the event loop ~350 ms in one go
    (``bench.stats_fold_steps``), and Route's p50 under GetStats polling rose to 8-11 ms."""

    @staticmethod
    def _random_window(rng: random.Random, tenants: int, outcomes: int) -> RoutingStats:
        """A window of ``outcomes`` over ``tenants`` tenants, on few costs so that many tenants tie
        on cost and requests, with late charges; latencies and first chunks at random."""
        stats = RoutingStats(3600, outcomes, "base", clock=lambda: 1.0)
        for _ in range(outcomes):
            tenant = f"t{rng.randrange(tenants):05d}"
            cost = rng.choice(("0.001", "0.002", "0.003"))
            outcome = _outcome(1.0, tenant=tenant, model=rng.choice("abc"), cost=cost, baseline="0.004")
            ttfc = rng.choice((None, rng.random()))
            stats.add(replace(outcome, latency_seconds=rng.random(), time_to_first_chunk_seconds=ttfc))
            if rng.random() < 0.05:
                stats.add_late_charge(LateCharge(1.0, tenant, outcome.model, Decimal("0.001")))
        return stats

    async def test_the_summary_is_the_window_folded_in_one_piece(self) -> None:
        """On a random window of 4,564 tenants (most tied on cost and requests), the tenant rows
        are the 1,000 with the most cost, then requests, then the lowest id, by id, the others
        summed; the percentiles are the nearest ranks of every sample; the same from ``summary``
        and ``summarize``."""
        rng = random.Random(20261201)  # noqa: S311 - a reproducible window, not a secret
        stats = self._random_window(rng, 5_000, 12_000)
        outcomes, late = tuple(stats._outcomes), tuple(stats._late)
        rows: dict[str, list[Decimal]] = {}
        for outcome in outcomes:
            row = rows.setdefault(outcome.tenant, [Decimal(0)] * 5)
            row[0] += 1
            row[1] += outcome.cost_usd
            row[2] += outcome.baseline_cost_usd
            row[3] += outcome.estimated_cost_usd
            row[4] += outcome.estimated_baseline_cost_usd
        for charge in late:
            rows[charge.tenant][1] += charge.cost_usd

        def totals(sums: list[Decimal]) -> Totals:
            return Totals(int(sums[0]), sums[1], sums[2], sums[3], sums[4], 0)

        ranked = sorted(rows, key=lambda tenant: (-rows[tenant][1], -rows[tenant][0], tenant))
        kept, others = sorted(ranked[:1_000]), ranked[1_000:]
        other_sums = [sum((rows[tenant][i] for tenant in others), Decimal(0)) for i in range(5)]
        ties = len(ranked) - len({(rows[tenant][1], rows[tenant][0]) for tenant in ranked})
        assert (len(rows), ties > 4_000) == (4_564, True)

        summary = await stats.summarize()
        assert [(row.tenant, row.totals) for row in summary.tenants] == [(t, totals(rows[t])) for t in kept]
        assert (summary.other_tenants, summary.other_tenant_totals) == (3_564, totals(other_sums))
        assert summary.latency == Percentiles.of(outcome.latency_seconds for outcome in outcomes)
        first_chunks = [o.time_to_first_chunk_seconds for o in outcomes if o.time_to_first_chunk_seconds is not None]
        assert summary.time_to_first_chunk == Percentiles.of(first_chunks)
        assert summary.totals.requests == 12_000
        assert summary == stats.summary()

    async def test_picking_the_tenant_rows_gives_the_event_loop_back(self) -> None:
        """With 3,000 tenants tied on cost and requests, ranked by id alone, the comparisons of
        their ids (made only in the last step) are spread over several turns of the event loop: a
        task counting its turns meanwhile is seen at more than one count (one: the 1,000 rows were
        picked in one go)."""
        turns = [0]
        seen: set[int] = set()
        stats = RoutingStats(3600, 3_000, "base", clock=lambda: 1.0)
        for i in range(3_000):
            stats.add(_outcome(1.0, tenant=_WatchedTenant(f"t{i:04d}", turns, seen)))

        async def count_turns() -> None:
            while True:
                turns[0] += 1
                await asyncio.sleep(0)

        counting = asyncio.ensure_future(count_turns())
        try:
            summary = await stats.summarize()
        finally:
            counting.cancel()
        assert [row.tenant for row in summary.tenants] == [f"t{i:04d}" for i in range(1_000)]
        assert len(seen) > 1


class TestFoldsTakeTurns:
    """Different questions (one per tenant, other windows) are folded one after another in the
    order asked, so the first asked is answered first (they took turns slice by slice, and all
    were answered together at the end: 60 callers with a 5 s deadline all ran out)."""

    async def test_the_first_question_is_answered_long_before_the_last(self, observed: Observed) -> None:
        TestAFullWindow._fill(observed, 100_000)
        started = time.monotonic()

        async def ask(window: float) -> float:
            await observed.client.get_stats(window_seconds=window)
            return time.monotonic() - started

        answered = await asyncio.gather(*(ask(600 + minute * 60) for minute in range(6)))
        assert min(answered) < 0.5 * max(answered)

    async def test_a_fold_no_caller_waits_for_stops(self, observed: Observed) -> None:
        TestAFullWindow._fill(observed, 100_000)
        call = asyncio.ensure_future(observed.client.get_stats(timeout=0.1))
        folds: list[asyncio.Task[object]] = []
        while not folds and not call.done():
            await asyncio.sleep(0)
            folds = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "RoutingStats._summarize"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        (fold,) = folds
        await asyncio.wait([fold])
        assert fold.cancelled()


class TestTheLongestWindow:
    """telemetry.stats_window_seconds is answered as a google.protobuf.Duration: 1e20 was
    accepted, and every GetStats then failed INTERNAL."""

    async def test_the_longest_window_a_duration_holds_is_served(self, fake: FakeProvider) -> None:
        from routesvc.client import RouterClient
        from routesvc.server import Server

        config = default_config()
        config["telemetry"] = {"stats_window_seconds": 315_576_000_000}
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            stats = await client.get_stats()
        assert stats.window.seconds == 315_576_000_000

    @pytest.mark.parametrize("window", [315_576_000_001, 1e20, 1e300])
    def test_a_longer_window_is_refused_at_start_naming_the_field(self, window: float) -> None:
        from routesvc.errors import ConfigError

        config = default_config()
        config["telemetry"] = {"stats_window_seconds": window}
        with pytest.raises(ConfigError) as caught:
            settings_from(config)
        assert (
            "telemetry.stats_window_seconds: Input should be less than or equal to 315576000000" in caught.value.message
        )


class TestStatsCommand:
    async def test_routesvc_stats_json_reports_the_savings(self, observed: Observed, fake: FakeProvider) -> None:
        """`routesvc stats --json` prints GetStats as JSON, money as decimal strings."""
        await _mixed_workload(observed, fake)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "routesvc", "stats", "--json", "--target", observed.server.target,
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        printed = json.loads(out)
        assert Decimal(printed["totals"]["savings_usd"]) == BASELINE - COST
        assert printed["baseline_model"] == "claude-sonnet"

    async def test_routesvc_stats_text(self, observed: Observed, fake: FakeProvider) -> None:
        """The text form names the cost, the baseline and the savings."""
        await _mixed_workload(observed, fake)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "routesvc", "stats", "--target", observed.server.target,
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        text = out.decode()
        assert f"savings:        {BASELINE - COST} USD" in text
        assert "gpt-4o-mini" in text

    async def test_routesvc_stats_lists_1000_tenants_and_a_line_for_the_others(self, observed: Observed) -> None:
        """With 5,000 tenants of 1,024-character names in the window, `routesvc stats` prints the
        1,000 costing most and one line counting and summing the others (it failed
        RESOURCE_EXHAUSTED)."""
        _fill_with_tenants(observed, 5_000, name_chars=1_024)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "routesvc", "stats", "--target", observed.server.target,
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()[-500:]
        lines = out.decode().splitlines()
        tenant_lines = [line for line in lines if line.startswith("  t")]
        assert len(tenant_lines) == 1_000
        assert (tenant_lines[0][:8], tenant_lines[-1][:8]) == ("  t4000x", "  t4999x")
        others_cost = sum(range(4_000)) + 1  # t0000 to t3999 (t0199: 200 USD, in two requests)
        assert lines[-1] == f"  ... and 4000 other tenants: 4001 requests, cost {others_cost} USD"


class TestTenantScope:
    async def test_an_authenticated_tenant_sees_only_its_own_numbers(self, fake: FakeProvider) -> None:
        """With auth on, GetStats answers a tenant's key with that tenant's stats, and refuses another's."""
        from routesvc.auth import key_digest
        from routesvc.client import RouterClient

        config = default_config()
        config["auth"] = {"enabled": True}
        config["tenants"] = {
            "acme": {"api_key_sha256": [key_digest("acme-key")]},
            "globex": {"api_key_sha256": [key_digest("globex-key")]},
        }
        async with observed_server(fake, config=config) as observed:
            target = observed.server.target
            async with (
                RouterClient(target, api_key="acme-key") as acme,
                RouterClient(target, api_key="globex-key") as globex,
            ):
                for client in (acme, globex, globex):
                    async for _ in client.complete(user_chat("hello")):
                        pass
                own = await acme.get_stats()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await acme.get_stats(tenant="globex")
        assert (own.tenant, own.totals.requests) == ("acme", 1)
        assert [t.tenant for t in own.tenants] == ["acme"]
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


class TestCascadeStats:
    async def test_escalation_and_release_rates(self, observed: Observed, fake: FakeProvider) -> None:
        """One cheap answer released at judge score 0.9, one refusal escalated: rates of one half each,
        and the released answers' mean score."""
        fake.enqueue(Script(text="Paris is the capital."), Script(text='{"score": 0.9}'), model="gpt-4o-mini")
        fake.enqueue(Script(text="I'm sorry, but I can't help with that."), model="gpt-4o-mini")
        for _ in range(2):
            async for _ in observed.client.complete(
                user_chat("What is the capital of France?"), pb.RoutingContext(cascade=True)
            ):
                pass
        stats = await observed.client.get_stats()
        assert (stats.escalations, stats.escalation_rate) == (1, 0.5)
        assert (stats.cascade_decisions, stats.cascade_release_rate) == (2, 0.5)
        assert stats.mean_released_score == pytest.approx(0.9)
        assert {m.model: m.totals.requests for m in stats.models} == {"gpt-4o-mini": 1, "gpt-4o": 1}

    async def test_a_released_answer_in_hand_is_credited_to_its_model(
        self, observed: Observed, fake: FakeProvider
    ) -> None:
        """A refusal escalates to gpt-4o, which answers with no text: the refusal in hand is released,
        and GetStats credits gpt-4o-mini with it, its baseline the refusal's tokens on claude-sonnet
        (it credited gpt-4o, the last attempt that answered, its baseline gpt-4o's tokens)."""
        refusal = Script(text="I'm sorry, but I can't help with that.", input_tokens=1000, output_tokens=100)
        fake.enqueue(refusal, model="gpt-4o-mini")
        fake.enqueue(Script(chunks=(), input_tokens=2000, output_tokens=300), model="gpt-4o")
        messages = [
            m
            async for m in observed.client.complete(
                user_chat("What is the capital of France?"), pb.RoutingContext(cascade=True)
            )
        ]
        assert messages[-1].completion.model == "gpt-4o-mini"
        stats = await observed.client.get_stats()
        assert [(m.model, m.totals.requests) for m in stats.models] == [("gpt-4o-mini", 1)]
        # 1000 in / 100 out on claude-sonnet (3.00 / 15.00 per 1M tokens)
        assert Decimal(stats.totals.baseline_cost_usd) == Decimal("0.0045")


class TestABaselineChangedByAReload:
    async def test_get_stats_names_each_baseline_its_totals_were_priced_on(self, fake: FakeProvider) -> None:
        config = default_config()
        async with observed_server(fake, config=copy.deepcopy(config)) as observed:
            fake.enqueue(Script(input_tokens=1000, output_tokens=100))
            [m async for m in observed.client.complete(user_chat("hello"))]
            before = await observed.client.get_stats()
            changed = copy.deepcopy(config)
            changed["telemetry"] = {"baseline_model": "gpt-4o"}
            await observed.server.reload(settings_from(changed, live_environ(fake)))
            same_window = await observed.client.get_stats()
            fake.enqueue(Script(input_tokens=1000, output_tokens=100))
            [m async for m in observed.client.complete(user_chat("hello"))]
            both = await observed.client.get_stats()
            catalog = observed.server.router.settings.catalog

        def priced_on(model: str) -> Decimal:
            spec = catalog.get(model)
            return (1000 * spec.input_price_per_mtok + 100 * spec.output_price_per_mtok) / 1_000_000

        assert (before.baseline_model, Decimal(before.totals.baseline_cost_usd)) == (
            "claude-sonnet",
            priced_on("claude-sonnet"),
        )
        # the reload changed the baseline, not what the window's request was priced on
        assert (same_window.baseline_model, Decimal(same_window.totals.baseline_cost_usd)) == (
            "claude-sonnet",
            priced_on("claude-sonnet"),
        )
        assert (both.baseline_model, Decimal(both.totals.baseline_cost_usd)) == (
            "claude-sonnet, gpt-4o",
            priced_on("claude-sonnet") + priced_on("gpt-4o"),
        )


class _WatchedTenant(str):
    """A tenant id that notes, at each ordering comparison with it, how many turns a task counting
    the event loop's turns has made (the test's, not the service's)."""

    __slots__ = ("seen", "turns")

    def __new__(cls, value: str, turns: list[int], seen: set[int]) -> _WatchedTenant:
        made = super().__new__(cls, value)
        made.turns, made.seen = turns, seen
        return made

    def __lt__(self, other: str) -> bool:
        self.seen.add(self.turns[0])
        return str.__lt__(self, other)


class _CountedId(str):
    """A decision id that counts the comparisons made with it (the test's, not the service's)."""

    __slots__ = ("compared",)

    def __new__(cls, value: str, compared: list[int]) -> _CountedId:
        made = super().__new__(cls, value)
        made.compared = compared
        return made

    def __eq__(self, other: object) -> bool:
        self.compared[0] += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__
