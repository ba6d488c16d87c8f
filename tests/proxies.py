"""HTTP proxies on loopback that record what is asked of them, for clients that take their proxy
from the environment (``grpc_proxy`` / ``https_proxy`` / ``http_proxy`` / ``HTTP_PROXY``).

    async with ConnectProxy() as proxy:
        monkeypatch.setenv("https_proxy", proxy.url)

Both relay what they are asked for, as a corporate proxy would, so a client that goes through one
still gets its answer: what tells is ``requests``, each request line asked of it.

- ``ConnectProxy``: ``CONNECT host:port HTTP/1.1`` tunnels (gRPC's, HTTPS); ``relayed`` holds the
  bytes it carried from client to server.
- ``ForwardProxy``: plain HTTP in absolute form (``POST http://host:port/path HTTP/1.1``): it
  connects there, rewrites that line to origin form and pipes the rest both ways. One request per
  connection is all it serves correctly (a second on a kept-alive connection goes on in absolute
  form), which is what a test of one call needs. ``resolve`` maps host names to the addresses it
  dials for them (``{"provider.test": "127.0.0.1"}``: a provider that is not on the client's host
  as far as the client can tell, served by the fake); a target it cannot reach is recorded all
  the same, and its connection closed.
"""

from __future__ import annotations

import asyncio

from routesvc.testing import LoopbackProxy


class _RecordingProxy(LoopbackProxy):
    """A proxy on loopback recording each request line asked of it in ``requests``."""

    _ENDINGS = (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError)

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[bytes] = []

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, a value for ``https_proxy`` and its kin."""
        return self.base_url

    @staticmethod
    async def _relay(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
        record: bytearray | None = None,
    ) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(_pipe(reader, upstream_writer, record))
            group.create_task(_pipe(upstream_reader, writer, None))


class ConnectProxy(_RecordingProxy):
    """A CONNECT proxy; ``requests`` holds each CONNECT line, ``relayed`` what it carried up."""

    def __init__(self) -> None:
        super().__init__()
        self.relayed = bytearray()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: list[asyncio.StreamWriter]
    ) -> None:
        line = await reader.readuntil(b"\r\n")
        self.requests.append(line.strip())
        while await reader.readuntil(b"\r\n") != b"\r\n":  # the rest of the CONNECT's headers
            pass
        host, _, port = line.split()[1].decode().rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        upstream.append(upstream_writer)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await self._relay(reader, writer, upstream_reader, upstream_writer, self.relayed)


class ForwardProxy(_RecordingProxy):
    """An HTTP forward proxy; ``requests`` holds each request line it forwarded."""

    def __init__(self, resolve: dict[str, str] | None = None) -> None:
        super().__init__()
        self._resolve = resolve or {}

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: list[asyncio.StreamWriter]
    ) -> None:
        line = await reader.readuntil(b"\r\n")
        method, target, version = line.split()
        host_port, _, path = target.removeprefix(b"http://").partition(b"/")
        host, _, port = host_port.decode().partition(":")
        self.requests.append(line.strip())
        upstream_reader, upstream_writer = await asyncio.open_connection(self._resolve.get(host, host), int(port or 80))
        upstream.append(upstream_writer)
        upstream_writer.write(b"%s /%s %s\r\n" % (method, path, version))
        await self._relay(reader, writer, upstream_reader, upstream_writer)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, record: bytearray | None) -> None:
    while data := await source.read(65536):
        if record is not None:
            record.extend(data)
        sink.write(data)
        await sink.drain()
    sink.close()
