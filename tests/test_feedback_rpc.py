"""The Feedback RPC (issue 3): outcomes of earlier decisions grow the embedding router's example
library, persisted in SQLite so a restart loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from structlog.testing import capture_logs

from routesvc import router as router_module
from routesvc.auth import key_digest
from routesvc.client import RouterClient
from routesvc.config import load_settings
from routesvc.encoders import HashingEncoder
from routesvc.errors import ConfigError, FeedbackStoreBusy, FeedbackStoreUnavailable
from routesvc.feedback import EvictedExample, FeedbackExample, FeedbackStore
from routesvc.fitting import FitSettings, fit_router
from routesvc.policy import Policy
from routesvc.reload import ConfigWatcher
from routesvc.server import Server
from routesvc.testing import FakeProvider, Fault, Script
from routesvc.v1 import router_pb2 as pb
from tests.conftest import (
    default_config,
    file_modes,
    keyless_environ,
    live_environ,
    settings_from,
    user_chat,
    write_locked,
)
from tests.routing_data import STRONG, WEAK, records
from tests.test_feedback import SqliteWork, disk_full, outcome_rows, small_pages
from tests.test_limits import retry_delay
from tests.test_validation import LONG_ID_NAMES, LONG_IDS, error_info


def embedding_config(folder: Path, **stage_settings: object) -> dict[str, object]:
    """The default catalog with an embedding stage (fitted on synthetic outcomes) keeping feedback;
    ``stage_settings`` are added to the stage's."""
    fit_router(records(), STRONG, WEAK, HashingEncoder(128), FitSettings(alpha=1.0)).save(folder / "router")
    config = default_config()
    config["routing"] = {
        "default_model": "gpt-4o-mini",
        "stages": [
            {
                "kind": "embedding",
                "router": str(folder / "router"),
                "strong_model": "gpt-4o",
                "weak_model": "gpt-4o-mini",
                "threshold": 0.99,
                "feedback_db": str(folder / "feedback.db"),
                **stage_settings,
            }
        ],
    }
    return config


def two_stage_config(folder: Path) -> dict[str, object]:
    """``embedding_config`` with a second embedding stage alike but for its feedback file,
    ``second.db`` under ``folder``: a Feedback is recorded in both files, the first's then the
    second's."""
    config = embedding_config(folder)
    [first_stage] = config["routing"]["stages"]  # type: ignore[index]
    second_stage = {**first_stage, "feedback_db": str(folder / "second.db")}
    config["routing"]["stages"] = [first_stage, second_stage]  # type: ignore[index]
    return config


async def _feedback_error(client: RouterClient, decision_id: str, **outcome: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.feedback(decision_id, **outcome)  # type: ignore[arg-type]
    return caught.value


class TestFeedbackRpc:
    async def test_without_a_learning_stage_feedback_is_failed_precondition(self, client: RouterClient) -> None:
        """The default policy keeps no feedback: FAILED_PRECONDITION, reason FEEDBACK_NOT_ENABLED."""
        decision = await client.route(user_chat("hi"))
        error = await _feedback_error(client, decision.decision_id, score=1.0)
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.FAILED_PRECONDITION, "FEEDBACK_NOT_ENABLED")

    @pytest.mark.parametrize(
        ("decision_id", "outcome", "field", "problem"),
        [
            ("", {"score": 1.0}, "decision_id", "decision_id: is required"),
            ("d" * 1025, {"score": 1.0}, "decision_id", "decision_id: must be at most 1024 characters"),
            ("d", {}, "outcome", "outcome: set score"),
            ("d", {"score": 1.5}, "score", "score: must be between 0 and 1"),
        ],
    )
    async def test_bad_feedback_names_the_field(
        self, client: RouterClient, decision_id: str, outcome: dict[str, float], field: str, problem: str
    ) -> None:
        """A missing or oversized decision id, a missing outcome or a score outside [0, 1] is
        INVALID_ARGUMENT naming the field and the problem."""
        error = await _feedback_error(client, decision_id, **outcome)
        assert (error.code(), error_info(error).metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, field)
        assert problem in (error.details() or "")

    async def test_feedback_grows_the_library_and_survives_a_restart(self, tmp_path: Path) -> None:
        """A thumbs-down on a weak-model decision adds one library example; after a restart the
        stored decision still takes feedback and the library counts both; unknown ids are NOT_FOUND."""
        settings = settings_from(embedding_config(tmp_path))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            first = await client.route(user_chat("say hello to zulu"))
            assert first.model == "gpt-4o-mini"
            response = await client.feedback(first.decision_id, thumbs_up=False)
            assert (response.model, response.score, response.library_examples) == ("gpt-4o-mini", 0.0, 1)
            second = await client.route(user_chat("say goodbye to zulu"))
            unknown = await _feedback_error(client, "no-such-decision", score=0.5)
            assert (unknown.code(), error_info(unknown).reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_DECISION")
        restarted = Server(settings_from(embedding_config(tmp_path)), port=0)
        async with restarted as server, RouterClient(server.target) as client:
            response = await client.feedback(second.decision_id, score=0.25)
        assert (response.model, response.library_examples) == ("gpt-4o-mini", 2)

    async def test_the_store_files_are_readable_by_their_owner_only(self, tmp_path: Path) -> None:
        """The file holds embeddings of rated prompts and tenant names: it and its write-ahead
        files are 0600, whatever the umask (SQLite alone made them 0644)."""
        previous = os.umask(0o022)
        try:
            async with Server(settings_from(embedding_config(tmp_path)), port=0) as server:
                async with RouterClient(server.target) as client:
                    decision = await client.route(user_chat("say hello to zulu"))
                    await client.feedback(decision.decision_id, thumbs_up=False)
                modes = file_modes(tmp_path, "feedback.db*")
        finally:
            os.umask(previous)
        assert modes == {"feedback.db": 0o600, "feedback.db-wal": 0o600, "feedback.db-shm": 0o600}

    @pytest.mark.parametrize("scope", ["tenant", "shared"])
    async def test_a_tenants_ratings_move_only_its_own_routing_unless_shared(self, tmp_path: Path, scope: str) -> None:
        """Tenant acme rates a weak-model answer down: its next request like it is moved by that
        example; another tenant's is not with feedback_scope tenant (the default; one tenant's
        ratings steered everyone's routing), and is with shared."""
        settings = settings_from(embedding_config(tmp_path, feedback_weight=1.0, feedback_scope=scope))
        acme, other = pb.RoutingContext(tenant="acme"), pb.RoutingContext(tenant="globex")
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            first = await client.route(user_chat("say hello to zulu"), acme)
            await client.feedback(first.decision_id, thumbs_up=False)
            own = await client.route(user_chat("say hello to zulu"), acme)
            others = await client.route(user_chat("say hello to zulu"), other)
        assert "moved by 1 feedback example" in own.reasons[0]
        assert own.model == "gpt-4o"
        moved = "moved by 1 feedback example" in others.reasons[0]
        assert (moved, others.model) == ((True, "gpt-4o") if scope == "shared" else (False, "gpt-4o-mini"))

    @pytest.mark.parametrize("decision_id", LONG_IDS, ids=LONG_ID_NAMES)
    async def test_a_long_unknown_decision_id_is_not_found_every_time(self, tmp_path: Path, decision_id: str) -> None:
        """An unknown decision id of the 1024 characters taken is NOT_FOUND with UNKNOWN_DECISION
        on every call, its message quoting its first 64 characters only (whole, the trailers
        passed the client's metadata limit: RESOURCE_EXHAUSTED without ErrorInfo)."""
        served = Server(settings_from(embedding_config(tmp_path)), port=0)
        async with served as server, RouterClient(server.target) as client:
            errors = [await _feedback_error(client, decision_id, score=0.5) for _ in range(5)]
        assert {(error.code(), error_info(error).reason) for error in errors} == {
            (grpc.StatusCode.NOT_FOUND, "UNKNOWN_DECISION")
        }
        quoted = f"no remembered decision {decision_id[:64]!r}... (never seen"
        assert all(str(error.details()).startswith(quoted) for error in errors)

    @pytest.mark.parametrize("deadline", [0.1, 0.2])
    async def test_an_unknown_decision_under_a_short_deadline_is_not_found_before_it(
        self, tmp_path: Path, deadline: float
    ) -> None:
        """An unknown decision id sent with a deadline shorter than the look-agains (0.05 s and
        0.2 s pauses) is NOT_FOUND UNKNOWN_DECISION before the deadline: the pauses are cut to
        the call's time. They ignored it: the call was DEADLINE_EXCEEDED, which clients retry
        for a decision that does not exist."""
        served = Server(settings_from(embedding_config(tmp_path)), port=0)
        async with served as server, RouterClient(server.target) as client:
            await client.feedback((await client.route(user_chat("hi"))).decision_id, score=1.0)  # warmed up
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.feedback("no-such-decision", score=0.5, timeout=deadline)
        error = caught.value
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_DECISION")

    async def test_feedback_for_a_forgotten_decision_is_not_found_like_an_unknown_one(self, tmp_path: Path) -> None:
        """A decision without feedback that ``feedback_max_pending_decisions`` newer ones pushed
        out is NOT_FOUND, reason UNKNOWN_DECISION, as if never seen; the newer one still counts."""
        settings = settings_from(embedding_config(tmp_path, feedback_max_pending_decisions=1))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            forgotten = await client.route(user_chat("say hello to zulu"))
            kept = await client.route(user_chat("say goodbye to zulu"))
            error = await _feedback_error(client, forgotten.decision_id, thumbs_up=False)
            response = await client.feedback(kept.decision_id, thumbs_up=False)
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_DECISION")
        assert (response.decision_id, response.library_examples) == (kept.decision_id, 1)

    async def test_the_routing_decision_notes_the_embedding_score(self, tmp_path: Path) -> None:
        """The embedding stage explains its pick in the reasons."""
        served = Server(settings_from(embedding_config(tmp_path)), port=0)
        async with served as server, RouterClient(server.target) as client:
            decision = await client.route(user_chat("say hello to zulu"), pb.RoutingContext())
        assert any(reason.startswith("embedding: score") for reason in decision.reasons)


async def _complete(client: RouterClient, prompt: str, **context: object) -> list[pb.CompleteResponse]:
    return [message async for message in client.complete(user_chat(prompt), pb.RoutingContext(**context))]  # type: ignore[arg-type]


class TestFeedbackIsAboutTheAnswer:
    async def test_an_escalated_answer_is_rated_under_the_model_that_gave_it(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """The weak model's answer is rejected and the strong one answers: a thumbs-up rates the
        strong model's answer, so it is filed under it and does not teach that the weak model
        did well on this prompt (the library keeps weak-model outcomes only)."""
        settings = settings_from(embedding_config(tmp_path), live_environ(fake))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            fake.enqueue(Script(text="I'm sorry, but I can't help with that."), model="gpt-4o-mini")
            fake.enqueue(Script(text="Hello, zulu."), model="gpt-4o")
            messages = await _complete(client, "say hello to zulu", cascade=True)
            response = await client.feedback(messages[0].decision.decision_id, thumbs_up=True)
        assert (messages[0].decision.model, messages[-1].completion.model) == ("gpt-4o-mini", "gpt-4o")
        assert (response.model, response.library_examples) == ("gpt-4o", 0)

    async def test_an_escalated_answer_cut_after_its_text_is_rated_and_counted_under_its_model(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """The strong model's stream, after the escalation, is cut once 5 chunks were sent: the
        caller saw only its text, so feedback is filed under it and GetStats counts the request
        under it (both went to the rejected weak model, whose answer the caller never saw)."""
        settings = settings_from(embedding_config(tmp_path), live_environ(fake))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            fake.enqueue(Script(text="I'm sorry, but I can't help with that."), model="gpt-4o-mini")
            fake.enqueue(Script(chunk_count=20, fault=Fault.CUT, fault_after=5), model="gpt-4o")
            messages: list[pb.CompleteResponse] = []

            async def complete() -> None:
                async for message in client.complete(user_chat("say hello to zulu"), pb.RoutingContext(cascade=True)):
                    messages.append(message)

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await complete()
            response = await client.feedback(messages[0].decision.decision_id, thumbs_up=False)
            stats = await client.get_stats()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sum(m.WhichOneof("event") == "delta" for m in messages) == 5
        assert response.model == "gpt-4o"
        assert [(m.model, m.totals.requests) for m in stats.models] == [("gpt-4o", 1)]

    async def test_a_released_fallback_answer_the_caller_left_is_rated_under_the_fallback(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """In a cascade step, gpt-4o-mini fails and its fallback claude-sonnet answers; the answer
        is released, ~12 MB, and the caller leaves after its first delta, while the rest is still
        being sent: what it saw was claude-sonnet's, so feedback is filed under claude-sonnet (it
        went to the decided gpt-4o-mini, re-filed only once the whole answer had been sent)."""
        config = embedding_config(tmp_path)
        config["routing"]["fallbacks"] = {"gpt-4o-mini": ["claude-sonnet"]}  # type: ignore[index]
        config["cascade"]["scorers"] = ["local"]  # type: ignore[index]
        settings = settings_from(config, live_environ(fake))
        fake.enqueue(Script(status=503), Script(status=503), model="gpt-4o-mini")
        fake.enqueue(Script(chunks=tuple("x" * 4000 + f" {i} " for i in range(3000))), model="claude-sonnet-4-6")
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            call = client.complete(user_chat("say hello to zulu"), pb.RoutingContext(cascade=True))
            decision_id = ""
            async for message in call:
                if message.WhichOneof("event") == "decision":
                    decision_id = message.decision.decision_id
                elif message.WhichOneof("event") == "delta":
                    break
            await call.aclose()  # the caller leaves after the first delta
            async with asyncio.timeout(15):
                while (await client.get_stats()).totals.requests < 1:  # noqa: ASYNC110 - the call's end is polled through GetStats
                    await asyncio.sleep(0.05)
            response = await client.feedback(decision_id, thumbs_up=False)
        assert [r.model for r in fake.requests] == ["gpt-4o-mini", "gpt-4o-mini", "claude-sonnet-4-6"]
        assert response.model == "claude-sonnet"

    async def test_a_fallback_answer_is_rated_under_the_fallback(self, tmp_path: Path, fake: FakeProvider) -> None:
        """The decided model fails and its fallback answers: feedback is about the fallback's answer."""
        config = embedding_config(tmp_path)
        config["routing"]["fallbacks"] = {"gpt-4o-mini": ["gpt-4o"]}  # type: ignore[index]
        settings = settings_from(config, live_environ(fake))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            fake.enqueue(Script(status=503), Script(status=503), model="gpt-4o-mini")
            messages = await _complete(client, "say hello to zulu")
            response = await client.feedback(messages[0].decision.decision_id, thumbs_up=False)
        assert messages[-1].completion.model == "gpt-4o"
        assert (response.model, response.library_examples) == ("gpt-4o", 0)

    async def test_repeated_feedback_on_a_decision_counts_once_in_the_stats(self, tmp_path: Path) -> None:
        """The latest score of a decision is its outcome, in GetStats as in the library."""
        settings = settings_from(embedding_config(tmp_path))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            for score in (0.0, 0.0, 1.0):
                await client.feedback(decision.decision_id, score=score)
            other = await client.route(user_chat("say goodbye to zulu"))
            await client.feedback(other.decision_id, score=0.5)
            stats = await client.get_stats()
        [row] = [m for m in stats.models if m.model == "gpt-4o-mini"]
        assert (row.feedback_count, row.mean_feedback_score) == (2, 0.75)


class TestFeedbackBelongsToTheDecisionsTenant:
    async def test_with_auth_off_feedback_counts_for_the_tenant_the_decision_was_routed_for(
        self, tmp_path: Path
    ) -> None:
        """A decision routed for acme and rated by a caller that names no tenant counts in acme's
        GetStats, not in an unnamed tenant's (it was filed under the caller's tenant, "")."""
        settings = settings_from(embedding_config(tmp_path))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            decision = await client.route(user_chat("say hello to zulu"), pb.RoutingContext(tenant="acme"))
            await client.feedback(decision.decision_id, thumbs_up=False)
            acme = await client.get_stats(tenant="acme")
        assert [(m.model, m.feedback_count, m.mean_feedback_score) for m in acme.models] == [("gpt-4o-mini", 1, 0.0)]

    async def test_with_auth_on_only_the_decisions_tenant_may_rate_it(self, tmp_path: Path) -> None:
        """globex rating acme's decision is NOT_FOUND UNKNOWN_DECISION with the message of an id
        never seen (the decision's existence is not revealed), and nothing is stored or learnt;
        acme rating it is recorded and counts in acme's stats."""
        config = embedding_config(tmp_path)
        config["auth"] = {"enabled": True}
        config["tenants"] = {
            "acme": {"api_key_sha256": [key_digest("acme-key")]},
            "globex": {"api_key_sha256": [key_digest("globex-key")]},
        }
        async with Server(settings_from(config), port=0) as server:
            [stage] = server.router.policy.learning_stages
            assert stage.feedback is not None
            async with RouterClient(server.target, api_key="acme-key") as acme:
                decision = await acme.route(user_chat("say hello to zulu"))
                async with RouterClient(server.target, api_key="globex-key") as globex:
                    refused = await _feedback_error(globex, decision.decision_id, thumbs_up=False)
                    unknown = await _feedback_error(globex, "no-such-decision", thumbs_up=False)
                    globex_stats = await globex.get_stats()
                stored_after_refusal = await asyncio.to_thread(stage.feedback.examples)
                response = await acme.feedback(decision.decision_id, thumbs_up=False)
                acme_stats = await acme.get_stats()
        assert (refused.code(), error_info(refused).reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_DECISION")
        assert (refused.details() or "").replace(decision.decision_id, "no-such-decision") == unknown.details()
        assert (stored_after_refusal, list(globex_stats.models)) == ([], [])
        assert (response.model, response.library_examples) == ("gpt-4o-mini", 1)
        assert [(m.model, m.feedback_count) for m in acme_stats.models] == [("gpt-4o-mini", 1)]

    @pytest.mark.parametrize("scope", ["tenant", "shared"])
    async def test_the_library_size_answered_counts_only_the_decisions_tenant(self, tmp_path: Path, scope: str) -> None:
        """With auth on and feedback_scope tenant, a FeedbackResponse's ``library_examples``
        counts the examples of the decision's tenant, the ones that move its routing (it counted
        every tenant's, telling acme how much globex rates); with shared, every tenant's."""
        config = embedding_config(tmp_path, feedback_scope=scope)
        config["auth"] = {"enabled": True}
        config["tenants"] = {
            "acme": {"api_key_sha256": [key_digest("acme-key")]},
            "globex": {"api_key_sha256": [key_digest("globex-key")]},
        }
        async with Server(settings_from(config), port=0) as server:
            async with RouterClient(server.target, api_key="globex-key") as globex:
                for prompt in ("globex says hello", "globex says goodbye"):
                    decision = await globex.route(user_chat(prompt))
                    await globex.feedback(decision.decision_id, thumbs_up=False)
            async with RouterClient(server.target, api_key="acme-key") as acme:
                decision = await acme.route(user_chat("acme says hello"))
                response = await acme.feedback(decision.decision_id, thumbs_up=False)
                repeated = await acme.feedback(decision.decision_id, thumbs_up=False)
        expected = 1 if scope == "tenant" else 3
        assert (response.library_examples, repeated.library_examples) == (expected, expected)


async def _rated(client: RouterClient, decision_id: str, *, after: float = 0.0, timeout: float | None = None) -> str:
    """A thumbs-down Feedback for ``decision_id`` sent ``after`` seconds from now: ``OK``, or its
    error's reason and details."""
    await asyncio.sleep(after)
    try:
        await client.feedback(decision_id, thumbs_up=False, timeout=timeout)
    except grpc.aio.AioRpcError as error:
        return f"{error_info(error).reason} {error.details()}"
    return "OK"


async def _timed_rating(client: RouterClient, decision_id: str, *, after: float = 0.0) -> tuple[str, float]:
    """``_rated``'s error reason (or ``OK``) and how long the call took from its sending."""
    await asyncio.sleep(after)
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await _rated(client, decision_id)
    return answer.split()[0], loop.time() - started


async def _flushed_stores(server: Server) -> list[FeedbackStore]:
    """The feedback stores of the server's learning stages, each with its queued writes written."""
    stores = [stage.feedback for stage in server.router.policy.learning_stages]
    for store in stores:
        assert store is not None
        assert await asyncio.to_thread(store.flush)
    return [store for store in stores if store is not None]


async def _cancelled_feedback(
    client: RouterClient, decision_id: str, *, after: float, timeout: float | None = None
) -> None:
    """A thumbs-down Feedback for ``decision_id`` that its client cancels ``after`` seconds on."""
    call = asyncio.ensure_future(client.feedback(decision_id, thumbs_up=False, timeout=timeout))
    await asyncio.sleep(after)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def _decisions_written(server: Server) -> None:
    """Write the decisions ``server`` has routed to its feedback file now (not at the next flush)."""
    [stage] = server.router.policy.learning_stages
    assert stage.feedback is not None
    assert await asyncio.to_thread(stage.feedback.flush)


@asynccontextmanager
async def _another_process(script: str, *args: str, ready: bytes) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real Python process running ``script`` with ``args``: entered once it has printed
    ``ready`` (its lock or row taken), left once it has exited."""
    other = await asyncio.create_subprocess_exec(sys.executable, "-c", script, *args, stdout=asyncio.subprocess.PIPE)
    try:
        assert other.stdout is not None
        assert await other.stdout.readline() == ready + b"\n"
        yield other
    finally:
        await other.wait()


# A real process writing the SQLite file ``argv[1]`` for ``argv[2]`` seconds as another worker
# would: a write every 10 ms, each holding the file's lock 1 ms.
_BRIEF_WRITES = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5)
connection.execute("CREATE TABLE IF NOT EXISTS other_worker (v)")
print("writing", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    connection.execute("BEGIN IMMEDIATE")
    connection.execute("INSERT INTO other_worker VALUES (1)")
    time.sleep(0.001)
    connection.execute("COMMIT")
    time.sleep(0.009)
"""


# A real process holding the write lock of the SQLite file ``argv[1]`` for ``argv[2]`` seconds.
_LOCK_HOLDER = (
    "import sqlite3, sys, time\n"
    "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "db.execute('BEGIN IMMEDIATE')\n"
    "print('locked', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
    "db.execute('ROLLBACK')\n"
)


# A real process taking the decision ``argv[2]`` out of the feedback file ``argv[1]`` and putting it
# back 0.1 s later: another worker's decision, its write still queued when the Feedback comes.
_LATE_WRITER = (
    "import sqlite3, sys, time\n"
    "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "db.execute('BEGIN IMMEDIATE')\n"
    "row = db.execute('SELECT * FROM decisions WHERE decision_id = ?', (sys.argv[2],)).fetchone()\n"
    "db.execute('DELETE FROM decisions WHERE decision_id = ?', (sys.argv[2],))\n"
    "db.execute('COMMIT')\n"
    "print('taken', flush=True)\n"
    "time.sleep(0.1)\n"
    "db.execute('INSERT INTO decisions VALUES (' + ', '.join('?' * len(row)) + ')', row)\n"
)


class TestFeedbackStoreUnderContention:
    async def test_a_locked_feedback_file_holds_up_no_route(self, tmp_path: Path) -> None:
        """Another process holds the feedback file's write lock (a second worker, a ``sqlite3``
        shell, a backup): Routes are answered at once and the event loop never waits; the
        decisions are written once the lock is released and then take feedback."""
        settings = settings_from(embedding_config(tmp_path))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            await client.route(user_chat("warm up"))
            with write_locked(tmp_path / "feedback.db"):
                started = time.monotonic()
                decision = await client.route(user_chat("say hello to zulu"))
                # The in-process server runs on this loop: a short sleep that overran would
                # mean the loop was held up.
                slept = time.monotonic()
                await asyncio.sleep(0.05)
                overslept = time.monotonic() - slept - 0.05
                routed_in = time.monotonic() - started
            response = await client.feedback(decision.decision_id, thumbs_up=False)
        # The failure this guards against held the loop for the whole 5 s busy timeout; the bounds
        # leave a loaded machine room (as the reload test's do).
        assert (routed_in < 2.5, overslept < 2.5) == (True, True)
        assert (response.model, response.library_examples) == ("gpt-4o-mini", 1)

    async def test_a_reload_while_the_file_is_locked_holds_up_no_call(self, tmp_path: Path) -> None:
        """The old router's store, retired by a reload, writes its queued decisions before it
        closes; while another process locks the file that waits (SQLite's 5 s busy timeout), in a
        worker thread: the event loop goes on, and a Route right after the reload is answered."""
        moved = embedding_config(tmp_path)
        moved["routing"]["stages"][0]["feedback_db"] = str(tmp_path / "other.db")  # type: ignore[index]
        served = Server(settings_from(embedding_config(tmp_path)), port=0)
        async with served as server, RouterClient(server.target) as client:
            await client.route(user_chat("warm up"))
            with write_locked(tmp_path / "feedback.db"):
                await client.route(user_chat("say hello to zulu"))
                await asyncio.sleep(0.1)  # the writer now waits on the lock
                await server.reload(settings_from(moved))
                started = time.monotonic()
                slept = time.monotonic()
                await asyncio.sleep(0.05)
                overslept = time.monotonic() - slept - 0.05
                await client.route(user_chat("another prompt"))
                routed_in = time.monotonic() - started
        # The failure this guards against held the loop for the whole 5 s busy timeout.
        assert (overslept < 2.5, routed_in < 2.5) == (True, True)

    async def test_a_reload_opening_a_file_another_process_locks_holds_up_no_route(self, tmp_path: Path) -> None:
        """A reload opens the stages' feedback stores anew, here the same file, while another
        process holds its write lock: opening waits for the lock (up to SQLite's 5 s busy
        timeout), in a worker thread, so a Route sent during the reload is answered before the
        reload ends (it held up the event loop, every call with it, until the lock was released
        or the timeout rejected the reload); once the lock is released the reload is applied."""
        config = embedding_config(tmp_path)
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            old_router = server.router
            await client.route(user_chat("warm up"))
            with write_locked(tmp_path / "feedback.db"):
                reload = asyncio.create_task(server.reload(settings_from(config)))
                await client.route(user_chat("say hello to zulu"))
                reloading_when_routed = not reload.done()
            await reload
            decision = await client.route(user_chat("say goodbye to zulu"))
            replaced = server.router is not old_router
        assert (reloading_when_routed, replaced, decision.model) == (True, True, "gpt-4o-mini")

    async def test_feedback_given_while_a_reload_builds_moves_the_new_routers_routing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A thumbs-down served by the old router after the reload's policy read its library, and
        before the swap, reaches the new router's library too (it was in the file only: since a
        Feedback changes just its example, the new library never learnt it until the next
        reload). The build is held after reading the library, so the Feedback comes in between."""
        built, release = threading.Event(), threading.Event()
        build = router_module._policy_for

        def held_build(*args: Any, **kwargs: Any) -> Policy:
            policy = build(*args, **kwargs)
            built.set()
            release.wait(30)
            return policy

        config = embedding_config(tmp_path, feedback_weight=1.0)
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            monkeypatch.setattr(router_module, "_policy_for", held_build)
            reload = asyncio.create_task(server.reload(settings_from(config)))
            await asyncio.to_thread(built.wait, 30)
            await client.feedback(decision.decision_id, thumbs_up=False)
            release.set()
            await reload
            again = await client.route(user_chat("say hello to zulu"))
        assert decision.model == "gpt-4o-mini"
        assert (again.model, "moved by 1 feedback example" in " ".join(again.reasons)) == ("gpt-4o", True)

    async def test_feedback_while_another_process_holds_the_lock_is_unavailable_and_retryable(
        self, tmp_path: Path
    ) -> None:
        """Another process holds the feedback file's write lock past SQLite's busy timeout (5 s)
        when a Feedback call comes: UNAVAILABLE FEEDBACK_STORE_BUSY with a 1 s RetryInfo, naming
        feedback_db (it was INTERNAL "internal error", logged as our bug), and the same call sent
        again once the lock is free is recorded."""
        settings = settings_from(embedding_config(tmp_path))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            await _decisions_written(server)
            with write_locked(tmp_path / "feedback.db"):
                error = await _feedback_error(client, decision.decision_id, thumbs_up=False)
            response = await client.feedback(decision.decision_id, thumbs_up=False)
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.UNAVAILABLE, "FEEDBACK_STORE_BUSY")
        assert retry_delay(error) == 1.0
        assert "feedback_db" in (error.details() or "")
        assert (response.model, response.library_examples) == ("gpt-4o-mini", 1)

    async def test_feedback_calls_queued_behind_one_waiting_for_another_processs_lock_are_told_the_file_is_locked(
        self, tmp_path: Path
    ) -> None:
        """Another process (a real one) holds the file's write lock for 3 s, less than the busy
        timeout (so the file is never known locked), while 6 Feedback calls come at once, each with
        a 1 s deadline: the first waits for the lock on the feedback thread, the others queue
        behind it. Every one is UNAVAILABLE FEEDBACK_STORE_BUSY naming the file, "stayed locked by
        another process", nothing stored. The queued ones were told "the Feedback calls before
        this one took this call's time", though what took it was the other process's lock."""
        path = tmp_path / "feedback.db"
        async with (
            Server(settings_from(embedding_config(tmp_path)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            decisions = [await client.route(user_chat(f"say hello to zulu {i}")) for i in range(6)]
            await _decisions_written(server)
            async with _another_process(_LOCK_HOLDER, str(path), "3", ready=b"locked"):
                errors = await asyncio.gather(
                    *(_feedback_error(client, d.decision_id, thumbs_up=False, timeout=1.0) for d in decisions)
                )
            [store] = await _flushed_stores(server)
            stored = await asyncio.to_thread(store.entries)
        assert [(e.code(), error_info(e).reason) for e in errors] == [
            (grpc.StatusCode.UNAVAILABLE, "FEEDBACK_STORE_BUSY")
        ] * 6
        assert [e.details() for e in errors] == [
            f"feedback_db {path} stayed locked by another process; retry shortly"
        ] * 6
        assert stored == []

    @pytest.mark.parametrize("other_worker", [False, True], ids=["alone", "beside-another-worker"])
    async def test_feedback_calls_queued_past_their_deadline_on_an_unlocked_file_claim_no_lock(
        self, tmp_path: Path, other_worker: bool
    ) -> None:
        """Two stages (two files to write for each call); 1,500 Feedback calls come at once (15
        on each of 100 decisions, no deadline) on files no other process locks for long, then 20
        with a 0.3 s deadline, queued behind them on the feedback thread: those are
        FeedbackStoreBusy saying the calls before them took their time (or that their time ran
        out before they wrote a file), none naming a file locked: no lock was met. So too beside
        another worker (a real process) writing the first file every 10 ms, each write holding
        its lock 1 ms: a write that meets one waits a few ms, no lock that "stayed" (such calls
        named the file locked). The calls go to the server's router (gRPC's own work for 1,500
        calls on the one loop, client's and server's, delays the server's answers past short
        deadlines: DEADLINE_EXCEEDED)."""
        async with contextlib.AsyncExitStack() as stack:
            server = await stack.enter_async_context(Server(settings_from(two_stage_config(tmp_path)), port=0))
            client = await stack.enter_async_context(RouterClient(server.target))
            decisions = await asyncio.gather(*(client.route(user_chat(f"say hello to zulu {i}")) for i in range(100)))
            await _flushed_stores(server)
            if other_worker:
                await stack.enter_async_context(
                    _another_process(_BRIEF_WRITES, str(tmp_path / "feedback.db"), "6", ready=b"writing")
                )

            async def rated(decision_id: str, score: float, timeout: float | None, after: float = 0.0) -> str:
                await asyncio.sleep(after)
                try:
                    await server.router.feedback(decision_id, score, timeout=timeout)
                except FeedbackStoreBusy as error:
                    return str(error)
                return "OK"

            answers = await asyncio.gather(
                *(rated(d.decision_id, wave % 2, None) for wave in range(15) for d in decisions),
                *(rated(d.decision_id, 1.0, 0.3, after=0.05) for d in decisions[:20]),
            )
        queued = answers[1500:]
        assert answers[:1500] == ["OK"] * 1500
        assert [answer for answer in queued if "locked" in answer] == []
        assert "feedback: the Feedback calls before this one took this call's time; retry shortly" in queued

    async def test_feedback_calls_piling_up_on_a_locked_file_are_each_busy_after_one_busy_timeout(
        self, tmp_path: Path
    ) -> None:
        """Another process (a real one) holds the file's write lock for 12 s while 8 Feedback
        calls come at once: every one is UNAVAILABLE FEEDBACK_STORE_BUSY about one busy timeout
        (5 s) after it came, and asyncio's default executor stays free meanwhile. They queued on
        one lock, each in a default-executor thread: the first was busy at 5 s, the second at
        10 s, the others recorded when the lock went at 12 s (clients saw their deadlines pass),
        and a job for the default executor waited seconds behind them."""
        settings = settings_from(embedding_config(tmp_path))
        holder = (
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(12)\n"
            "db.execute('ROLLBACK')\n"
        )
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            decisions = [await client.route(user_chat(f"say hello to zulu {i}")) for i in range(8)]
            await _decisions_written(server)
            async with _another_process(holder, str(tmp_path / "feedback.db"), ready=b"locked"):
                loop = asyncio.get_running_loop()

                async def default_executor_wait() -> float:
                    await asyncio.sleep(1.0)  # the Feedback calls are waiting by now
                    queued = loop.time()
                    started = await loop.run_in_executor(None, loop.time)
                    return started - queued

                *answers, waited = await asyncio.gather(
                    *(_timed_rating(client, d.decision_id) for d in decisions), default_executor_wait()
                )
        assert [outcome for outcome, _ in answers] == ["FEEDBACK_STORE_BUSY"] * 8
        assert max(seconds for _, seconds in answers) < 8.0  # the busy timeout (5 s) and a margin
        assert waited < 1.0

    async def test_with_routes_flowing_feedback_calls_on_a_locked_file_are_each_busy_after_one_busy_timeout(
        self, tmp_path: Path
    ) -> None:
        """Another process (a real one) locks the file for 10 s while Routes flow (one every
        0.25 s). The first Feedback comes with one, so it waits the busy timeout for its store's
        queued writes (the writer thread waiting on the lock), not for the lock itself; a second
        Feedback comes 0.5 s later. Each is FEEDBACK_STORE_BUSY about one busy timeout after it came. The wait
        for the queued write did not make the file known locked (only the writer's own failure
        did, a moment later), so the second counted a fresh busy timeout from its turn, and was
        answered after ~9.5 s."""
        settings = settings_from(embedding_config(tmp_path))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            decisions = [await client.route(user_chat(f"say hello to zulu {i}")) for i in range(2)]
            await _decisions_written(server)
            async with _another_process(_LOCK_HOLDER, str(tmp_path / "feedback.db"), "10", ready=b"locked"):

                async def routes() -> None:
                    for i in range(40):  # a Route every 0.25 s, each queueing a write
                        await client.route(user_chat(f"say hello to yankee {i}"))
                        await asyncio.sleep(0.25)

                routing = asyncio.ensure_future(routes())
                first, second = await asyncio.gather(
                    _timed_rating(client, decisions[0].decision_id),
                    _timed_rating(client, decisions[1].decision_id, after=0.5),
                )
                await routing
        assert (first[0], second[0]) == ("FEEDBACK_STORE_BUSY", "FEEDBACK_STORE_BUSY")
        assert (first[1] < 7.0, second[1] < 7.0) == (True, True)  # the busy timeout (5 s) and a margin

    async def test_feedback_calls_queued_behind_this_processs_own_feedback_are_not_refused_as_busy(
        self, tmp_path: Path
    ) -> None:
        """900 Feedback calls come at once (9 on each of 100 decisions) while another process (a
        real one) holds the file's write lock for 3.5 s, lets it go for 0.25 s, and takes it
        again for 3.5 s: never past the busy timeout (5 s), so every call is recorded, though
        the last wait about 8 s in all, most of it behind this process's own Feedback calls on
        the one feedback thread. The busy timeout counted from each call's arrival, that queue
        included: the call that met the second hold had ~1.5 s of it left, and it and all after
        it were UNAVAILABLE FEEDBACK_STORE_BUSY "stayed locked by another process" (as were the
        calls of a burst of ~1,800 on a file nobody else touches, queued 5 s behind the others)."""
        settings = settings_from(embedding_config(tmp_path))
        holder = (
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(3.5)\n"
            "db.execute('ROLLBACK')\n"
            "time.sleep(0.25)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "time.sleep(3.5)\n"
            "db.execute('ROLLBACK')\n"
        )
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            decisions = await asyncio.gather(*(client.route(user_chat(f"say hello to zulu {i}")) for i in range(100)))
            await _decisions_written(server)

            async def rated(decision_id: str, thumbs_up: bool) -> str:
                try:
                    await client.feedback(decision_id, thumbs_up=thumbs_up, timeout=60)
                except grpc.aio.AioRpcError as error:
                    return f"{error.code().name} {error.details()}"
                return "OK"

            async with _another_process(holder, str(tmp_path / "feedback.db"), ready=b"locked"):
                started = time.monotonic()
                answers = await asyncio.gather(
                    *(rated(d.decision_id, wave % 2 == 0) for wave in range(9) for d in decisions)
                )
                took = time.monotonic() - started
        assert {answer: answers.count(answer) for answer in set(answers)} == {"OK": 900}, f"in {took:.1f} s"
        assert took > 7.0  # the last did wait past the busy timeout in all

    async def test_calls_queued_behind_a_feedback_its_deadline_cut_in_a_brief_lock_are_stored(
        self, tmp_path: Path
    ) -> None:
        """Two stages, two files; another process (a real one) locks the second file for 0-4.8 s
        and the first for 1-5.8 s: no lock lasts the busy timeout (5 s). A (no deadline, sent at
        0 s) is stored at ~4.8 s; C (5.4 s deadline, at 0.05 s) then meets the first file's lock
        and is FEEDBACK_STORE_BUSY at its answer_by (~5.35 s), nothing stored; B0..B9 (no
        deadline, at 0.1 s), queued behind both, wait for that lock and are stored at ~5.8 s.
        C's wait cut by its deadline made the file "known locked", so the B calls counted the
        busy timeout from their arrival, past it already: all UNAVAILABLE FEEDBACK_STORE_BUSY
        "stayed locked by another process" at once, without waiting for the lock."""
        config = two_stage_config(tmp_path)
        holder = (
            "import sqlite3, sys, time\n"
            "first = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "second = sqlite3.connect(sys.argv[2], isolation_level=None)\n"
            "second.execute('BEGIN IMMEDIATE')\n"
            "t0 = time.monotonic()\n"
            "print('locked', flush=True)\n"
            "time.sleep(1.0)\n"
            "first.execute('BEGIN IMMEDIATE')\n"
            "time.sleep(4.8 - (time.monotonic() - t0))\n"
            "second.execute('ROLLBACK')\n"
            "time.sleep(5.8 - (time.monotonic() - t0))\n"
            "first.execute('ROLLBACK')\n"
        )
        server = Server(settings_from(config), port=0)
        async with server, RouterClient(server.target, default_timeout=None) as client:
            decisions = [await client.route(user_chat(f"say hello to zulu {i}")) for i in range(12)]
            for stage in server.router.policy.learning_stages:
                assert stage.feedback is not None
                assert await asyncio.to_thread(stage.feedback.flush)

            async with _another_process(
                holder, str(tmp_path / "feedback.db"), str(tmp_path / "second.db"), ready=b"locked"
            ):
                a, c, *b = await asyncio.gather(
                    _rated(client, decisions[0].decision_id),
                    _rated(client, decisions[1].decision_id, timeout=5.4, after=0.05),
                    *(_rated(client, d.decision_id, after=0.1) for d in decisions[2:]),
                )
            [first, _] = server.router.policy.learning_stages
            assert first.feedback is not None
            stored = {entry.decision_id for entry in await asyncio.to_thread(first.feedback.entries)}
        assert (a, c.split()[0], b) == ("OK", "FEEDBACK_STORE_BUSY", ["OK"] * 10)
        assert stored == {d.decision_id for d in decisions} - {decisions[1].decision_id}

    async def test_a_lock_wait_shortened_by_another_stores_brief_lock_leaves_later_calls_their_busy_timeout(
        self, tmp_path: Path
    ) -> None:
        """Two stages, two files; another process (a real one) locks the first file for 0-4 s and
        the second for 3-7 s: no lock lasts the busy timeout (5 s). A (no deadline, sent at 0 s)
        waits 4 s for the first file, stores there, then has 1 s of its busy timeout left for
        the second: FEEDBACK_STORE_BUSY at ~5 s (the documented partial store). B0..B9 (no
        deadline, at 0.1 s), queued behind A, count the busy timeout from their turn and are all
        stored at ~7 s. A's 1 s wait marked the second file "known locked", so the B calls
        counted it from their arrival, past it already: all FEEDBACK_STORE_BUSY "stayed locked
        by another process" at once, though no lock lasted 5 s."""
        holder = (
            "import sqlite3, sys, time\n"
            "first = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "second = sqlite3.connect(sys.argv[2], isolation_level=None)\n"
            "first.execute('BEGIN IMMEDIATE')\n"
            "t0 = time.monotonic()\n"
            "print('locked', flush=True)\n"
            "time.sleep(3.0)\n"
            "second.execute('BEGIN IMMEDIATE')\n"
            "time.sleep(4.0 - (time.monotonic() - t0))\n"
            "first.execute('ROLLBACK')\n"
            "time.sleep(7.0 - (time.monotonic() - t0))\n"
            "second.execute('ROLLBACK')\n"
        )
        server = Server(settings_from(two_stage_config(tmp_path)), port=0)
        async with server, RouterClient(server.target, default_timeout=None) as client:
            decisions = [await client.route(user_chat(f"say hello to zulu {i}")) for i in range(11)]
            stores = await _flushed_stores(server)

            async with _another_process(
                holder, str(tmp_path / "feedback.db"), str(tmp_path / "second.db"), ready=b"locked"
            ):
                a, *b = await asyncio.gather(
                    _rated(client, decisions[0].decision_id),
                    *(_rated(client, d.decision_id, after=0.1) for d in decisions[1:]),
                )
            assert stores[1] is not None
            stored = {entry.decision_id for entry in await asyncio.to_thread(stores[1].entries)}
            known_locked = [store.known_locked for store in stores if store is not None]
        assert (a.split()[0], b) == ("FEEDBACK_STORE_BUSY", ["OK"] * 10)
        assert stored == {d.decision_id for d in decisions[1:]}
        assert known_locked == [False, False]

    async def test_a_call_refused_while_a_file_is_known_locked_names_that_file(self, tmp_path: Path) -> None:
        """Two stages; another process (a real one) locks the second file for 14 s: the writer's
        write of a routed decision waits the busy timeout and fails, so that file is known locked.
        A Feedback (no deadline) then waits over 5 s for its turn on the feedback thread (held
        here): it is FEEDBACK_STORE_BUSY at its turn, naming the second file, the one locked. It
        named the first, which nobody had locked. So is one with a 2 s deadline, still queued at
        its end (it named the first file, saying the Feedback calls before it took its time)."""
        holder = (
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(14)\n"
            "db.execute('ROLLBACK')\n"
        )
        server = Server(settings_from(two_stage_config(tmp_path)), port=0)
        async with server, RouterClient(server.target, default_timeout=None) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            _, second = await _flushed_stores(server)
            async with _another_process(holder, str(tmp_path / "second.db"), ready=b"locked"):
                await client.route(user_chat("say hello to yankee"))
                assert await asyncio.to_thread(second.flush)  # its write waited 5 s and failed
                assert second.known_locked
                release = threading.Event()
                # The feedback thread busy (as with the Feedback calls of a burst before this one).
                held = server.router._learning.executor.submit(release.wait)
                call = asyncio.ensure_future(_feedback_error(client, decision.decision_id, thumbs_up=False))
                queued = await _feedback_error(client, decision.decision_id, thumbs_up=False, timeout=2.0)
                await asyncio.sleep(5.0)  # past the call's busy timeout, counted from its arrival
                release.set()
                await asyncio.wrap_future(held)
                error = await call
        for refused in (error, queued):
            assert error_info(refused).reason == "FEEDBACK_STORE_BUSY"
            assert f"feedback_db {tmp_path / 'second.db'} stayed locked" in (refused.details() or "")
            assert str(tmp_path / "feedback.db") not in (refused.details() or "")

    async def test_a_feedback_the_client_cancels_while_it_waits_for_the_lock_is_not_stored(
        self, tmp_path: Path
    ) -> None:
        """Another process (a real one) locks the file for 3 s; a Feedback with no deadline,
        waiting for that lock on the feedback thread, is cancelled by its client at 1 s: nothing
        of it is stored, once the lock is free either, and GetStats counts only what was stored;
        the same Feedback sent again is stored. It was stored at 3 s, the client told CANCELLED,
        and never counted in GetStats."""
        holder = (
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(3)\n"
            "db.execute('ROLLBACK')\n"
        )
        settings = settings_from(embedding_config(tmp_path))
        async with Server(settings, port=0) as server, RouterClient(server.target, default_timeout=None) as client:
            cancelled, rated = [await client.route(user_chat(f"say hello to zulu {i}")) for i in range(2)]
            await _decisions_written(server)
            async with _another_process(holder, str(tmp_path / "feedback.db"), ready=b"locked"):
                await _cancelled_feedback(client, cancelled.decision_id, after=1.0)
            # Behind whatever of the cancelled call still ran on the feedback thread.
            await client.feedback(rated.decision_id, thumbs_up=True)
            [stage] = server.router.policy.learning_stages
            assert stage.feedback is not None
            stored = await asyncio.to_thread(stage.feedback.entries)
            counted = sum(model.feedback_count for model in (await client.get_stats()).models)
            again = await client.feedback(cancelled.decision_id, thumbs_up=False)
            counted_again = sum(model.feedback_count for model in (await client.get_stats()).models)
        assert [(entry.decision_id, entry.score) for entry in stored] == [(rated.decision_id, 1.0)]
        assert (counted, again.library_examples, counted_again) == (1, 2, 2)

    async def test_with_two_stages_a_feedback_cancelled_after_the_first_file_stored_it_is_stored_and_counted(
        self, tmp_path: Path
    ) -> None:
        """Two stages; another process (a real one) locks the second file for 3 s. A Feedback
        with no deadline is stored in the first file, then waits for the second's lock, and is
        cancelled by its client at 1 s: once a file's lock was taken the call is finished, so it
        is stored in both files and counted in GetStats once. The cancel rolled back the second
        file only: half stored, the client told CANCELLED, GetStats counting nothing."""
        server = Server(settings_from(two_stage_config(tmp_path)), port=0)
        async with server, RouterClient(server.target, default_timeout=None) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            stores = await _flushed_stores(server)
            async with _another_process(_LOCK_HOLDER, str(tmp_path / "second.db"), "3", ready=b"locked"):
                await _cancelled_feedback(client, decision.decision_id, after=1.0)
            # Behind whatever of the cancelled call still ran on the feedback thread.
            await asyncio.wrap_future(server.router._learning.executor.submit(lambda: None))
            stored = [
                [(e.decision_id, e.score) for e in await asyncio.to_thread(store.entries)]
                for store in stores
                if store is not None
            ]
            counted = sum(model.feedback_count for model in (await client.get_stats()).models)
        assert stored == [[(decision.decision_id, 0.0)]] * 2
        assert counted == 1

    async def test_with_two_stages_a_cancelled_feedback_whose_second_file_stays_locked_is_counted_and_logged(
        self, tmp_path: Path
    ) -> None:
        """Two stages; another process (a real one) locks the second file for 7 s, past the 5 s
        busy timeout. A Feedback with no deadline is stored in the first file, waits for the
        second's lock and is cancelled by its client at 0.5 s; its wait then ends busy. The
        outcome stays in the first file only (its client, told CANCELLED, will not send it
        again), so it is counted in GetStats as stored and logged ``feedback_partly_stored``
        naming the file not written (no prompt); sent again, it is stored there and counted
        once. It was half stored, counted nowhere and logged nowhere (the job's
        FeedbackStoreBusy read and dropped)."""
        server = Server(settings_from(two_stage_config(tmp_path)), port=0)
        async with server, RouterClient(server.target, default_timeout=None) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            stores = await _flushed_stores(server)
            with capture_logs() as logs:
                async with _another_process(_LOCK_HOLDER, str(tmp_path / "second.db"), "7", ready=b"locked"):
                    await _cancelled_feedback(client, decision.decision_id, after=0.5)
                    # Behind what the cancelled call's job still ran on the feedback thread.
                    await asyncio.wrap_future(server.router._learning.executor.submit(lambda: None))
                    await asyncio.sleep(0.1)
                    stored = [[e.score for e in await asyncio.to_thread(s.entries)] for s in stores if s is not None]
                    counted = sum(model.feedback_count for model in (await client.get_stats()).models)
            again = await client.feedback(decision.decision_id, thumbs_up=False, timeout=5.0)
            stored_again = [[e.score for e in await asyncio.to_thread(s.entries)] for s in stores if s is not None]
            counted_again = sum(model.feedback_count for model in (await client.get_stats()).models)
        partly = [entry for entry in logs if entry["event"] == "feedback_partly_stored"]
        assert stored == [[0.0], []]
        assert counted == 1
        assert [(e["log_level"], e["decision_id"], e["stored"], e["not_stored"], e["error_type"]) for e in partly] == [
            (
                "warning",
                decision.decision_id,
                [str(tmp_path / "feedback.db")],
                [str(tmp_path / "second.db")],
                "FeedbackStoreBusy",
            )
        ]
        assert "zulu" not in str(partly)
        assert (stored_again, counted_again, again.library_examples) == ([[0.0], [0.0]], 1, 2)

    async def test_with_two_stages_a_look_again_stored_in_the_first_file_and_cut_on_the_second_is_busy_not_unknown(
        self, tmp_path: Path
    ) -> None:
        """Two stages; another process (a real one) locks the second file for 4 s, and another
        takes the decision out of the first file and puts it back 0.1 s later (another worker's
        queued write). A Feedback with a 1.5 s deadline finds it unknown, looks again, stores the
        score in the first file, and its wait for the second file's lock is cut at the call's
        end: it is UNAVAILABLE ``FEEDBACK_STORE_BUSY`` (sent again, it is stored in the second
        file), counted in GetStats as stored and logged ``feedback_partly_stored``. It was
        NOT_FOUND ``UNKNOWN_DECISION`` (final: never sent again), half stored, counted nowhere
        and logged nowhere."""
        server = Server(settings_from(two_stage_config(tmp_path)), port=0)
        async with server, RouterClient(server.target, default_timeout=None) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            stores = await _flushed_stores(server)
            with capture_logs() as logs:
                async with _another_process(_LOCK_HOLDER, str(tmp_path / "second.db"), "4", ready=b"locked"):
                    first = str(tmp_path / "feedback.db")
                    async with _another_process(_LATE_WRITER, first, decision.decision_id, ready=b"taken"):
                        error = await _feedback_error(client, decision.decision_id, score=0.0, timeout=1.5)
                    stored = [[e.score for e in await asyncio.to_thread(s.entries)] for s in stores]
                    counted = sum(model.feedback_count for model in (await client.get_stats()).models)
            again = await client.feedback(decision.decision_id, thumbs_up=False, timeout=5.0)
            stored_again = [[e.score for e in await asyncio.to_thread(s.entries)] for s in stores]
            counted_again = sum(model.feedback_count for model in (await client.get_stats()).models)
        partly = [(e["decision_id"], e["stored"], e["not_stored"]) for e in logs if "partly" in e["event"]]
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.UNAVAILABLE, "FEEDBACK_STORE_BUSY")
        assert (stored, counted) == ([[0.0], []], 1)
        assert partly == [(decision.decision_id, [str(tmp_path / "feedback.db")], [str(tmp_path / "second.db")])]
        assert (stored_again, counted_again, again.library_examples) == ([[0.0], [0.0]], 1, 2)

    async def test_a_feedback_with_a_deadline_cancelled_while_it_waits_for_the_lock_logs_no_asyncio_error(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Another process (a real one) locks the file for 3 s; a Feedback with a 30 s deadline,
        waiting for that lock, is cancelled by its client at 1 s: nothing is stored, and nothing
        is logged past the structured log (asyncio logged ``ERROR Future exception was never
        retrieved`` for each such call, its job's CancelledError read by nobody)."""
        settings = settings_from(embedding_config(tmp_path))
        async with Server(settings, port=0) as server, RouterClient(server.target, default_timeout=None) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            await _decisions_written(server)
            async with _another_process(_LOCK_HOLDER, str(tmp_path / "feedback.db"), "3", ready=b"locked"):
                await _cancelled_feedback(client, decision.decision_id, after=1.0, timeout=30.0)
            await asyncio.wrap_future(server.router._learning.executor.submit(lambda: None))
            await asyncio.sleep(0.1)
            gc.collect()
            [stage] = server.router.policy.learning_stages
            assert stage.feedback is not None
            stored = await asyncio.to_thread(stage.feedback.entries)
        assert stored == []
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []

    async def test_a_feedback_that_took_the_lock_before_its_deadline_is_stored_when_a_late_loop_ends_its_call(
        self, tmp_path: Path
    ) -> None:
        """Another process (a real one: a worker with a larger cap) writes 150,000 examples in a
        transaction it holds 2.5 s; a Feedback with a 3.5 s deadline takes the lock then, and its
        new example evicts that rest (over ``feedback_max_total_examples``), seconds of work in
        its transaction. The event loop is held up (blocked on purpose, as by load) across the
        call's answer_by and the server's own end of the call, so both come at once: the call is
        DEADLINE_EXCEEDED, its outcome stored (docs/feedback.md) and counted in GetStats. The
        server's own end was taken for its client's cancel: the transaction was rolled back."""
        writer = (
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "n = 150_000\n"
            'db.executemany("INSERT INTO examples (decision_id, model, embedding, created_at, encoder, tenant)'
            " VALUES (?, 'gpt-4o-mini', x'', 0, '', '')\", ((f'other-{i}',) for i in range(n)))\n"
            "db.execute(\"INSERT INTO example_counts (tenant, examples) VALUES ('', ?)"
            ' ON CONFLICT (tenant) DO UPDATE SET examples = examples + ?", (n, n))\n'
            "print('locked', flush=True)\n"
            "time.sleep(2.5)\n"
            "db.execute('COMMIT')\n"
        )
        config = embedding_config(tmp_path, feedback_max_examples=1, feedback_max_total_examples=1)
        loop = asyncio.get_running_loop()
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            await _decisions_written(server)
            async with _another_process(writer, str(tmp_path / "feedback.db"), ready=b"locked"):
                started = loop.time()
                # answer_by is about started + 3.22, the server's own end about started + 3.32.
                loop.call_at(started + 2.7, time.sleep, 0.7)
                error = await _feedback_error(client, decision.decision_id, thumbs_up=False, timeout=3.5)
            await asyncio.wrap_future(server.router._learning.executor.submit(lambda: None))
            [stage] = server.router.policy.learning_stages
            assert stage.feedback is not None
            stored = await asyncio.to_thread(stage.feedback.entries)
            counted = sum(model.feedback_count for model in (await client.get_stats()).models)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert [(entry.decision_id, entry.score) for entry in stored] == [(decision.decision_id, 0.0)]
        assert counted == 1

    async def test_a_feedback_whose_deadline_comes_while_another_process_locks_the_file_is_busy_before_it(
        self, tmp_path: Path
    ) -> None:
        """Another process (a real one) holds the file's write lock for 3 s; a Feedback with a 1 s
        deadline is UNAVAILABLE FEEDBACK_STORE_BUSY with a 1 s RetryInfo before its deadline, and
        nothing of it is stored, then or once the lock is free. Its wait for the lock ignored the
        deadline: the call was DEADLINE_EXCEEDED and the outcome stored at 3 s all the same."""
        settings = settings_from(embedding_config(tmp_path))
        holder = (
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(3)\n"
            "db.execute('ROLLBACK')\n"
        )
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            refused, rated = [await client.route(user_chat(f"say hello to zulu {i}")) for i in range(2)]
            await _decisions_written(server)
            async with _another_process(holder, str(tmp_path / "feedback.db"), ready=b"locked"):
                started = time.monotonic()
                error = await _feedback_error(client, refused.decision_id, thumbs_up=False, timeout=1.0)
                answered_in = time.monotonic() - started
            # Behind whatever of the refused call still ran on the feedback thread.
            await client.feedback(rated.decision_id, thumbs_up=True)
            [stage] = server.router.policy.learning_stages
            assert stage.feedback is not None
            stored = await asyncio.to_thread(stage.feedback.entries)
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.UNAVAILABLE, "FEEDBACK_STORE_BUSY")
        assert (retry_delay(error), answered_in < 1.0) == (1.0, True)
        assert [(entry.decision_id, entry.score) for entry in stored] == [(rated.decision_id, 1.0)]

    async def test_an_unknown_decision_whose_look_again_queues_behind_a_waiting_feedback_is_not_found_in_one_pass(
        self, tmp_path: Path
    ) -> None:
        """Two stages; an unknown decision is not in the first file at its first look, which also
        reads the second file without waiting for its lock: it does not know it either. Its look
        again then queues on the feedback thread behind another Feedback that waits for the
        second file, which another process (a real one) locks for 4 s: the call is NOT_FOUND
        UNKNOWN_DECISION before its 1.5 s deadline, after one pass on the feedback thread, as with
        one stage. It was UNAVAILABLE FEEDBACK_STORE_BUSY (the first look asked the first file
        only, and only a second pass, the look asking every file, could answer NOT_FOUND: under
        load, most calls for ids no file knows were busy and sent again). Before that the look
        again was waited for past the deadline: DEADLINE_EXCEEDED. A decision the second file
        knows stays FEEDBACK_STORE_BUSY in this case (``TestFeedbackWithAStageThatNeverSawTheDecision``)."""
        config = two_stage_config(tmp_path)
        holder = (
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(4)\n"
            "db.execute('ROLLBACK')\n"
        )
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            for stage in server.router.policy.learning_stages:
                assert stage.feedback is not None
                assert await asyncio.to_thread(stage.feedback.flush)
            async with _another_process(holder, str(tmp_path / "second.db"), ready=b"locked"):
                started = time.monotonic()
                unknown = asyncio.create_task(_feedback_error(client, "no-such-decision", score=0.5, timeout=1.5))
                # After the first look (the first file is free), before the look again (0.05 s on).
                await asyncio.sleep(0.02)
                waiting = asyncio.create_task(client.feedback(decision.decision_id, thumbs_up=False))
                error = await unknown
                answered_in = time.monotonic() - started
                rated = await waiting
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_DECISION")
        assert answered_in < 1.5
        assert rated.library_examples == 2  # the other Feedback, once the lock was free

    async def test_a_decision_another_process_writes_just_after_the_feedback_comes_is_found(
        self, tmp_path: Path
    ) -> None:
        """Another process sharing the feedback_db (a second worker) routed a decision and writes
        it 0.1 s after the Feedback for it came here (its write was queued): the Feedback looks
        again after short pauses and records it. It was NOT_FOUND UNKNOWN_DECISION at once, a
        status clients take as final, and the rating was lost."""
        settings = settings_from(embedding_config(tmp_path))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            await _decisions_written(server)
            # "taken": the decision out of the file, as if routed elsewhere and not yet written
            database = str(tmp_path / "feedback.db")
            async with _another_process(_LATE_WRITER, database, decision.decision_id, ready=b"taken") as other:
                response = await client.feedback(decision.decision_id, thumbs_up=False)
            assert other.returncode == 0
        assert (response.model, response.library_examples) == ("gpt-4o-mini", 1)

    async def test_concurrent_feedback_leaves_the_served_library_as_the_store_has_it(self, tmp_path: Path) -> None:
        """Feedback calls at once (new examples, and one decision rated again and again with
        another score each time) leave the library routing uses scoring every prompt as a library
        rebuilt from the file does: no example missing, no older score in place of the latest."""
        settings = settings_from(embedding_config(tmp_path))
        prompts = [f"say hello to zulu number {i}" for i in range(4)]
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            decisions = [await client.route(user_chat(prompt)) for prompt in prompts]
            rerated = decisions[0].decision_id
            calls = [client.feedback(d.decision_id, thumbs_up=False) for d in decisions[1:]]
            calls += [client.feedback(rerated, score=i % 2) for i in range(6)]
            await asyncio.gather(*calls)
            [stage] = server.router.policy.learning_stages
            served = [stage.score(prompt) for prompt in prompts]
            rebuilt = stage.rebuild_library()
            from_the_file = [stage.score(prompt) for prompt in prompts]
        assert rebuilt == 4
        assert served == from_the_file


class TestTheLibraryStaysBounded:
    async def test_a_feedbacks_sqlite_work_does_not_grow_with_the_library(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A Feedback call adds or re-scores its one example: its SQLite work is the same with 2
        examples as with 40 (every call re-read the whole library, O(examples) a call), and a
        repeat of the latest score, which stores nothing, does no more than that either."""
        sqlite_work = SqliteWork()
        sqlite_work.install(monkeypatch)
        settings = settings_from(embedding_config(tmp_path))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            decisions = [await client.route(user_chat(f"prompt {i} about zulu")) for i in range(42)]
            await _decisions_written(server)

            async def steps_of_feedback(decision: pb.RouteResponse) -> int:
                before = sqlite_work.steps
                await client.feedback(decision.decision_id, thumbs_up=False)
                return sqlite_work.steps - before

            await client.feedback(decisions[0].decision_id, thumbs_up=False)
            with_few = await steps_of_feedback(decisions[1])
            repeat_with_few = await steps_of_feedback(decisions[1])
            for decision in decisions[2:40]:
                await client.feedback(decision.decision_id, thumbs_up=False)
            with_many = await steps_of_feedback(decisions[40])
            repeat_with_many = await steps_of_feedback(decisions[40])
            library = (await client.feedback(decisions[41].decision_id, thumbs_up=False)).library_examples
        assert library == 42
        assert (with_many, repeat_with_many) == (with_few, repeat_with_few)

    async def test_a_decision_rated_again_and_again_keeps_one_outcome(self, tmp_path: Path) -> None:
        """One decision rated 5 times, another score each time, keeps one outcome in the file, its
        latest (each added a row: one caller could grow the file without bound, whatever the
        examples cap); that one moves the routing after a restart."""
        settings = settings_from(embedding_config(tmp_path, feedback_weight=1.0))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            for i in range(5):
                await client.feedback(decision.decision_id, score=float(i % 2))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            again = await client.route(user_chat("say hello to zulu"))
        assert outcome_rows(tmp_path / "feedback.db") == [(decision.decision_id, 0.0)]
        assert (decision.model, again.model) == ("gpt-4o-mini", "gpt-4o")

    @pytest.mark.parametrize("scope", ["tenant", "shared"])
    async def test_only_the_newest_examples_are_kept(self, tmp_path: Path, scope: str) -> None:
        """With ``feedback_max_examples: 2`` a third rated decision evicts the oldest example, from
        the library (it moves no score) and from the file (its outcome is gone; rating it again is
        NOT_FOUND, and a restart does not bring it back); per tenant with feedback_scope tenant
        (another tenant's example stays), of all tenants with shared. Examples grew for good."""
        settings = settings_from(embedding_config(tmp_path, feedback_max_examples=2, feedback_scope=scope))
        acme, globex = pb.RoutingContext(tenant="acme"), pb.RoutingContext(tenant="globex")
        prompts = ["globex says hello", "acme says hello", "acme says goodbye", "acme says thanks"]
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            decisions = [
                await client.route(user_chat(prompt), globex if prompt.startswith("globex") else acme)
                for prompt in prompts
            ]
            for decision in decisions:
                await client.feedback(decision.decision_id, thumbs_up=False)
            [stage] = server.router.policy.learning_stages
            assert stage.feedback is not None
            kept = sorted(entry.decision_id for entry in await asyncio.to_thread(stage.feedback.entries))
            moved = [stage.score(prompt, tenant=prompt.split()[0])[1] for prompt in prompts]
            evicted = decisions[1] if scope == "tenant" else decisions[0]
            refused = await _feedback_error(client, evicted.decision_id, thumbs_up=True)
        async with Server(settings, port=0) as server:
            [stage] = server.router.policy.learning_stages
            after_restart = [stage.score(prompt, tenant=prompt.split()[0])[1] for prompt in prompts]
        expected_kept = [
            d.decision_id for d in decisions if d is not evicted and (scope == "tenant" or d is not decisions[1])
        ]
        assert kept == sorted(expected_kept)
        assert moved == after_restart == [int(d.decision_id in expected_kept) for d in decisions]
        assert (refused.code(), error_info(refused).reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_DECISION")

    async def test_the_examples_of_all_tenants_are_capped_together(self, tmp_path: Path) -> None:
        """With auth off a caller names any tenant, so the per-tenant cap alone bounds nothing:
        ``feedback_max_total_examples: 3`` keeps the newest 3 examples whatever their tenants.
        Five tenants each rating one decision leave the last three, in the file and the library
        (the first two move no score, now or after a restart), and the first two's decisions
        are forgotten (NOT_FOUND). Each new tenant added an example for good."""
        config = embedding_config(tmp_path, feedback_max_examples=2, feedback_max_total_examples=3)
        settings = settings_from(config)
        prompts = [f"tenant{i} says hello" for i in range(5)]
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            decisions = []
            for prompt in prompts:
                decision = await client.route(user_chat(prompt), pb.RoutingContext(tenant=prompt.split()[0]))
                await client.feedback(decision.decision_id, thumbs_up=False)
                decisions.append(decision)
            [stage] = server.router.policy.learning_stages
            assert stage.feedback is not None
            kept = sorted(entry.decision_id for entry in await asyncio.to_thread(stage.feedback.entries))
            moved = [stage.score(prompt, tenant=prompt.split()[0])[1] for prompt in prompts]
            refused = await _feedback_error(client, decisions[0].decision_id, thumbs_up=True)
        async with Server(settings, port=0) as server:
            [stage] = server.router.policy.learning_stages
            after_restart = [stage.score(prompt, tenant=prompt.split()[0])[1] for prompt in prompts]
        assert kept == sorted(decision.decision_id for decision in decisions[2:])
        assert moved == after_restart == [0, 0, 1, 1, 1]
        assert (refused.code(), error_info(refused).reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_DECISION")

    @pytest.mark.parametrize("scope", ["tenant", "shared"])
    def test_a_total_cap_below_the_examples_cap_is_a_config_error_naming_both(self, tmp_path: Path, scope: str) -> None:
        """``feedback_max_total_examples`` below ``feedback_max_examples`` is refused at start,
        naming both: with ``shared`` the lower applied, so a cap of 200,005 (valid before the total
        cap) was taken without a word and the first open deleted 5 examples; with ``tenant`` no
        tenant could reach its cap. Equal caps are taken."""
        config = embedding_config(tmp_path, feedback_scope=scope, feedback_max_examples=200_005)
        with pytest.raises(ConfigError) as caught:
            settings_from(config)
        equal = embedding_config(tmp_path, feedback_max_examples=50, feedback_max_total_examples=50)
        assert caught.value.message.endswith(
            "routing.stages[0]: feedback_max_total_examples (200000) is below feedback_max_examples (200005):"
            " the total cap applies to all tenants' examples together, so raise it to at least"
            " feedback_max_examples (or lower feedback_max_examples)"
        )
        assert settings_from(equal).config.routing.stages[0].feedback_max_total_examples == 50  # type: ignore[union-attr]


class TestAReloadChangingTheExamplesCap:
    @pytest.mark.parametrize("change", [{"feedback_max_examples": 1}, {"feedback_scope": "shared"}])
    async def test_a_rejected_reload_deletes_no_example(self, tmp_path: Path, change: dict[str, object]) -> None:
        """A reload whose embedding stage keeps fewer examples (a lower feedback_max_examples, or
        feedback_scope shared counting every tenant's against one cap of 2) but which is rejected
        (a later stage cannot be built) deletes none: the file keeps all 4 and each can still be
        rated on the configuration that goes on serving. Its store evicted at open, so 2 were
        gone from the file and NOT_FOUND, though the version was never applied."""
        config = embedding_config(tmp_path, feedback_max_examples=2)
        rejected = copy.deepcopy(config)
        stages: Any = rejected["routing"]
        stages["stages"][0].update(change)
        stages["stages"].append({"kind": "classifier", "examples": str(tmp_path / "missing.jsonl")})
        tenants = [pb.RoutingContext(tenant="acme"), pb.RoutingContext(tenant="globex")]
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            decisions = [await client.route(user_chat(f"say hello {i}"), tenants[i % 2]) for i in range(4)]
            for decision in decisions:
                await client.feedback(decision.decision_id, thumbs_up=False)
            with pytest.raises(ConfigError, match=r"missing\.jsonl"):
                await server.reload(settings_from(rejected))
            kept = _examples_in(tmp_path / "feedback.db")
            rated_again = [(await client.feedback(d.decision_id, score=0.5)).model for d in decisions]
        assert kept == sorted(d.decision_id for d in decisions)
        assert rated_again == ["gpt-4o-mini"] * 4

    async def test_an_applied_reload_lowering_the_cap_evicts_once_it_serves(self, tmp_path: Path) -> None:
        """A reload to ``feedback_max_examples: 2`` that is applied evicts the oldest examples
        past it as the new configuration takes over: from the file and from the new library (they
        move no score; rating one is NOT_FOUND), and the newest two stay."""
        config = embedding_config(tmp_path)
        lowered = copy.deepcopy(config)
        stages: Any = lowered["routing"]
        stages["stages"][0]["feedback_max_examples"] = 2
        prompts = ["globex says hello", "acme says hello", "acme says goodbye", "acme says thanks"]
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            decisions = [await client.route(user_chat(prompt)) for prompt in prompts]
            for decision in decisions:
                await client.feedback(decision.decision_id, thumbs_up=False)
            await server.reload(settings_from(lowered))
            kept = _examples_in(tmp_path / "feedback.db")
            [stage] = server.router.policy.learning_stages
            moved = [stage.score(prompt)[1] for prompt in prompts]
            refused = await _feedback_error(client, decisions[0].decision_id, thumbs_up=True)
            library = (await client.feedback(decisions[3].decision_id, score=0.5)).library_examples
        assert kept == sorted(d.decision_id for d in decisions[2:])
        assert moved == [0, 0, 1, 1]
        assert (refused.code(), error_info(refused).reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_DECISION")
        assert library == 2

    async def test_with_two_workers_on_one_file_each_library_keeps_to_the_lowered_cap(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two workers (two servers here) share one feedback_db and both reload to
        ``feedback_max_examples: 2``. Worker B's new policy reads its library while the file still
        holds all 4 examples, then worker A's take-over evicts 2: B's take-over finds none to
        evict, and its library still holds the newest 2 only, as the file does (it kept all 4,
        over the cap in memory, 2 of them gone from the file, until B's next reload)."""
        config = embedding_config(tmp_path)
        lowered = copy.deepcopy(config)
        stages: Any = lowered["routing"]
        stages["stages"][0]["feedback_max_examples"] = 2
        prompts = ["globex says hello", "acme says hello", "acme says goodbye", "acme says thanks"]
        built, release = threading.Event(), threading.Event()
        build = router_module._policy_for
        held: list[Policy] = []

        def first_build_held(*args: Any, **kwargs: Any) -> Policy:
            policy = build(*args, **kwargs)
            if not held:  # worker B's, which reloads first
                held.append(policy)
                built.set()
                release.wait(30)
            return policy

        worker_a = Server(settings_from(config), port=0)
        worker_b = Server(settings_from(config), port=0)
        async with worker_a as a, RouterClient(a.target) as client_a, worker_b as b, RouterClient(b.target) as client_b:
            decisions = [await client_a.route(user_chat(prompt)) for prompt in prompts]
            for decision in decisions:
                await client_a.feedback(decision.decision_id, thumbs_up=False)
            monkeypatch.setattr(router_module, "_policy_for", first_build_held)
            reload_b = asyncio.create_task(b.reload(settings_from(lowered)))
            await asyncio.to_thread(built.wait, 30)
            await a.reload(settings_from(lowered))
            release.set()
            await reload_b
            kept = _examples_in(tmp_path / "feedback.db")
            moved = {
                name: [stage.score(prompt)[1] for prompt in prompts]
                for name, server in (("a", a), ("b", b))
                for stage in server.router.policy.learning_stages
            }
            library_b = (await client_b.feedback(decisions[3].decision_id, score=0.5)).library_examples
        assert kept == sorted(d.decision_id for d in decisions[2:])
        assert moved == {"a": [0, 0, 1, 1], "b": [0, 0, 1, 1]}
        assert library_b == 2

    @pytest.mark.parametrize("held_at", ["the eviction", "the library read again"])
    async def test_calls_are_answered_while_the_lowered_cap_is_applied(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held_at: str
    ) -> None:
        """A reload lowering ``feedback_max_examples`` evicts and reads the library again as it
        takes over (seconds on a large file): held there, a Route and a Feedback call are both
        answered. The take-over held the Feedback lock through the eviction (Feedback calls
        waited), and the lock a Route scores under, on the event loop, while it dropped the
        evicted ids from every library one by one (a reload to a cap of 1 over 200 tenants' 500
        examples stalled every call 8 s). The Feedback answered meanwhile, taught to the old
        policy, still reaches the new library, within the cap."""
        config = embedding_config(tmp_path)
        lowered = copy.deepcopy(config)
        stages: Any = lowered["routing"]
        stages["stages"][0]["feedback_max_examples"] = 2
        prompts = ["globex says hello", "acme says hello", "acme says goodbye", "acme says thanks", "zulu says hi"]
        held, release = threading.Event(), threading.Event()
        released: list[bool] = []
        taking_over = threading.Event()  # the eviction has begun: the next read is the take-over's
        evict, read = FeedbackStore.apply_cap, FeedbackStore.examples

        def hold() -> None:
            if not held.is_set():
                held.set()
                released.append(release.wait(10))

        def held_eviction(store: FeedbackStore) -> tuple[EvictedExample, ...]:
            taking_over.set()
            if held_at == "the eviction":
                hold()
            return evict(store)

        def held_read(store: FeedbackStore) -> list[FeedbackExample]:
            if held_at == "the library read again" and taking_over.is_set():
                hold()
            return read(store)

        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            decisions = [await client.route(user_chat(prompt)) for prompt in prompts]
            for decision in decisions[:4]:
                await client.feedback(decision.decision_id, thumbs_up=False)
            monkeypatch.setattr(FeedbackStore, "apply_cap", held_eviction)
            monkeypatch.setattr(FeedbackStore, "examples", held_read)
            reload = asyncio.create_task(server.reload(settings_from(lowered)))
            reached = await asyncio.to_thread(held.wait, 10)
            routed = await client.route(user_chat("say hello to zulu"))
            rated = await client.feedback(decisions[4].decision_id, thumbs_up=False)
            release.set()
            await reload
            kept = _examples_in(tmp_path / "feedback.db")
            [stage] = server.router.policy.learning_stages
            moved = [stage.score(prompt)[1] for prompt in prompts]
        assert (reached, released) == (True, [True])
        assert (routed.model, rated.model) == ("gpt-4o-mini", "gpt-4o-mini")
        assert kept == sorted(d.decision_id for d in decisions[3:])
        assert moved == [0, 0, 0, 1, 1]

    async def test_a_decision_routed_while_the_new_policy_takes_over_can_be_rated(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Swapped in, the new router serves Routes while its take-over evicts (held there):
        their decisions wait in the new stores' write queues (held until something flushes
        them, as when the eviction keeps the writer waiting), and a Feedback for one, still
        recorded in the old policy's store, finds it: the new stores are flushed first. It was
        NOT_FOUND, the old store flushing only its own queue, for as long as the take-over ran."""
        config = embedding_config(tmp_path)
        lowered = copy.deepcopy(config)
        stages: Any = lowered["routing"]
        stages["stages"][0]["feedback_max_examples"] = 1
        held, release, flushed = threading.Event(), threading.Event(), threading.Event()
        new_stores: list[FeedbackStore] = []
        evict, write, flush = FeedbackStore.apply_cap, FeedbackStore._write, FeedbackStore.flush

        def held_eviction(store: FeedbackStore) -> tuple[EvictedExample, ...]:
            held.set()
            release.wait(10)
            return evict(store)

        def write_once_flushed(store: FeedbackStore, writes: list[Any]) -> None:
            if store in new_stores:
                flushed.wait(10)
            write(store, writes)

        def flush_noted(store: FeedbackStore, timeout: float = 30.0) -> bool:
            if store in new_stores:
                flushed.set()
            return flush(store, timeout)

        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            for prompt in ("acme says hello", "acme says goodbye"):
                await client.feedback((await client.route(user_chat(prompt))).decision_id, thumbs_up=False)
            monkeypatch.setattr(FeedbackStore, "apply_cap", held_eviction)
            monkeypatch.setattr(FeedbackStore, "_write", write_once_flushed)
            monkeypatch.setattr(FeedbackStore, "flush", flush_noted)
            reload = asyncio.create_task(server.reload(settings_from(lowered)))
            try:
                assert await asyncio.to_thread(held.wait, 10)
                new_stores.extend(s.feedback for s in server.router.policy.learning_stages if s.feedback)
                routed = await client.route(user_chat("say hello to zulu"))
                rated = await client.feedback(routed.decision_id, thumbs_up=False)
            finally:
                flushed.set()
                release.set()
                await reload
        assert rated.model == routed.model


class TestFeedbackSentAgain:
    async def test_a_feedback_busy_at_its_deadline_stores_nothing_and_sent_again_is_stored_once(
        self, tmp_path: Path
    ) -> None:
        """A Feedback whose deadline comes while its SQLite work waits (another process holds the
        file's lock) is FEEDBACK_STORE_BUSY before it and stores nothing once the lock is free (it
        was DEADLINE_EXCEEDED, and stored all the same); the client sending it again stores it
        once: one outcome in the file, one in GetStats, one example in the library."""
        settings = settings_from(embedding_config(tmp_path))
        async with Server(settings, port=0) as server, RouterClient(server.target) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            [stage] = server.router.policy.learning_stages
            assert stage.feedback is not None
            assert await asyncio.to_thread(stage.feedback.flush)  # the decision is in the file
            with write_locked(tmp_path / "feedback.db"):
                error = await _feedback_error(client, decision.decision_id, thumbs_up=False, timeout=0.3)
            response = await client.feedback(decision.decision_id, thumbs_up=False)
            stored = await asyncio.to_thread(stage.feedback.entries)
            stats = await client.get_stats()
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.UNAVAILABLE, "FEEDBACK_STORE_BUSY")
        assert [(e.decision_id, e.score) for e in stored] == [(decision.decision_id, 0.0)]
        assert (response.model, response.library_examples) == ("gpt-4o-mini", 1)
        assert [(m.model, m.feedback_count) for m in stats.models if m.feedback_count] == [("gpt-4o-mini", 1)]

    async def test_with_two_stages_a_call_sent_again_after_the_second_failed_stores_the_first_once(
        self, tmp_path: Path
    ) -> None:
        """Two embedding stages keep feedback, each in its own file; the second's disk is full, so
        the call fails RESOURCE_EXHAUSTED FEEDBACK_STORE_FULL (it was INTERNAL) after the first
        stage stored the outcome. Sent again once there is room, it is stored in the second and
        not a second time in the first."""
        config = two_stage_config(tmp_path)
        small_pages(tmp_path / "second.db")
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            decision = await client.route(user_chat("say hello to zulu"))
            first, second = (stage.feedback for stage in server.router.policy.learning_stages)
            assert first is not None
            assert second is not None
            assert await asyncio.to_thread(second.flush)
            disk_full(second)
            error = await _feedback_error(client, decision.decision_id, thumbs_up=False)
            second._writer.execute("PRAGMA max_page_count = 1000000")  # private: room again
            response = await client.feedback(decision.decision_id, thumbs_up=False)
            stored = [[e.score for e in await asyncio.to_thread(store.entries)] for store in (first, second)]
        assert (error.code(), error_info(error).reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "FEEDBACK_STORE_FULL")
        assert "second.db" in (error.details() or "")
        assert stored == [[0.0], [0.0]]
        assert (response.model, response.library_examples) == ("gpt-4o-mini", 2)


class TestFeedbackWithAStageThatNeverSawTheDecision:
    @pytest.mark.parametrize("forgetting", [1, 0], ids=["second-forgets", "first-forgets"])
    async def test_a_decision_one_file_no_longer_keeps_is_stored_in_the_other_and_ok(
        self, tmp_path: Path, forgetting: int
    ) -> None:
        """Two embedding stages keep feedback with different limits: one file keeps only the newest
        pending decision, so of two routed decisions it has forgotten the first, which the other
        file keeps. Rating it is OK, stored in the file that knows it (and learnt by its stage),
        counted once in GetStats, logged ``feedback_stage_without_decision`` (info) naming the file
        that did not know it, no ``feedback_partly_stored``; sent again it is OK and counted once.
        It was NOT_FOUND UNKNOWN_DECISION (final) though stored and counted when the second file
        forgot it (three ``feedback_partly_stored`` warnings a call), and NOT_FOUND, stored nowhere,
        when the first did. A decision no file knows is NOT_FOUND still."""
        config = two_stage_config(tmp_path)
        config["routing"]["stages"][forgetting]["feedback_max_pending_decisions"] = 1  # type: ignore[index]
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            older = await client.route(user_chat("say hello to zulu"))
            await client.route(user_chat("say goodbye to zulu"))
            stores = await _flushed_stores(server)
            with capture_logs() as logs:
                response = await client.feedback(older.decision_id, thumbs_up=False)
                again = await client.feedback(older.decision_id, thumbs_up=False)
            stored = [[(e.decision_id, e.score) for e in await asyncio.to_thread(s.entries)] for s in stores]
            stats = await client.get_stats()
            unknown = await _feedback_error(client, "0" * 32, thumbs_up=False)
        assert (response.model, response.library_examples) == ("gpt-4o-mini", 1)
        assert (again.model, again.library_examples) == ("gpt-4o-mini", 1)
        expected: list[list[tuple[str, float]]] = [[], []]
        expected[1 - forgetting] = [(older.decision_id, 0.0)]
        assert stored == expected
        assert [(m.model, m.feedback_count) for m in stats.models if m.feedback_count] == [("gpt-4o-mini", 1)]
        assert not [e for e in logs if e["event"] == "feedback_partly_stored"]
        without = [e for e in logs if e["event"] == "feedback_stage_without_decision"]
        assert [(e["log_level"], e["decision_id"], e["stored"], e["without_decision"]) for e in without] == [
            ("info", older.decision_id, [stores[1 - forgetting].path], [stores[forgetting].path])
        ] * 2
        assert "zulu" not in str(without)
        assert (unknown.code(), error_info(unknown).reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_DECISION")

    @pytest.mark.parametrize("added", ["after", "before"])
    async def test_a_decision_routed_before_a_reload_added_a_stage_is_rated_ok(
        self, tmp_path: Path, added: str
    ) -> None:
        """One embedding stage keeps feedback (feedback.db); a reload adds a second with its own
        file (second.db), after or before it. A decision routed before the reload is rated OK,
        stored in feedback.db only (second.db never saw it) and counted once; one routed after is
        stored in both. The first was NOT_FOUND UNKNOWN_DECISION (final) after three looks, though
        stored in feedback.db and counted in GetStats (a stage added after it) or stored nowhere
        (a stage added before it)."""
        server = Server(settings_from(embedding_config(tmp_path)), port=0)
        async with server, RouterClient(server.target) as client:
            before = await client.route(user_chat("say hello to zulu"))
            config = two_stage_config(tmp_path)
            if added == "before":
                config["routing"]["stages"].reverse()  # type: ignore[index]
            await server.reload(settings_from(config))
            after = await client.route(user_chat("say goodbye to zulu"))
            stores = await _flushed_stores(server)
            with capture_logs() as logs:
                rated_before = await client.feedback(before.decision_id, thumbs_up=False)
            rated_after = await client.feedback(after.decision_id, thumbs_up=True)
            stored = {
                Path(s.path).name: {(e.decision_id, e.score) for e in await asyncio.to_thread(s.entries)}
                for s in stores
            }
            stats = await client.get_stats()
        assert (rated_before.model, rated_before.library_examples) == ("gpt-4o-mini", 1)
        assert rated_after.library_examples == 3  # feedback.db's two examples, second.db's one
        assert stored == {
            "feedback.db": {(before.decision_id, 0.0), (after.decision_id, 1.0)},
            "second.db": {(after.decision_id, 1.0)},
        }
        assert sum(m.feedback_count for m in stats.models) == 2
        assert not [e for e in logs if e["event"] == "feedback_partly_stored"]
        assert [e["without_decision"] for e in logs if e["event"] == "feedback_stage_without_decision"] == [
            [str(tmp_path / "second.db")]
        ]

    async def _forgotten_by_the_first_file(
        self, server: Server, client: RouterClient
    ) -> tuple[str, list[FeedbackStore]]:
        """A decision routed before another one, so that the first file (its pending limit 1)
        no longer keeps it and the later files do; the stores, their queued writes written."""
        older = await client.route(user_chat("say hello to zulu"))
        await client.route(user_chat("say goodbye to zulu"))
        return older.decision_id, await _flushed_stores(server)

    async def test_a_decision_only_the_second_file_knows_is_ok_when_the_first_look_ends_near_the_deadline(
        self, tmp_path: Path
    ) -> None:
        """Two stages; the first file forgot the decision (pending limit 1), the second keeps it.
        Another process (a real one) holds the first file's write lock 0.5 s, and the event loop
        is held up (blocked on purpose, as by load) until about 0.035 s before the call's answer_by, so
        the first look (the first file only) ends with no time left for a pause. The call asks
        the second file at once: OK, stored there, counted once. It was NOT_FOUND UNKNOWN_DECISION
        (final) at once, the second file never asked, nothing stored; sent again it was OK."""
        config = two_stage_config(tmp_path)
        config["routing"]["stages"][0]["feedback_max_pending_decisions"] = 1  # type: ignore[index]
        loop = asyncio.get_running_loop()
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            decision_id, stores = await self._forgotten_by_the_first_file(server, client)
            async with _another_process(_LOCK_HOLDER, str(tmp_path / "feedback.db"), "0.5", ready=b"locked"):
                started = time.monotonic()
                # answer_by is about started + 0.85 (a 1 s deadline less the server's own 0.05 s
                # lead and the 0.1 s answer margin): held up until about 0.035 s before it.
                loop.call_later(0.3, lambda: time.sleep(max(0.0, started + 0.815 - time.monotonic())))
                answer = await _rated(client, decision_id, timeout=1.0)
            stored = [[(e.decision_id, e.score) for e in await asyncio.to_thread(s.entries)] for s in stores]
            counted = sum(model.feedback_count for model in (await client.get_stats()).models)
        assert answer == "OK"
        assert stored == [[], [(decision_id, 0.0)]]
        assert counted == 1

    async def test_a_decision_only_the_second_file_knows_whose_look_again_queues_past_the_deadline_is_busy(
        self, tmp_path: Path
    ) -> None:
        """Two stages; the first file forgot the decision, the second keeps it. Another process (a
        real one) holds the first file's lock 0.6 s, so another Feedback (for a decision both
        files know) queues on the feedback thread behind this call's first look; it then waits
        for the second file's lock, which a third process holds 3 s. This call's look again
        (the one asking the second file) is still queued at its answer_by: it is UNAVAILABLE
        FEEDBACK_STORE_BUSY before its 1.5 s deadline (retryable; sent again once the locks are
        gone it is OK, stored in the second file). It was NOT_FOUND UNKNOWN_DECISION (final),
        though the second file, never asked, knew the decision."""
        config = two_stage_config(tmp_path)
        config["routing"]["stages"][0]["feedback_max_pending_decisions"] = 1  # type: ignore[index]
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            decision_id, stores = await self._forgotten_by_the_first_file(server, client)
            both = await client.route(user_chat("say farewell to zulu"))
            await _flushed_stores(server)
            async with (
                _another_process(_LOCK_HOLDER, str(tmp_path / "second.db"), "3", ready=b"locked"),
                _another_process(_LOCK_HOLDER, str(tmp_path / "feedback.db"), "0.6", ready=b"locked"),
            ):
                started = time.monotonic()
                call = asyncio.create_task(_rated(client, decision_id, timeout=1.5))
                await asyncio.sleep(0.2)  # its first look waits for the first file's lock
                waiting = asyncio.create_task(_rated(client, both.decision_id))
                answer = await call
                answered_in = time.monotonic() - started
                await waiting
            again = await _rated(client, decision_id, timeout=5.0)
            stored = [{e.decision_id for e in await asyncio.to_thread(s.entries)} for s in stores]
        assert answer.startswith("FEEDBACK_STORE_BUSY ")
        assert answered_in < 1.5
        assert again == "OK"
        assert decision_id in stored[1]
        assert decision_id not in stored[0]

    async def test_a_decision_only_the_second_file_knows_whose_wait_for_its_lock_is_cut_is_busy(
        self, tmp_path: Path
    ) -> None:
        """Two stages; the first file forgot the decision, the second keeps it, and another
        process (a real one) holds the second file's lock 3 s. A Feedback with a 1.5 s deadline
        finds the decision unknown to the first file, looks again, and its wait for the second
        file's lock is cut at the call's end: it is UNAVAILABLE FEEDBACK_STORE_BUSY (retryable;
        sent again once the lock is gone it is OK, stored in the second file). It was NOT_FOUND
        UNKNOWN_DECISION (final): the first file's answer, though the second was never asked."""
        config = two_stage_config(tmp_path)
        config["routing"]["stages"][0]["feedback_max_pending_decisions"] = 1  # type: ignore[index]
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            decision_id, stores = await self._forgotten_by_the_first_file(server, client)
            with capture_logs() as logs:
                async with _another_process(_LOCK_HOLDER, str(tmp_path / "second.db"), "3", ready=b"locked"):
                    answer = await _rated(client, decision_id, timeout=1.5)
                stored = [[e.decision_id for e in await asyncio.to_thread(s.entries)] for s in stores]
            again = await _rated(client, decision_id, timeout=5.0)
            stored_again = [[e.decision_id for e in await asyncio.to_thread(s.entries)] for s in stores]
        assert answer.startswith(f"FEEDBACK_STORE_BUSY feedback_db {tmp_path / 'second.db'} stayed locked by another")
        assert not [e for e in logs if e["event"] == "feedback_partly_stored"]  # nothing stored
        assert stored == [[], []]
        assert (again, stored_again) == ("OK", [[], [decision_id]])

    async def test_a_busy_answer_names_no_file_locked_when_the_calls_time_just_ran_out(self, tmp_path: Path) -> None:
        """Two stages; the first file forgot the decision, the second keeps it; nobody locks either
        file. The second store's connection is busy with a write of its own across the call (held
        here, as a long write or a lowered cap's eviction holds it): a Feedback (1 s deadline)
        asks the first file, looks again, and its wait for the second store's connection ends at
        the call's end. It is UNAVAILABLE FEEDBACK_STORE_BUSY (retryable, nothing stored) saying
        the call's time ran out before it wrote the second file, naming no lock; sent again once
        the write is done it is OK, stored there. It said the second file "stayed locked by
        another process", which no process had locked."""
        config = two_stage_config(tmp_path)
        config["routing"]["stages"][0]["feedback_max_pending_decisions"] = 1  # type: ignore[index]
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            decision_id, stores = await self._forgotten_by_the_first_file(server, client)
            assert stores[1]._write_lock.acquire(timeout=5)
            try:
                answer = await _rated(client, decision_id, timeout=1.0)
            finally:
                stores[1]._write_lock.release()
            stored = [[e.decision_id for e in await asyncio.to_thread(s.entries)] for s in stores]
            again = await _rated(client, decision_id, timeout=1.0)
        assert answer == (
            f"FEEDBACK_STORE_BUSY feedback: this call's time ran out before it wrote feedback_db"
            f" {tmp_path / 'second.db'}; retry shortly"
        )
        assert stored == [[], []]
        assert again == "OK"

    async def test_with_three_stages_a_partly_stored_feedback_names_only_the_files_that_can_take_it(
        self, tmp_path: Path
    ) -> None:
        """Three stages; the first file forgot the decision, the second and third keep it, and
        another process (a real one) holds the third file's lock 3 s. A Feedback with a 1.5 s
        deadline is stored in the second file and FEEDBACK_STORE_BUSY; ``feedback_partly_stored``
        names the third file as ``not_stored`` (sending it again stores it there) and the first
        as ``without_decision``. It named the first file ``not_stored`` too, which can never
        take it."""
        config = two_stage_config(tmp_path)
        stages = config["routing"]["stages"]  # type: ignore[index]
        stages.append({**stages[1], "feedback_db": str(tmp_path / "third.db")})
        stages[0]["feedback_max_pending_decisions"] = 1
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            decision_id, stores = await self._forgotten_by_the_first_file(server, client)
            with capture_logs() as logs:
                async with _another_process(_LOCK_HOLDER, str(tmp_path / "third.db"), "3", ready=b"locked"):
                    answer = await _rated(client, decision_id, timeout=1.5)
            stored = [[e.decision_id for e in await asyncio.to_thread(s.entries)] for s in stores]
            counted = sum(model.feedback_count for model in (await client.get_stats()).models)
        partly = [(e["stored"], e["not_stored"], e.get("without_decision")) for e in logs if "partly" in e["event"]]
        assert answer.startswith("FEEDBACK_STORE_BUSY ")
        assert (stored, counted) == ([[], [decision_id], []], 1)
        assert partly == [
            ([str(tmp_path / "second.db")], [str(tmp_path / "third.db")], [str(tmp_path / "feedback.db")])
        ]
        assert "zulu" not in str(partly)


class TestAFeedbackDbThatCannotBeOpened:
    async def test_a_reload_to_a_file_that_is_not_sqlite_is_rejected_and_the_old_config_serves(
        self, tmp_path: Path
    ) -> None:
        """A reloaded config whose feedback_db is not an SQLite file is a rejected configuration
        (``config_reload_rejected`` naming feedback_db and the file), as any invalid one is; it went
        down the watcher's "our bug" path (``config_reload_failed``, a traceback). The running
        configuration keeps serving and taking feedback."""
        not_sqlite = tmp_path / "notes.txt"
        not_sqlite.write_text("not a database, but long enough to have a header of one\n" * 4)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(embedding_config(tmp_path)), encoding="utf-8")
        async with (
            Server(load_settings(path, keyless_environ()), port=0) as server,
            RouterClient(server.target) as client,
        ):
            watcher = ConfigWatcher(path, 1.0, server.reload)
            path.write_text(yaml.safe_dump(embedding_config(tmp_path, feedback_db=str(not_sqlite))), encoding="utf-8")
            with capture_logs() as logs:
                applied = await watcher.check()
            decision = await client.route(user_chat("say hello to zulu"))
            response = await client.feedback(decision.decision_id, thumbs_up=False)
        events = [(entry["event"], entry.get("error")) for entry in logs if entry["event"].startswith("config_reload")]
        assert applied is False
        rejected = f"{path}: routing.stages[0]: feedback_db {not_sqlite}: file is not a database"
        assert events == [("config_reload_rejected", rejected)]
        assert response.library_examples == 1

    @pytest.mark.parametrize("second", ["relative", "absolute"])
    async def test_two_stages_naming_one_file_are_a_config_error(self, tmp_path: Path, second: str) -> None:
        """Two embedding stages whose feedback_db is one file, written alike or one relative to
        the config file's folder and one absolute, are a configuration error naming the second
        stage's setting (both stores remembered each decision, and one rating was counted twice
        in the stats while the second stage, seeing a repeat, never learnt it); nothing starts."""
        config = embedding_config(tmp_path)
        [stage] = config["routing"]["stages"]  # type: ignore[index]
        stage["feedback_db"] = "feedback.db"
        other = "feedback.db" if second == "relative" else str(tmp_path / "feedback.db")
        config["routing"]["stages"] = [stage, {**stage, "feedback_db": other}]  # type: ignore[index]
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        writers_before = _feedback_writers()
        with pytest.raises(ConfigError) as caught:
            Server(load_settings(path, keyless_environ()), port=0)
        assert "routing.stages[1].feedback_db" in caught.value.message
        assert _feedback_writers() == writers_before

    async def test_a_reload_to_a_damaged_file_is_rejected_and_leaves_its_store_closed(self, tmp_path: Path) -> None:
        """A reloaded config whose feedback_db opens but whose examples cannot be read (a damaged
        page) is rejected, and the store the reload opened for it is closed again: its writer
        thread left running (with its open files) on every rejected reload, which the watcher
        tries at every poll."""
        damaged = tmp_path / "damaged.db"
        _damage_the_examples_table(damaged)
        good = tmp_path / "good"
        good.mkdir()
        async with Server(settings_from(embedding_config(good)), port=0) as server:
            writers_before = _feedback_writers()
            for _ in range(2):
                with pytest.raises(FeedbackStoreUnavailable):
                    await server.reload(settings_from(embedding_config(tmp_path, feedback_db=str(damaged))))
            writers_after = _feedback_writers()
        assert writers_after == writers_before


def _examples_in(path: Path) -> list[str]:
    """The decision ids of the examples in the feedback file at ``path``, sorted."""
    with closing(sqlite3.connect(path)) as db:
        return sorted(str(row[0]) for row in db.execute("SELECT decision_id FROM examples"))


def _feedback_writers() -> int:
    """How many feedback stores' writer threads run in this process."""
    return sum(thread.name == "routesvc-feedback-writer" for thread in threading.enumerate())


def _damage_the_examples_table(path: Path) -> None:
    """A feedback file at ``path`` that opens, with the root page of its ``examples`` table
    overwritten (as by a disk fault), so reading the examples fails."""
    FeedbackStore(path).close()
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        [root] = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = 'examples'").fetchone()
        [page_size] = connection.execute("PRAGMA page_size").fetchone()
    data = bytearray(path.read_bytes())
    data[(root - 1) * page_size : root * page_size] = b"\xff" * page_size
    path.write_bytes(bytes(data))
