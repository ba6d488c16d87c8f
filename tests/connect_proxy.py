"""An HTTP ``CONNECT`` proxy on loopback that records every tunnel asked of it, for clients that take
their proxy from ``grpc_proxy`` / ``https_proxy`` / ``http_proxy`` (gRPC's tunnels are CONNECTs).

    async with ConnectProxy() as proxy:
        monkeypatch.setenv("https_proxy", proxy.url)

It opens each tunnel and relays both ways, as a corporate proxy would, so a client that goes through
it still gets its answer: what tells is ``requests``, each ``CONNECT host:port HTTP/1.1`` line, and
``relayed``, the bytes it carried from client to server.
"""

from __future__ import annotations

import asyncio
import contextlib


class ConnectProxy:
    """A CONNECT proxy on loopback; ``requests`` holds each CONNECT line, ``relayed`` what it carried up."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.relayed = bytearray()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, a value for ``https_proxy`` and its kin."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
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
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            line = await reader.readuntil(b"\r\n")
            self.requests.append(line.strip())
            while await reader.readuntil(b"\r\n") != b"\r\n":  # the rest of the CONNECT's headers
                pass
            host, _, port = line.split()[1].decode().rpartition(":")
            upstream_reader, upstream_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            async with asyncio.TaskGroup() as group:
                group.create_task(_pipe(reader, upstream_writer, self.relayed))
                group.create_task(_pipe(upstream_reader, writer, None))
        except* (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            for stream in (writer, upstream_writer):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, record: bytearray | None) -> None:
    while data := await source.read(65536):
        if record is not None:
            record.extend(data)
        sink.write(data)
        await sink.drain()
    sink.close()
