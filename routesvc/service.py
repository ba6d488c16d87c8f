"""The gRPC methods of ``routesvc.v1.RouterService``: thin calls into the router, and the one
table that maps our errors to gRPC status codes with a ``google.rpc.ErrorInfo``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TypeVar

import grpc
import structlog
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from routesvc import telemetry, wire
from routesvc.auth import Authenticator, Principal
from routesvc.batches import BatchQueue
from routesvc.cost import format_usd
from routesvc.errors import (
    BatchNotFound,
    BatchStoreBusy,
    BatchStoreFull,
    BatchStoreUnavailable,
    ClientStalled,
    ConfigError,
    ContextWindowExceeded,
    CostLimitExceeded,
    DeadlineExceeded,
    FeedbackNotEnabled,
    FeedbackStoreBusy,
    FeedbackStoreDiskError,
    FeedbackStoreFull,
    FeedbackStoreUnavailable,
    InvalidRequest,
    LimitExceeded,
    ModelNotFound,
    NoEligibleModel,
    Overloaded,
    PermissionDenied,
    ProviderAuthFailed,
    ProviderError,
    ProviderNotConfigured,
    ProviderQuotaExhausted,
    ProviderRateLimited,
    ProviderRejected,
    ProviderUnavailable,
    RequestTooLarge,
    RouteSvcError,
    SharedStateUnavailable,
    ShuttingDown,
    StreamInterrupted,
    Unauthenticated,
)
from routesvc.feedback import UnknownDecision
from routesvc.models import BatchJob, Completion, Escalation, Mode, RouteDecision, RoutingRequest
from routesvc.router import RouteCount, Router, with_tenant_defaults
from routesvc.rpc_tracing import ended_as, ended_by_caller, last_message_follows, last_write, own_end
from routesvc.v1 import router_pb2 as pb
from routesvc.v1 import router_pb2_grpc as pb_grpc

log = structlog.get_logger("routesvc.service")
_Request = TypeVar("_Request")

ERROR_DOMAIN = "routesvc"
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 128

# The one table from our errors to gRPC status codes; the most specific class wins.
STATUS_TABLE: dict[type[RouteSvcError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    BatchNotFound: grpc.StatusCode.NOT_FOUND,
    RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ContextWindowExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NoEligibleModel: grpc.StatusCode.FAILED_PRECONDITION,
    CostLimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ProviderNotConfigured: grpc.StatusCode.FAILED_PRECONDITION,
    FeedbackNotEnabled: grpc.StatusCode.FAILED_PRECONDITION,
    # Read-only or damaged: no retry helps until an operator fixes the file.
    FeedbackStoreUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    FeedbackStoreBusy: grpc.StatusCode.UNAVAILABLE,
    # gRPC's own words for RESOURCE_EXHAUSTED include "the entire file system is out of space".
    FeedbackStoreFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    FeedbackStoreDiskError: grpc.StatusCode.UNAVAILABLE,
    UnknownDecision: grpc.StatusCode.NOT_FOUND,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ProviderAuthFailed: grpc.StatusCode.FAILED_PRECONDITION,
    ProviderRejected: grpc.StatusCode.FAILED_PRECONDITION,
    ProviderRateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # Not RESOURCE_EXHAUSTED: clients retry that after a delay, and no delay helps until the
    # account is paid; the state must be fixed first, which is what FAILED_PRECONDITION says.
    ProviderQuotaExhausted: grpc.StatusCode.FAILED_PRECONDITION,
    ProviderUnavailable: grpc.StatusCode.UNAVAILABLE,
    StreamInterrupted: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    SharedStateUnavailable: grpc.StatusCode.UNAVAILABLE,
    BatchStoreUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    BatchStoreBusy: grpc.StatusCode.UNAVAILABLE,
    BatchStoreFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ProviderError: grpc.StatusCode.UNAVAILABLE,
    ConfigError: grpc.StatusCode.INTERNAL,
    RouteSvcError: grpc.StatusCode.INTERNAL,
}


_SERVER_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL})


def _chunks_sent(record: _CallRecord) -> int:
    """How many content chunks the call had sent (Complete counts them in its record)."""
    return int(str(record.fields.get("chunks", 0)))


def _spent(method: str) -> dict[str, object]:
    """What the RPC in progress spent upstream, every attempt counted as in the ledger (a failed,
    cancelled or escalated one included): always for Complete, for another method only when it
    paid for a call (a Route's LLM classifier)."""
    request = telemetry.current_request()
    if request is None or (method != "Complete" and not request.attempts):
        return {}
    usage = request.usage
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cost_usd": format_usd(request.cost),
    }


def _past(ends_at: float | None) -> bool:
    """Whether the server's own end of a call (``own_end``; None: no deadline) has passed."""
    return ends_at is not None and asyncio.get_running_loop().time() >= ends_at


def _ended_by_caller(context: grpc.aio.ServicerContext, record: _CallRecord) -> grpc.StatusCode:
    """How a call that can send nothing more ended (``ended_by_caller``); a passed deadline is
    also its record's ``error_reason``, as when our own timer ends the call."""
    code = ended_by_caller(context, record.ends_at)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        record.fields["error_reason"] = DeadlineExceeded.reason
    return code


# How long after its deadline a caller's call is surely over in grpc's core (which fails the
# writes still waiting then).
_PAST_DEADLINE_SECONDS = 1.0


def _until_gone(context: grpc.aio.ServicerContext, bound: float | None) -> float | None:
    """``bound`` seconds, at most until shortly after the caller's deadline (None: no bound)."""
    remaining: float | None = context.time_remaining()
    if remaining is None:
        return bound
    gone = max(0.0, remaining) + _PAST_DEADLINE_SECONDS
    return gone if bound is None else min(bound, gone)


async def _last_message_out(bound: float | None) -> bool | None:
    """Whether the call's last message, handed to grpc before the call's end came, went out: True
    once the caller took it (or when no write of it was kept), False when the call ended first
    (the caller left or its deadline passed, or the server's stop cut it: grpc fails the write),
    None when it still waits after ``bound`` seconds. A cancellation of the task meanwhile (grpc's,
    the call having ended, or the shutdown's ``cancel_in_flight``) is raised: the write goes on."""
    write = last_write()
    if write is None:
        return True
    if not write.done():
        try:
            async with asyncio.timeout(bound):
                await asyncio.shield(write)
        except TimeoutError:
            return None
        except Exception:
            return False
    return not write.cancelled() and write.exception() is None


def status_code_of(error: RouteSvcError) -> grpc.StatusCode:
    """The gRPC status code for ``error``, from ``STATUS_TABLE``."""
    for cls in type(error).__mro__:
        if cls in STATUS_TABLE:
            return STATUS_TABLE[cls]
    return grpc.StatusCode.INTERNAL  # pragma: no cover - RouteSvcError is in the table


def _error_metadata(error: RouteSvcError) -> dict[str, str]:
    metadata: dict[str, str] = {}
    if isinstance(error, InvalidRequest):
        metadata["field"] = error.field
    if isinstance(error, ProviderError):
        metadata["provider"] = error.provider
        metadata["model"] = error.model
        if error.status is not None:
            metadata["upstream_status"] = str(error.status)
    if isinstance(error, LimitExceeded) and error.held_in_flight:
        metadata["held_by_requests_in_flight"] = "true"
    if error.chunks_sent:
        metadata["committed"] = "true"
        metadata["chunks_sent"] = str(error.chunks_sent)
    return metadata


def _rich_status(
    code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str], retry_after: float | None
) -> status_pb2.Status:
    details = [error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)]
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return status


_ANONYMOUS = Principal(None)


@dataclass(slots=True)
class _CallRecord:
    """What the one log line of an RPC says."""

    method: str
    request_id: str
    started: float
    principal: Principal = _ANONYMOUS
    fields: dict[str, object] = field(default_factory=dict)
    ends_at: float | None = None  # when (loop time) the server ends the call itself (``own_end``)
    # A message of a stream's answer was handed to grpc, or a Route's decision was found in time
    # (``Route``'s one look at the clock): past ``ends_at`` the call is no longer made
    # DEADLINE_EXCEEDED after the fact (``_rpc``), its timer ends it at an await if at all.
    answering: bool = False
    # The stream's last message (a Complete's Completion, its usage and cost charged, or a batch
    # Complete's BatchJob, whose job then stands) was handed to grpc: the caller has the whole
    # answer, and what ends the call after (its deadline's timer, the shutdown grace's end, the
    # write timeout, firing at that message's write, held by a caller reading late, or at an
    # await after it: a batch job's release) ends it OK.
    completed: bool = False

    def time_left(self) -> float | None:
        """The time until the server ends the call itself (not the caller's deadline, which is
        later by the lead): what the router keeps its own time inside (``min_attempt_seconds``,
        a judge ending early so that the answer can still be released). None without a deadline."""
        if self.ends_at is None:
            return None
        return max(0.0, self.ends_at - asyncio.get_running_loop().time())


class RouterService(pb_grpc.RouterServiceServicer):
    """``routesvc.v1.RouterService`` over a ``Router``."""

    def __init__(
        self,
        router: Router,
        instrumentation: telemetry.Telemetry | None = None,
        *,
        batches: BatchQueue | None = None,
    ) -> None:
        self._router = router
        self._batches = batches
        self._limits = router.settings.config.limits
        self._telemetry = instrumentation or telemetry.Telemetry(router.settings)
        self._max_in_flight = router.settings.config.reliability.max_concurrent_rpcs
        self._in_flight = 0
        self._tasks: set[asyncio.Task[object]] = set()
        self._interrupted: set[asyncio.Task[object]] = set()
        # When (loop time) the server's stop cuts the calls still running (``interrupt_in_flight``).
        self._cut_at: float | None = None
        self._draining = False
        self._authenticator = Authenticator(router.settings.config)

    def swap_router(self, router: Router) -> None:
        """Serve new calls with ``router`` (hot reload); calls in flight keep the old one.

        Everything that can fail (the API keys files) is read first: a rejected configuration
        changes nothing, neither the keys nor the tenants' limits.
        """
        config = router.settings.config
        authenticator = Authenticator(config)
        router.admission.configure(config.tenants)
        self._router = router
        self._limits = config.limits
        self._max_in_flight = config.reliability.max_concurrent_rpcs
        self._authenticator = authenticator

    def interrupt_in_flight(self, cut_at: float | None = None) -> int:
        """Ask every call still running to end (the shutdown grace is nearly over); returns how many.
        ``cut_at``: when (the loop's time) the server's stop cuts the calls still running then,
        which tells a caller leaving before it from the cut (None: not known, a call ended
        CANCELLED taken as cut).

        A stream ends at its next message with UNAVAILABLE, reason SHUTTING_DOWN, and the committed
        trailers when it sent text, instead of being cut without a status. ``cancel_in_flight``
        then ends the calls that are still waiting for their provider.
        """
        self._draining = True
        self._cut_at = cut_at
        return len(self._tasks)

    @property
    def client_write_timeout(self) -> float:
        """How long one message's write to a streaming call's caller may wait (the current
        configuration's ``reliability.client_write_timeout_seconds``)."""
        return self._router.settings.config.reliability.client_write_timeout_seconds

    def calls_in_flight(self) -> frozenset[asyncio.Task[object]]:
        """The tasks of the calls running now (a reload waits for these before closing what the
        router they use holds)."""
        return frozenset(self._tasks)

    def cancel_in_flight(self) -> int:
        """Cancel the calls still running; each ends as ``interrupt_in_flight`` says."""
        for task in self._tasks:
            self._interrupted.add(task)
            task.cancel("server shutting down")
        return len(self._tasks)

    def _as_principal(self, request: RoutingRequest, principal: Principal) -> RoutingRequest:
        """Routing follows the authenticated tenant, never one the client names. With auth off the
        named tenant is taken as given, its configured ``user_tier`` included, as its allow-list
        and limits are."""
        if principal.tenant is None:
            return with_tenant_defaults(request, self._router.settings.config.tenants.get(request.context.tenant))
        context = request.context
        if context.tenant and context.tenant != principal.tenant:
            raise PermissionDenied("context.tenant does not match the authenticated tenant")
        as_tenant = replace(request, context=replace(context, tenant=principal.tenant))
        return with_tenant_defaults(as_tenant, principal.config)

    @staticmethod
    def _parsed(request: _Request | None) -> _Request:
        """The request, or INVALID_ARGUMENT when its bytes were not a valid message."""
        if request is None:
            raise InvalidRequest("request", "is not a valid protobuf message (corrupt bytes or invalid UTF-8)")
        return request

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, record: _CallRecord, error: RouteSvcError) -> grpc.StatusCode:
        """End the call with ``error``'s status, ErrorInfo, RetryInfo and trailers (never returns)."""
        code = status_code_of(error)
        status = _rich_status(code, error.message, error.reason, _error_metadata(error), error.retry_after)
        trailers = [(REQUEST_ID_HEADER, record.request_id), ("grpc-status-details-bin", status.SerializeToString())]
        if error.chunks_sent:
            trailers += [("routesvc-committed", "true"), ("routesvc-chunks-sent", str(error.chunks_sent))]
        record.fields["error_reason"] = error.reason
        # A caller that stopped reading holds the status back too (it waits behind the messages
        # flow control holds): wait for it as long as for a write, then leave it to grpc, which
        # sends it if the caller reads on, and free the call's slot.
        bound = error.write_timeout if isinstance(error, ClientStalled) else None
        try:
            async with asyncio.timeout(bound):
                await context.abort(code, error.message, trailing_metadata=tuple(trailers))
        except grpc.aio.InternalError as failure:
            # grpc ended the call (its deadline passed, or the client left) while our status was
            # on its way, so nothing can be sent. The abort marked the status sent, which keeps
            # grpc from cancelling this task as it does when a call ends first: end it that way
            # (a failed send would be logged by grpc with a traceback).
            raise asyncio.CancelledError from failure
        except TimeoutError as stalled:
            raise asyncio.CancelledError from stalled  # as above: the status is marked sent

    async def _handed_over(
        self,
        context: grpc.aio.ServicerContext,
        record: _CallRecord,
        task: asyncio.Task[object] | None,
        bound: float | None,
        *,
        interrupted: bool = False,
    ) -> grpc.StatusCode | None:
        """How a call ended for its caller whose last message was handed to grpc
        (``record.completed``) when its deadline, the shutdown or a write stall came while that
        message's write waited: OK once the caller took it; when the call ended first, as the
        caller saw it (``_ended_by_caller``, or ``_interrupted_end`` once the shutdown
        ``interrupted`` the call); None when it still waits after ``bound`` seconds.

        The shutdown cancelling the call meanwhile (``cancel_in_flight``: a write that stalled
        before the drain began) does not end the wait: the message stays with grpc, which sends
        it to a caller reading within the grace, so it is waited for from then on as the shutdown
        waits (until the caller's deadline or the grace's end). Taken as the call's end, it was
        logged CANCELLED, and the caller reading on got the Completion then UNAVAILABLE."""
        while True:
            try:
                sent = await _last_message_out(bound)
            except asyncio.CancelledError:
                if interrupted or task is None or task not in self._interrupted:
                    sent = False  # grpc cancelled the task: the call is over
                else:
                    task.uncancel()
                    interrupted = True
                    bound = _until_gone(context, None)
                    continue
            if sent is None:
                return None
            if sent:
                return grpc.StatusCode.OK
            if interrupted:
                return self._interrupted_end(context, record)
            code = _ended_by_caller(context, record)
            ended_as(code)
            return code

    def _shut_down_end(
        self, context: grpc.aio.ServicerContext, record: _CallRecord, ended: asyncio.CancelledError
    ) -> grpc.StatusCode:
        """How a call ended for its caller whose UNAVAILABLE ``SHUTTING_DOWN`` status was on its
        way (behind messages the caller had not read) when its handler was ``ended`` cancelled:
        UNAVAILABLE when the shutdown's own cancel ended the wait (the status stays with grpc,
        sent if the caller reads on, else the stop's cut is); else, grpc having failed the
        status's send (``_abort``: the call is over), as ``_interrupted_end`` says. It is so
        for the log line, span and metric: the span and metric said CANCELLED."""
        if ended.__cause__ is None:
            ended_as(grpc.StatusCode.UNAVAILABLE)
            return grpc.StatusCode.UNAVAILABLE
        return self._interrupted_end(context, record)

    def _interrupted_end(self, context: grpc.aio.ServicerContext, record: _CallRecord) -> grpc.StatusCode:
        """How a call the shutdown interrupted (``interrupt_in_flight``) that can send nothing more
        ended for its caller, which its log line, span and metric say (``ended_as``): UNAVAILABLE
        ``SHUTTING_DOWN`` when the server's stop cut it (past ``cut_at``, the caller's deadline
        not passed: as a caller reading after the grace, or one whose status waited behind
        unread messages, sees it; when is not known, a call not ended by its deadline), else as
        the caller ended it (``_ended_by_caller``: leaving in the grace is CANCELLED). A caller
        that left was logged UNAVAILABLE, and one cut in the last moments before its deadline
        DEADLINE_EXCEEDED; a status that waited was traced CANCELLED."""
        code = _ended_by_caller(context, record)
        remaining = context.time_remaining()
        if self._cut_at is None:
            cut = code is grpc.StatusCode.CANCELLED
        else:
            cut = asyncio.get_running_loop().time() >= self._cut_at and (remaining is None or remaining > 0)
        if cut:
            code = grpc.StatusCode.UNAVAILABLE
            record.fields["error_reason"] = ShuttingDown.reason
        elif code is grpc.StatusCode.CANCELLED:
            record.fields.pop("error_reason", None)
        ended_as(code)
        return code

    @contextlib.asynccontextmanager
    async def _rpc(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[_CallRecord]:
        """Run one RPC: echo the request id, bound it by the deadline, map errors, log once."""
        started = time.monotonic()
        incoming = dict(context.invocation_metadata() or ())
        given_id = incoming.get(REQUEST_ID_HEADER)
        # A longer id is refused (below) and one is made up in its place: echoed twice, in the
        # initial and the trailing metadata, a long one put the answer past the caller's own
        # metadata limit (8 KiB by default), so that a call served and billed failed there.
        valid_id = isinstance(given_id, str) and len(given_id) <= MAX_REQUEST_ID_CHARS
        request_id = str(given_id) if given_id and valid_id else os.urandom(16).hex()
        # Every line logged while this RPC runs names it (each RPC is a task of its own, so the
        # binding ends with it); ``_record_decision`` adds the decision id.
        structlog.contextvars.bind_contextvars(request_id=request_id)
        record = _CallRecord(method, request_id, started)
        code = grpc.StatusCode.OK
        alert = False  # a failure the operator must act on whatever its code (operator_must_act)
        task = asyncio.current_task()
        admitted = False

        def release_slot() -> None:
            nonlocal admitted
            if admitted:
                admitted = False
                self._in_flight -= 1

        try:
            # Inside the ``try``: grpc cancels a call whose deadline passed before it ran this
            # handler (a busy loop) at this first await, which is then logged DEADLINE_EXCEEDED as
            # its span and metric record it (before the ``try``, it was never logged). It holds no
            # slot yet, so ``release_slot`` does nothing for it.
            await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
            if self._in_flight >= self._max_in_flight:
                raise Overloaded(f"the server is at its limit of {self._max_in_flight} concurrent calls")
            self._in_flight += 1
            admitted = True
            if task is not None:
                self._tasks.add(task)
            authenticator = self._authenticator
            peers = _peer_common_names(context) if authenticator.uses_certificates else ()
            record.principal = authenticator.authenticate(incoming, peers)
            if given_id is not None and not valid_id:
                raise InvalidRequest(REQUEST_ID_HEADER, f"at most {MAX_REQUEST_ID_CHARS} characters")
            if record.principal.tenant is not None:
                record.fields["tenant"] = record.principal.tenant
            # End the call before the caller's own timer would, so that our status
            # (DEADLINE_EXCEEDED with the committed trailers after text) reaches it first.
            record.ends_at = own_end(context)
            async with asyncio.timeout_at(record.ends_at):
                yield record
        except RouteSvcError as raised:
            error = raised
            if isinstance(raised, ClientStalled) and record.completed:
                # Its last message (the Completion, usage and cost charged) was handed to grpc,
                # which sends it before the status: the caller has the whole answer, and told
                # DEADLINE_EXCEEDED it would pay for it again. The call ends OK, the stall noted on its log line,
                # span and metric; its slot is free, and its status waits as long as an error's.
                record.fields["client_stalled"] = True
                telemetry.record_client_stalled()
                release_slot()
                ended = await self._handed_over(context, record, task, _until_gone(context, raised.write_timeout))
                if ended is not None and ended is not grpc.StatusCode.OK:
                    # The call ended (the caller left, its deadline passed, the grace ended)
                    # before the caller read it: grpc can send nothing; end as the caller saw it,
                    # sending nothing.
                    code = ended
                    raise asyncio.CancelledError from None
                if ended is None and task is not None:
                    # Still unread after waiting as long again: grpc's send of the status, begun
                    # as this task returns (nothing awaited before it), is ended at once, as
                    # ``_abort`` leaves an error's: the status stays with grpc for a caller that
                    # reads on, and a caller leaving meanwhile makes grpc log nothing (a send
                    # still awaited would fail, which grpc logs at ERROR with a traceback).
                    asyncio.get_running_loop().call_soon(task.cancel)
                context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
                return
            if raised.operator_must_act:
                alert = True
                telemetry.record_operator_failure(raised.reason)
            if _past(record.ends_at) and not record.answering and not isinstance(raised, ClientStalled):
                # Raised after the server's own end by work that did not await since (its timer
                # fires only at an await), nothing of its answer sent: the call ends
                # DEADLINE_EXCEEDED, as it would have.
                error = DeadlineExceeded("deadline exceeded")
            code = status_code_of(error)
            if isinstance(error, DeadlineExceeded):
                error.chunks_sent = _chunks_sent(record)
            if isinstance(error, ClientStalled):
                telemetry.record_client_stalled()
                # Its status waits behind the unread messages as long again (``_abort``): the
                # call holds nothing more meanwhile (its provider request and reservation are
                # closed), so its slot is free from now on.
                release_slot()
            try:
                await self._abort(context, record, error)
            except asyncio.CancelledError as cut_short:
                if isinstance(error, ShuttingDown):
                    code = self._shut_down_end(context, record, cut_short)
                raise
        except TimeoutError:
            if record.completed:
                # The whole answer is on its way (grpc sends the Completion before the status):
                # told DEADLINE_EXCEEDED, a caller would retry and pay for it again. The call ends
                # OK if the caller reads it before its own deadline; else the transport ends it
                # DEADLINE_EXCEEDED without it, and so it is logged (grpc sends nothing).
                ended = await self._handed_over(context, record, task, _until_gone(context, None))
                if ended is not grpc.StatusCode.OK:
                    code = ended or _ended_by_caller(context, record)
                    raise asyncio.CancelledError from None
                context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
            else:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                late = DeadlineExceeded("deadline exceeded", chunks_sent=_chunks_sent(record))
                await self._abort(context, record, late)
        except asyncio.CancelledError:
            if task is None or task not in self._interrupted:
                # The caller left, or grpc ended the call at its deadline before our timer could
                # (a busy loop runs it late; logged DEADLINE_EXCEEDED all the same): grpc has the
                # status; log how the call ended.
                code = _ended_by_caller(context, record)
                raise
            task.uncancel()
            if record.completed:
                # The grace ended while the last message's write waited (a caller reading late)
                # or after it (a batch job's release): it is sent before the status, so the call
                # ends OK, as at its deadline; told UNAVAILABLE, a caller would retry and pay for
                # the answer again (or queue its batch job twice). Only if the caller reads it
                # before the grace ends: grpc's stop then cuts the call UNAVAILABLE without it,
                # logged so (grpc sends nothing), as is a caller whose deadline passed first.
                ended = await self._handed_over(context, record, task, _until_gone(context, None), interrupted=True)
                if ended is not grpc.StatusCode.OK:
                    code = ended or _ended_by_caller(context, record)
                    raise asyncio.CancelledError from None
                context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
                return
            code = grpc.StatusCode.UNAVAILABLE
            shutting_down = ShuttingDown("the server is shutting down", chunks_sent=_chunks_sent(record))
            try:
                await self._abort(context, record, shutting_down)
            except asyncio.CancelledError as cut_short:
                code = self._shut_down_end(context, record, cut_short)
                raise
        except grpc.aio.AbortError:
            raise
        except GeneratorExit:
            # A streaming call whose write failed: the client is gone or its deadline passed, and
            # the span wrapper closed this handler. Nothing more can be sent; log how it ended.
            code = _ended_by_caller(context, record)
            raise
        except Exception:
            # Our bug: log the traceback (locals are not rendered), answer INTERNAL, never UNKNOWN.
            log.exception("rpc_internal_error", method=method, request_id=request_id)
            code = grpc.StatusCode.INTERNAL
            internal = RouteSvcError("internal error")
            # After text, with the committed trailers: a client retrying would repeat it.
            internal.chunks_sent = _chunks_sent(record)
            await self._abort(context, record, internal)
        else:
            if _past(record.ends_at) and not record.answering:
                # Returned after the server's own end without awaiting since (a Route's work is
                # CPU only, so asyncio's timer fires at no await): the answer is not sent, and the
                # call ends DEADLINE_EXCEEDED, logged, traced and counted as the caller sees it.
                # Not a stream that sent messages (a Complete's last is its Completion, with the
                # usage and cost charged): the caller has them, and told DEADLINE_EXCEEDED it
                # would pay again.
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                late = DeadlineExceeded("deadline exceeded", chunks_sent=_chunks_sent(record))
                await self._abort(context, record, late)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        finally:
            release_slot()
            if task is not None:
                self._tasks.discard(task)
                self._interrupted.discard(task)
            duration_ms = round((time.monotonic() - started) * 1000, 3)
            # Failures on our side or the provider's at warning, so they can be alerted on;
            # the caller's own doing (invalid, cancelled, over a limit) stays at info.
            emit = log.warning if alert or code in _SERVER_FAILURES else log.info
            emit(
                "rpc_finished",
                method=method,
                code=code.name,
                request_id=request_id,
                duration_ms=duration_ms,
                **record.fields,
                **_spent(method),
            )

    async def Route(self, request: pb.RouteRequest, context: grpc.aio.ServicerContext) -> pb.RouteResponse:
        """Decide only."""
        async with self._rpc("Route", context) as record:
            request = self._parsed(request)
            routing_request = self._as_principal(wire.routing_request(request, self._limits), record.principal)
            counted = RouteCount()
            decision = await self._router.route(
                routing_request,
                count_route=True,
                request_id=record.request_id,
                timeout=record.time_left(),
                counted=counted,
            )
            response = pb.RouteResponse(decision=wire.decision_message(decision))
            if _past(record.ends_at):
                # Its work (CPU only: a slow rule's regex, a large catalog, a loaded loop) passed
                # the server's own end without awaiting, so no timer ended it: DEADLINE_EXCEEDED,
                # its decision unsent, and its count given back when nothing was paid to decide.
                counted.give_back()
                raise DeadlineExceeded("deadline exceeded")
            # The one look at the clock found it in time: answered (``_rpc`` does not look again).
            record.answering = True
            _record_decision(record, decision)
            return response
        raise AssertionError("unreachable")  # pragma: no cover - _rpc aborts or returns

    async def Complete(
        self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CompleteResponse]:
        """Decide, call the model, stream the answer."""
        async with self._rpc("Complete", context) as record:
            request = self._parsed(request)
            routing_request = self._as_principal(wire.routing_request(request, self._limits), record.principal)
            headers = _upstream_headers(context)
            chunks = 0
            events = self._router.complete(
                routing_request, timeout=record.time_left(), headers=headers, request_id=record.request_id
            )
            # aclosing: when the client goes away mid-stream the router's generator is closed at
            # once, which closes the upstream request, instead of waiting for garbage collection.
            async with contextlib.aclosing(events):
                async for event in events:
                    # Converted before it is counted: the trailers of a call that fails here count
                    # only what was sent.
                    message = wire.complete_message(event)
                    if isinstance(event, RouteDecision):
                        _record_decision(record, event)
                    elif isinstance(event, Escalation):
                        record.fields["escalated_to"] = event.to_model
                    elif isinstance(event, BatchJob):
                        record.fields["batch_id"] = event.batch_id
                    elif isinstance(event, Completion):
                        record.fields.update(answered_by=event.model, finish_reason=event.finish_reason.value)
                    else:
                        if not chunks:
                            telemetry.record_first_chunk_sent()
                        chunks += 1
                    # A batch decision comes after its job was queued: it and the job's id are
                    # delivered even while draining (a client told "shutting down" would retry and
                    # queue the job twice).
                    queued = isinstance(event, BatchJob) or (
                        isinstance(event, RouteDecision) and event.mode is Mode.BATCH
                    )
                    if self._draining and not isinstance(event, Completion) and not queued:
                        # Delivered so far: ``chunks`` minus the one not sent now.
                        sent = chunks - (0 if isinstance(event, RouteDecision | Escalation | BatchJob) else 1)
                        raise ShuttingDown("the server is shutting down", chunks_sent=sent)
                    # Counted before its write: a write the deadline or a shutdown cuts short (a
                    # client reading slowly) has handed the message to grpc, which sends it before
                    # the status, so a client that reads on gets it and the trailers count it.
                    record.fields["chunks"] = chunks
                    record.answering = True
                    # A Completion, or a BatchJob (its job stands once its id is on its way).
                    record.completed = isinstance(event, Completion | BatchJob)
                    if record.completed:
                        last_message_follows()
                    yield message

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """The catalog; for an authenticated tenant with an allow-list, the models it leaves out are
        unavailable, saying so."""
        async with self._rpc("ListModels", context) as record:
            self._parsed(request)
            settings = self._router.settings
            # Auth off: no tenant, as routing sees a request that names none.
            allow_list = self._router.allow_list(record.principal.tenant or "")
            return pb.ListModelsResponse(
                models=[
                    wire.model_info(
                        model,
                        allow_list.refuses(model.id) or settings.providers[model.provider].missing_key_reason,
                    )
                    for model in settings.catalog
                ]
            )
        raise AssertionError("unreachable")  # pragma: no cover - _rpc aborts or returns

    def _batch_owner(self, tenant: str, principal: Principal) -> tuple[BatchQueue, str]:
        """The batch queue and the tenant whose jobs the caller may see."""
        if self._batches is None:
            raise BatchNotFound("batch mode is not enabled on this server")
        if principal.tenant is None:
            return self._batches, tenant
        if tenant and tenant != principal.tenant:
            raise PermissionDenied("tenant does not match the authenticated tenant")
        return self._batches, principal.tenant

    async def GetBatch(self, request: pb.GetBatchRequest, context: grpc.aio.ServicerContext) -> pb.GetBatchResponse:
        """A batch job's state and, once it succeeded, its result."""
        async with self._rpc("GetBatch", context) as record:
            batch_id, named = wire.batch_request(self._parsed(request))
            batches, tenant = self._batch_owner(named, record.principal)
            status = await batches.get(batch_id, tenant)
            record.fields.update(batch_id=status.job.batch_id, batch_state=status.job.state.value)
            return wire.batch_status_message(status)
        raise AssertionError("unreachable")  # pragma: no cover - _rpc aborts or returns

    async def CancelBatch(
        self, request: pb.CancelBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelBatchResponse:
        """Cancel a batch job that has not ended."""
        async with self._rpc("CancelBatch", context) as record:
            batch_id, named = wire.batch_request(self._parsed(request))
            batches, tenant = self._batch_owner(named, record.principal)
            status = await batches.cancel(batch_id, tenant)
            record.fields.update(batch_id=status.job.batch_id, batch_state=status.job.state.value)
            return pb.CancelBatchResponse(job=wire.batch_job_message(status.job))
        raise AssertionError("unreachable")  # pragma: no cover - _rpc aborts or returns

    async def Feedback(self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext) -> pb.FeedbackResponse:
        """Record how good an earlier decision's answer was."""
        async with self._rpc("Feedback", context) as record:
            request = self._parsed(request)
            decision_id, score = wire.feedback(request)
            # An authenticated caller rates its own tenant's decisions only; the router files the
            # score under the decision's tenant.
            model, examples = await self._router.feedback(
                decision_id, score, tenant=record.principal.tenant, timeout=record.time_left()
            )
            record.fields.update(decision_id=decision_id, model=model, feedback_score=score)
            return pb.FeedbackResponse(decision_id=decision_id, model=model, score=score, library_examples=examples)
        raise AssertionError("unreachable")  # pragma: no cover - _rpc aborts or returns

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.GetStatsResponse:
        """Routing effectiveness over the window, for one tenant or all."""
        async with self._rpc("GetStats", context) as record:
            tenant, window = wire.stats_request(self._parsed(request))
            if record.principal.tenant is not None:
                # An authenticated tenant sees its own numbers only.
                if tenant and tenant != record.principal.tenant:
                    raise PermissionDenied("tenant does not match the authenticated tenant")
                tenant = record.principal.tenant
            return wire.stats_message(await self._telemetry.stats.summarize(tenant=tenant, window_seconds=window))
        raise AssertionError("unreachable")  # pragma: no cover - _rpc aborts or returns


def _record_decision(record: _CallRecord, decision: RouteDecision) -> None:
    telemetry.record_decision(decision)
    structlog.contextvars.bind_contextvars(decision_id=decision.decision_id)
    record.fields.update(
        decision_id=decision.decision_id,
        model=decision.model,
        strategy=decision.strategy,
        rule=decision.rule,
        mode=decision.mode.value,
        est_cost_usd=format_usd(decision.estimated_cost_usd),
    )


def _upstream_headers(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """Headers to forward upstream: trace context only, never the client's credentials."""
    incoming = dict(context.invocation_metadata() or ())
    return {key: str(incoming[key]) for key in ("traceparent", "tracestate") if key in incoming}


def _peer_common_names(context: grpc.aio.ServicerContext) -> list[str]:
    """Common names of the client certificate the TLS handshake verified (mutual TLS), if any."""
    auth_context = context.auth_context() or {}
    return [name.decode("utf-8", "replace") for name in auth_context.get("x509_common_name", ())]
