"""Multi-process serving (``server.workers``, ``routesvc serve --workers N``) and uvloop: several
processes answer on one port, and SIGTERM drains every one of them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from routesvc.client import RouterClient
from routesvc.config import NATIVE_THREAD_VARIABLES, Settings, limit_native_threads
from routesvc.errors import ConfigError
from routesvc.supervisor import serve_workers
from routesvc.testing import FakeProvider, Script
from tests.conftest import default_config, free_port, live_environ, loopback_channel, settings_from, user_chat


class _Serve:
    """``python -m routesvc serve`` as a child process whose JSON log lines are read as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, object]] = []

    async def until(self, event: str, count: int = 1, timeout: float = 30.0) -> dict[str, object]:
        """Read log lines until ``event`` has been seen ``count`` times; returns the last."""
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while sum(e.get("event") == event for e in self.events) < count:
                line = await self.process.stdout.readline()
                if not line:
                    raise AssertionError(f"exited before {count} x {event}: {self.events}")
                if line.startswith(b"{"):
                    self.events.append(json.loads(line))
        return [e for e in self.events if e.get("event") == event][-1]


@pytest.fixture
async def serve_process(tmp_path: Path, fake: FakeProvider) -> AsyncIterator[_Serve]:
    """Two workers on uvloop on a port the supervisor picks and a fixed health port, both
    providers pointed at ``fake``."""
    health_port = free_port()
    config = default_config()
    config["server"] = {"port": 0, "workers": 2, "uvloop": True, "grace_seconds": 5, "health_port": health_port}
    config["logging"] = {"format": "json"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ROUTESVC_"))}
    env |= live_environ(fake)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "routesvc", "serve", "--config", str(path), stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        yield _Serve(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


class TestWorkers:
    async def test_two_workers_serve_one_port_and_drain_on_sigterm(
        self, serve_process: _Serve, fake: FakeProvider
    ) -> None:
        """Both workers start on the supervisor's port, answer Route from fresh connections, and on
        SIGTERM a stream in flight still completes; every process exits 0."""
        started = await serve_process.until("workers_started")
        await serve_process.until("server_started", count=2)
        target = str(started["target"])
        assert {e["target"] for e in serve_process.events if e["event"] == "server_started"} == {target}
        health_targets = {e["health_target"] for e in serve_process.events if e["event"] == "server_started"}
        assert len(health_targets) == 1
        for _ in range(4):  # both workers share the health port too
            async with loopback_channel(str(*health_targets)) as channel:
                response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert response.status == health_pb2.HealthCheckResponse.SERVING
        for _ in range(4):
            async with RouterClient(target) as client:
                assert (await client.route(user_chat("What is the capital of France?"))).model == "gpt-4o-mini"

        fake.enqueue(Script(chunk_count=10, chunk_delay=0.1))
        async with RouterClient(target) as client:
            stream = client.complete(user_chat("hi"))
            first = await anext(stream)
            assert first.WhichOneof("event") == "decision"
            serve_process.process.send_signal(signal.SIGTERM)
            rest = [message.WhichOneof("event") async for message in stream]
        assert (rest.count("delta"), rest[-1]) == (10, "completion")
        assert await asyncio.wait_for(serve_process.process.wait(), 30) == 0
        await serve_process.until("server_stopped", count=2)
        assert (await serve_process.until("workers_stopped"))["failed"] is False

    async def test_a_hangup_drains_like_sigterm(self, serve_process: _Serve) -> None:
        """SIGHUP (the session went away) is forwarded as SIGTERM: both workers drain, exit 0."""
        await serve_process.until("server_started", count=2)
        serve_process.process.send_signal(signal.SIGHUP)
        assert await asyncio.wait_for(serve_process.process.wait(), 30) == 0
        await serve_process.until("server_stopped", count=2)

    async def test_workers_do_not_outlive_a_killed_supervisor(self, serve_process: _Serve) -> None:
        """SIGKILL to the supervisor (no chance to forward anything): the kernel sends each worker
        SIGTERM, so none is left serving the port as an orphan."""
        started = await serve_process.until("workers_started")
        await serve_process.until("server_started", count=2)
        serve_process.process.kill()
        await serve_process.process.wait()
        pids = [int(pid) for pid in started["pids"]]  # type: ignore[attr-defined]
        async with asyncio.timeout(20):
            while [pid for pid in pids if _alive(pid)]:  # noqa: ASYNC110 - other processes' lives have no event
                await asyncio.sleep(0.1)

    async def test_a_second_supervisor_on_a_served_port_is_refused(self, serve_process: _Serve, tmp_path: Path) -> None:
        """``serve --workers 2 --port P`` while another supervisor's workers serve P: one error line
        and exit 2, not a second set of workers silently taking a share of the connections."""
        started = await serve_process.until("workers_started")
        await serve_process.until("server_started", count=2)
        port = str(started["target"]).rpartition(":")[2]
        second = await asyncio.to_thread(_serve_once, tmp_path, default_config(), "--workers", "2", "--port", port)
        assert (second.returncode, second.stderr.splitlines()) == (
            2,
            [_in_use("server", f"127.0.0.1:{port}")],
        )

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
    async def test_a_stop_signal_while_the_workers_start_is_a_clean_stop(
        self, tmp_path: Path, signum: signal.Signals
    ) -> None:
        """SIGTERM or SIGINT as soon as the workers are spawned (still loading): each worker stops
        as asked, without a traceback, and the supervisor exits 0."""
        config = default_config()
        config["server"] = {"port": 0, "workers": 2, "grace_seconds": 2, "health_port": free_port()}
        config["logging"] = {"format": "json"}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ROUTESVC_"))}
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "routesvc", "serve", "--config", str(path)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            serving = _Serve(process)
            await serving.until("workers_started")
            process.send_signal(signum)
            async with asyncio.timeout(60):
                stdout, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, stderr.decode()
        assert "Traceback" not in stderr.decode()
        stopped = [json.loads(line) for line in stdout.splitlines() if b'"workers_stopped"' in line]
        assert stopped[0]["failed"] is False


def _serve_once(tmp_path: Path, config: dict[str, object], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m routesvc serve`` with ``config`` and ``args``, expected to end by itself."""
    path = tmp_path / "once.yaml"
    path.write_text(yaml.safe_dump(config | {"logging": {"format": "json"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ROUTESVC_"))}
    command = [sys.executable, "-m", "routesvc", "serve", "--config", str(path), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


def _in_use(field: str, address: str) -> str:
    """The one line ``serve`` prints for a port it cannot have."""
    return f"error: {field}: cannot listen on {address} (the port is in use, or the host is not this machine's)"


class TestPortsInUse:
    @pytest.mark.parametrize("field", ["server", "server.health_port"])
    def test_a_port_something_listens_on_is_refused_before_any_worker(self, tmp_path: Path, field: str) -> None:
        """A plain socket listening on the serving or the health port: the supervisor exits 2 with
        one line naming the setting and the address, as a single server does."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            config = default_config()
            if field == "server":
                config["server"] = {"port": port, "health_port": free_port()}
            else:
                config["server"] = {"port": 0, "health_port": port}
            result = _serve_once(tmp_path, config, "--workers", "2")
        assert (result.returncode, result.stderr.splitlines()) == (
            2,
            [_in_use(field, f"127.0.0.1:{port}")],
        )
        assert "workers_started" not in result.stdout

    def test_a_problem_every_worker_finds_at_start_is_one_line_and_exit_2(self, tmp_path: Path) -> None:
        """A TLS file that cannot be read is found by the workers only: the supervisor prints it
        once and exits 2, as a single server does, not one line per worker and exit 1."""
        missing = tmp_path / "missing.pem"
        config = default_config()
        config["server"] = {
            "port": 0,
            "health_port": free_port(),
            "tls": {"cert_file": str(missing), "key_file": str(missing)},
        }
        result = _serve_once(tmp_path, config, "--workers", "2")
        assert (result.returncode, result.stderr.splitlines()) == (
            2,
            [f"error: server.tls: cannot read {missing}: No such file or directory"],
        )


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting to be reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


class TestWorkerSettings:
    def test_prometheus_port_is_refused_with_workers(self) -> None:
        """One Prometheus port cannot serve several workers: refused before any worker starts."""
        config = default_config()
        config["telemetry"] = {"metrics": {"prometheus_port": 9464}}
        settings: Settings = settings_from(config)
        with pytest.raises(ConfigError, match="prometheus_port"):
            serve_workers(settings, None, workers=2)

    def test_a_health_port_picked_per_worker_is_refused(self) -> None:
        """health_port 0 would give each worker its own free port, which no probe could name."""
        config = default_config()
        config["server"] = {"health_port": 0}
        with pytest.raises(ConfigError, match=r"server\.health_port: 0 would give each of 2 workers"):
            serve_workers(settings_from(config), None, workers=2)

    def test_a_serving_port_that_is_the_health_port_is_refused(self) -> None:
        """``serve --workers 2 --port P`` with health_port P: refused before any worker starts."""
        free = free_port()
        config = default_config()
        config["server"] = {"port": 0, "health_port": free}
        with pytest.raises(ConfigError, match=rf"server\.health_port: {free} is the serving port too"):
            serve_workers(settings_from(config), None, workers=2, port=free)

    def test_workers_must_be_positive(self) -> None:
        """server.workers below 1 is a config error naming the field."""
        config = default_config()
        config["server"] = {"workers": 0}
        with pytest.raises(ConfigError, match=r"server\.workers"):
            settings_from(config)


class TestNativeThreads:
    def test_one_blas_thread_unless_the_environment_sets_one(self) -> None:
        """Each BLAS / OpenMP thread variable defaults to 1; a value already set is kept."""
        environ = {"OMP_NUM_THREADS": "4"}
        limit_native_threads(environ)
        assert environ == {"OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def test_the_running_blas_pool_is_limited_too(self) -> None:
        """With numpy already loaded (as importing the config does), its BLAS pool drops to one thread."""
        code = (
            "import numpy, threadpoolctl; from routesvc.config import limit_native_threads; limit_native_threads(); "
            "print(max(pool['num_threads'] for pool in threadpoolctl.threadpool_info()))"
        )
        env = {k: v for k, v in os.environ.items() if k not in NATIVE_THREAD_VARIABLES}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert result.stdout.strip() == "1"
