"""The grpc.aio server interceptor that gives every RouterService RPC exactly one server span.

It runs outermost, so RPCs rejected before the service (authentication, admission) are traced
too. The span continues the caller's ``traceparent``, carries ``rpc.*`` attributes and the
final ``rpc.grpc.status_code``, and is current while the handler runs, so the router's spans
are its children and every log line of the RPC carries its ids. Health and reflection calls
are not traced.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from routesvc.telemetry import RequestTelemetry, Telemetry

_Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def _status(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


def _finish(rpc: RequestTelemetry, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
    code = _status(context, error)
    rpc.finish(code.name, code.value[0])


class TracingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type hints
    """Wraps RouterService handlers in ``Telemetry.server_rpc``."""

    def __init__(self, telemetry: Telemetry, service: str) -> None:
        self._telemetry = telemetry
        self._service = service

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        service, _, method = str(handler_call_details.method).lstrip("/").rpartition("/")
        if handler is None or service != self._service:
            return handler
        metadata = {str(k): str(v) for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        telemetry = self._telemetry
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with telemetry.server_rpc(service, method, metadata) as rpc:
                    try:
                        response = await inner_unary(request, context)
                    except BaseException as error:
                        _finish(rpc, context, error)
                        raise
                    _finish(rpc, context, None)
                    return response

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                # A coroutine that writes, not a generator that yields: every await (writes
                # included) happens in this frame, so a cancellation ends the span and resets
                # the context variables in the task and context that set them. A generator
                # left suspended at a yield would be finalized later in another context.
                with telemetry.server_rpc(service, method, metadata) as rpc:
                    try:
                        async with contextlib.aclosing(inner_stream(request, context)) as responses:
                            async for response in responses:
                                await context.write(response)
                    except BaseException as error:
                        _finish(rpc, context, error)
                        raise
                    _finish(rpc, context, None)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
