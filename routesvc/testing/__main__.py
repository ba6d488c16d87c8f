"""``python -m routesvc.testing [--host H] [--port N]``: the fake provider as a process, until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from routesvc.testing._fake import FakeProvider


async def _run(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with FakeProvider(host=host, port=port) as fake:
        # The address on stdout lets a parent process that asked for port 0 find the server.
        sys.stdout.write(f"{fake.base_url}\n")
        sys.stdout.flush()
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Run a fake OpenAI + Anthropic server on loopback until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m routesvc.testing", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default 0: a free port, printed)")
    args = parser.parse_args(argv)
    asyncio.run(_run(args.host, args.port))


if __name__ == "__main__":
    main()
