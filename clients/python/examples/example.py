"""Route a prompt, then stream a completion for it.

    python clients/python/examples/example.py 127.0.0.1:50051 "Explain gRPC in one line"

Plaintext unless ROUTESVC_TLS=1; ROUTESVC_API_KEY is sent as a bearer token.
"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc

from routesvc.v1 import router_pb2 as pb
from routesvc_client import RouterClient, error_info, user_prompt


async def main(target: str, prompt: str) -> int:
    insecure = os.environ.get("ROUTESVC_TLS") != "1"
    async with RouterClient(target, api_key=os.environ.get("ROUTESVC_API_KEY"), insecure=insecure) as client:
        try:
            decision = await client.route(pb.RouteRequest(chat=user_prompt(prompt)), timeout=30)
            print(f"route: {decision.model} ({decision.rule}), estimated {decision.estimated_cost_usd} USD")
            # Leaving the block early (an exception, Ctrl-C) cancels the call.
            async with client.complete(pb.CompleteRequest(chat=user_prompt(prompt)), timeout=30) as stream:
                async for message in stream:
                    kind = message.WhichOneof("event")
                    if kind == "decision":
                        print(f"[{message.decision.model}]")
                    elif kind == "delta":
                        print(message.delta.text, end="", flush=True)
                    else:
                        completion = message.completion
                        tokens = f"{completion.usage.input_tokens} in / {completion.usage.output_tokens} out tokens"
                        print(f"\n[{tokens}, {completion.cost_usd} USD]")
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            print(f"{error.code().name}: {error.details()} (reason {info.reason if info else 'none'})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    prompt = " ".join(sys.argv[2:]) or "Say hello in five words."
    sys.exit(asyncio.run(main(target, prompt)))
