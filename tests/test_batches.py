"""Batch mode: Complete answers with a job reference; GetBatch / CancelBatch; both providers' batch
APIs through the real SDKs to the fake; persistence across a restart; tenants see only their jobs."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import grpc
import pytest

from routesvc.client import RouterClient
from routesvc.server import Server
from routesvc.testing import BatchOutcome, FakeProvider, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import default_config, live_environ, settings_from, user_chat
from tests.test_validation import error_info


def batch_config(tmp_path: Path) -> dict[str, object]:
    """The default policy with fast batch timers and the store under ``tmp_path``."""
    config = default_config()
    config["batch"] = {
        "store_path": str(tmp_path / "batches.db"),
        "group_window_seconds": 0.05,
        "poll_interval_seconds": 0.05,
    }
    return config


async def submit(client: RouterClient, tenant: str = "acme", **context: object) -> list[pb.CompleteResponse]:
    """A Complete with realtime false."""
    request_context = pb.RoutingContext(realtime=False, tenant=tenant, **context)  # type: ignore[arg-type]
    return [m async for m in client.complete(user_chat("Summarise this report"), request_context)]


async def get_batch(client: RouterClient, batch_id: str, tenant: str = "acme") -> pb.GetBatchResponse:
    """GetBatch through the generated stub."""
    stub = client._stub  # the typed client has no batch calls yet for tests to lean on
    response: pb.GetBatchResponse = await stub.GetBatch(pb.GetBatchRequest(batch_id=batch_id, tenant=tenant))
    return response


async def wait_state(client: RouterClient, batch_id: str, state: int, timeout: float = 5.0) -> pb.GetBatchResponse:
    """Poll GetBatch until the job reaches ``state``."""
    async with asyncio.timeout(timeout):
        while True:
            response = await get_batch(client, batch_id)
            if response.job.state == state:
                return response
            await asyncio.sleep(0.05)


class TestBatchSubmitAndResults:
    """A batch-mode Complete returns a job at once; GetBatch returns the answer at the batch price."""

    @pytest.mark.parametrize(
        ("task", "model", "api"), [("", "gpt-4o-mini", "openai"), ("creative_writing", "claude-sonnet", "anthropic")]
    )
    async def test_submit_poll_and_results(
        self, tmp_path: Path, fake: FakeProvider, task: str, model: str, api: str
    ) -> None:
        """Decision then one BatchJob; the provider batch completes; the result costs half the realtime price."""
        fake.enqueue(Script(text="A short summary.", input_tokens=100, output_tokens=20), model=fake_model(model))
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            messages = await submit(client, task_hint=task)
            assert [m.WhichOneof("event") for m in messages] == ["decision", "batch"]
            job = messages[1].batch
            assert (job.state, job.model) == (pb.BATCH_STATE_QUEUED, model)
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
            spec = server.router.settings.catalog.get(model)
            expected = (100 * spec.input_price_per_mtok + 20 * spec.output_price_per_mtok) / 10**6 / 2
            assert done.result.text == "A short summary."
            assert Decimal(done.result.cost_usd) == expected
            assert [b.api for b in fake.batches] == [api]
            entries = [e for e in server.router.ledger.entries() if e.request_id == job.batch_id]
            assert [e.cost_usd for e in entries] == [expected]

    async def test_small_requests_are_grouped_into_one_provider_batch(self, tmp_path: Path, fake: FakeProvider) -> None:
        """Three jobs within the window: one provider batch of three requests."""
        config = batch_config(tmp_path)
        config["batch"]["group_window_seconds"] = 0.5  # type: ignore[index]
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            jobs = [(await submit(client))[1].batch.batch_id for _ in range(3)]
            for batch_id in jobs:
                await wait_state(client, batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert [len(b.requests) for b in fake.batches] == [3]


def fake_model(model: str) -> str:
    """The provider model name the fake sees for a catalog id."""
    return {"claude-sonnet": "claude-sonnet-4-6"}.get(model, model)


class TestBatchFaults:
    """Expiry and failure at the provider, cancellation, and other tenants' jobs."""

    @pytest.mark.parametrize("task", ["", "creative_writing"])
    async def test_an_expired_batch_ends_expired_and_uncharged(
        self, tmp_path: Path, fake: FakeProvider, task: str
    ) -> None:
        """The provider's 24 h window passes: EXPIRED, no result, nothing in the ledger."""
        fake.batch_outcome = BatchOutcome.EXPIRE
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client, task_hint=task))[1].batch
            expired = await wait_state(client, job.batch_id, pb.BATCH_STATE_EXPIRED)
            assert not expired.HasField("result")
            assert [e for e in server.router.ledger.entries() if e.request_id == job.batch_id] == []

    @pytest.mark.parametrize("task", ["", "creative_writing"])
    async def test_cancel_before_the_provider_answers(self, tmp_path: Path, fake: FakeProvider, task: str) -> None:
        """CancelBatch on a submitted job: CANCELLED, the provider batch is cancelled, nothing charged."""
        fake.batch_outcome = BatchOutcome.PENDING
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client, task_hint=task))[1].batch
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUBMITTED)
            cancelled = await client._stub.CancelBatch(pb.CancelBatchRequest(batch_id=job.batch_id, tenant="acme"))
            assert cancelled.job.state == pb.BATCH_STATE_CANCELLED
            assert fake.batches[0].cancelled
            fake.batch_outcome = BatchOutcome.COMPLETE
            await asyncio.sleep(0.3)
            assert (await get_batch(client, job.batch_id)).job.state == pb.BATCH_STATE_CANCELLED
            assert server.router.ledger.entries() == []

    async def test_another_tenants_or_an_unknown_job_is_not_found(self, tmp_path: Path, fake: FakeProvider) -> None:
        """GetBatch with another tenant, or an id that never existed: NOT_FOUND / BATCH_NOT_FOUND."""
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = (await submit(client, tenant="acme"))[1].batch
            for batch_id, tenant in ((job.batch_id, "globex"), ("batch_unknown", "acme")):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await get_batch(client, batch_id, tenant)
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
                assert error_info(caught.value).reason == "BATCH_NOT_FOUND"


class TestBatchPersistence:
    """Jobs live in SQLite: a restart between submit and completion loses nothing and charges once."""

    async def test_a_restart_loses_no_job(self, tmp_path: Path, fake: FakeProvider) -> None:
        """Submitted, server stopped, provider completes, new server: the answer arrives, charged once."""
        fake.batch_outcome = BatchOutcome.PENDING
        settings = settings_from(batch_config(tmp_path), live_environ(fake))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            job = (await submit(client))[1].batch
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUBMITTED)
        fake.batch_outcome = BatchOutcome.COMPLETE
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
            assert done.result.text
            await asyncio.sleep(0.2)
            assert len([e for e in server.router.ledger.entries() if e.request_id == job.batch_id]) == 1
        assert len(fake.batches) == 1
