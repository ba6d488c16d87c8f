"""The baseline: a bare grpc.aio server with empty RouterService handlers of the same message shapes.

``python -m bench.bare_server --port N [--uvloop]``. It is built from the same generated stubs
in ``routesvc/v1``; Route answers one pre-built ``RouteResponse`` shaped like routesvc's answer
to a short prompt (model, reasons, three candidates), so the framework parses the same request
and serialises a response of the same size. Nothing else: no interceptor, logging or health.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc

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
    """Answers Route at once; Complete sends the decision, ``chunks`` deltas and a completion."""

    async def Route(self, request: pb.RouteRequest, context: grpc.aio.ServicerContext) -> pb.RouteResponse:
        return _ROUTE

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CompleteResponse]:
        yield pb.CompleteResponse(decision=_DECISION)
        for index in range(20):
            yield pb.CompleteResponse(delta=pb.TextDelta(text=f"chunk-{index} "))
        yield pb.CompleteResponse(completion=pb.Completion(model="gpt-4o-mini", cost_usd="0.0000123"))


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    server = grpc.aio.server()
    pb_grpc.add_RouterServiceServicer_to_server(BareService(), server)
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
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.port))
    else:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
