"""The server span of every RouterService RPC: each method handler is wrapped once, when the
server is built, so that every call (also one the service rejects early: authentication,
admission, a corrupt request) runs inside exactly one ``Telemetry.server_rpc``.

The span continues the caller's ``traceparent``, carries ``rpc.*`` attributes and the final
``rpc.grpc.status_code``, and is current while the handler runs, so the router's spans are its
children and every log line of the RPC carries its ids. Health and reflection calls are not
traced. Wrapping at registration instead of in a ``grpc.aio.ServerInterceptor`` spares every
call the interceptor chain and a new handler object (about a tenth of a Route's server CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc

from routesvc.errors import ClientStalled
from routesvc.telemetry import RequestTelemetry, Telemetry

_Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
_Stream = Callable[[Any, grpc.aio.ServicerContext], AsyncGenerator[Any, None]]


# How a call its handler ended cancelled, sending nothing, ended for its caller, when the handler
# knows better than ``ended_by_caller`` (a shutdown's stop cut it: UNAVAILABLE).
_ended_as: contextvars.ContextVar[grpc.StatusCode | None] = contextvars.ContextVar("routesvc_ended_as", default=None)


def ended_as(code: grpc.StatusCode) -> None:
    """The handler ends the call cancelled (grpc sends nothing), which its caller saw end ``code``."""
    _ended_as.set(code)


def _status(context: grpc.aio.ServicerContext, error: BaseException | None, ends_at: float | None) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError):
        return _ended_as.get() or ended_by_caller(context, ends_at)
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


def _finish(
    rpc: RequestTelemetry, context: grpc.aio.ServicerContext, error: BaseException | None, ends_at: float | None
) -> None:
    code = _status(context, error, ends_at)
    rpc.finish(code.name, code.value[0])


class _WriteWatch:
    """Cancels the call's task when one message's write has waited ``timeout`` seconds (the
    caller reads nothing, and HTTP/2 flow control holds the message back); ``_written`` turns
    that into ``ClientStalled``.

    One timer for the whole call, looking at the write under way when it fires and set again
    from it, not one armed and cancelled around every message: that cost about 4 µs a message,
    a tenth of a stream's server CPU at 20 chunks."""

    __slots__ = ("_handle", "_loop", "_task", "fired", "started", "timeout")

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.timeout = timeout
        self.started: float | None = None  # when the write under way began
        self.fired = False
        self._handle = self._loop.call_later(timeout, self._check)

    def _check(self) -> None:
        now, started = self._loop.time(), self.started
        if started is not None and now - started >= self.timeout and self._task is not None:
            self.fired = True
            self._task.cancel()
            return
        since = now if started is None else started
        # At least a millisecond: uvloop rounds timers to whole milliseconds and may call this one
        # up to one early, which re-armed at 0 would spin until the write is due.
        self._handle = self._loop.call_later(max(since + self.timeout - now, 0.001), self._check)

    def begin(self) -> None:
        """A write begins now (``started`` is set back to None when it is over)."""
        self.started = self._loop.time()

    def close(self) -> None:
        self._handle.cancel()


# The write of a call's last message (a Complete's Completion or BatchJob): True once the
# handler said the next message is its last (``last_message_follows``), then that write's
# future. Each call runs in a task (a context) of its own, and the handler's generator runs in it.
_last_write: contextvars.ContextVar[asyncio.Future[None] | bool] = contextvars.ContextVar(
    "routesvc_last_write", default=False
)


def last_message_follows() -> None:
    """The handler's next message is its last: its write is kept (``last_write``), so that a call
    whose end comes while that write waits (a caller reading late) can learn whether it went out."""
    _last_write.set(True)


def last_write() -> asyncio.Future[None] | None:
    """The write of the call's last message, if it was begun (it goes on when the task is cancelled
    while it waits: the message stays with grpc, sent if the caller reads on, failed with
    ``grpc.aio.InternalError`` once the call is over)."""
    write = _last_write.get()
    return write if isinstance(write, asyncio.Future) else None


def _retrieve(write: asyncio.Future[None]) -> None:
    if not write.cancelled():
        write.exception()  # no "exception was never retrieved" when nobody awaits it any more


async def _write(context: grpc.aio.ServicerContext, response: Any) -> None:
    if _last_write.get() is not True:
        await context.write(response)
        return
    # Shielded: a cancellation (the call's own end, a shutdown, a stall) leaves the write going.
    write = asyncio.ensure_future(context.write(response))
    write.add_done_callback(_retrieve)
    _last_write.set(write)
    await asyncio.shield(write)


async def _written(context: grpc.aio.ServicerContext, response: Any, watch: _WriteWatch) -> bool:
    """Write one message; False (instead of grpc's ``ExecuteBatchError``, which grpc would log
    with a traceback) when the call is already over, so nothing can be written any more.

    A write still waiting after ``watch.timeout`` seconds raises ``ClientStalled``.
    """
    watch.begin()
    try:
        await _write(context, response)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if watch.fired and task is not None and task.uncancel() == 0:
            # Ours alone (another cancellation, a deadline's or a shutdown's, goes on as it was).
            message = f"the caller read nothing for {watch.timeout:g} s (reliability.client_write_timeout_seconds)"
            raise ClientStalled(message, write_timeout=watch.timeout) from None
        raise
    except grpc.aio.InternalError:
        # The core failed the write (``ExecuteBatchError``): the call is over, the caller gone or
        # the transport closed, whether or not its cancellation has reached this task yet.
        return False
    except Exception:
        if context.done() or _past_deadline(context):
            return False
        raise
    finally:
        watch.started = None
    return True


def _past_deadline(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


# The most a call is ended before its caller's deadline (``own_end``).
MAX_DEADLINE_LEAD_SECONDS = 0.25


def own_end(context: grpc.aio.ServicerContext) -> float | None:
    """When (loop time) the server ends a call with a deadline itself, so that its status
    (DEADLINE_EXCEEDED, after text with the committed trailers) reaches the caller before the
    caller's own timer ends the call without them: a twentieth of the time the call has before
    its deadline, at most ``MAX_DEADLINE_LEAD_SECONDS``; a lead that leaves room for a loop that
    runs the timer late under load (a fixed 20 ms often did not). None without a deadline."""
    remaining: float | None = context.time_remaining()
    if remaining is None:
        return None
    lead = min(MAX_DEADLINE_LEAD_SECONDS, remaining / 20)
    return asyncio.get_running_loop().time() + max(0.0, remaining - lead)


def ended_by_caller(context: grpc.aio.ServicerContext, ends_at: float | None = None) -> grpc.StatusCode:
    """How a call its caller left ended: DEADLINE_EXCEEDED once its deadline passed, or once the
    server's own end of it (``ends_at``, from ``own_end``) has, whose timer a late loop had not
    run yet when the caller's deadline cancelled the call; else CANCELLED."""
    past_own_end = ends_at is not None and asyncio.get_running_loop().time() >= ends_at
    if past_own_end or _past_deadline(context):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def traced_unary(telemetry: Telemetry, service: str, method: str, behaviour: _Unary) -> _Unary:
    """``behaviour`` (a unary-response handler) inside the RPC's server span."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        ends_at = own_end(context)
        with telemetry.server_rpc(service, method, context.invocation_metadata()) as rpc:
            try:
                response = await behaviour(request, context)
            except BaseException as error:
                _finish(rpc, context, error, ends_at)
                raise
            _finish(rpc, context, None, ends_at)
            return response

    return unary


def traced_stream(
    telemetry: Telemetry, service: str, method: str, behaviour: _Stream, write_timeout: Callable[[], float]
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
    """``behaviour`` (a server-streaming handler) inside the RPC's server span; each message's
    write is bounded by ``write_timeout()`` seconds (read per call: a reload may change it)."""

    async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
        # A coroutine that writes, not a generator that yields: every await (writes included)
        # happens in this frame, so a cancellation ends the span and resets the context
        # variables in the task and context that set them. A generator left suspended at a
        # yield would be finalized later in another context.
        ends_at = own_end(context)
        with telemetry.server_rpc(service, method, context.invocation_metadata()) as rpc:
            watch = _WriteWatch(write_timeout())
            caller_stalled = False
            try:
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        try:
                            written = await _written(context, response, watch)
                        except ClientStalled as stalled:
                            # Raised at the handler's yield, as a deadline is below: the handler
                            # closes the upstream request and ends the call with its status,
                            # then leaves that status to grpc (it waits behind what the caller
                            # does not read) by ending cancelled.
                            caller_stalled = True
                            try:
                                await responses.athrow(stalled)
                            except StopAsyncIteration:
                                # The handler returned: its last message (a Complete's
                                # Completion) was handed to grpc before, so the call ends OK.
                                break
                            raise  # the handler did not end the call: it is cancelled
                        except asyncio.CancelledError as cancelled:
                            # The handler's own deadline timer (or a shutdown) cancels the task
                            # where it waits, mostly here when the client reads slowly. Raised at
                            # the handler's yield, it ends the call as it would had the handler
                            # been waiting itself: DEADLINE_EXCEEDED (or SHUTTING_DOWN) with the
                            # committed trailers, where closing it would end it without a status.
                            try:
                                await responses.athrow(cancelled)
                            except StopAsyncIteration:
                                # The handler returned: its last message was handed to grpc
                                # before its end came (a Complete's Completion), so the call
                                # ends OK, sent after that message.
                                break
                            raise  # the handler did not end the call: it is cancelled
                        if not written:
                            # The client is gone or its deadline passed: leaving the block closes
                            # the handler, which logs how the call ended; grpc has its status.
                            code = ended_by_caller(context, ends_at)
                            rpc.finish(code.name, code.value[0])
                            return
            except BaseException as error:
                # A stalled call's handler set its status (the abort's code) before it ended cancelled.
                # Not one whose handler ended cancelled without a status (its last message's write
                # failed: the caller left).
                stalled_status = caller_stalled and context.code() is not None
                _finish(rpc, context, None if stalled_status else error, ends_at)
                raise
            finally:
                watch.close()
            _finish(rpc, context, None, ends_at)

    return unary_stream
