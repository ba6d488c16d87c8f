"""Multi-process serving: ``server.workers`` processes share one port with ``SO_REUSEPORT``.

One Python process serves on one core. With ``workers: N`` (or ``routesvc serve --workers N``)
the process started becomes a supervisor that serves nothing itself:

- it refuses a port something already holds (exit 2, as a single server), then reserves the port
  and ``server.health_port`` (bound with ``SO_REUSEPORT``, never listening, so port 0 works too)
  and logs ``workers_started`` with the target;
- it spawns N workers, fresh interpreters that each load the same configuration and run their
  own grpc.aio server on that port with ``SO_REUSEPORT``: the kernel spreads new connections
  over them (a client's channel stays on one worker);
- SIGTERM, SIGINT or SIGHUP is forwarded to every worker (SIGHUP as SIGTERM), each drains as a
  single server does (health NOT_SERVING, drain delay, grace), and the supervisor exits 0 when
  all have exited 0; a worker still starting then stops without serving, also a clean stop;
- a worker whose supervisor dies (even by SIGKILL) is sent SIGTERM by the kernel and drains
  (Linux), so no orphan keeps serving the port with an old configuration;
- a worker that exits on its own is a failure: the others are stopped and the supervisor exits
  1, so that the orchestrator restarts the whole; one that exits on a problem found at start (a
  TLS file it cannot read) makes the supervisor print that once and exit 2, as a single server.

Each worker keeps its own state: per-tenant limits, breakers, the retry budget, ``GetStats`` and
metrics are per process, so limits are per worker. ``telemetry.metrics.prometheus_port`` cannot
be shared and is refused with more than one worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from multiprocessing import resource_tracker
from types import FrameType
from typing import Any

import structlog

from routesvc.config import Settings, load_settings
from routesvc.errors import ConfigError, RouteSvcError
from routesvc.signals import STOP_SIGNALS, note_stop_signals, stop_on_signals

log = structlog.get_logger("routesvc.supervisor")


def run_event_loop(main: Coroutine[Any, Any, None], *, uvloop: bool = True) -> None:
    """Run ``main`` to completion on a new event loop: uvloop's when asked and installed (it is a
    dependency except on Windows), else asyncio's."""
    if uvloop:
        try:
            import uvloop as uvloop_module
        except ImportError:
            # Not a dependency on Windows, where asyncio's loop is expected; elsewhere it should be there.
            if sys.platform != "win32":
                log.warning("uvloop_unavailable", detail="uvloop is not installed here; running on asyncio's loop")
        else:
            uvloop_module.run(main)
            return
    asyncio.run(main)


def _reserve(host: str, port: int, field: str = "server") -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT`` that never listens: it holds the port
    (and picks one for port 0) while the workers listen on it.

    A port something else already holds is refused first, as a single server refuses it: the
    reservation and the workers share the port with ``SO_REUSEPORT``, which any other process of
    the same user could join too, silently taking a share of the connections. ``field`` names the
    setting in the error."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    in_use = ConfigError.port_in_use(field, host, port)
    if port:
        # Without SO_REUSEPORT this bind fails on any socket bound or listening there (another
        # supervisor's reservation or workers, a single server); SO_REUSEADDR only lets it past
        # connections of an earlier server still in TIME_WAIT, as grpc's own bind does.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((bare, port))
            except OSError as exc:
                raise in_use from exc
    reservation = socket.socket(family, socket.SOCK_STREAM)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind((bare, port))
    except OSError as exc:
        reservation.close()
        raise in_use from exc
    return reservation


def _end_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the parent process dies (Linux ``PR_SET_PDEATHSIG``)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(
    config_path: str | None, port: int, uvloop: bool, parent: int, errors: multiprocessing.connection.Connection
) -> None:
    """One worker process: the configuration loaded again, one server on the shared port.

    The process starts with the stop signals blocked (the supervisor blocks them while it spawns
    the workers, and a new process inherits that): here they are first taken, then let through
    (``routesvc.signals``), so one the supervisor forwarded while this worker was still starting
    stops it at once and cleanly, without serving, instead of killing it half-started. A problem
    found at start (a TLS file that cannot be read) goes back to the supervisor on ``errors`` and
    the worker exits 2; the supervisor stops the others, prints the first such problem once and
    exits 2, as a single server does.
    """
    note_stop_signals()
    _end_with_parent(parent)

    from routesvc.server import serve, stopped_while_starting
    from routesvc.telemetry import configure_logging

    settings: Settings | None = None
    try:
        stop_on_signals()
        settings = load_settings(config_path)
        configure_logging(settings.config.logging)
        structlog.contextvars.bind_contextvars(worker_pid=os.getpid())
        run_event_loop(serve(settings, port=port, reuse_port=True), uvloop=uvloop)
    except RouteSvcError as exc:
        errors.send(exc.message)
        raise SystemExit(2) from None
    except BaseException as error:
        if not stopped_while_starting(error, None if settings is None else settings.config.logging):
            raise


def serve_workers(
    settings: Settings, config_path: str | None, *, workers: int, port: int | None = None, uvloop: bool = True
) -> int:
    """Run ``workers`` server processes on one port until SIGTERM or SIGINT; returns the exit code."""
    if workers > 1 and settings.telemetry.prometheus_port:
        raise ConfigError(
            f"{settings.source}: telemetry.metrics.prometheus_port: one port cannot serve {workers} workers; "
            "unset it or use OTLP metrics"
        )
    server = settings.config.server
    if workers > 1 and server.health_port == 0:
        raise ConfigError(
            f"{settings.source}: server.health_port: 0 would give each of {workers} workers its own port; "
            "set a fixed one"
        )
    reservation = _reserve(server.host, server.port if port is None else port)
    bound = int(reservation.getsockname()[1])
    if server.health_port == bound:
        reservation.close()
        raise ConfigError(f"{settings.source}: server.health_port: {bound} is the serving port too; choose another")
    try:
        # Held too, so that the workers' health servers (also SO_REUSEPORT) join no other process's.
        health_reservation = (
            None if server.health_port is None else _reserve(server.host, server.health_port, "server.health_port")
        )
    except ConfigError:
        reservation.close()
        raise
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe(duplex=False) for _ in range(workers)]  # (supervisor's end, worker's end)
    processes = [
        context.Process(
            target=_worker, args=(config_path, bound, uvloop, os.getpid(), sending), name=f"routesvc-worker-{index}"
        )
        for index, (_, sending) in enumerate(pipes)
    ]
    received = dict(zip(processes, (receiving for receiving, _ in pipes), strict=True))
    start_error: str | None = None  # the first problem a worker found at start
    stopping = False

    def stop_all(signum: int, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        # A hangup (the terminal or session went away) drains like SIGTERM; the workers handle
        # SIGTERM and SIGINT.
        forwarded = signal.SIGTERM if signum == signal.SIGHUP else signum
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, forwarded)

    previous = {signum: signal.signal(signum, stop_all) for signum in STOP_SIGNALS}
    failed = False
    try:
        # Blocked while the workers are spawned, so that each starts with them blocked until it
        # handles them (see _worker); one sent here meanwhile is forwarded once all have a pid.
        # The resource tracker is started first: starting it unblocks SIGINT and SIGTERM here.
        resource_tracker.ensure_running()
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for process in processes:
                process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
            for _, sending in pipes:
                sending.close()
        log.info(
            "workers_started",
            workers=workers,
            target=f"{server.host}:{bound}",
            pids=[process.pid for process in processes],
        )
        running = list(processes)
        while running:
            ended = multiprocessing.connection.wait([process.sentinel for process in running])
            for process in [p for p in running if p.sentinel in ended]:
                process.join()
                running.remove(process)
                if start_error is None and received[process].poll():
                    # Ready at the end of the pipe too, for a worker that sent nothing.
                    with contextlib.suppress(EOFError):
                        start_error = received[process].recv()
                # Once stopping, a worker ended by the signal forwarded to it (before it could
                # handle it, or after its event loop closed) stopped as asked.
                if not stopping or process.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT):
                    failed = True
                    log.error("worker_exited", pid=process.pid, exit_code=process.exitcode, stopping=stopping)
                    if not stopping:
                        stop_all(signal.SIGTERM)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        reservation.close()
        if health_reservation is not None:
            health_reservation.close()
        for receiving, _ in pipes:
            receiving.close()
    log.info("workers_stopped", workers=workers, failed=failed)
    if start_error is not None:
        # Every worker finds the same problem: one line, and the exit code of a single server.
        print(f"error: {start_error}", file=sys.stderr)
        return 2
    return 1 if failed else 0
