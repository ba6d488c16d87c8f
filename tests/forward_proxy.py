"""A plain HTTP forward proxy on loopback, for clients that take their proxy from ``HTTP_PROXY``.

    async with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)

Each connection's first request line names its target in absolute form (``POST http://host:port/path
HTTP/1.1``): the proxy connects there, rewrites that line to origin form, records it in
``requests``, and pipes the rest both ways. One request per connection is all it serves
correctly (a second on a kept-alive connection goes on in absolute form), which is what a test of
one call needs. No ``CONNECT`` (no HTTPS). ``resolve`` maps host names to the addresses the proxy
dials for them (``{"provider.test": "127.0.0.1"}``: a provider that is not on the client's host as
far as the client can tell, served by the fake); a target it cannot reach is recorded all the same,
and its connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib


class ForwardProxy:
    """An HTTP forward proxy on loopback; ``requests`` holds each request line it forwarded."""

    def __init__(self, resolve: dict[str, str] | None = None) -> None:
        self.requests: list[bytes] = []
        self._resolve = resolve or {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, a value for ``HTTP_PROXY``."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> ForwardProxy:
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
            method, target, version = line.split()
            host_port, _, path = target.removeprefix(b"http://").partition(b"/")
            host, _, port = host_port.decode().partition(":")
            self.requests.append(line.strip())
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self._resolve.get(host, host), int(port or 80)
            )
            upstream_writer.write(b"%s /%s %s\r\n" % (method, path, version))
            async with asyncio.TaskGroup() as group:
                group.create_task(_pipe(reader, upstream_writer))
                group.create_task(_pipe(upstream_reader, writer))
        except* (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            for stream in (writer, upstream_writer):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while data := await source.read(65536):
        sink.write(data)
        await sink.drain()
    sink.close()
