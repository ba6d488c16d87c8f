"""Profile the routesvc server under load with pyinstrument.

    .venv/bin/python -m bench.profile_server --scenario route|complete [--concurrency 16]
        [--duration 5] [--text 30] [--html docs/profile-route.html]

The server runs in this process (logging JSON lines to /dev/null, as ``routesvc serve`` would
to a collector) under pyinstrument; the load comes from a separate process as in the
benchmarks; for ``complete`` the fake provider is a third process. Prints the call tree.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from bench import _load
from bench._harness import fake_provider, in_subprocess, provider_environ, routesvc_config


def in_process_settings(fake_base: str | None) -> Any:
    """The embedded default config for a server run in this process (providers at the fake), with
    JSON logging to /dev/null as ``routesvc serve`` would log to a collector. Replaces stdout."""
    import yaml

    from routesvc.config import parse_config
    from routesvc.telemetry import configure_logging

    settings = parse_config(yaml.safe_dump(routesvc_config()), "<bench>", provider_environ(fake_base))
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout of this process until it exits; once, at start
    configure_logging(settings.config.logging)
    return settings


async def _profile(args: argparse.Namespace, fake_base: str | None) -> None:
    from pyinstrument import Profiler

    from routesvc.server import Server

    settings = in_process_settings(fake_base)
    async with Server(settings, port=0) as server:
        if args.scenario == "route":
            load = (_load.route_closed_loop, server.target, args.concurrency, 0.5, 1000)
        else:
            load = (_load.streams, "grpc", server.target, args.concurrency, 0.5, 100, 1.0)
        await asyncio.to_thread(in_subprocess, *load)  # warm up imports and connections
        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
        if args.scenario == "route":
            result = await asyncio.to_thread(
                in_subprocess, _load.route_closed_loop, server.target, args.concurrency, args.duration, 10**6, 0.0
            )
        else:
            result = await asyncio.to_thread(
                in_subprocess, _load.streams, "grpc", server.target, args.concurrency, args.duration, 10**6, 1.0, 0.0
            )
        profiler.stop()
    sys.stdout = sys.__stdout__
    print(result)
    print(profiler.output_text(unicode=False, color=False, show_all=False, timeline=False))
    if args.html:
        await asyncio.to_thread(Path(args.html).write_text, profiler.output_html())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_server", description=__doc__)
    parser.add_argument("--scenario", choices=("route", "complete"), default="route")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--html", default="")
    args = parser.parse_args()
    from routesvc.config import limit_native_threads

    # One BLAS thread, as `routesvc serve` does: the server runs in this process (see bench/soak.py).
    limit_native_threads()
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(fake_provider(20, 0.01)) if args.scenario == "complete" else None
        asyncio.run(_profile(args, fake))


if __name__ == "__main__":
    main()
