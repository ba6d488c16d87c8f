"""A real Jaeger for tests: start the all-in-one binary on loopback and read traces back.

Not a test module; tests import it::

    from tests.jaeger import running_jaeger, span_tags

    def test_something() -> None:
        with running_jaeger() as jaeger:
            exporter = OTLPSpanExporter(endpoint=jaeger.otlp_endpoint, insecure=True)
            ...  # send spans for service "routesvc"
            traces = jaeger.traces("routesvc", min_spans=4)

    async def test_async() -> None:
        async with running_jaeger() as jaeger:
            ...
            traces = await jaeger.atraces("routesvc")

The binary is the Jaeger v1 all-in-one (collector + query + in-memory storage in one process),
found in this order: ``$ROUTESVC_JAEGER_BIN``; the cache that ``.ci/jaeger.sh`` fills,
``${ROUTESVC_CACHE:-~/.cache/routesvc}/jaeger/<version>/jaeger-all-in-one``; otherwise
``.ci/jaeger.sh`` is run to build it from the Go module proxy (minutes, once per machine).

Every listener gets its own free port on 127.0.0.1, so parallel test processes do not collide and
nothing is reachable from outside. Jaeger's own self-tracing is switched off so that only the
spans a test sends are stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "JAEGER_VERSION",
    "Jaeger",
    "JaegerError",
    "find_jaeger_binary",
    "running_jaeger",
    "span_tags",
    "spans_of",
]

JAEGER_VERSION = os.environ.get("JAEGER_VERSION", "v1.76.0")
_REPO_ROOT = Path(__file__).resolve().parents[1]
_BUILD_SCRIPT = _REPO_ROOT / ".ci" / "jaeger.sh"
_LOOPBACK = "127.0.0.1"
_READY_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
_START_ATTEMPTS = 3  # free ports are picked before the process binds them; retry if one got taken


class JaegerError(RuntimeError):
    """Jaeger could not be built, started, or queried."""


def _cache_root() -> Path:
    configured = os.environ.get("ROUTESVC_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "routesvc"


def find_jaeger_binary(*, build: bool = True) -> Path:
    """Return the path of the Jaeger all-in-one binary, building it with ``.ci/jaeger.sh`` if needed.

    ``$ROUTESVC_JAEGER_BIN`` wins when set (and must exist). Otherwise the ``.ci/jaeger.sh`` cache
    path for ``$JAEGER_VERSION`` (default v1.76.0) is used; when it is absent and ``build`` is true
    the script is run (its log goes to this process's stderr) and the path it prints is returned.
    """
    explicit = os.environ.get("ROUTESVC_JAEGER_BIN")
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise JaegerError(f"ROUTESVC_JAEGER_BIN={explicit} is not an executable file")
        return path
    cached = _cache_root() / "jaeger" / JAEGER_VERSION / "jaeger-all-in-one"
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    if not build:
        raise JaegerError(f"no Jaeger binary at {cached}; run {_BUILD_SCRIPT} or set ROUTESVC_JAEGER_BIN")
    env = {**os.environ, "JAEGER_VERSION": JAEGER_VERSION}
    result = subprocess.run([str(_BUILD_SCRIPT)], env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise JaegerError(f"{_BUILD_SCRIPT} failed with exit code {result.returncode}; see its log on stderr")
    path = Path(lines[-1])
    if not path.is_file():
        raise JaegerError(f"{_BUILD_SCRIPT} printed {path}, which does not exist")
    return path


def span_tags(span: dict[str, Any]) -> dict[str, Any]:
    """Flatten a Jaeger query-API span's ``tags`` list (``[{key, type, value}]``) into a dict."""
    return {tag["key"]: tag["value"] for tag in span.get("tags", [])}


def spans_of(traces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All spans of the given query-API traces, each with its ``serviceName`` copied onto it."""
    spans: list[dict[str, Any]] = []
    for trace in traces:
        processes = trace.get("processes", {})
        for span in trace.get("spans", []):
            process = processes.get(span.get("processID"), {})
            spans.append({**span, "serviceName": process.get("serviceName")})
    return spans


@dataclass(frozen=True)
class _Ports:
    otlp_grpc: int
    otlp_http: int
    collector_grpc: int
    collector_http: int
    query_http: int
    query_grpc: int
    admin_http: int

    @classmethod
    def pick(cls) -> _Ports:
        # Hold every socket open until all are chosen, so the seven ports are distinct.
        with contextlib.ExitStack() as stack:
            ports = []
            for _ in range(7):
                sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.bind((_LOOPBACK, 0))
                ports.append(sock.getsockname()[1])
        return cls(*ports)

    def flags(self) -> list[str]:
        def hp(port: int) -> str:
            return f"{_LOOPBACK}:{port}"

        return [
            "--collector.otlp.enabled=true",
            f"--collector.otlp.grpc.host-port={hp(self.otlp_grpc)}",
            f"--collector.otlp.http.host-port={hp(self.otlp_http)}",
            f"--collector.grpc-server.host-port={hp(self.collector_grpc)}",
            f"--collector.http-server.host-port={hp(self.collector_http)}",
            f"--query.http-server.host-port={hp(self.query_http)}",
            f"--query.grpc-server.host-port={hp(self.query_grpc)}",
            f"--admin.http.host-port={hp(self.admin_http)}",
            # Zipkin stays off (its default host-port is empty).
        ]


def _http_get_json(url: str, timeout: float) -> tuple[int, Any]:
    """GET a loopback URL; (status, decoded JSON or None). Connection errors raise OSError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http://127.0.0.1 built here
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"null")
        except ValueError:
            return exc.code, None


@dataclass
class Jaeger:
    """A running Jaeger all-in-one process, as yielded by :func:`running_jaeger`."""

    binary: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    ports: _Ports
    #: OTLP/gRPC receiver, for ``OTLPSpanExporter(endpoint=..., insecure=True)`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``.
    otlp_endpoint: str = field(init=False)
    #: OTLP/HTTP receiver (append ``/v1/traces`` for the traces endpoint).
    otlp_http_endpoint: str = field(init=False)
    #: Query service base URL: JSON API under ``/api`` (the source build serves a placeholder UI at ``/``).
    query_url: str = field(init=False)
    #: Admin server: health check at ``/``, Prometheus metrics at ``/metrics``.
    admin_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.otlp_endpoint = f"http://{_LOOPBACK}:{self.ports.otlp_grpc}"
        self.otlp_http_endpoint = f"http://{_LOOPBACK}:{self.ports.otlp_http}"
        self.query_url = f"http://{_LOOPBACK}:{self.ports.query_http}"
        self.admin_url = f"http://{_LOOPBACK}:{self.ports.admin_http}"

    def log(self) -> str:
        """Jaeger's combined stdout/stderr so far (for failure messages)."""
        return self.log_path.read_text(errors="replace")

    def services(self) -> list[str]:
        """Service names Jaeger has received spans for."""
        status, body = _http_get_json(f"{self.query_url}/api/services", timeout=5)
        if status != 200 or not isinstance(body, dict):
            raise JaegerError(f"GET /api/services -> {status}: {body}")
        return list(body.get("data") or [])

    def traces(
        self,
        service: str,
        *,
        operation: str | None = None,
        tags: dict[str, str] | None = None,
        min_traces: int = 1,
        min_spans: int = 1,
        timeout: float = 15.0,
        interval: float = 0.2,
        lookback: str = "1h",
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Poll ``/api/traces?service=...`` until enough traces and spans are stored; return the traces.

        Each trace is the query API's JSON: ``{"traceID", "spans": [...], "processes": {...}}``; each
        span has ``spanID``, ``operationName``, ``references`` (parent links), ``startTime``,
        ``duration`` (microseconds), ``tags`` (see :func:`span_tags`) and ``logs`` (span events).
        Returns once at least ``min_traces`` traces holding ``min_spans`` spans in total are there,
        and raises :class:`JaegerError` (with Jaeger's log tail) after ``timeout`` seconds.
        Spans of one trace can arrive in several export batches, so ask for the ``min_spans`` you
        expect rather than asserting on the first poll.
        """
        query: dict[str, str] = {"service": service, "lookback": lookback, "limit": str(limit)}
        if operation is not None:
            query["operation"] = operation
        if tags:
            query["tags"] = json.dumps(tags)
        url = f"{self.query_url}/api/traces?{urllib.parse.urlencode(query)}"
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            self._check_alive()
            try:
                status, body = _http_get_json(url, timeout=5)
                last = (status, body)
                if status == 200 and isinstance(body, dict):
                    found: list[dict[str, Any]] = list(body.get("data") or [])
                    spans = sum(len(t.get("spans", [])) for t in found)
                    if len(found) >= min_traces and spans >= min_spans:
                        return found
            except OSError as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise JaegerError(
                    f"no {min_traces} trace(s) / {min_spans} span(s) for service {service!r} within {timeout}s; "
                    f"last response: {str(last)[:2000]}\n--- jaeger log tail ---\n{self.log()[-3000:]}"
                )
            time.sleep(interval)

    async def atraces(
        self,
        service: str,
        *,
        operation: str | None = None,
        tags: dict[str, str] | None = None,
        min_traces: int = 1,
        min_spans: int = 1,
        timeout: float = 15.0,
        interval: float = 0.2,
        lookback: str = "1h",
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """:meth:`traces` without blocking the event loop (polls in a worker thread)."""
        return await asyncio.to_thread(
            lambda: self.traces(
                service,
                operation=operation,
                tags=tags,
                min_traces=min_traces,
                min_spans=min_spans,
                timeout=timeout,
                interval=interval,
                lookback=lookback,
                limit=limit,
            )
        )

    def _check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise JaegerError(f"jaeger exited with code {code}\n--- jaeger log tail ---\n{self.log()[-3000:]}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if self._ready():
                return
            if time.monotonic() >= deadline:
                raise JaegerError(f"jaeger not ready within {timeout}s\n--- jaeger log tail ---\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            health, _ = _http_get_json(self.admin_url + "/", timeout=2)
            query, _ = _http_get_json(f"{self.query_url}/api/services", timeout=2)
            with socket.create_connection((_LOOPBACK, self.ports.otlp_grpc), timeout=2):
                pass
        except OSError:
            return False
        return health == 200 and query == 200

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after a grace period) and reap it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _jaeger_env(ports: _Ports) -> dict[str, str]:
    # Drop the caller's OTEL_* settings (a test may point them at this very Jaeger) and switch off
    # Jaeger's self-tracing, so the store holds only what the test sends and nothing dials out.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        {
            "SPAN_STORAGE_TYPE": "memory",
            "OTEL_TRACES_SAMPLER": "always_off",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{_LOOPBACK}:{ports.otlp_grpc}",
        }
    )
    env.pop("METRICS_STORAGE_TYPE", None)
    env.pop("SAMPLING_CONFIG_TYPE", None)
    return env


def _start(binary: Path, extra_args: list[str], log_dir: Path) -> Jaeger:
    failures: list[str] = []
    for attempt in range(1, _START_ATTEMPTS + 1):
        ports = _Ports.pick()
        log_path = log_dir / f"jaeger-{attempt}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [str(binary), *ports.flags(), "--memory.max-traces=100000", *extra_args],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=_jaeger_env(ports),
            )
        jaeger = Jaeger(binary=binary, process=process, log_path=log_path, ports=ports)
        try:
            jaeger._wait_ready(_READY_TIMEOUT_S)
        except BaseException as exc:
            jaeger.stop()
            if isinstance(exc, JaegerError) and "address already in use" in jaeger.log():
                failures.append(str(exc))
                continue
            raise
        return jaeger
    raise JaegerError("jaeger failed to start (ports kept being taken):\n" + "\n".join(failures))


@contextlib.contextmanager
def _running(extra_args: list[str]) -> Iterator[Jaeger]:
    binary = find_jaeger_binary()
    with tempfile.TemporaryDirectory(prefix="routesvc-jaeger-") as log_dir:
        jaeger = _start(binary, extra_args, Path(log_dir))
        try:
            yield jaeger
        finally:
            jaeger.stop()


class running_jaeger:  # lower case: reads as a function at the call site, `with running_jaeger() as j:`
    """Start a Jaeger all-in-one on loopback for the duration of a ``with`` or ``async with`` block.

    Yields a :class:`Jaeger` with ``otlp_endpoint`` (``"http://127.0.0.1:PORT"``, OTLP/gRPC),
    ``query_url`` and ``traces(service, ...)``. Storage is in memory and private to this process,
    so each block starts empty. The process is stopped and reaped when the block exits, also on
    errors. ``extra_args`` are appended to Jaeger's command line.
    """

    def __init__(self, *, extra_args: list[str] | None = None) -> None:
        self._cm = _running(list(extra_args or []))

    def __enter__(self) -> Jaeger:
        return self._cm.__enter__()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._cm.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> Jaeger:
        # Start in a worker thread; if we are cancelled meanwhile, stop Jaeger once it is up
        # instead of leaking the process.
        task = asyncio.ensure_future(asyncio.to_thread(self._cm.__enter__))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:

            def stop_when_started(done: asyncio.Future[Jaeger]) -> None:
                if not done.cancelled() and done.exception() is None:
                    self._cm.__exit__(None, None, None)

            task.add_done_callback(stop_when_started)
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self._cm.__exit__, exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"<running_jaeger {JAEGER_VERSION}>"
