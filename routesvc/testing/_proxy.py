"""A fault-injecting TCP proxy, for faults that live in the network rather than the provider.

    async with FaultProxy("127.0.0.1", fake.port) as proxy:
        proxy.fault = NetworkFault(reset_after_bytes=2_000)   # applies to new connections
        ... point a provider's base_url at proxy.base_url ...

Each accepted connection is piped to the target. A ``NetworkFault`` can reset (RST) or close
(FIN) the connection after N bytes came back from the target, delay every chunk going back (a
slow network), or swallow everything (a black hole that accepts and never answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import Self


@dataclass(frozen=True, slots=True)
class NetworkFault:
    """What the proxy does to connections accepted while it is set."""

    reset_after_bytes: int | None = None
    close_after_bytes: int | None = None
    delay_per_chunk: float = 0.0
    blackhole: bool = False


class LoopbackProxy:
    """A proxy listening on a free port of ``host`` (loopback); a subclass's ``_serve`` serves each
    connection, which ends quietly on the ``_ENDINGS`` exceptions and is closed, with the
    connection ``_serve`` opened upstream (put in ``upstream``), when it ends."""

    _ENDINGS: tuple[type[Exception], ...] = (ConnectionError, OSError)

    def __init__(self, *, host: str = "127.0.0.1") -> None:
        self._host = host
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port listened on."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` of the proxy."""
        return f"http://{self._host}:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, self._host, 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: list[asyncio.StreamWriter] = []
        try:
            await self._serve(reader, writer, upstream)
        except* self._ENDINGS:
            pass
        finally:
            self._tasks.discard(task)
            for stream in (writer, *upstream):
                with contextlib.suppress(Exception):
                    stream.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: list[asyncio.StreamWriter]
    ) -> None:
        raise NotImplementedError


class _Injected(Exception):
    """The fault ended the connection."""


class FaultProxy(LoopbackProxy):
    """A TCP proxy on loopback in front of ``target_host:target_port``."""

    _ENDINGS = (ConnectionError, OSError, _Injected)

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        super().__init__(host=host)
        self._target = (target_host, target_port)
        self.fault = NetworkFault()
        self.connections = 0
        self.faults_injected = 0

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: list[asyncio.StreamWriter]
    ) -> None:
        self.connections += 1
        fault = self.fault
        if fault.blackhole:
            self.faults_injected += 1
            while await reader.read(65536):
                pass
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        upstream.append(upstream_writer)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._pipe(reader, upstream_writer, NetworkFault()))
            group.create_task(self._pipe(upstream_reader, writer, fault))

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, fault: NetworkFault) -> None:
        passed = 0
        while data := await source.read(4096):
            if fault.delay_per_chunk:
                await asyncio.sleep(fault.delay_per_chunk)
            for limit, reset in ((fault.reset_after_bytes, True), (fault.close_after_bytes, False)):
                if limit is not None and passed + len(data) > limit:
                    sink.write(data[: max(0, limit - passed)])
                    await sink.drain()
                    self.faults_injected += 1
                    if reset:
                        sock = sink.get_extra_info("socket")
                        if sock is not None:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        sink.transport.abort()
                    else:
                        sink.close()
                    raise _Injected
            passed += len(data)
            sink.write(data)
            await sink.drain()
        sink.close()
