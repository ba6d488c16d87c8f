"""grpc.health.v1 for the serving port and ``server.health_port``, with Watch streams a drain ends.

grpc's own servicer keeps every ``Watch`` open until the call is cancelled, and ``server.stop(grace)``
waits for it like any other call: one open watcher made every drain last the whole grace. Here
``close()`` (the drain, once its delay is over and just before the stop) ends each Watch with OK
after it has streamed the last status (NOT_SERVING); a Watch opened after that gets the status
and ends at once. ``Check`` answers as before, throughout.

Health needs no key, so the Watch streams open at once are capped (``server.max_health_watch_streams``,
both ports together), and those of one client address (``server.max_health_watch_streams_per_peer``):
one more is refused RESOURCE_EXHAUSTED; and a Watch of a service name longer
than ``MAX_SERVICE_CHARS`` (no service is named so) is refused INVALID_ARGUMENT rather than kept
open holding the name (up to the message size limit each).
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _address(peer: str) -> str:
    """A gRPC peer ("ipv4:10.0.0.7:51234", "ipv6:[::1]:51234") without its port: one client
    address, whatever connections it opens; other kinds (a Unix socket) as they are."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


MAX_SERVICE_CHARS = 256
"""The longest service name a Watch is kept open for (gRPC service names are far shorter)."""


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # generated, untyped
    """Check and Watch for the statuses ``set`` gives; ``close`` ends the Watch streams."""

    def __init__(self, max_watchers: int, max_per_peer: int) -> None:
        self._statuses: dict[str, health_pb2.HealthCheckResponse.ServingStatus] = {
            "": health_pb2.HealthCheckResponse.SERVING
        }
        self._changed = asyncio.Condition()
        self._closed = False
        self._max_watchers = max_watchers
        self._watchers = 0
        self._max_per_peer = max_per_peer
        self._by_peer: dict[str, int] = {}

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        """Report ``status`` for ``service`` to Check and to every Watch of it."""
        async with self._changed:
            self._statuses[service] = status
            self._changed.notify_all()

    async def close(self) -> None:
        """End every Watch (with OK) once it has streamed the current status, and each new one
        right after its first message."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND)
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        if len(request.service) > MAX_SERVICE_CHARS:
            message = f"service: must be at most {MAX_SERVICE_CHARS} characters"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        peer = _address(context.peer())
        if self._by_peer.get(peer, 0) >= self._max_per_peer:
            # One peer (no key needed) must not take every place and make the replica look
            # unhealthy to every client that watches it.
            message = (
                f"at most {self._max_per_peer} health Watch streams at once from one address"
                " (server.max_health_watch_streams_per_peer)"
            )
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        if self._watchers >= self._max_watchers:
            # Health needs no key: without a cap anyone could hold any number of streams open.
            message = f"at most {self._max_watchers} health Watch streams at once (server.max_health_watch_streams)"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        self._watchers += 1
        self._by_peer[peer] = self._by_peer.get(peer, 0) + 1
        try:
            await self._watch(request.service, context)
        finally:
            self._watchers -= 1
            left = self._by_peer[peer] - 1
            if left:
                self._by_peer[peer] = left
            else:
                del self._by_peer[peer]

    async def _watch(self, service: str, context: grpc.aio.ServicerContext) -> None:
        last: health_pb2.HealthCheckResponse.ServingStatus | None = None
        while True:
            async with self._changed:
                status, closed = self._status(service), self._closed
                while status == last and not closed:
                    await self._changed.wait()
                    status, closed = self._status(service), self._closed
            # Written outside the lock: a watcher that reads slowly holds up nobody's ``set``.
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if closed:
                return

    def _status(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus:
        return self._statuses.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
