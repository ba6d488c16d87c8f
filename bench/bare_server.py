"""The baseline: a bare grpc.aio server with empty RouterService handlers of the same message shapes.

``python -m bench.bare_server --port N [--uvloop] [--workers N]``. It is built from the same generated stubs
in ``routesvc/v1``; Route answers one pre-built ``RouteResponse`` shaped like routesvc's answer
to a short prompt (model, reasons, three candidates), so the framework parses the same request
and serialises a response of the same size. Nothing else: no interceptor, logging or health.
``--workers N`` runs N such processes on the one port (grpc sets ``SO_REUSEPORT``), the
reference for routesvc's ``server.workers``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from routesvc.v1 import router_pb2 as pb
from routesvc.v1 import router_pb2_grpc as pb_grpc

_DECISION = pb.RouteDecision(
    decision_id="0" * 32,
    model="gpt-4o-mini",
    provider="openai",
    strategy="default",
    rule="default_model",
    reasons=("no rule matched; default model gpt-4o-mini",),
    estimated_input_tokens=13,
    estimated_output_tokens=512,
    estimated_cost_usd="0.00030915",
    mode=pb.MODE_REALTIME,
    candidates=[
        pb.Candidate(model="gpt-4o-mini", eligible=True),
        pb.Candidate(model="gpt-4o", eligible=True),
        pb.Candidate(model="claude-sonnet", eligible=True),
    ],
)
_ROUTE = pb.RouteResponse(decision=_DECISION)


class BareService(pb_grpc.RouterServiceServicer):
    """Answers Route at once; Complete sends the decision, ``chunks`` deltas and a completion.

    ``initial_metadata`` and ``log`` add one piece of what routesvc does per call (send the
    request id as initial metadata; one JSON log line through structlog), to price each alone.
    """

    def __init__(self, *, initial_metadata: bool = False, log: bool = False) -> None:
        self._initial_metadata = initial_metadata
        self._log = structlog.get_logger("bare") if log else None

    async def Route(self, request: pb.RouteRequest, context: grpc.aio.ServicerContext) -> pb.RouteResponse:
        if self._initial_metadata:
            await context.send_initial_metadata((("x-request-id", "0" * 32),))
        if self._log is not None:
            self._log.info("rpc_finished", method="Route", code="OK", request_id="0" * 32, duration_ms=0.1)
        return _ROUTE

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CompleteResponse]:
        yield pb.CompleteResponse(decision=_DECISION)
        for index in range(20):
            yield pb.CompleteResponse(delta=pb.TextDelta(text=f"chunk-{index} "))
        yield pb.CompleteResponse(completion=pb.Completion(model="gpt-4o-mini", cost_usd="0.0000123"))


class _Passthrough(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type hints
    """A server interceptor that does nothing but wrap the handler, as routesvc's tracing one does."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


async def serve(port: int, *, initial_metadata: bool = False, interceptor: bool = False, log: bool = False) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    if log:
        from routesvc.config import LoggingConfig
        from routesvc.telemetry import configure_logging

        sys.stdout = open(os.devnull, "w")  # noqa: SIM115, ASYNC230 - this process's stdout, once, at start
        configure_logging(LoggingConfig(level="info", format="json"))
    server = grpc.aio.server(interceptors=[_Passthrough()] if interceptor else None)
    service = BareService(initial_metadata=initial_metadata, log=log)
    pb_grpc.add_RouterServiceServicer_to_server(service, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--initial-metadata", action="store_true", help="send initial metadata on Route")
    parser.add_argument("--interceptor", action="store_true", help="add a pass-through server interceptor")
    parser.add_argument("--log", action="store_true", help="one structlog JSON line per Route (to /dev/null)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    args = parser.parse_args()
    # The other workers: this command with one worker each; they end with this process.
    command = [sys.executable, "-m", "bench.bare_server", "--port", str(args.port)]
    for flag in ("uvloop", "initial_metadata", "interceptor", "log"):
        if getattr(args, flag):
            command.append("--" + flag.replace("_", "-"))
    others = [subprocess.Popen(command) for _ in range(args.workers - 1)]  # noqa: S603 - this very module
    try:
        _serve(args)
    finally:
        for other in others:
            other.terminate()
        for other in others:
            other.wait(10)


def _serve(args: argparse.Namespace) -> None:
    main = serve(args.port, initial_metadata=args.initial_metadata, interceptor=args.interceptor, log=args.log)
    if args.uvloop:
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


if __name__ == "__main__":
    main()
