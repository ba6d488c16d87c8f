"""``RouterClient`` over ``grpc.aio``, and helpers to build requests and read errors."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from routesvc.client import (
    DEFAULT_STREAM_TIMEOUT,
    DEFAULT_TIMEOUT,
    CompleteStream,
    checked_timeout,
    direct_channel_options,
)
from routesvc.v1 import router_pb2 as pb
from routesvc.v1 import router_pb2_grpc as pb_grpc

ERROR_DOMAIN = "routesvc"
"""The ``ErrorInfo`` domain of errors raised by routesvc itself."""

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RouterService"].full_name

Metadata = Mapping[str, str]


class RouterClient:
    """A channel to routesvc; ``async with`` it or call ``aclose()``.

    TLS: with the system roots, or ``credentials`` (``grpc.ssl_channel_credentials(ca, key,
    cert)`` for a private CA or mutual TLS); ``insecure=True`` is plaintext, for loopback and tests,
    and the caller's explicit choice to send ``api_key`` over it, as the Go client's
    ``WithInsecure()``. ``api_key`` is sent as ``authorization: Bearer <key>`` on every call. A
    loopback target (127.0.0.0/8, ``::1``, ``localhost``) is dialled directly, never through a proxy
    named by ``grpc_proxy`` / ``https_proxy`` / ``http_proxy`` (as Go's client does); other targets
    take that proxy, as gRPC does. Each call takes a ``timeout`` in seconds (the gRPC deadline) and
    extra ``metadata``. A call given no ``timeout`` gets ``default_timeout`` (``DEFAULT_TIMEOUT``,
    30 s), a Complete stream ``default_stream_timeout`` (``DEFAULT_STREAM_TIMEOUT``, 5 minutes, for
    the whole answer); None turns a default off. Calls made through ``stub`` take only the ``timeout`` given to them.
    """

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        insecure: bool = False,
        default_timeout: float | None = DEFAULT_TIMEOUT,
        default_stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT,
    ) -> None:
        self._timeout = checked_timeout("default_timeout", default_timeout)
        self._stream_timeout = checked_timeout("default_stream_timeout", default_stream_timeout)
        if insecure:
            if credentials is not None:
                raise ValueError("insecure=True with credentials: choose TLS or plaintext")
            self._channel = grpc.aio.insecure_channel(target, options=direct_channel_options(target))
        else:
            self._channel = grpc.aio.secure_channel(
                target, credentials or grpc.ssl_channel_credentials(), options=direct_channel_options(target)
            )
        self.stub = pb_grpc.RouterServiceStub(self._channel)
        """The generated stub, for what the wrapper does not cover (e.g. reading response metadata)."""
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._auth: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def metadata(self, extra: Metadata | None = None) -> tuple[tuple[str, str], ...]:
        """The metadata every call sends: the API key, then ``extra``."""
        return self._auth + tuple((extra or {}).items())

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    async def route(
        self, request: pb.RouteRequest, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> pb.RouteDecision:
        """The routing decision for ``request``, without calling any model."""
        response: pb.RouteResponse = await self.stub.Route(
            request, timeout=self._deadline(timeout), metadata=self.metadata(metadata)
        )
        return response.decision

    def complete(
        self, request: pb.CompleteRequest, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> CompleteStream:
        """The Complete stream: the decision, text deltas, then the completion (or, in batch mode,
        the decision and the batch job). A cascade may send an escalation before the deltas (one
        per step passed); the deltas that follow are the next model's, or, if it failed before any
        text, the rejected answer's: the completion's ``model`` says whose. The call starts when
        ``complete`` is called, so ``timeout`` counts from then, however late the stream is first
        read.

        Read it inside ``async with client.complete(...) as stream:``: leaving the block early
        (``break``, an exception, task cancellation) cancels the call, and routesvc the provider's
        request; ``aclose()`` does the same. A bare ``async for`` over ``complete(...)`` is
        cancelled as the loop is left; a stream kept in a variable runs on until it is closed or
        dropped. The last message (the completion or the batch job) is handed over once the stream
        has ended (``routesvc.client.CompleteStream``), whose ``initial_metadata()`` and
        ``trailing_metadata()`` are the call's. Without a ``timeout`` the whole stream has the
        client's ``default_stream_timeout``.
        """
        deadline = self._stream_timeout if timeout is None else timeout
        return CompleteStream(lambda: self.stub.Complete(request, timeout=deadline, metadata=self.metadata(metadata)))

    async def list_models(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> list[pb.ModelInfo]:
        """The model catalog."""
        response: pb.ListModelsResponse = await self.stub.ListModels(
            pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self.metadata(metadata)
        )
        return list(response.models)

    async def health(self, *, timeout: float | None = None) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        """The server's ``grpc.health.v1`` status for RouterService."""
        response: health_pb2.HealthCheckResponse = await self._health.Check(
            health_pb2.HealthCheckRequest(service=_SERVICE_NAME), timeout=self._deadline(timeout)
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
    for detail in _details(error):
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return info
    return None


def retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    """The ``google.rpc.RetryInfo`` of ``error``, or None: how long to wait before trying again
    (``retry_delay.ToTimedelta()``), on RESOURCE_EXHAUSTED (RATE_LIMITED, OVERLOADED, ...) and some
    UNAVAILABLE errors."""
    for detail in _details(error):
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info
    return None


def _details(error: grpc.aio.AioRpcError) -> list[any_pb2.Any]:
    """The ``google.rpc.Status`` details in ``error``'s trailing metadata."""
    details: list[any_pb2.Any] = []
    for key, value in error.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            details.extend(status_pb2.Status.FromString(value).details)
    return details
