"""The server: health, reflection, unknown methods, request ids, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import pytest
import yaml
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from routesvc.client import RouterClient
from routesvc.server import SERVICE_NAME, Server
from routesvc.testing import FakeProvider
from routesvc.v1 import router_pb2 as pb
from routesvc.v1 import router_pb2_grpc as pb_grpc
from tests.conftest import REPO, default_config, live_environ, loopback_channel, settings_from, user_chat


async def health_across_drain(server: Server, target: str, service: str = "") -> tuple[int, int]:
    """The status a plaintext Watch on ``target`` streams first, and then once ``server`` starts
    draining."""
    async with loopback_channel(target) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))
        first = await call.read()
        closing = asyncio.create_task(server.aclose())
        second = await call.read()
        await closing
    return first.status, second.status


class TestTheTestsChannelsSkipProxies:
    """The channels tests open to their in-process server (``loopback_channel``) go straight to
    it, whatever proxy the environment names (as CI and corporate machines do)."""

    async def test_a_test_channel_reaches_the_server_past_a_closed_proxy(
        self, server: Server, monkeypatch: pytest.MonkeyPatch, unaccepting_port: int
    ) -> None:
        """grpc_proxy, http_proxy and https_proxy name a port that never accepts: Check still says
        SERVING (a plain ``grpc.aio.insecure_channel`` tunnels even a loopback call through the
        proxy: the call ended DEADLINE_EXCEEDED)."""
        for name in ("grpc_proxy", "http_proxy", "https_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{unaccepting_port}")
        async with loopback_channel(server.target) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


class TestHealth:
    async def test_serving_for_the_server_and_the_service(self, server: Server) -> None:
        """grpc.health.v1 Check says SERVING for "" and for routesvc.v1.RouterService."""
        async with loopback_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", SERVICE_NAME):
                response = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                assert response.status == health_pb2.HealthCheckResponse.SERVING

    async def test_watch_sees_not_serving_on_shutdown(self, server: Server) -> None:
        """Watch streams SERVING, then NOT_SERVING when the server starts draining."""
        assert await health_across_drain(server, server.target, SERVICE_NAME) == (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    async def test_limits_near_gRPCs_32_bit_counts_still_start_the_server(self) -> None:
        """max_concurrent_rpcs and max_health_watch_streams set "unlimited" (near 2**31): their
        sum, each connection's stream limit, is capped at gRPC's 32-bit maximum (the server
        failed to start with an OverflowError)."""
        config = default_config()
        config["server"] = {**config["server"], "health_port": 0, "max_health_watch_streams": 2_147_483_000}
        config["reliability"] = {"max_concurrent_rpcs": 2_147_483_000}
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            models = await client.list_models()
        assert models

    async def test_one_address_holds_only_its_share_of_the_watch_streams(self) -> None:
        """server.max_health_watch_streams_per_peer 2: a third Watch from 127.0.0.1 (any
        connection) is refused RESOURCE_EXHAUSTED naming the setting, while another address (::1)
        is still served: one peer, no key needed, cannot take every place and make the replica
        look unhealthy to every client that watches it."""
        config = default_config()
        config["server"] = {
            **config["server"],
            "host": "[::]",
            "max_health_watch_streams": 10,
            "max_health_watch_streams_per_peer": 2,
        }
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        async with Server(settings_from(config), port=0) as server:
            port = server.target.rsplit(":", 1)[1]
            async with (
                loopback_channel(f"127.0.0.1:{port}") as first,
                loopback_channel(f"127.0.0.1:{port}") as second,
                loopback_channel(f"[::1]:{port}") as other,
            ):
                held = [health_pb2_grpc.HealthStub(c).Watch(request) for c in (first, second)]
                statuses = [(await watch.read()).status for watch in held]
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await health_pb2_grpc.HealthStub(first).Watch(request).read()
                elsewhere = await health_pb2_grpc.HealthStub(other).Watch(request).read()
        serving = health_pb2.HealthCheckResponse.SERVING
        assert (statuses, elsewhere.status) == ([serving, serving], serving)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server.max_health_watch_streams_per_peer" in (refused.value.details() or "")

    async def test_a_watch_of_a_service_no_one_could_name_is_refused_not_kept(self, server: Server) -> None:
        """A Watch's service name is held while it is open: one over 256 characters (no service
        is named so) is INVALID_ARGUMENT at once, so 1,000 unauthenticated Watch streams cannot
        hold a 4 MiB name each; an unknown name of ordinary length still streams SERVICE_UNKNOWN."""
        async with loopback_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Watch(health_pb2.HealthCheckRequest(service="s" * 100_000)).read()
            unknown = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"))
            first = await unknown.read()
            unknown.cancel()
        assert (caught.value.code(), caught.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "service: must be at most 256 characters",
        )
        assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

    async def test_watch_streams_are_capped_across_both_ports(self) -> None:
        """Health needs no key, so the Watch streams open at once are capped
        (server.max_health_watch_streams 3, both ports together): a fourth is refused
        RESOURCE_EXHAUSTED, Check still answers, and a Watch that ends frees its place."""
        config = default_config()
        config["server"] = {**config["server"], "health_port": 0, "max_health_watch_streams": 3}
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        async with (
            Server(settings_from(config), port=0) as server,
            loopback_channel(server.target) as channel,
            loopback_channel(server.health_target) as health_channel,
        ):
            stubs = [health_pb2_grpc.HealthStub(channel), health_pb2_grpc.HealthStub(health_channel)]
            watches = [stubs[0].Watch(request), stubs[0].Watch(request), stubs[1].Watch(request)]
            firsts = [(await watch.read()).status for watch in watches]
            refused = [stub.Watch(request) for stub in stubs]
            with pytest.raises(grpc.aio.AioRpcError) as on_serving_port:
                await refused[0].read()
            with pytest.raises(grpc.aio.AioRpcError) as on_health_port:
                await refused[1].read()
            checked = [(await stub.Check(request)).status for stub in stubs]

            watches.pop().cancel()

            async def watch_again() -> health_pb2.HealthCheckResponse.ServingStatus:
                while True:  # until the server has seen the cancel and ended that Watch
                    try:
                        return (await stubs[0].Watch(request).read()).status
                    except grpc.aio.AioRpcError as error:
                        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                            raise
                    await asyncio.sleep(0.01)

            async with asyncio.timeout(10):
                again = await watch_again()
        serving = health_pb2.HealthCheckResponse.SERVING
        assert firsts == [serving] * 3
        assert (on_serving_port.value.code(), on_health_port.value.code()) == (grpc.StatusCode.RESOURCE_EXHAUSTED,) * 2
        assert "server.max_health_watch_streams" in (on_serving_port.value.details() or "")
        assert (checked, again) == ([serving, serving], serving)

    async def test_a_connection_opens_a_bounded_number_of_streams(self) -> None:
        """grpc.max_concurrent_streams per connection on the serving port: max_concurrent_rpcs 1
        plus max_health_watch_streams 2. With two Watch streams and a reflection stream held
        open on one connection, a Check on it cannot start (its deadline passes while the client
        waits for a stream); on another connection it is answered."""
        config = default_config()
        config["server"] = {**config["server"], "max_health_watch_streams": 2}
        config["reliability"] = {"max_concurrent_rpcs": 1}
        request = health_pb2.HealthCheckRequest()
        async with (
            Server(settings_from(config), port=0) as server,
            loopback_channel(server.target) as channel,
            loopback_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as other,
        ):
            stub = health_pb2_grpc.HealthStub(channel)
            watches = [stub.Watch(request) for _ in range(2)]
            firsts = [(await watch.read()).status for watch in watches]
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
            await reflection.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await reflection.read()  # the third stream is open, and stays open
            with pytest.raises(grpc.aio.AioRpcError) as waiting:
                await stub.Check(request, timeout=0.5)
            answered = await health_pb2_grpc.HealthStub(other).Check(request)
        assert firsts == [health_pb2.HealthCheckResponse.SERVING] * 2
        assert waiting.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert answered.status == health_pb2.HealthCheckResponse.SERVING


class TestReflection:
    async def test_lists_the_services(self, server: Server) -> None:
        """Server reflection lists RouterService and health."""
        async with loopback_channel(server.target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            async for response in responses:
                names = {service.name for service in response.list_services_response.service}
                break
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


class TestMetadata:
    async def test_unknown_method_is_unimplemented(self, server: Server) -> None:
        """A method the service does not have is UNIMPLEMENTED."""
        async with loopback_channel(server.target) as channel:
            call = channel.unary_unary("/routesvc.v1.RouterService/Nope")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(b"")
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

    async def test_request_id_round_trips(self, server: Server) -> None:
        """x-request-id sent by the client comes back in initial and trailing metadata."""
        async with loopback_channel(server.target) as channel:
            from routesvc.v1 import router_pb2 as pb
            from routesvc.v1 import router_pb2_grpc as pb_grpc

            call = pb_grpc.RouterServiceStub(channel).Route(
                pb.RouteRequest(chat=user_chat("hi")), metadata=(("x-request-id", "req-123"),)
            )
            await call
            initial = dict(await call.initial_metadata())
            trailing = dict(await call.trailing_metadata())
        assert (initial["x-request-id"], trailing["x-request-id"]) == ("req-123", "req-123")

    @pytest.mark.parametrize("method", ["Route", "Complete"])
    async def test_a_request_id_over_128_characters_is_invalid_and_a_made_up_one_is_echoed(
        self, fake: FakeProvider, method: str
    ) -> None:
        """An x-request-id of 129 characters or more is INVALID_ARGUMENT naming it, and the
        provider is not called; a made-up id is echoed in its place, and one of 128 characters
        round-trips. (A 9,000-character one was echoed twice, over the caller's own 8 KiB
        metadata limit: a Complete served, and billed, failed RESOURCE_EXHAUSTED at the caller.)"""
        async with (
            Server(settings_from(default_config(), live_environ(fake)), port=0) as server,
            loopback_channel(server.target) as channel,
        ):
            stub = pb_grpc.RouterServiceStub(channel)

            async def call(request_id: str) -> tuple[dict[str, str | bytes], grpc.StatusCode, str]:
                metadata = (("x-request-id", request_id),)
                if method == "Route":
                    unary = stub.Route(pb.RouteRequest(chat=user_chat("hi")), metadata=metadata)
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await unary
                    initial, code = dict(await unary.initial_metadata()), await unary.code()
                    trailing = dict(await unary.trailing_metadata())
                else:
                    stream = stub.Complete(pb.CompleteRequest(chat=user_chat("hi")), metadata=metadata)
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        [m async for m in stream]
                    initial, code = dict(await stream.initial_metadata()), await stream.code()
                    trailing = dict(await stream.trailing_metadata())
                assert initial["x-request-id"] == trailing["x-request-id"]
                field = ""
                if code is grpc.StatusCode.INVALID_ARGUMENT:
                    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])  # type: ignore[arg-type]
                    info = error_details_pb2.ErrorInfo()
                    status.details[0].Unpack(info)
                    field = info.metadata["field"]
                return initial, code, field

            longest = "r" * 128
            refused = [await call("x" * length) for length in (129, 9000)]
            served = await call(longest)
        assert [(code, field) for _, code, field in refused] == [(grpc.StatusCode.INVALID_ARGUMENT, "x-request-id")] * 2
        assert all(len(str(initial["x-request-id"])) == 32 for initial, _, _ in refused)
        assert (served[0]["x-request-id"], served[1]) == (longest, grpc.StatusCode.OK)
        assert len(fake.requests) == (1 if method == "Complete" else 0)

    async def test_a_request_id_is_made_when_missing(self, client: RouterClient, server: Server) -> None:
        """Without x-request-id the server makes one up and returns it."""
        async with loopback_channel(server.target) as channel:
            from routesvc.v1 import router_pb2 as pb
            from routesvc.v1 import router_pb2_grpc as pb_grpc

            call = pb_grpc.RouterServiceStub(channel).Route(pb.RouteRequest(chat=user_chat("hi")))
            await call
            assert len(dict(await call.initial_metadata())["x-request-id"]) == 32


class TestProcess:
    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
    def test_sigterm_exits_zero_after_logging(self, signum: signal.Signals) -> None:
        """`routesvc serve` logs JSON lines, and on SIGTERM (or SIGHUP: the session went away)
        drains and exits 0."""
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        process = subprocess.Popen(
            [sys.executable, "-m", "routesvc", "serve", "--port", "0"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            started = json.loads(process.stdout.readline())
            assert started["event"] == "server_started"
            process.send_signal(signum)
            assert process.wait(timeout=30) == 0
            events = [json.loads(line)["event"] for line in process.stdout.read().splitlines()]
            assert events[-2:] == ["server_draining", "server_stopped"] or events[-1] == "server_stopped"
            # Started without any provider key: said at start, once per provider and once overall.
            assert (events.count("provider_unconfigured"), events.count("no_provider_configured")) == (2, 1)
        finally:
            process.kill()


def _pid_namespaces() -> bool:
    """Whether this host lets the tests start a process as PID 1 of its own PID namespace."""
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def _serve_without_keys(
    *args: str, wrapper: Sequence[str] = (), preexec_fn: Callable[[], object] | None = None
) -> subprocess.Popen[str]:
    """``[wrapper] python -m routesvc serve --port 0 [args]``, no provider key set, logs piped."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return subprocess.Popen(
        [*wrapper, sys.executable, "-m", "routesvc", "serve", "--port", "0", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def _assert_stopped_while_starting(process: subprocess.Popen[str]) -> None:
    """``process`` logged only that a SIGTERM stopped it before serving, and exited 0 without a
    traceback (one that ignored the signal logs ``server_started`` first; one that died of it,
    nothing)."""
    assert process.stdout is not None
    assert process.stderr is not None
    line = process.stdout.readline()
    assert line, f"no log line; exit {process.wait(timeout=30)}"
    assert (json.loads(line)["event"], json.loads(line)["signal"]) == ("server_not_started", "SIGTERM")
    assert process.wait(timeout=30) == 0
    assert process.stdout.read() == ""
    assert "Traceback" not in process.stderr.read()


class TestStopWhileStarting:
    """A stop signal that comes while ``routesvc serve`` starts (imports, config) ends it at once
    and cleanly: exit 0 and ``server_not_started``, never a server that then serves. As PID 1
    (in a container) a SIGTERM without a handler is dropped by the kernel instead of killing."""

    @pytest.mark.parametrize(
        ("fifo", "pid1"),
        [("config", False), ("config", True), ("examples", False)],
        ids=["config read", "config read as PID 1", "server built"],
    )
    def test_a_sigterm_while_starting_exits_zero_without_serving(self, tmp_path: Path, fifo: str, pid1: bool) -> None:
        """A FIFO catches the server at a point of its start, its imports done: reading its config
        file (before its event loop runs), or building the server (in its event loop: a
        classifier stage's examples file). A SIGTERM then stops it without reading on, also as
        PID 1 of a PID namespace, where the default action of SIGTERM is none (a server without a
        handler then read on)."""
        if pid1 and not _pid_namespaces():
            pytest.skip("no PID namespaces here (unshare --pid needs CAP_SYS_ADMIN)")
        config = tmp_path / "config.yaml"
        examples = tmp_path / "examples.jsonl"
        if fifo == "config":
            os.mkfifo(config)
            held = config
        else:
            os.mkfifo(examples)
            held = examples
            settings = default_config()
            settings["routing"]["stages"] = [{"kind": "classifier", "examples": str(examples)}]  # type: ignore[index]
            config.write_text(yaml.safe_dump(settings), encoding="utf-8")
        # --kill-child: killing unshare in the end kills the server in it too.
        process = _serve_without_keys(
            "--config", str(config), wrapper=["unshare", "--pid", "--fork", "--kill-child"] if pid1 else []
        )

        def unblock_if_gone() -> None:
            # A server that died before opening the FIFO would leave open() below blocked.
            process.wait()
            with contextlib.suppress(OSError):
                os.close(os.open(held, os.O_RDONLY | os.O_NONBLOCK))

        threading.Thread(target=unblock_if_gone, daemon=True).start()
        try:
            writer = os.open(held, os.O_WRONLY)  # returns once the server opened it to read
            try:
                assert process.poll() is None, process.communicate()
                server = process.pid
                if pid1:  # unshare's one child, PID 1 inside
                    (server,) = map(int, Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split())
                os.kill(server, signal.SIGTERM)
                # A server that ignored the signal reads on, finds this invalid and exits 2.
                with contextlib.suppress(BrokenPipeError):
                    os.write(writer, b"server: {port: not-a-port}\n" if fifo == "config" else b"not json\n")
            finally:
                os.close(writer)
            _assert_stopped_while_starting(process)
        finally:
            process.kill()
            process.wait()

    def test_a_signal_that_cuts_a_lazy_import_short_is_still_found_behind_the_error_it_causes(self) -> None:
        """A module start-up imports lazily (a provider's batch adapter, its SDK) can be cut short
        by the StopSignal; Python 3.11 then raises a RuntimeError from it (a descriptor's
        ``__set_name__`` in a class body), which ended ``serve`` with a traceback and exit 1 in
        about one start in thirty: the signal is found behind it."""
        from routesvc.signals import StopSignal, stop_signal_in

        class Interrupted:
            def __set_name__(self, owner: type, name: str) -> None:
                raise StopSignal(signal.SIGTERM)

        with pytest.raises(BaseException) as caught:  # noqa: PT011 - which one depends on the Python version
            type("Resource", (), {"events": Interrupted()})
        assert stop_signal_in(caught.value) is not None
        assert stop_signal_in(caught.value).name == "SIGTERM"  # type: ignore[union-attr]
        assert stop_signal_in(RuntimeError("bind failed")) is None

    def test_a_sigterm_before_the_first_line_is_handled_once_it_can_be(self) -> None:
        """A SIGTERM sent before the process could set any handler (here held back by starting it
        with SIGTERM blocked, as the supervisor starts its workers) is taken from the first line
        on and stops the start-up: exit 0, nothing served."""
        process = _serve_without_keys(preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM]))
        try:
            process.send_signal(signal.SIGTERM)
            _assert_stopped_while_starting(process)
        finally:
            process.kill()
            process.wait()


class TestHeap:
    async def test_a_serving_process_freezes_its_start_up_heap_and_again_after_a_reload(self) -> None:
        """``routesvc serve`` (``freeze_heap``) moves the objects built at start out of the cycle
        collector's reach, so a full collection no longer walks them (170 ms -> 2 ms measured),
        and refreezes after a reload; an embedded server (the default) leaves the heap alone."""
        gc.unfreeze()
        settings = settings_from(default_config())
        async with Server(settings, port=0):
            assert gc.get_freeze_count() == 0
        try:
            async with Server(settings, port=0, freeze_heap=True) as server:
                frozen = gc.get_freeze_count()
                assert frozen > 10_000
                await server.reload(settings_from(default_config()))
                assert gc.get_freeze_count() > 10_000
                async with RouterClient(server.target) as client:
                    decision = await client.route(user_chat("hi"))
                assert decision.model == "gpt-4o-mini"
        finally:
            gc.unfreeze()


class TestConnectionAge:
    async def test_clients_are_asked_to_reconnect_after_max_connection_age(self) -> None:
        """server.max_connection_age_seconds 0.5: the server closes the client's connection with a
        GOAWAY once it is that old (the channel leaves READY) and the next call reconnects, so
        long-lived clients spread over new replicas in time."""
        config = default_config()
        config["server"] = {"max_connection_age_seconds": 0.5}
        async with (
            Server(settings_from(config), port=0) as server,
            loopback_channel(server.target) as channel,
        ):
            stub = pb_grpc.RouterServiceStub(channel)
            request = pb.RouteRequest(chat=user_chat("hi"))
            await stub.Route(request, timeout=5)
            assert channel.get_state() is grpc.ChannelConnectivity.READY
            async with asyncio.timeout(10):
                while channel.get_state() is grpc.ChannelConnectivity.READY:  # noqa: ASYNC110 - no state event here
                    await asyncio.sleep(0.1)
            assert (await stub.Route(request, timeout=5)).decision.model == "gpt-4o-mini"
