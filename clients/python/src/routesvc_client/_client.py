"""``RouterClient`` over ``grpc.aio``, and helpers to build requests and read errors."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from routesvc.client import CompleteStream
from routesvc.v1 import router_pb2 as pb
from routesvc.v1 import router_pb2_grpc as pb_grpc

ERROR_DOMAIN = "routesvc"
"""The ``ErrorInfo`` domain of errors raised by routesvc itself."""

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RouterService"].full_name

Metadata = Mapping[str, str]


class RouterClient:
    """A channel to routesvc; ``async with`` it or call ``aclose()``.

    Plaintext unless ``credentials`` are given (``grpc.ssl_channel_credentials()`` for TLS);
    ``api_key`` is sent as ``authorization: Bearer <key>`` on every call. Each call takes a
    ``timeout`` in seconds (the gRPC deadline) and extra ``metadata``.
    """

    def __init__(
        self, target: str, api_key: str | None = None, *, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials)
        self.stub = pb_grpc.RouterServiceStub(self._channel)
        """The generated stub, for what the wrapper does not cover (e.g. reading response metadata)."""
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._auth: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def metadata(self, extra: Metadata | None = None) -> tuple[tuple[str, str], ...]:
        """The metadata every call sends: the API key, then ``extra``."""
        return self._auth + tuple((extra or {}).items())

    async def route(
        self, request: pb.RouteRequest, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> pb.RouteDecision:
        """The routing decision for ``request``, without calling any model."""
        response: pb.RouteResponse = await self.stub.Route(request, timeout=timeout, metadata=self.metadata(metadata))
        return response.decision

    def complete(
        self, request: pb.CompleteRequest, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> CompleteStream:
        """The Complete stream: the decision, text deltas, then the completion (or, in batch mode,
        the decision and the batch job). The call starts when ``complete`` is called, so ``timeout``
        counts from then, however late the stream is first read.

        Read it inside ``async with client.complete(...) as stream:``: leaving the block early
        (``break``, an exception, task cancellation) cancels the call, and routesvc the provider's
        request; ``aclose()`` does the same. A bare ``async for`` over ``complete(...)`` is
        cancelled as the loop is left; a stream kept in a variable runs on until it is closed or
        dropped. The last message (the completion or the batch job) is handed over once the stream
        has ended (``routesvc.client.CompleteStream``).
        """
        return CompleteStream(lambda: self.stub.Complete(request, timeout=timeout, metadata=self.metadata(metadata)))

    async def list_models(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> list[pb.ModelInfo]:
        """The model catalog."""
        response: pb.ListModelsResponse = await self.stub.ListModels(
            pb.ListModelsRequest(), timeout=timeout, metadata=self.metadata(metadata)
        )
        return list(response.models)

    async def health(self, *, timeout: float | None = None) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        """The server's ``grpc.health.v1`` status for RouterService."""
        response: health_pb2.HealthCheckResponse = await self._health.Check(
            health_pb2.HealthCheckRequest(service=_SERVICE_NAME), timeout=timeout
        )
        return response.status

    async def aclose(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def user_prompt(prompt: str) -> pb.ChatRequest:
    """A ``ChatRequest`` with one user message."""
    return pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, content=prompt)])


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ``google.rpc.ErrorInfo`` routesvc attached to ``error``, or None.

    Switch on its ``reason`` ("INVALID_REQUEST", "MODEL_NOT_FOUND", ...).
    """
    for key, value in error.trailing_metadata() or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                return info
    return None
