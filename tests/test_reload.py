"""Hot reload (issue 8): a ConfigMap-style symlink swap changes the policy without dropping calls;
an invalid file is rejected, logged, and the old configuration keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest
import yaml
from structlog.testing import capture_logs

from routesvc.auth import key_digest
from routesvc.client import RouterClient
from routesvc.config import Settings, load_settings
from routesvc.errors import ConfigError
from routesvc.providers.base import Provider
from routesvc.reload import MAX_RETRY_SECONDS, ConfigWatcher
from routesvc.server import Server, build_providers
from routesvc.testing import FakeProvider, Fault, Script
from routesvc.v1 import router_pb2 as pb
from routesvc.v1 import router_pb2_grpc as pb_grpc
from tests.conftest import (
    REPO,
    default_config,
    keyless_environ,
    live_environ,
    loopback_sync_channel,
    process_environ,
    settings_from,
    user_chat,
)
from tests.test_feedback_rpc import embedding_config


class ConfigMapDir:
    """A folder laid out as the kubelet lays out a mounted ConfigMap: config.yaml -> ..data/config.yaml,
    ..data -> a timestamped folder, swapped atomically by renaming a new symlink over ..data."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        (root / "config.yaml").symlink_to("..data/config.yaml")

    @property
    def path(self) -> Path:
        return self.root / "config.yaml"

    def publish(self, text: str) -> None:
        self.generation += 1
        folder = self.root / f"..2026_11_28_{self.generation}"
        folder.mkdir()
        (folder / "config.yaml").write_text(text)
        temporary = self.root / "..data_tmp"
        temporary.symlink_to(folder.name)
        os.replace(temporary, self.root / "..data")


def config_text(default_model: str) -> str:
    config = default_config()
    config["routing"]["default_model"] = default_model  # type: ignore[index]
    config["server"] = {"port": 0, "reload_interval_seconds": 0.1}
    config["logging"] = {"format": "json"}
    return yaml.safe_dump(config)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ConfigMapDir, str, subprocess.Popen[str], list[dict[str, object]]]]:
    """`routesvc serve` as a process on a ConfigMap-style config; its log lines are collected."""
    configmap = ConfigMapDir(tmp_path)
    configmap.publish(config_text("gpt-4o-mini"))
    env = process_environ()
    process = subprocess.Popen(
        [sys.executable, "-m", "routesvc", "serve", "--config", str(configmap.path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    started = json.loads(process.stdout.readline())
    logs: list[dict[str, object]] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            logs.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield configmap, str(started["target"]), process, logs
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        reader.join(timeout=5)


def default_model(stub: pb_grpc.RouterServiceStub) -> str:
    request = pb.RouteRequest(chat=pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, content="hello")]))
    return str(stub.Route(request, timeout=5).decision.model)


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


class TestHotReload:
    def test_a_valid_swap_changes_the_policy_and_an_invalid_one_is_rejected(
        self, served: tuple[ConfigMapDir, str, subprocess.Popen[str], list[dict[str, object]]]
    ) -> None:
        """gpt-4o-mini -> (swap) gpt-4o -> (invalid swap) still gpt-4o, with config_reload_rejected
        logged, naming the line but never quoting it (PyYAML's message quoted the line, and with
        it the password of a Redis URL)."""
        configmap, target, _, logs = served
        with loopback_sync_channel(target) as channel:
            stub = pb_grpc.RouterServiceStub(channel)
            assert default_model(stub) == "gpt-4o-mini"
            configmap.publish(config_text("gpt-4o"))
            assert wait_for(lambda: default_model(stub) == "gpt-4o")
            configmap.publish('shared_state:\n  redis_url: "redis://:s3cr3t-pass@redis:6379\n')
            assert wait_for(lambda: any(entry["event"] == "config_reload_rejected" for entry in logs))
            assert default_model(stub) == "gpt-4o"
        rejected = next(entry for entry in logs if entry["event"] == "config_reload_rejected")
        assert "not valid YAML" in str(rejected["error"])
        assert "(line 2, column 14)" in str(rejected["error"])
        assert "s3cr3t-pass" not in repr(logs)

    def test_a_config_that_fails_to_build_is_rejected_and_the_watcher_goes_on(
        self, served: tuple[ConfigMapDir, str, subprocess.Popen[str], list[dict[str, object]]]
    ) -> None:
        """Valid YAML whose classifier stage names a missing examples file fails only when the new
        router is built: rejected and logged like invalid YAML, the old policy keeps serving, the
        next valid file is applied, and SIGTERM still drains to exit 0 (the fixture checks)."""
        configmap, target, _, logs = served
        broken = yaml.safe_load(config_text("gpt-4o"))
        broken["routing"]["stages"] = [{"kind": "classifier", "examples": "/nonexistent/examples.jsonl"}]
        with loopback_sync_channel(target) as channel:
            stub = pb_grpc.RouterServiceStub(channel)
            configmap.publish(yaml.safe_dump(broken))
            assert wait_for(lambda: any(entry["event"] == "config_reload_rejected" for entry in logs))
            assert default_model(stub) == "gpt-4o-mini"
            configmap.publish(config_text("claude-sonnet"))
            assert wait_for(lambda: default_model(stub) == "claude-sonnet")
        rejected = next(entry for entry in logs if entry["event"] == "config_reload_rejected")
        assert "examples.jsonl" in str(rejected["error"])

    def test_calls_keep_being_served_across_a_swap(
        self, served: tuple[ConfigMapDir, str, subprocess.Popen[str], list[dict[str, object]]]
    ) -> None:
        """200 Route calls while the config is swapped 5 times: every call succeeds."""
        configmap, target, _, _ = served
        failures: list[BaseException] = []
        with loopback_sync_channel(target) as channel:
            stub = pb_grpc.RouterServiceStub(channel)

            def hammer() -> None:
                for _ in range(200):
                    try:
                        default_model(stub)
                    except grpc.RpcError as error:
                        failures.append(error)

            thread = threading.Thread(target=hammer)
            thread.start()
            for index in range(5):
                configmap.publish(config_text("gpt-4o" if index % 2 == 0 else "gpt-4o-mini"))
                time.sleep(0.15)
            thread.join(timeout=60)
        assert failures == []


class TestWhatWaitsForARestart:
    async def test_a_reload_applies_the_policy_and_names_the_settings_read_only_at_start(self) -> None:
        """A file that changes the default model, the port, batch mode and the Redis URL: the policy
        is applied, the rest keeps its start value (limits still counted in this process) and the
        reload logs which fields wait for a restart; so does every later reload of such a file,
        while the grace period, read again at shutdown, is not named."""
        config = default_config()
        changed = copy.deepcopy(config)
        changed["routing"]["default_model"] = "gpt-4o"  # type: ignore[index]
        changed["server"] = {"port": 6001, "grace_seconds": 3}
        changed["batch"] = {"enabled": False}
        changed["shared_state"] = {"redis_url": "redis://127.0.0.1:1/0"}
        changed["reliability"] = {"ledger_entries": 50, "max_concurrent_rpcs": 10}  # the second is applied
        changed["limits"] = {"max_request_bytes": 8_000_000}
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            admission = server.router.admission
            with capture_logs() as logs:
                await server.reload(settings_from(changed))
                await server.reload(settings_from(changed))
            decision = await client.route(user_chat("hello"))
            assert server.router.admission is admission
            assert server.batches.enabled
        assert decision.model == "gpt-4o"
        waiting = [entry["fields"] for entry in logs if entry["event"] == "config_reload_needs_restart"]
        fields = ["server.port", "batch.enabled", "shared_state.redis_url", "reliability.ledger_entries"]
        assert waiting == [[*fields, "limits.max_request_bytes"]] * 2

    async def test_a_reload_that_changes_only_the_policy_says_nothing_waits(self) -> None:
        config = default_config()
        changed = copy.deepcopy(config)
        changed["routing"]["default_model"] = "gpt-4o"  # type: ignore[index]
        changed["limits"] = {"max_request_bytes": 1_000_000}  # lower: the service applies it at once
        async with Server(settings_from(config), port=0) as server:
            with capture_logs() as logs:
                await server.reload(settings_from(changed))
        assert not [entry for entry in logs if entry["event"] == "config_reload_needs_restart"]

    async def test_a_reload_applies_a_new_baseline_model(self) -> None:
        """telemetry.baseline_model is a catalog model: a reload that names another applies it
        (GetStats names it) and says nothing waits for a restart."""
        config = default_config()
        changed = copy.deepcopy(config)
        changed["telemetry"] = {"baseline_model": "gpt-4o"}
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            with capture_logs() as logs:
                await server.reload(settings_from(changed))
            stats = await client.get_stats()
        assert stats.baseline_model == "gpt-4o"
        assert not [entry for entry in logs if entry["event"] == "config_reload_needs_restart"]


class TestRetiredProviders:
    async def test_providers_a_reload_replaces_are_closed_once_their_calls_end(self, fake: FakeProvider) -> None:
        """A reload that changes a provider builds new adapters; the old ones serve the stream
        that was running at the swap to its end and are then closed (they were kept until
        shutdown: ~1.7 MB per such reload)."""
        config = default_config()
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            old = dict(server.router.providers)
            fake.enqueue(Script(chunk_count=10, chunk_delay=0.05))
            stream = client.complete(user_chat("hi"))
            assert (await anext(stream)).WhichOneof("event") == "decision"
            changed = dict(live_environ(fake), OPENAI_BASE_URL=fake.openai_base_url.rstrip("/") + "/")
            await server.reload(settings_from(config, changed))
            assert server.router.providers["openai"] is not old["openai"]
            rest = [message.WhichOneof("event") async for message in stream]
            assert (rest.count("delta"), rest[-1]) == (10, "completion")
            async with asyncio.timeout(5):
                while not all(provider.closed for provider in old.values()):  # noqa: ASYNC110 - no close event
                    await asyncio.sleep(0.02)
            assert not any(provider.closed for provider in server.router.providers.values())

    async def test_a_reload_that_changes_max_event_bytes_applies_it_to_new_adapters(self, fake: FakeProvider) -> None:
        """``reliability.max_event_bytes`` lives in the adapters' transports: a reload that
        changes it alone builds new adapters (the old bound held until a restart)."""
        config = default_config()
        config["reliability"] = {"max_event_bytes": 8192}
        raised = default_config()
        raised["reliability"] = {"max_event_bytes": 65536}
        oversized = Script(fault=Fault.OVERSIZED_LINE, fault_after=1, oversized_bytes=8192)
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            fake.enqueue(oversized)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                [message async for message in client.complete(user_chat("hi"), pb.RoutingContext(model="gpt-4o-mini"))]
            assert "over 8192 bytes" in str(caught.value.details())
            fake.enqueue(oversized)
            await server.reload(settings_from(raised, live_environ(fake)))
            messages = [m async for m in client.complete(user_chat("hi"), pb.RoutingContext(model="gpt-4o-mini"))]
            assert messages[-1].WhichOneof("event") == "completion"

    async def test_a_reload_that_keeps_the_providers_closes_the_old_feedback_store(self, tmp_path: Path) -> None:
        """Reloads of an embedding stage with a feedback_db, providers unchanged: the old
        routers' SQLite connections are closed once nothing runs on them, so the descriptors
        open on the store do not grow with the number of reloads (each reload left two more).

        (Not "back to the count before": SQLite on Unix keeps a closed connection's descriptors
        while another connection of the process has the same file open, so as not to drop its
        POSIX locks, and reuses them for the next open of that file; so the first reload leaves
        two, and no later one adds any.)"""
        config = embedding_config(tmp_path)

        def open_on_the_store() -> int:
            count = 0
            for fd in os.listdir("/proc/self/fd"):
                with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
                    count += "feedback.db" in os.readlink(f"/proc/self/fd/{fd}")
            return count

        async def reloads(server: Server, count: int) -> int:
            for index in range(count):
                changed = copy.deepcopy(config)
                changed["routing"]["stages"][0]["threshold"] = 0.9 - index * 0.01  # type: ignore[index]
                await server.reload(settings_from(changed))
                # The old router is retired from a task of its own, its store closed in a worker
                # thread; each reload waits for it, as reloads seconds apart do (reloads faster
                # than their closes hold more descriptors at once, which SQLite then keeps).
                async with asyncio.timeout(5):
                    while server._retired:  # noqa: ASYNC110 - no event for a retired router
                        await asyncio.sleep(0.01)
            gc.collect()  # what is not closed but merely unreachable goes too
            return open_on_the_store()

        async with Server(settings_from(config), port=0) as server:
            after_two = await reloads(server, 2)
            assert await reloads(server, 8) == after_two


def feedback_writers() -> int:
    """The feedback stores' writer threads alive in this process."""
    return sum(thread.name == "routesvc-feedback-writer" and thread.is_alive() for thread in threading.enumerate())


class TestARejectedReloadClosesWhatItBuilt:
    @pytest.mark.parametrize("providers_change", [True, False], ids=["new-providers", "same-providers"])
    async def test_a_reload_whose_api_keys_file_is_missing_closes_the_router_it_built(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, providers_change: bool
    ) -> None:
        """A new file naming a tenant's api_keys_file that is not there is rejected after its
        router was built: the old configuration keeps serving, and the new router's feedback store
        (its writer thread and SQLite connections) and, when the providers changed, its new
        provider clients are closed (they were left open, on every rejected version of the file)."""
        config = embedding_config(tmp_path)
        config["auth"] = {"enabled": True}
        config["tenants"] = {"acme": {"api_key_sha256": [key_digest("acme-key")]}}
        environ = {"OPENAI_API_KEY": "sk-a", "ANTHROPIC_API_KEY": "sk-b"}
        built: list[Mapping[str, Provider]] = []

        def recorded(settings: Settings) -> dict[str, Provider]:
            providers = build_providers(settings)
            built.append(providers)
            return providers

        monkeypatch.setattr("routesvc.server.build_providers", recorded)
        async with Server(settings_from(config, environ), port=0) as server:
            old = server.router
            writers = feedback_writers()
            rejected = copy.deepcopy(config)
            rejected["tenants"] = {"acme": {"api_keys_file": str(tmp_path / "not-mounted-yet.keys")}}
            if providers_change:
                environ = dict(environ, OPENAI_API_KEY="sk-rotated")
            with pytest.raises(ConfigError, match=r"tenants\.acme\.api_keys_file"):
                await server.reload(settings_from(rejected, environ))
            assert server.router is old
            assert feedback_writers() == writers
            rebuilt = built[1:]  # built[0]: the providers the server started with
            assert [all(provider.closed for provider in new.values()) for new in rebuilt] == [True] * providers_change
            assert not any(provider.closed for provider in old.providers.values())
            async with RouterClient(server.target, api_key="acme-key") as client:
                assert (await client.route(user_chat("hello"))).model

    async def test_a_policy_that_fails_after_an_embedding_stage_closes_its_feedback_store(self, tmp_path: Path) -> None:
        """A new version whose embedding stage opens its feedback store and whose next stage then
        fails (examples not there) is rejected at every try: each try closes the store it opened
        (one writer thread and two SQLite connections were left per poll)."""
        config = embedding_config(tmp_path)
        config["server"] = {"reload_interval_seconds": 0}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        clock = Clock()
        async with Server(settings_from(config), port=0) as server:
            watcher = ConfigWatcher(path, 1.0, server.reload, clock=clock)
            broken = copy.deepcopy(config)
            broken["routing"]["stages"].append(  # type: ignore[index]
                {"kind": "classifier", "examples": str(tmp_path / "missing.jsonl")}
            )
            path.write_text(yaml.safe_dump(broken), encoding="utf-8")
            writers = feedback_writers()
            tried = []
            for _ in range(3):
                clock.now += MAX_RETRY_SECONDS  # each poll a real try, past any backoff
                tried.append(await watcher.check())
            assert tried == [False] * 3
            assert feedback_writers() == writers

    async def test_a_provider_url_with_credentials_is_rejected_unquoted(self, tmp_path: Path) -> None:
        """A new version pointing a provider at ``http://user:password@gateway/v1`` (which the HTTP
        client refuses on every call) is rejected naming the field, without the password, and the
        old providers keep serving."""
        config = default_config()
        path = watched_config(tmp_path, config)
        async with Server(settings_from(config), port=0) as server:
            watcher = ConfigWatcher(path, 1.0, server.reload, clock=Clock())
            config["providers"]["openai"]["base_url"] = "http://user:S3cretPw@gateway/v1"  # type: ignore[index]
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            with capture_logs() as logs:
                assert not await watcher.check()
            assert server.router.settings.providers["openai"].base_url is None
        (rejected,) = [entry for entry in logs if entry["event"] == "config_reload_rejected"]
        assert str(rejected["error"]).startswith(f"{path}: providers.openai.base_url: credentials in the URL")
        assert "S3cretPw" not in repr(logs)

    async def test_a_stage_that_fails_to_build_is_named_with_the_file(self, tmp_path: Path) -> None:
        """A new version whose embedding stage names no fitted router is rejected, and the log
        names the file, the stage and its field (it said ``embedding.router: ...``)."""
        config = default_config()
        path = watched_config(tmp_path, config)
        async with Server(settings_from(config), port=0) as server:
            watcher = ConfigWatcher(path, 1.0, server.reload, clock=Clock())
            config["routing"]["stages"].append({"kind": "embedding", "router": "no-router"})  # type: ignore[index]
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            with capture_logs() as logs:
                assert not await watcher.check()
        (rejected,) = [entry for entry in logs if entry["event"] == "config_reload_rejected"]
        assert str(rejected["error"]).startswith(f"{path}: routing.stages[2].router: {tmp_path / 'no-router'}: ")

    async def test_a_router_whose_library_cannot_be_read_is_rejected_with_the_stage_named(self, tmp_path: Path) -> None:
        """A new version whose embedding stage names a router with an empty library.npz (a fit
        cut short by a full disk) is rejected, naming the file, the stage and the failure, and the
        old policy keeps serving: it was ``config_reload_failed``, logged as our own bug."""
        stage = embedding_config(tmp_path)["routing"]["stages"][0]  # type: ignore[index]
        (tmp_path / "router" / "library.npz").write_bytes(b"")
        config = default_config()
        path = watched_config(tmp_path, config)
        async with Server(settings_from(config), port=0) as server:
            watcher = ConfigWatcher(path, 1.0, server.reload, clock=Clock())
            config["routing"]["stages"].insert(0, {**stage, "feedback_db": None})  # type: ignore[index]
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            with capture_logs() as logs:
                assert not await watcher.check()
            async with RouterClient(server.target) as client:
                decision = await client.route(user_chat("hello"))
        events = [entry["event"] for entry in logs if str(entry["event"]).startswith("config_reload")]
        assert events == ["config_reload_rejected"]
        (rejected,) = [entry for entry in logs if entry["event"] == "config_reload_rejected"]
        assert str(rejected["error"]) == (
            f"{path}: routing.stages[0].router: {tmp_path / 'router'}: not a fitted router"
            " (EOFError: No data left in file)"
        )
        assert decision.strategy != "embedding"


def watched_config(tmp_path: Path, config: dict[str, object]) -> Path:
    """``config`` written to a file, with the server's own watcher off (the test drives one)."""
    config["server"] = {"reload_interval_seconds": 0}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def route_status(server: Server, api_key: str) -> grpc.StatusCode:
    """The status of a Route call made with ``api_key``."""
    async with RouterClient(server.target, api_key=api_key) as client:
        try:
            await client.route(user_chat("hello"))
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


class TestFilesTheConfigNames:
    async def test_a_version_rejected_for_a_keys_file_not_there_yet_is_applied_once_it_is(self, tmp_path: Path) -> None:
        """A new config names a tenant's api_keys_file before the Secret holding it is mounted: it
        is rejected, and tried again at every poll but said (logged, counted) once per version of
        the files; when the file appears, with a bad line and then fixed, each version is tried at
        the next poll (it was never tried again: only the config file was watched, and a version
        once rejected was taken as seen)."""
        config = default_config()
        config["auth"] = {"enabled": True}
        config["tenants"] = {"acme": {"api_key_sha256": [key_digest("acme-key")]}}
        path = watched_config(tmp_path, config)
        outcomes: list[str] = []
        async with Server(load_settings(path, keyless_environ()), port=0) as server:
            watcher = ConfigWatcher(path, 1.0, server.reload, outcome=outcomes.append)
            keys = tmp_path / "beta.keys"
            config["tenants"]["beta"] = {"api_keys_file": str(keys)}  # type: ignore[index]
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            with capture_logs() as logs:
                assert [await watcher.check() for _ in range(3)] == [False] * 3
                keys.write_text("not a digest\n", encoding="utf-8")
                assert [await watcher.check() for _ in range(2)] == [False] * 2
                keys.write_text(key_digest("beta-key") + "\n", encoding="utf-8")
                assert await watcher.check()
                assert not await watcher.check()
            assert await route_status(server, "beta-key") == grpc.StatusCode.OK
            assert await route_status(server, "acme-key") == grpc.StatusCode.OK
        rejections = [entry["error"] for entry in logs if entry["event"] == "config_reload_rejected"]
        assert rejections == [
            f"tenants.beta.api_keys_file: cannot read {keys}",
            f"tenants.beta.api_keys_file: line 1 of {keys} is not a hex SHA-256 digest (64 characters)",
        ]
        assert outcomes == ["rejected", "rejected", "applied"]

    async def test_a_key_removed_from_a_tenants_keys_file_is_revoked(self, tmp_path: Path) -> None:
        """The config file unchanged, a key removed from a tenant's api_keys_file (a leaked key
        revoked): the next poll applies it, and the key is refused UNAUTHENTICATED while the key
        added beside it works (the old key kept working until the config file changed or a restart)."""
        keys = tmp_path / "acme.keys"
        keys.write_text(key_digest("leaked-key") + "\n", encoding="utf-8")
        config = default_config()
        config["auth"] = {"enabled": True}
        config["tenants"] = {"acme": {"api_keys_file": str(keys)}}
        path = watched_config(tmp_path, config)
        async with Server(load_settings(path, keyless_environ()), port=0) as server:
            watcher = ConfigWatcher(path, 1.0, server.reload)
            assert await route_status(server, "leaked-key") == grpc.StatusCode.OK
            keys.write_text(key_digest("new-key") + "\n", encoding="utf-8")
            assert await watcher.check()
            assert await route_status(server, "leaked-key") == grpc.StatusCode.UNAUTHENTICATED
            assert await route_status(server, "new-key") == grpc.StatusCode.OK

    async def test_a_rotated_provider_key_file_is_sent_upstream_after_the_next_poll(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A provider's api_key_file rewritten (a rotated Secret), the config file unchanged: the
        next poll applies it and the next call upstream carries the new key."""
        key_file = tmp_path / "openai.key"
        key_file.write_text("sk-before\n", encoding="utf-8")
        config = default_config()
        config["providers"]["openai"].update(api_key_file=str(key_file), base_url=fake.openai_base_url)  # type: ignore[index]
        path = watched_config(tmp_path, config)
        async with (
            Server(load_settings(path, keyless_environ()), port=0) as server,
            RouterClient(server.target) as client,
        ):
            watcher = ConfigWatcher(path, 1.0, server.reload)
            sent: list[str] = []
            for key in ("sk-before", "sk-rotated"):
                key_file.write_text(key + "\n", encoding="utf-8")
                assert await watcher.check() == (key == "sk-rotated")
                events = [message.WhichOneof("event") async for message in client.complete(user_chat("hi"))]
                assert events[-1] == "completion"
                sent.append(fake.requests[-1].headers["authorization"])
        assert sent == ["Bearer sk-before", "Bearer sk-rotated"]


class TestYamlPythonCannotRead:
    @pytest.mark.parametrize(
        ("tail", "problem"),
        [
            ("huge: 1" + "0" * 5000, "a value that cannot be read as its type (an integer of more than 4,300 digits"),
            ("deep: " + "[" * 10000 + "]" * 10000, "nested too deeply"),
        ],
        ids=["integer-of-5001-digits", "nested-10000-deep"],
    )
    async def test_a_reload_to_it_is_rejected_naming_the_file_and_the_old_config_serves(
        self, tmp_path: Path, tail: str, problem: str
    ) -> None:
        """An integer over Python's 4,300 digits (ValueError) or lists nested 10,000 deep
        (RecursionError): rejected with the file named, like any invalid YAML (it was logged as
        our bug, config_reload_failed, with a traceback)."""
        config = default_config()
        path = watched_config(tmp_path, config)
        outcomes: list[str] = []
        async with (
            Server(load_settings(path, keyless_environ()), port=0) as server,
            RouterClient(server.target) as client,
        ):
            watcher = ConfigWatcher(path, 1.0, server.reload, outcome=outcomes.append)
            path.write_text(yaml.safe_dump(config) + tail + "\n", encoding="utf-8")
            with capture_logs() as logs:
                assert not await watcher.check()
            decision = await client.route(user_chat("hello"))
        assert [entry["event"] for entry in logs] == ["config_reload_rejected"]
        assert str(logs[0]["error"]).startswith(f"{path}: not valid YAML: {problem}")
        assert outcomes == ["rejected"]
        assert decision.model == "gpt-4o-mini"


class TestAChangeWhileTheServerStarts:
    """A file changed after the settings were parsed and before the server's watcher starts (the
    seconds ``serve`` spends building the router): the watcher started from the file as it was
    then, so the change was taken as serving, never parsed, applied nor logged."""

    @staticmethod
    def polled_config(tmp_path: Path, config: dict[str, object]) -> Path:
        config["server"] = {"reload_interval_seconds": 0.1}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    async def test_a_config_changed_after_it_was_parsed_is_applied_at_the_first_poll(self, tmp_path: Path) -> None:
        config = default_config()
        config["routing"]["default_model"] = "gpt-4o-mini"  # type: ignore[index]
        path = self.polled_config(tmp_path, config)
        settings = load_settings(path, keyless_environ())
        config["routing"]["default_model"] = "gpt-4o"  # type: ignore[index]
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        with capture_logs() as logs:
            async with Server(settings, port=0) as server, RouterClient(server.target) as client:
                models = []
                for _ in range(40):
                    models.append((await client.route(user_chat("hello"))).model)
                    if models[-1] == "gpt-4o":
                        break
                    await asyncio.sleep(0.05)
        assert models[0] == "gpt-4o-mini"
        assert models[-1] == "gpt-4o"
        assert [entry["event"] for entry in logs if entry["event"].startswith("config_")] == ["config_reloaded"]

    async def test_a_config_read_from_a_pipe_is_not_watched(self) -> None:
        """``serve --config <(envsubst < config.yaml)``: the pipe held the config once and is empty
        after, so it is not polled (each poll read it empty, unlike the bytes parsed at start, and
        logged a rejected reload, "the top level must be a mapping", at error level)."""
        config = default_config()
        config["server"] = {"reload_interval_seconds": 0.05}
        read_end, write_end = os.pipe()
        try:
            with os.fdopen(write_end, "wb") as writer:
                writer.write(yaml.safe_dump(config).encode())
            settings = load_settings(Path(f"/proc/self/fd/{read_end}"), keyless_environ())
            with capture_logs() as logs:
                async with Server(settings, port=0) as server, RouterClient(server.target) as client:
                    await asyncio.sleep(0.3)
                    assert (await client.route(user_chat("hello"))).model
        finally:
            os.close(read_end)
        assert [entry["event"] for entry in logs if entry["event"].startswith("config_")] == []

    async def test_a_provider_key_file_filled_after_the_parse_is_used_from_the_first_poll(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """The README's promise for a Secret mounted late: its key is used from the next poll on,
        also when it lands while the server starts."""
        key_file = tmp_path / "openai.key"
        key_file.write_text("", encoding="utf-8")
        config = default_config()
        config["providers"]["openai"].update(api_key_file=str(key_file), base_url=fake.openai_base_url)  # type: ignore[index]
        path = self.polled_config(tmp_path, config)
        settings = load_settings(path, keyless_environ())
        assert not settings.providers["openai"].configured
        key_file.write_text("sk-late\n", encoding="utf-8")
        with capture_logs() as logs:
            async with Server(settings, port=0) as server, RouterClient(server.target) as client:
                for _ in range(40):
                    if any(entry["event"] == "config_reloaded" for entry in logs):
                        break
                    await asyncio.sleep(0.05)
                events = [message.WhichOneof("event") async for message in client.complete(user_chat("hi"))]
        assert events[-1] == "completion"
        assert fake.requests[-1].headers["authorization"] == "Bearer sk-late"


class Clock:
    """A monotonic clock the test sets by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TestARejectedVersionBacksOff:
    async def test_a_rejected_version_is_rebuilt_less_and_less_often_until_its_files_are_there(
        self, tmp_path: Path
    ) -> None:
        """A new version whose embedding stage names a router folder not there yet (not
        fingerprinted: the watcher cannot tell when it comes) is rejected and said once; while
        nothing fingerprinted changes it is built again at the next poll, then after 2, 4, 8, ...
        polls, up to a minute (it was built again at every poll, its router read each time). A
        changed config file is tried at once, and a try once the folder is there applies it."""
        stage = embedding_config(tmp_path)["routing"]["stages"][0]  # type: ignore[index]
        del stage["feedback_db"]
        config = default_config()
        path = watched_config(tmp_path, config)
        clock = Clock()
        tries: list[float] = []
        async with Server(load_settings(path, keyless_environ()), port=0) as server:

            async def apply(settings: Settings) -> None:
                tries.append(clock.now)
                await server.reload(settings)

            watcher = ConfigWatcher(path, 1.0, apply, clock=clock)
            config["routing"] = {
                "default_model": "gpt-4o-mini",
                "stages": [{**stage, "router": str(tmp_path / "later")}],
            }
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            with capture_logs() as logs:
                for second in range(250):  # a poll a second
                    clock.now = second
                    assert not await watcher.check()
                backed_off = list(tries)
                config["routing"]["stages"][0]["threshold"] = 0.5  # type: ignore[index]
                path.write_text(yaml.safe_dump(config), encoding="utf-8")
                clock.now = 250
                assert not await watcher.check()
                (tmp_path / "router").rename(tmp_path / "later")
                clock.now = 251
                applied = await watcher.check()
        assert backed_off == [0, 1, 3, 7, 15, 31, 63, 123, 183, 243]
        assert tries[len(backed_off) :] == [250, 251]
        assert applied
        assert [entry["event"] for entry in logs if entry["event"].startswith("config_")] == [
            "config_reload_rejected",
            "config_reload_rejected",
            "config_reloaded",
        ]


class TestReloadOutcomes:
    async def test_every_change_is_counted_applied_or_rejected(self, tmp_path: Path) -> None:
        """The watcher reports each change it sees: a valid file "applied", invalid YAML and a
        file that fails to build "rejected" (the server counts them in routesvc.config.reloads,
        so a rejected file, which only the next restart would trip over, can be alerted on)."""
        configmap = ConfigMapDir(tmp_path)
        configmap.publish(config_text("gpt-4o-mini"))
        applied: list[str] = []
        outcomes: list[str] = []

        async def apply(settings: Settings) -> None:
            if settings.config.routing.default_model == "claude-sonnet":
                raise ConfigError("routing.stages[0].examples: cannot read it")
            applied.append(settings.config.routing.default_model)

        watcher = ConfigWatcher(configmap.path, 0.05, apply, outcome=outcomes.append)
        for text in (config_text("gpt-4o"), "routing: {default_model: [broken", config_text("claude-sonnet")):
            configmap.publish(text)
            await watcher.check()
        assert (applied, outcomes) == (["gpt-4o"], ["applied", "rejected", "rejected"])


class TestAWatchedFileThatGoesAway:
    async def test_a_deleted_file_is_said_once_and_the_old_configuration_stays(self, tmp_path: Path) -> None:
        """The watched file is deleted: nothing is applied, and the log says so once (not at every
        poll); when it is back with a change, that change is applied as usual."""
        path = tmp_path / "config.yaml"
        path.write_text(config_text("gpt-4o-mini"), encoding="utf-8")
        applied: list[str] = []

        async def apply(settings: Settings) -> None:
            applied.append(settings.config.routing.default_model)

        watcher = ConfigWatcher(path, 0.05, apply)
        path.unlink()
        with capture_logs() as logs:
            for _ in range(3):
                assert not await watcher.check()
            path.write_text(config_text("gpt-4o"), encoding="utf-8")
            assert await watcher.check()
        events = [e["event"] for e in logs if e["event"].startswith("config_")]
        assert events == ["config_file_unreadable", "config_file_readable", "config_reloaded"]
        assert applied == ["gpt-4o"]
