"""The router: request -> policy -> decision -> provider -> cost. Knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import structlog

from routesvc import telemetry
from routesvc.admission import Admission, Reservation, build_admission
from routesvc.breaker import Breakers, Permit
from routesvc.cascade import EscalationPolicy, max_cost_reason
from routesvc.catalog import ModelSpec
from routesvc.config import BATCH_API_KINDS, RulesStageConfig, Settings, TenantConfig
from routesvc.cost import (
    billed_input_of_estimate,
    billed_input_tokens,
    cost_of_usage,
    estimated_cost,
    format_usd,
    interrupted_usage,
)
from routesvc.errors import (
    CostLimitExceeded,
    DeadlineExceeded,
    FeedbackNotEnabled,
    FeedbackStoreBusy,
    InvalidRequest,
    LimitExceeded,
    ModelNotFound,
    PermissionDenied,
    ProviderError,
    ProviderNotConfigured,
    ProviderQuotaExhausted,
    ProviderStalled,
    ProviderTimedOut,
    ProviderUnavailable,
    RouteSvcError,
    SharedStateUnavailable,
    StreamInterrupted,
    counts_against_model,
    quoted_id,
)
from routesvc.feedback import Cancellation, FeedbackStore, LockDeadline, Recorded, UnknownDecision
from routesvc.ledger import AttemptOutcome, Ledger
from routesvc.models import (
    AllowList,
    AttemptResult,
    AttemptSummary,
    Candidate,
    CompleteEvent,
    Completion,
    Escalation,
    FinishReason,
    Heartbeat,
    ImageEstimate,
    InputReported,
    Mode,
    ProviderEvent,
    QualityScore,
    RouteDecision,
    RoutingRequest,
    TextDelta,
    UpstreamCall,
    Usage,
)
from routesvc.policy import Policy
from routesvc.providers.base import Provider, ProviderCall, close_stream, refusal
from routesvc.reported_usage import checked
from routesvc.retry import RetryBudget, backoff_delay, is_retryable, skips_provider
from routesvc.scoring import Scorer, ScoreResult, ScoringInput
from routesvc.strategies.base import RoutingInput, Verdict
from routesvc.strategies.classifier import TASK_LABELS
from routesvc.strategies.default import no_eligible_model, pinned_model_refused
from routesvc.tokens import estimate_image_tokens, estimate_input_tokens

if TYPE_CHECKING:
    from routesvc.batches import BatchQueue

log = structlog.get_logger("routesvc.router")

# A decision's strategy and rule when the request's max_cost_usd replaced the policy's model by a
# cheaper one.
MAX_COST_STRATEGY = "max_cost"
MAX_COST_DOWNGRADE_RULE = "max_cost_downgrade"

# How a candidate says it refuses a request parameter that is not a field of the request.
_REFUSED_PARAMETER = {"prefill": "refuses a prefill, a conversation that ends in an assistant turn"}


def _policy_for(
    settings: Settings,
    providers: Mapping[str, Provider],
    *,
    cap_feedback_at_open: bool = True,
    previous: Policy | None = None,
) -> Policy:
    """The routing policy ``settings`` describe; relative paths are read from the config file's
    folder. ``cap_feedback_at_open`` and ``previous`` as ``Policy.from_config`` takes them."""
    return Policy.from_config(
        settings.config.routing,
        catalog=settings.catalog,
        providers=providers,
        base_dir=None if settings.source.startswith("<") else Path(settings.source).parent,
        source=settings.source,
        cap_feedback_at_open=cap_feedback_at_open,
        previous=previous,
    )


async def _built_in_thread(build: Callable[[], Policy]) -> Policy:
    """``build()`` run in a worker thread. If the caller is cancelled meanwhile (a stop during a
    reload) the thread goes on, and the policy it then builds is closed: no one else will."""
    building = asyncio.ensure_future(asyncio.to_thread(build))
    try:
        return await asyncio.shield(building)
    except asyncio.CancelledError:

        def close_unused(done: asyncio.Future[Policy]) -> None:
            if not done.cancelled() and done.exception() is None:
                done.result().close()  # just opened, nothing queued: closing is quick

        building.add_done_callback(close_unused)
        raise


# The pauses after which a Feedback looks again for a decision not in its feedback_db before it is
# NOT_FOUND (about a quarter of a second in all): another process sharing the file may have routed
# it and not written it yet (its write queued, ~1 ms, longer while its writer waits on a lock).
_UNKNOWN_DECISION_PAUSES = (0.05, 0.2)
# The time a look needs before the call's end (its deadline): a pause that would leave less is cut,
# and with no pause left the decision is NOT_FOUND at once (not DEADLINE_EXCEEDED, which clients
# retry for a decision that does not exist) once every store was asked; else the last look, which
# asks the later stores, is made at once (``_Asked``).
_UNKNOWN_DECISION_LOOK_SECONDS = 0.05
# How long before the call's end a Feedback's wait on the feedback thread (behind the calls before
# it, then for the file's lock) ends, at most: a quarter of the call's time for a shorter one. The
# call is then answered with what is known (FEEDBACK_STORE_BUSY, or the NOT_FOUND of a look
# before) before its deadline, rather than DEADLINE_EXCEEDED with the outcome stored afterwards.
_FEEDBACK_ANSWER_MARGIN_SECONDS = 0.1
# How long a look that found a decision unknown to the first store waits at most, in all, for a
# later store's queued writes (an idle writer: ~1 ms) and its read of whether that store knows it
# (``FeedbackStore.knows``: a read held up, by another process holding the WAL's read locks,
# holds the feedback thread no longer).
_KNOWS_WAIT_SECONDS = 0.02


@dataclass(slots=True)
class _Learning:
    """What the routers a server swaps in by reload share for Feedback: one lock, so outcomes
    reach the stores and the libraries one at a time and in order, whichever router a call
    came to; the policy whose stages they teach (the newest swapped in); and how many Feedback
    calls were recorded, so a policy built meanwhile knows its libraries missed some."""

    lock: threading.Lock
    policy: Policy
    recorded: int = 0
    # Feedback's SQLite work, one call at a time (they take ``lock`` in turn anyway): on its own
    # thread, so calls waiting on a file another process locks never fill asyncio's default
    # executor (reloads, the batch store, shutdown use it). Its thread ends with the last router.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="routesvc-feedback")
    )


_FEEDBACK_NOT_ENABLED = "feedback needs an embedding stage with a feedback_db in routing.stages"


@dataclass(slots=True)
class _Stored:
    """What one look's job has recorded so far (written on the feedback thread, read by
    ``_ended_after_its_call`` once the job is done): the stores (``files``) it is to record in,
    those it has ``stored`` the outcome in, and the decision's ``model`` and ``owner`` as they read it."""

    files: list[FeedbackStore] = field(default_factory=list)
    stored: list[FeedbackStore] = field(default_factory=list)
    model: str = ""
    owner: str = ""
    # The stores this look found without the decision (never to be written: not ``not_stored``).
    without_decision: list[FeedbackStore] = field(default_factory=list)


@dataclass(slots=True)
class _Asked:
    """The stores a Feedback call's looks have found without the decision (``unknown``, on the
    feedback thread), out of those its newest look was to record in (``files``). Its NOT_FOUND is
    an answer only once ``everywhere`` (each one asked: the later ones read without their locks
    by the first look, ``_read_the_later_stores``, or by the final look): a call whose time ends
    before a later store that may know it is asked (the look asking it not made, still queued, or
    cut waiting for its lock) is FeedbackStoreBusy (retryable), as a busy file is, never a final
    NOT_FOUND for a decision a later store may know."""

    files: list[FeedbackStore] = field(default_factory=list)
    unknown: set[FeedbackStore] = field(default_factory=set)

    @property
    def everywhere(self) -> bool:
        return bool(self.files) and all(store in self.unknown for store in self.files)


@dataclass(frozen=True, slots=True)
class _FeedbackCall:
    """One Feedback call: its ``score`` for ``decision_id`` from ``tenant``, and the times its
    waits end by. Each ``look`` for the decision runs ``record`` on the feedback thread
    (``learning.executor``), in the call's ``context``, behind the Feedback calls before it.

    A look has the busy timeout (``busy_timeout``, the longest of the ``stores``') to take the
    file's write lock, from when it runs on the feedback thread: waiting there behind this
    process's own Feedback calls is no lock of another process (a burst of a few thousand on an
    unlocked file all go through, grpc's own limit on calls waiting for the loop raised to let
    them in: ``server._pending_calls_options``; the client's deadline bounds the wait). While the
    file is known locked by another process (a write waited the busy timeout and did not get it),
    the busy timeout counts from the look's arrival instead, so calls piling up there are each
    FeedbackStoreBusy after about one busy timeout, not one after another (the N-th waited N of
    them; clients saw their deadlines pass instead). Either way the wait ends by ``answer_by``
    (``time.monotonic()``; None: no deadline), so that the call is answered before its deadline.

    ``policy`` is the policy of the router the call came to; ``learning`` what the routers swapped
    in by reload share for Feedback."""

    decision_id: str
    score: float
    tenant: str | None
    answer_by: float | None
    policy: Policy
    learning: _Learning
    stores: tuple[FeedbackStore, ...]
    busy_timeout: float
    context: contextvars.Context
    asked: _Asked = field(default_factory=_Asked)
    # When the call came (``time.monotonic()``): a lock met since held it up (``_time_out``).
    arrived: float = field(default_factory=time.monotonic)

    async def look(self, found_unknown: UnknownDecision | None, *, final: bool) -> tuple[str, str, int]:
        """The decision's model and owner and the examples the libraries hold once the score is
        recorded (``record``), on the one feedback thread, behind the Feedback calls before it.
        ``found_unknown``: what a look before found once every store was asked (``_Asked``: the
        answer if this one is not made; None: this call's time running out is FeedbackStoreBusy);
        ``final``: no look comes after this one (``_recorded_by``).

        A call cancelled while its look waits (the client gave up, or the call's end came) cancels
        the job if it has not started, and otherwise has it store nothing unless it has taken a
        file's lock already (``Cancellation``): the caller was told CANCELLED (or
        DEADLINE_EXCEEDED), so nothing changes. A job that has taken it is finished (in every
        store) and counted in GetStats once done (``_ended_after_its_call``), as is one still
        running at ``answer_by`` (below) whose call then ends."""
        cancel = Cancellation()
        stored = _Stored()
        job = self.learning.executor.submit(
            self.context.run, self.record, time.monotonic(), found_unknown, final, cancel, stored
        )
        answer = asyncio.wrap_future(job)
        try:
            if self.answer_by is not None:
                try:
                    async with asyncio.timeout(self.answer_by - time.monotonic()):
                        return await asyncio.shield(answer)
                except TimeoutError:
                    # Still queued at the call's end: it never runs (so nothing is stored). Once
                    # running, it ends by ``answer_by`` itself.
                    if job.cancel():
                        if found_unknown is not None:
                            raise found_unknown from None
                        raise self._time_out("the Feedback calls before this one") from None
                # Past ``answer_by`` the running job is busy at once or has just taken the lock:
                # then it stores the outcome even if the call's end comes meanwhile
                # (DEADLINE_EXCEEDED, the outcome stored: sent again, it is stored once,
                # docs/feedback.md).
            return await asyncio.shield(answer)
        except asyncio.CancelledError:
            cancel.cancel()
            job.cancel()
            answer.add_done_callback(functools.partial(self._ended_after_its_call, stored))
            raise
        except Exception as error:
            if stored.stored:
                # Failed after a file took the outcome (two stages: the second file locked past
                # its wait, or full): it is stored there, so counted and logged, and the client is
                # told the error (``record``: never the look before's NOT_FOUND), which it sends
                # again, the files not written then storing it (counted once, by decision_id).
                self._partly_stored(stored, error)
            raise

    def _ended_after_its_call(self, stored: _Stored, answer: asyncio.Future[tuple[str, str, int]]) -> None:
        """A job whose call ended before it (cancelled, or its deadline passed): its error read
        (nobody else will: asyncio logged each as ``Future exception was never retrieved``), and
        the outcome it recorded counted in GetStats, as its call would have.

        A job that failed after it ``stored`` the outcome in a file (with two stages, the second
        file locked past the busy timeout, or full) leaves it there and in that stage's library,
        and its call's client, told CANCELLED, will not send it again as one told the error
        would: it is counted (it is stored) and logged, ``feedback_partly_stored`` naming the files
        not written (the call sent again stores it there)."""
        if answer.cancelled():
            return
        error = answer.exception()
        if error is None:
            model, owner, _ = answer.result()
            telemetry.record_feedback(model, self.score, decision_id=self.decision_id, tenant=owner)
        elif stored.stored:
            self._partly_stored(stored, error)

    def _partly_stored(self, stored: _Stored, error: BaseException) -> None:
        """A job that failed with ``error`` after it ``stored`` the outcome in a file: counted in
        GetStats (it is stored; sent again, it counts once, by decision_id) and logged
        ``feedback_partly_stored``, naming the files not written (no prompt)."""
        log.warning(
            "feedback_partly_stored",
            decision_id=self.decision_id,
            stored=[store.path for store in stored.stored],
            not_stored=[
                store.path
                for store in stored.files
                if store not in stored.stored and store not in stored.without_decision
            ],
            without_decision=[store.path for store in stored.without_decision],
            error_type=type(error).__name__,
        )
        telemetry.record_feedback(stored.model, self.score, decision_id=self.decision_id, tenant=stored.owner)

    def record(
        self,
        arrived: float,
        found_unknown: UnknownDecision | None,
        final: bool,
        cancel: Cancellation,
        stored: _Stored,
    ) -> tuple[str, str, int]:
        """``look``'s work on the feedback thread, for a look that ``arrived`` then (``cancel``:
        settled once its call is cancelled; before a file's lock is taken, nothing is stored;
        ``stored``: what it recorded so far)."""
        deadline = self._lock_deadline(arrived)
        try:
            return self._recorded_by(deadline, final, cancel, stored)
        except FeedbackStoreBusy:
            # Not looked at again within the call's time (the busy timeout had not passed):
            # a look again answers what the looks before found, once they asked every store,
            # while it stored nothing. One that found the decision and stored it in a file (two
            # stages, the second file's wait cut) is FeedbackStoreBusy: a NOT_FOUND, final, left
            # it half stored, never sent again. So is one cut waiting for a store no look asked
            # (``found_unknown`` None: a later stage's file may know the decision).
            if deadline.cut and found_unknown is not None and not stored.stored:
                raise found_unknown from None
            raise

    def another_look_fits(self) -> bool:
        """Whether the call's time leaves room for another look after this one (as
        ``Router.feedback`` decides a look is final): without it, a look that found the decision
        unknown to the first store asks the later ones itself rather than answer what only the
        first one said."""
        return self.answer_by is None or self.answer_by - time.monotonic() > 2 * _UNKNOWN_DECISION_LOOK_SECONDS

    def _read_the_later_stores(self, later: Sequence[FeedbackStore], deadline: LockDeadline) -> None:
        """The stores after the first, for a look that found the decision unknown to the first
        and looks again: each read without its write lock (``FeedbackStore.knows``, its queued
        writes written and the read made within ``_KNOWS_WAIT_SECONDS``, or the call's time if
        less) and noted in ``self.asked`` if it does not know the decision either, so that a
        decision no store knows is an answer (NOT_FOUND) after this one pass on the feedback
        thread, as with one stage, not only once the final look has passed its queue a second
        time (under load, FeedbackStoreBusy instead). One that knows it, or cannot tell, is
        asked by the final look."""
        for store in later:
            if store in self.asked.unknown:
                continue
            wait = min(_KNOWS_WAIT_SECONDS, max(0.0, deadline.at - time.monotonic()))
            if store.knows(self.decision_id, tenant=self.tenant, timeout=wait) is False:
                self.asked.unknown.add(store)

    def _lock_deadline(self, arrived: float) -> LockDeadline:
        """When a look that ``arrived`` then must have the file's write lock: the busy timeout
        after it runs (after it arrived, while the file is known locked), or ``answer_by`` if
        that comes first: ``cut``, as a lock not taken by then is not known to outlast the busy
        timeout (it may be another worker's brief write), so the next calls count from their
        turn."""
        locked = any(store.known_locked for store in self.stores)
        at = (arrived if locked else time.monotonic()) + self.busy_timeout
        if self.answer_by is None or at < self.answer_by:
            return LockDeadline(at, since=self.arrived)
        return LockDeadline(self.answer_by, cut=True, since=self.arrived)

    def _time_out(self, waited_for: str) -> FeedbackStoreBusy:
        """The error for a look whose time ran out before it waited for a file's lock: a file
        known locked by another process counted it from the look's arrival, or else one whose lock
        another process held while the call waited (a write before it on the feedback thread, or
        the file's writer thread, waiting for it since the call came: ``lock_met_since``, the
        longest such wait; the file not yet known locked, no wait having lasted the busy timeout)
        took its time: it is named; else what it ``waited_for`` (a burst on files nobody locks,
        or that other workers lock only for their brief writes)."""
        for store in self.stores:
            if store.known_locked:
                return store.busy()
        waited, held_up = max((store.lock_met_since(self.arrived), i) for i, store in enumerate(self.stores))
        if waited > 0:
            return self.stores[held_up].busy()
        return FeedbackStoreBusy(f"feedback: {waited_for} took this call's time; retry shortly")

    def _recorded_by(
        self, deadline: LockDeadline, final: bool, cancel: Cancellation, stored: _Stored
    ) -> tuple[str, str, int]:
        """The score recorded in each store and taught to each library of the newest policy,
        the first store's lock taken by ``deadline`` (else ``FeedbackStoreBusy``, nothing stored)
        and ``cancel`` not settled before it (else ``concurrent.futures.CancelledError``, nothing
        stored); the stores after the first are each taken by ``deadline`` too, their calls'
        cancel too late (the call is finished); each file recorded in is noted in ``stored``.
        A store that does not know the decision is skipped when another does (logged
        ``feedback_stage_without_decision``, info); ``UnknownDecision`` only when none does. The
        first store not knowing it is ``UnknownDecision`` at once unless the look is ``final``:
        the decision may wait in another process's write queue (looked for again, no wait for the
        later stores' locks meanwhile: they are only read, ``_read_the_later_stores``); the final
        look asks the later stores too, as does one with no time left for another look
        (``another_look_fits``). Each store found without the decision is noted in ``self.asked``
        (and ``stored``)."""
        model = owner = ""
        examples = 0
        if time.monotonic() >= deadline.at:
            raise self._time_out("the Feedback calls before this one")
        if self.policy is not self.learning.policy:
            # Swapped in and not yet taken over (``take_over_feedback``), or replaced since:
            # the decisions this router routed wait in its own stores' write queues, which
            # recording in the stores taught does not flush; written first, they are found.
            for store in self.stores:
                if not store.flush(timeout=max(0.0, deadline.at - time.monotonic())):
                    raise store.timed_out(self.arrived)
        # One call at a time, across reloads too, so the libraries take the outcomes in the
        # order the stores recorded them (an older score never replaces a newer one, an
        # eviction comes after the add it follows); taught to the newest policy swapped in.
        if not self.learning.lock.acquire(timeout=max(0.0, deadline.at - time.monotonic())):
            raise self._time_out("a reload taking over the feedback stores")
        try:
            stages = [s for s in self.learning.policy.learning_stages if s.feedback is not None]
            if not stages:
                raise FeedbackNotEnabled(_FEEDBACK_NOT_ENABLED)
            self.learning.recorded += 1
            stored.files = list(dict.fromkeys(stage.feedback for stage in stages if stage.feedback is not None))
            self.asked.files = list(stored.files)
            # A store that does not know the decision while another does never saw it (its stage
            # added by a reload after the decision was routed, or its pending limit or TTL
            # smaller): skipped, the outcome stored in the others. Unknown to every store, the
            # decision is not found. Unknown to the first, it is looked for again
            # (``Router.feedback``) before the later stores are asked, on the final look.
            recorded: dict[FeedbackStore, Recorded | None] = {}
            unknown: UnknownDecision | None = None
            for stage in stages:
                assert stage.feedback is not None
                if stage.feedback not in recorded:  # stages sharing a store record once
                    try:
                        recorded[stage.feedback] = stage.feedback.record_outcome(
                            self.decision_id, self.score, tenant=self.tenant, deadline=deadline, cancel=cancel
                        )
                    except UnknownDecision as error:
                        self.asked.unknown.add(stage.feedback)
                        if not final and not stored.stored and self.another_look_fits():
                            self._read_the_later_stores(stored.files[1:], deadline)
                            raise
                        recorded[stage.feedback] = None
                        stored.without_decision.append(stage.feedback)
                        unknown = unknown or error
                        continue
                    stored.stored.append(stage.feedback)
                outcome = recorded[stage.feedback]
                if outcome is None:
                    continue
                model, owner = outcome.entry.model, outcome.entry.tenant
                stored.model, stored.owner = model, owner
                examples += stage.learn(outcome)
        finally:
            self.learning.lock.release()
        if not stored.stored:
            assert unknown is not None
            raise unknown
        if unknown is not None:
            log.info(
                "feedback_stage_without_decision",
                decision_id=self.decision_id,
                stored=[store.path for store in stored.stored],
                without_decision=[store.path for store, outcome in recorded.items() if outcome is None],
            )
        return model, owner, examples


def with_tenant_defaults(request: RoutingRequest, tenant: TenantConfig | None) -> RoutingRequest:
    """``request`` with what its tenant's configuration (``tenant``) gives a request that names
    none: its ``user_tier``. The service routes every request through this (auth off: the named
    tenant's configuration; on: the authenticated one's), and ``simulate`` every prompt, so that
    a simulation routes a tenant's prompts as the live service does."""
    if tenant is None or not tenant.user_tier or request.context.user_tier:
        return request
    return replace(request, context=replace(request.context, user_tier=tenant.user_tier))


def _new_decision_id() -> str:
    return os.urandom(16).hex()


# How long a realtime call's end waits for its settle to reach the shared store at most, and how
# much of the server's end of the call it leaves (past that the settle runs on in the background).
_SETTLE_WAIT_SECONDS = 0.25
# The least time a cascade keeps before the deadline to release an answer in hand (its deltas and
# completion written), whatever ``reliability.min_attempt_seconds`` is (0 included: with none, a
# hung escalation ran to the deadline and the paid answer was never sent).
_RELEASE_SECONDS = 0.05
_SETTLE_WAIT_MARGIN_SECONDS = 0.05
# What a decision still needs once its paid calls (an LLM classifier's) are done, before the server's
# end of the call: a Route's reply written (its rules, costs and message; CPU only), and at least
# a Complete's admission, after which its answer needs ``reliability.min_attempt_seconds`` to start.
_DECIDED_SLACK_SECONDS = 0.02
# ... and at least this share of the call's time: requests cut together on a hung classifier (an
# outage under load) run their fallbacks, decisions and first attempts one after another on the
# one event loop, which a fixed 20 ms did not hold (10 Completes cut at once: half ended
# DEADLINE_EXCEEDED, their answers refused their start).
_DECIDED_SHARE = 1 / 3
# What a comparison of times that should be equal forgives: a monotonic time less a duration, taken
# from the same time again, is off by a few ULPs (about 1e-12 s at a day of uptime).
_TIME_SLACK = 1e-6
# The waits for the tenant's budget that a cascade's check of the time forgives after a judge's cut
# (``_AttemptState.counted_now``), in all (not per round trip): a local budget's, one or two round
# trips to a shared store a few ms away (a cut leaves just the time the escalation needs, so that
# anything counted would refuse its verdict).
_BUDGET_WAIT_FORGIVEN_SECONDS = 0.02
# The most UTF-8 bytes of one delta message a buffered cascade answer is released in: a quarter of
# the 4 MiB a gRPC client receives in one message unless raised.
_RELEASE_DELTA_BYTES = 1 << 20


def _released(deltas: Sequence[TextDelta]) -> list[TextDelta]:
    """A buffered answer's ``deltas`` as the few messages it is released in: its text joined (the
    provider's chunking gains nothing once the answer was held, and each message takes its time to
    write: one per token left a long answer half written when the deadline came), cut every
    ``_RELEASE_DELTA_BYTES`` at most, between characters (a character is at most 4 UTF-8 bytes;
    the adapters have joined surrogate halves already, ``provider_text``)."""
    text = "".join(delta.text for delta in deltas)
    size = _RELEASE_DELTA_BYTES // 4
    return [TextDelta(text[start : start + size]) for start in range(0, len(text), size)]


def _settle_wait(deadline: float | None) -> float:
    """How long a realtime call may wait for its settle: ``_SETTLE_WAIT_SECONDS``, or less when the
    server's end of the call (``deadline``, monotonic) comes sooner, a margin before it."""
    if deadline is None:
        return _SETTLE_WAIT_SECONDS
    return max(0.0, min(_SETTLE_WAIT_SECONDS, deadline - time.monotonic() - _SETTLE_WAIT_MARGIN_SECONDS))


class RouteCount:
    """A Route call's count against its tenant's ``route_requests_per_minute``, as ``Router.route``
    leaves it with its decision: ``give_back`` returns it when the service refuses the call after
    all (its own end passed as the decision was made and converted: DEADLINE_EXCEEDED, the decision
    unsent), unless something was paid to decide (an LLM classifier's call). Once at most."""

    __slots__ = ("_give_back",)

    def __init__(self) -> None:
        self._give_back: Callable[[], None] | None = None

    def keep(self, give_back: Callable[[], None]) -> None:
        """What gives the count back (the router's, for a call that paid nothing to decide)."""
        self._give_back = give_back

    def give_back(self) -> None:
        """Give the count back, if the router left what does (a no-op the second time)."""
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()


class Router:
    """Decides which model serves a request, and serves it.

    ``route`` only decides. ``complete`` decides, calls the chosen model's provider and yields
    the decision, the text deltas and one ``Completion`` with the exact cost.
    """

    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, Provider],
        policy: Policy | None = None,
        *,
        new_decision_id: Callable[[], str] = _new_decision_id,
        ledger: Ledger | None = None,
        admission: Admission | None = None,
        breakers: Breakers | None = None,
        retry_budget: RetryBudget | None = None,
        batches: BatchQueue | None = None,
        learning: _Learning | None = None,
    ) -> None:
        self._settings = settings
        self._catalog = settings.catalog
        self._limits = settings.config.limits
        self._routing = settings.config.routing
        self._known_tasks = frozenset(TASK_LABELS) | frozenset(
            task
            for stage in self._routing.stages
            if isinstance(stage, RulesStageConfig)
            for rule in stage.rules
            for task in rule.when.task_in or ()
        )
        self._providers = dict(providers)
        self._policy = policy or _policy_for(settings, self._providers)
        try:
            self._new_decision_id = new_decision_id
            self._reliability = settings.config.reliability
            self._ledger = ledger or Ledger(self._reliability.ledger_entries)
            self._admission = admission or build_admission(settings)
            self._breakers = breakers or Breakers(self._reliability.breaker)
            self._retry_budget = retry_budget or RetryBudget(
                self._reliability.retry_budget_tokens, self._reliability.retry_budget_ratio
            )
            self._providers_by_model = {m.id for m in self._catalog if m.provider in self._providers}
            self._escalation = EscalationPolicy(settings, self._providers)
            self._batches = batches
            self._learning = learning or _Learning(threading.Lock(), self._policy)
            # Feedback recorded before this router's policy read its libraries (``take_over_feedback``).
            self._recorded_before_build = self._learning.recorded
        except BaseException:
            if policy is None:
                # Built here, so closed here: no router will (its feedback stores' threads).
                self._policy.close()
            raise

    @property
    def settings(self) -> Settings:
        """The settings this router was built from."""
        return self._settings

    async def reconfigured(self, settings: Settings, providers: Mapping[str, Provider]) -> Router:
        """A router for new settings (hot reload) that keeps this one's ledger, limits, breakers
        and retry budget, so nothing counted so far is lost. Calls in flight finish on this one.
        The shared admission takes the new tenant limits when the service swaps the router in.

        Its policy is built in a worker thread: that opens the feedback stores (waiting up to the
        busy timeout while another process locks a file) and reads their example libraries, which
        must not hold up the calls the event loop serves meanwhile. Feedback calls go on teaching
        this router's policy until the new one, swapped in, ``take_over_feedback``. Its stores
        keep a file's examples past a lowered ``feedback_max_examples`` until then too: the reload
        may still be rejected, and a rejected version changes nothing."""
        recorded_before = self._learning.recorded
        policy = await _built_in_thread(
            lambda: _policy_for(settings, providers, cap_feedback_at_open=False, previous=self._policy)
        )
        try:
            router = Router(
                settings,
                providers,
                policy,
                new_decision_id=self._new_decision_id,
                ledger=self._ledger,
                admission=self._admission,
                breakers=self._breakers,
                retry_budget=self._retry_budget,
                batches=self._batches,
                learning=self._learning,
            )
        except BaseException:
            await asyncio.to_thread(policy.close)
            raise
        router._recorded_before_build = recorded_before
        return router

    async def take_over_feedback(self) -> None:
        """Make this router's policy the one Feedback calls teach, once it serves (a reload
        swapped it in), first evicting the examples past its stages' ``feedback_max_examples``
        (their stores did not at open, in case the reload was rejected; their libraries read only
        the examples the cap keeps). A library is read again when that evicted any (the file may
        have gained examples since it was read, from another worker; a read past the eviction is
        of what the cap keeps only), or when a Feedback was recorded while it was being built
        (else that example would move no routing until the next reload).

        This runs in a worker thread outside the Feedback lock, the eviction in short
        transactions (``FeedbackStore.apply_cap``) and a library read again swapped in whole, so
        Routes and Feedback calls (teaching the old policy until the end, after writing what this
        router's stores have queued: the decisions it routed) are answered meanwhile. Only when a
        Feedback was recorded during it is it done again under that lock (then evicting just what
        those calls added), so none is missed."""

        def catch_up(missed: bool) -> None:
            for stage in self._policy.learning_stages:
                stale = missed
                try:
                    stale = stage.apply_example_cap() > 0 or stale
                except Exception as exc:  # the file locked or failing: the next open or example evicts
                    log.warning("feedback_cap_not_applied", error_type=type(exc).__name__, detail=str(exc))
                    stale = True  # the transactions before the failure may have evicted some
                if stale:
                    try:
                        stage.rebuild_library()
                    except Exception as exc:  # a file damaged since: it keeps what it read
                        log.warning("feedback_library_reread_failed", error_type=type(exc).__name__)

        def take_over() -> None:
            with self._learning.lock:
                if self._learning.policy is self._policy:
                    return
                recorded = self._learning.recorded
            catch_up(recorded != self._recorded_before_build)
            with self._learning.lock:
                if self._learning.policy is self._policy:
                    return
                if self._learning.recorded != recorded:
                    catch_up(True)
                self._learning.policy = self._policy

        await asyncio.to_thread(take_over)

    @property
    def policy(self) -> Policy:
        """The routing policy's stages, in order."""
        return self._policy

    @property
    def providers(self) -> Mapping[str, Provider]:
        """The provider adapters by provider name."""
        return self._providers

    @property
    def ledger(self) -> Ledger:
        """Every upstream attempt's usage and cost."""
        return self._ledger

    @property
    def admission(self) -> Admission:
        """Per-tenant limits and budgets."""
        return self._admission

    @property
    def breakers(self) -> Breakers:
        """The per-model circuit breakers."""
        return self._breakers

    @property
    def retry_budget(self) -> RetryBudget:
        """The process's retry budget (failed attempts take tokens, successes give some back)."""
        return self._retry_budget

    async def aclose(self) -> None:
        """Close every provider's connections and the feedback stores."""
        for provider in self._providers.values():
            await provider.aclose()
        await self.close_policy()

    async def close_policy(self) -> None:
        """Close what this router's policy holds (the feedback stores), not the providers: for a
        router a reload replaced while keeping its providers for the new one. In a worker thread:
        a store writes what is queued first, which waits while another process locks its file."""
        await asyncio.to_thread(self._policy.close)

    def allow_list(self, tenant: str) -> AllowList:
        """The models ``tenant`` may use (its ``allowed_models``; every model without one)."""
        config = self._settings.config.tenants.get(tenant)
        allowed = None if config is None or config.allowed_models is None else frozenset(config.allowed_models)
        return AllowList(tenant, allowed)

    def _pinned(self, request: RoutingRequest) -> ModelSpec | None:
        """The catalog model ``request`` pins, or None. An unknown id is ``ModelNotFound`` naming
        the models the request's tenant may use (not the catalog: a model its allow-list leaves
        out is none of its business)."""
        model_id = request.context.model
        if not model_id:
            return None
        if model_id in self._catalog:
            return self._catalog.get(model_id)
        allow_list = self.allow_list(request.context.tenant)
        usable = ", ".join(model.id for model in self._catalog if not allow_list.refuses(model.id))
        if allow_list.models is None:
            raise ModelNotFound(f"unknown model {quoted_id(model_id)}; known models: {usable}")
        tenant = quoted_id(request.context.tenant)
        raise ModelNotFound(f"unknown model {quoted_id(model_id)}; tenant {tenant} may use: {usable}")

    def _eligibility(
        self, request: RoutingRequest, text_tokens: int, images: ImageEstimate, output_tokens: int
    ) -> dict[str, str]:
        """Each catalog model's id mapped to "" when it can serve ``request``, else why not; its
        input is ``text_tokens`` (all but the images) and ``images`` by its provider kind's formula."""
        skip_unconfigured = self._routing.on_unconfigured_provider == "fallthrough"
        allow_list = self.allow_list(request.context.tenant)
        # A conversation carrying tool calls or results needs a model that takes them, tools
        # offered again or not.
        uses_tools = request.chat.uses_tools
        uses_images = request.chat.uses_images
        parameters = request.chat.parameters_set
        eligible: dict[str, str] = {}
        for model in self._catalog:
            input_tokens = text_tokens + images.for_kind(model.provider_kind)
            needed = input_tokens + output_tokens
            provider = self._settings.providers[model.provider]
            if model.context_window < needed:
                why = (
                    f"context window {model.context_window} < {needed} tokens "
                    f"(input {input_tokens} + output {output_tokens})"
                )
            elif request.chat.max_output_tokens is not None and model.max_output_tokens < output_tokens:
                why = f"max output tokens {model.max_output_tokens} < {output_tokens} requested"
            elif uses_tools and not model.supports("tools"):
                why = "does not support tools" if request.chat.tools else "does not support the tool turns sent"
            elif uses_images and not model.supports("vision"):
                why = "does not support images (no vision capability)"
            elif request.chat.response_format is not None and not model.supports("json"):
                why = "does not support JSON output"
            elif refused := refusal(provider.kind, request.chat):
                why = refused
            elif unsupported := [name for name in parameters if name in model.unsupported_parameters]:
                why = _REFUSED_PARAMETER.get(unsupported[0], f"refuses the parameter {unsupported[0]}")
                why += " (unsupported_parameters)"
            elif refused := allow_list.refuses(model.id):
                why = refused
            elif skip_unconfigured and not provider.configured:
                why = provider.missing_key_reason
            else:
                why = ""
            eligible[model.id] = why
        if uses_images and not request.context.model:
            # A pinned model is not left out: it is refused REQUEST_TOO_LARGE, whatever the others.
            self._leave_out_over_token_rate(request.context.tenant, eligible, text_tokens, images, output_tokens)
        return eligible

    def _leave_out_over_token_rate(
        self, tenant: str, eligible: dict[str, str], text_tokens: int, images: ImageEstimate, output_tokens: int
    ) -> None:
        """Leave out of ``eligible`` the models on which a request with images would bill more
        than ``tenant``'s tokens per minute (its images at each model's formula and
        ``image_token_scale``, as admission counts them), when another eligible model fits: the
        policy then picks among those it can be admitted on, rather than choosing one that
        admission refuses REQUEST_TOO_LARGE after an LLM classifier was paid. When none fits,
        none is left out, and admission refuses the request as too large."""
        config = self._settings.config.tenants.get(tenant)
        limit = None if config is None else config.tokens_per_minute
        if limit is None:
            return
        billed: dict[str, int] = {}
        for model in self._catalog:
            if not eligible[model.id]:
                image_tokens = images.for_kind(model.provider_kind)
                billed[model.id] = billed_input_tokens(model, text_tokens + image_tokens, image_tokens) + output_tokens
        if all(tokens > limit for tokens in billed.values()):
            return
        for model_id, tokens in billed.items():
            if tokens > limit:
                eligible[model_id] = (
                    f"bills {tokens} tokens (input, images at its image_token_scale, plus output), more than"
                    f" tenant {quoted_id(tenant)}'s {limit} tokens per minute"
                )

    async def route(
        self,
        request: RoutingRequest,
        *,
        for_completion: bool = False,
        count_route: bool = False,
        request_id: str = "",
        timeout: float | None = None,
        counted: RouteCount | None = None,
    ) -> RouteDecision:
        """Decide which model serves ``request``; raises a ``RouteSvcError`` when none can.
        (``_route``, without whether its classifier was cut.)"""
        decision, _ = await self._route(
            request,
            for_completion=for_completion,
            count_route=count_route,
            request_id=request_id,
            timeout=timeout,
            counted=counted,
        )
        return decision

    async def _route(
        self,
        request: RoutingRequest,
        *,
        for_completion: bool = False,
        count_route: bool = False,
        request_id: str = "",
        timeout: float | None = None,
        counted: RouteCount | None = None,
    ) -> tuple[RouteDecision, bool]:
        """The decision for ``request`` and whether an LLM classifier's wait was cut to keep what
        follows within ``timeout`` (``_decide_by``).

        With ``for_completion`` the decision must be callable now: a model whose provider has
        no key fails with ``ProviderNotConfigured`` (policy ``fail``); for ``Route`` alone the
        decision is returned with a reason saying Complete would fail. With ``count_route`` (the
        Route RPC; not ``simulate``) the call counts against the tenant's
        ``route_requests_per_minute``. A provider call made to
        decide (an LLM classifier's) is written to the ledger as it ends, under the decision's
        id and ``request_id``, and comes back in ``routing_attempts`` with its cost. Such a call is
        waited for only while what follows the decision still fits in ``timeout`` (the seconds
        until the server's own end of the call; None: no deadline): ``_decide_by``.

        A Route refused (a ``RouteSvcError``) or cancelled (its deadline's timer at an await, a
        shutdown, the caller gone) gives its count back when nothing was paid to decide; one
        decided leaves the give-back in ``counted``, for the service, which alone says whether its
        own end passed (one look at one clock, after all the work, the decision's conversion too).
        """
        ends_at = None if timeout is None else time.monotonic() + timeout
        decide_by = self._decide_by(ends_at, timeout, for_completion=for_completion)
        telemetry.start_routing(request, self.settings)
        chat = request.chat
        if chat.max_output_tokens is not None and chat.max_output_tokens > self._limits.max_output_tokens:
            raise InvalidRequest("chat.max_output_tokens", f"must be at most {self._limits.max_output_tokens}")
        pinned = self._pinned(request)
        # Before a model is chosen, the images count by the larger of the providers' formulas;
        # each model is weighed (context window, cost) by its own.
        input_tokens = estimate_input_tokens(chat)
        images = estimate_image_tokens(chat) if chat.uses_images else ImageEstimate()
        text_tokens = input_tokens - images.larger
        output_tokens = chat.max_output_tokens or self._limits.default_output_tokens
        eligible = self._eligibility(request, text_tokens, images, output_tokens)
        hint = request.context.task_hint
        # A hint the policy does not know (not a classifier label, in no rule's task_in) would
        # skip the classifier and match nothing: it is set aside, and the decision says so.
        unknown_hint = bool(hint) and hint not in self._known_tasks
        decision_id = self._new_decision_id()
        routing_attempts: list[AttemptSummary] = []
        cut: list[bool] = []  # the classifier's wait was cut (``on_cut``)
        decided: list[bool] = []  # the decision took ``routing_attempts``: a charge after is late

        def charge(call: UpstreamCall) -> None:
            model = self._catalog.get(call.model)
            cost = cost_of_usage(model, call.usage)
            # A call that ends after the decision took its attempts (one this request left when
            # its deadline cut the wait, aborted or answering another request) is not one of
            # them: not in the decision's or the Completion's attempts and cost, nor the RPC's
            # totals (``telemetry.close_routing``); charged all the same, numbered 0 in the ledger.
            late = bool(decided)
            if not late:
                routing_attempts.append(AttemptSummary(model.id, AttemptResult.CLASSIFIER, call.usage, cost))
            # Paid where it was spent, whatever happens to the request next (also a Route alone).
            self._admission.charge(request.context.tenant, cost)
            self._ledger.record(
                request_id=request_id,
                decision_id=decision_id,
                tenant=request.context.tenant,
                model=model.id,
                provider=model.provider,
                attempt=0 if late else len(routing_attempts),
                outcome=_side_call_outcome(call),
                usage=call.usage,
                cost_usd=cost,
                estimated=call.estimated,
            )
            if late:
                # Its rpc_finished line, span and Completion do not count it: say what it was
                # charged (GetStats counts it, as the ledger and the budget do).
                telemetry.record_late_charge(cost)
                log.info(
                    "classifier_charged",
                    request_id=request_id,
                    decision_id=decision_id,
                    tenant=request.context.tenant,
                    model=model.id,
                    cost_usd=format_usd(cost),
                    estimated=call.estimated,
                )

        give_back: Callable[[], None] | None = None
        paying = False  # a classifier call may be under way: cancelled, it is paid all the same
        if count_route:
            # A Route call counts against the tenant's Route calls per minute before it can cost
            # anything (an LLM classifier's call); Complete is admitted by ``complete``.
            give_back = await self._admission.count_route(request.context.tenant)
        try:
            routing_input = RoutingInput(
                request=request,
                estimated_input_tokens=input_tokens,
                estimated_output_tokens=output_tokens,
                estimated_image_tokens=images.larger,
                image_estimate=images,
                models=tuple(self._catalog),
                eligible=MappingProxyType(eligible),
                task="" if unknown_hint else hint,
                task_source="hint" if hint and not unknown_hint else "",
                charge=charge,
                allow_list=self.allow_list(request.context.tenant),
                breakers=self._breakers,
                decide_by=decide_by,
                min_call_seconds=self._reliability.min_attempt_seconds,
                on_cut=lambda: cut.append(True),
            )
            if pinned is not None:
                # First: a model the tenant may not use is refused as that whatever else keeps it
                # from the request, and nothing more about it is told to the tenant.
                if refused := routing_input.allow_list.refuses(pinned.id):
                    raise PermissionDenied(f"model {pinned.id} is {refused}")
                if eligible[pinned.id]:
                    raise pinned_model_refused(routing_input, pinned.id)
                # A pinned model skips the policy, its rules included: the request's own realtime
                # flag sets the mode.
                pinned_reasons = [f"model {pinned.id} pinned by the request"]
                if not request.context.realtime:
                    pinned_reasons.append("realtime=false: mode batch (a pinned model skips the policy's rules)")
                verdict = Verdict(
                    model=pinned.id,
                    strategy="pinned",
                    rule="model",
                    reasons=tuple(pinned_reasons),
                    mode=Mode.REALTIME if request.context.realtime else Mode.BATCH,
                    task=routing_input.task,
                )
            else:
                if self._policy.pays_to_decide:
                    await self._refuse_before_paying(routing_input, for_completion=for_completion)
                    # Deciding is paid only while the tenant can still spend (a request refused after
                    # a classifier's call would still pay for it). Asked after a Complete's precheck,
                    # so that a store not answering refuses it within the store's one second (asked
                    # before, it took that second, said the store failed, and the precheck took
                    # another: DEADLINE_EXCEEDED under a 1.5 s deadline).
                    may_not_pay = await self._admission.exhausted(request.context.tenant)
                    routing_input = replace(routing_input, may_not_pay=may_not_pay)
                    paying = not may_not_pay
                verdict = await self._policy.decide(routing_input)
                paying = False
            model = self._catalog.get(verdict.model)
            reasons = list(verdict.reasons)
            if unknown_hint:
                reasons.insert(0, "context.task_hint is not a task this policy knows; ignored")
            excluded = [f"{model_id} excluded: {why}" for model_id, why in eligible.items() if why]
            reasons.extend(excluded)
            mode = verdict.mode
            if pinned is None and not request.context.realtime and mode is Mode.REALTIME and not verdict.mode_rule:
                # Unpinned, realtime=false batches only through a rule that sets mode batch.
                reasons.append("realtime=false, but no matching rule sets mode batch: served in realtime")
            realtime_instead = self._realtime_instead_of_batch(model.provider) if mode is Mode.BATCH else ""
            if realtime_instead:
                # Served in realtime, so estimated, capped by max_cost_usd and admitted at that price.
                mode = Mode.REALTIME
                reasons.append(f"{realtime_instead}; served in realtime")
            model, cost, mode = self._within_max_cost(
                request,
                routing_input,
                model,
                mode,
                reasons,
                pinned=pinned is not None,
                chosen_by=f"{verdict.strategy} / {verdict.rule}",
            )
            strategy, rule = verdict.strategy, verdict.rule
            if model.id != verdict.model:
                # The request's cap picked the model, not the policy (whose pick the reasons name).
                strategy, rule = MAX_COST_STRATEGY, MAX_COST_DOWNGRADE_RULE
            provider = self._settings.providers[model.provider]
            if not provider.configured:
                if for_completion:
                    raise ProviderNotConfigured(f"model {model.id}: {provider.missing_key_reason}")
                reasons.append(f"{provider.missing_key_reason}; Complete would fail until it is set")
            decided.append(True)  # nothing awaited from here to the snapshot of ``routing_attempts``
            telemetry.close_routing()
            decision = RouteDecision(
                decision_id=decision_id,
                model=model.id,
                provider=model.provider,
                strategy=strategy,
                rule=rule,
                reasons=tuple(reasons),
                estimated_input_tokens=text_tokens + images.for_kind(model.provider_kind),
                estimated_output_tokens=output_tokens,
                estimated_cost_usd=cost,
                mode=mode,
                candidates=tuple(Candidate(model_id, not why, why) for model_id, why in eligible.items()),
                task=verdict.task,
                routing_attempts=tuple(routing_attempts),
                estimated_image_tokens=images.for_kind(model.provider_kind),
                image_estimate=images,
            )
            for stage in self._policy.learning_stages:
                # Only an embedding of the prompt is kept (never its text), for later feedback.
                stage.remember(
                    decision.decision_id, request.chat.last_user_message, decision.model, request.context.tenant
                )
            if counted is not None and give_back is not None and not routing_attempts and not cut:
                counted.keep(give_back)
            return self._escalation.plan(decision, request), bool(cut)
        except RouteSvcError:
            decided.append(True)
            telemetry.close_routing()
            if give_back is not None and not routing_attempts:
                # Refused before it cost anything: it consumes nothing of the tenant's Route limit.
                give_back()
            raise
        except asyncio.CancelledError:
            # Ended at an await (a shared store's budget look-up, a classifier's wait) by its
            # deadline's timer, a shutdown or the caller leaving: nothing sent, its count given
            # back unless a classifier was paid or is under way (charged as it ends).
            if give_back is not None and not routing_attempts and not paying:
                give_back()
            raise

    async def feedback(
        self, decision_id: str, score: float, *, tenant: str | None = None, timeout: float | None = None
    ) -> tuple[str, int]:
        """Record ``score`` in [0, 1] for an earlier decision; each embedding stage's library takes
        the one example (``EmbeddingStage.learn``; SQLite and that in a worker thread). Returns the
        decision's model and the library size.

        ``tenant`` is the authenticated caller's (None with auth off: any decision may be rated).
        Another tenant's decision is ``UnknownDecision``, as one never seen. The score counts in
        the stats of the tenant the decision was routed for, whoever sent it.

        ``timeout`` (seconds; None: none) is the time the call has: a decision not found is
        looked for again only within it (``_UNKNOWN_DECISION_PAUSES`` cut to it), and the wait
        for the feedback thread and the file's lock ends ``_FEEDBACK_ANSWER_MARGIN_SECONDS``
        before its end: ``FeedbackStoreBusy`` (nothing stored, or, with two stages, stored in
        the first file only: counted and logged ``feedback_partly_stored``), or, for a look again
        that stored nothing, the ``UnknownDecision`` of the looks before once they asked every
        store. With two stages, the decision is ``UnknownDecision`` (looked for again) only when
        every stage's store was asked and none knows it: one a store knows is recorded there
        (``_FeedbackCall._recorded_by``); a call whose time runs out before a later store that
        may know it is asked is ``FeedbackStoreBusy`` (``_Asked``; the first look reads the later
        stores without their locks, so an id none knows is answered in one pass)."""
        answer_by = None
        if timeout is not None:
            answer_by = time.monotonic() + timeout - min(_FEEDBACK_ANSWER_MARGIN_SECONDS, timeout / 4)
        if not any(stage.feedback is not None for stage in self._policy.learning_stages):
            raise FeedbackNotEnabled(_FEEDBACK_NOT_ENABLED)
        stores = tuple(stage.feedback for stage in self._policy.learning_stages if stage.feedback is not None)
        call = _FeedbackCall(
            decision_id=decision_id,
            score=score,
            tenant=tenant,
            answer_by=answer_by,
            policy=self._policy,
            learning=self._learning,
            stores=stores,
            busy_timeout=max(store.busy_timeout_seconds for store in stores),
            context=contextvars.copy_context(),
        )
        found_unknown: UnknownDecision | None = None
        for pause in (*_UNKNOWN_DECISION_PAUSES, None):
            # The last look, the pauses done or the call's time too short for another: it asks
            # every stage's store (the earlier ones the first's, the later ones only read:
            # ``_recorded_by``).
            final = pause is None or not call.another_look_fits()
            try:
                model, owner, examples = await call.look(found_unknown, final=final)
                break
            except UnknownDecision as unknown:
                # An answer once every store was asked (one store: each look asks it); till then
                # the looks go on, and a call whose time ends first is FeedbackStoreBusy.
                if call.asked.everywhere:
                    found_unknown = unknown
                if pause is None:
                    raise
                if answer_by is not None:
                    # Within the call's time only: a look that could not end before it would
                    # turn a final NOT_FOUND into DEADLINE_EXCEEDED, which clients retry (and a
                    # look still queued behind other Feedback calls then is not made:
                    # ``_FeedbackCall.look``).
                    pause = min(pause, answer_by - time.monotonic() - _UNKNOWN_DECISION_LOOK_SECONDS)
                    if pause <= 0:
                        if found_unknown is not None:
                            raise
                        # The later stores not yet asked: the final look, at once (FeedbackStoreBusy
                        # if the call's end comes before it asks them: ``_FeedbackCall.look``).
                        pause = 0.0
            # Not in the file (yet): a decision routed by another process sharing it (another
            # worker, a replica) may still wait in that process's write queue, which this one
            # cannot flush. Looked for again after a pause, on the event loop (no thread held).
            await asyncio.sleep(pause)
        # On the event loop, like every other change to the stats window.
        telemetry.record_feedback(model, score, decision_id=decision_id, tenant=owner)
        return model, examples

    def _realtime_instead_of_batch(self, provider: str) -> str:
        """Why a batch-mode decision for ``provider`` is served in realtime here, or "" (also while
        the provider has no key: Complete fails on that, and the decision says so). With a batch
        queue, what the queue was started with decides (batch settings need a restart); without
        one (``simulate``), the configuration."""
        enabled = self._settings.config.batch.enabled if self._batches is None else self._batches.enabled
        if not enabled:
            return "batch mode is disabled (batch.enabled false)"
        settings = self._settings.providers[provider]
        if settings.kind not in BATCH_API_KINDS:
            return f"provider {provider} has no batch API here"
        if self._batches is not None and settings.configured and not self._batches.supports(provider):
            return f"provider {provider} has no batch queue here (it was added after the start)"
        return ""

    def _in_realtime(self, decision: RouteDecision, request: RoutingRequest, why: str) -> RouteDecision:
        """``decision`` served in realtime instead of batch: at the realtime estimate, which must
        fit the request's ``max_cost_usd``."""
        model = self._catalog.get(decision.model)
        cost = estimated_cost(model, decision)
        cap = request.context.max_cost_usd
        if cap is not None and cost > cap:
            raise CostLimitExceeded(
                f"{why}; its realtime estimate on {model.id} ({format_usd(cost)} USD) exceeds max_cost_usd"
                f" {format_usd(cap)}"
            )
        return replace(
            decision,
            mode=Mode.REALTIME,
            estimated_cost_usd=cost,
            reasons=(*decision.reasons, f"{why}; served in realtime"),
        )

    async def _refuse_before_paying(self, routing_input: RoutingInput, *, for_completion: bool) -> None:
        """Raise what the request would meet after the policy decides, whatever model it picks,
        before the policy pays to decide (an LLM classifier's call): no eligible model, a
        ``max_cost_usd`` below every eligible model's estimate, and, for Complete, an admission
        refusal of its tokens (known before deciding) and of the least it can cost (the cheapest
        eligible model in a mode it can be served in: batch only when a rule may set it for the
        request and the model's provider can take it here).
        """
        request = routing_input.request
        modes = (Mode.REALTIME, Mode.BATCH) if self._policy.may_batch(request.context.realtime) else (Mode.REALTIME,)
        costs = [
            estimated_cost(model, routing_input, mode)
            for model in self._catalog
            if routing_input.is_eligible(model.id)
            for mode in modes
            if mode is Mode.REALTIME or not self._realtime_instead_of_batch(model.provider)
        ]
        if not costs:
            raise no_eligible_model(routing_input)
        least = min(costs)
        cap = request.context.max_cost_usd
        if cap is not None and least > cap:
            raise CostLimitExceeded(
                f"estimated cost of the cheapest eligible model ({format_usd(least)} USD) exceeds"
                f" max_cost_usd {format_usd(cap)}"
            )
        if for_completion:
            # The fewest tokens it can take, as the cost is the least it can cost: the images count
            # as each eligible model bills them (its formula and image_token_scale).
            fewest = min(
                billed_input_of_estimate(model, routing_input)
                for model in self._catalog
                if routing_input.is_eligible(model.id)
            )
            tokens = fewest + routing_input.estimated_output_tokens
            await self._admission.precheck(request.context.tenant, tokens=tokens, cost=least)

    def _admitted_tokens(self, decision: RouteDecision) -> int:
        """The tokens a Complete of ``decision`` is admitted for against its tenant's limits: what
        its estimate bills on its model (the input as the model bills it, images at its
        ``image_token_scale``, as ``estimated_cost_usd`` prices it) plus its output estimate."""
        model = self._catalog.get(decision.model)
        return billed_input_of_estimate(model, decision) + decision.estimated_output_tokens

    def _within_max_cost(
        self,
        request: RoutingRequest,
        routing_input: RoutingInput,
        model: ModelSpec,
        mode: Mode,
        reasons: list[str],
        *,
        pinned: bool,
        chosen_by: str,
    ) -> tuple[ModelSpec, Decimal, Mode]:
        """``model`` and its estimate in ``mode``, or the cheapest eligible model within the
        request's ``max_cost_usd`` (the reason names the strategy and rule that had ``chosen_by``
        ``model``); a batch decision moving to a model without a batch API here is served by it in
        realtime, at that price. A ``pinned`` model is never replaced: over the cap, the request
        is refused."""
        cost = estimated_cost(model, routing_input, mode)
        cap = request.context.max_cost_usd
        if cap is None or cost <= cap:
            return model, cost, mode
        if pinned:
            raise CostLimitExceeded(
                f"estimated cost of the pinned model {model.id} ({format_usd(cost)} USD) exceeds"
                f" max_cost_usd {format_usd(cap)}"
            )
        options = []
        for index, other in enumerate(self._catalog):
            if not routing_input.is_eligible(other.id):
                continue
            realtime_instead = self._realtime_instead_of_batch(other.provider) if mode is Mode.BATCH else ""
            other_mode = Mode.REALTIME if realtime_instead else mode
            other_cost = estimated_cost(other, routing_input, other_mode)
            options.append((other_cost, index, other, realtime_instead))
        options.sort(key=lambda option: (option[0], option[1]))
        for other_cost, _, other, realtime_instead in options:
            if other_cost <= cap:
                reasons.append(
                    f"estimated cost {format_usd(cost)} USD on {model.id} (chosen by {chosen_by}) exceeds"
                    f" max_cost_usd {format_usd(cap)}; downgraded to {other.id} at {format_usd(other_cost)} USD"
                )
                if realtime_instead:
                    reasons.append(f"{realtime_instead}; served in realtime")
                return other, other_cost, Mode.REALTIME if realtime_instead else mode
        cheapest = format_usd(options[0][0]) if options else format_usd(cost)
        raise CostLimitExceeded(
            f"estimated cost of the cheapest eligible model ({cheapest} USD) exceeds max_cost_usd {format_usd(cap)}"
        )

    def _attempt_chain(self, decision: RouteDecision) -> list[str]:
        """The decided model, then its configured fallbacks that can serve the request (``_serve``
        leaves out those over the cost cap).

        In a cascade step, the chain's other models are left out: reaching a later one is an
        escalation, announced and scored, not a silent fallback, and an earlier one's answer was
        already rejected.
        """
        eligible = {c.model for c in decision.candidates if c.eligible}
        steps = decision.cascade_models
        other_steps = set(steps) - {decision.model}
        chain = [decision.model]
        for name in self._routing.fallbacks.get(decision.model, ()):
            spec = self._catalog.get(name)
            provider = self._settings.providers[spec.provider]
            if name in other_steps or name in chain or name not in eligible:
                continue
            if not provider.configured or name not in self._providers_by_model:
                continue
            chain.append(name)
        return chain

    async def complete(
        self,
        request: RoutingRequest,
        *,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> AsyncGenerator[CompleteEvent, None]:
        """Decide, call the chosen model, and yield the decision, deltas and the ``Completion``.

        One retry loop: before the first delta, a retryable failure (5xx, 408, 429, connection,
        timeout, open breaker) is retried on the same model, then on its fallbacks, within
        ``max_attempts``, the retry budget and the caller's deadline. Once a delta has been
        yielded a failure becomes ``StreamInterrupted`` (the commit rule): nothing is retried or
        appended. Every attempt is written to the ledger exactly once.

        A cascade (``decision.cascade_models``) runs each step but the last buffered: its answer
        is scored and released, or an ``Escalation`` is yielded and the next step runs. In batch
        mode the request is queued for the provider's batch API and one ``BatchJob`` is yielded.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        decision, cut = await self._route(request, for_completion=True, request_id=request_id, timeout=timeout)
        if decision.mode is Mode.BATCH and (self._batches is None or not self._batches.supports(decision.provider)):
            # ``route`` decides batch only where the queue can take it; a router built without a
            # queue (as ``simulate`` builds one) judges by the configuration and serves it here.
            decision = self._in_realtime(decision, request, f"provider {decision.provider} has no batch queue here")
        if decision.mode is Mode.BATCH and self._batches is not None:
            tokens = self._admitted_tokens(decision)
            reservation = await self._admission.admit(
                request.context.tenant, tokens=tokens, cost=decision.estimated_cost_usd
            )
            try:
                job = await self._batches.submit(request, decision)
            except BaseException:
                await reservation.settle(0, Decimal(0))
                raise
            try:
                yield decision
            except BaseException:
                # The call ended before the job's id could be sent (the caller left, its deadline):
                # a job nobody knows of would run, be billed, and be queued again by a retry.
                await self._batches.withdraw(job.batch_id, then=lambda: reservation.settle(0, Decimal(0)))
                raise

            async def count() -> Decimal | None:
                # The job's budget counts its estimate from now; the queue corrects it to the real
                # cost when the job ends (all of it back if unanswered); the ledger has that cost.
                await reservation.settle(tokens, decision.estimated_cost_usd)
                return decision.estimated_cost_usd if reservation.counted else None

            try:
                yield job
            finally:
                # The job's id is on its way: the job stands however the call ends (a client may
                # stop reading once it has the id), and may now be sent.
                await self._batches.commit(job.batch_id, count)
            return
        tenant = request.context.tenant
        reservation = await self._admission.admit(
            tenant,
            tokens=self._admitted_tokens(decision),
            cost=decision.estimated_cost_usd,
        )
        attempt = _AttemptState(request_id, decision, tenant, reservation, decision.estimated_cost_usd)
        attempt.start_unchecked = cut
        # Deciding's calls are the request's first attempts, in its cost, summary and tokens (the
        # budget has their cost already: ``route`` charged it as they ended, so the settle below
        # leaves it out).
        for summary in decision.routing_attempts:
            attempt.number += 1
            attempt.tokens += summary.usage.input_tokens + summary.usage.output_tokens
            attempt.cost += summary.cost_usd
            attempt.summaries.append(summary)
        try:
            yield decision
            steps = decision.cascade_models or (decision.model,)
            index = 0
            # The last answer the cascade rejected, kept (with its attempt's index in the
            # summaries) to be released if the models it escalated to fail before any text.
            held: tuple[_StepOutcome, int] | None = None
            while index < len(steps) - 1:
                step = steps[index]
                threshold = decision.cascade_thresholds[index]
                step_deadline = self._escalated_deadline(deadline, keeping=held is not None)
                try:
                    outcome = await self._buffered_step(
                        attempt, index, request, step_deadline, headers, in_hand=held is not None
                    )
                except (ProviderError, DeadlineExceeded, TimeoutError) as error:
                    # An error the next model would meet too (a 400, a revoked key), or the time
                    # kept for the answer in hand come: nothing of this step was sent, so the
                    # answer is released, as when the last step fails so.
                    if held is None or (not isinstance(error, ProviderError) and step_deadline == deadline):
                        raise
                    for event in self._release_held(attempt, *held, step, _failed(error)):
                        yield event
                    return
                next_model = steps[outcome.next_step]
                quality = outcome.quality
                released = outcome.completion is not None and quality.score >= threshold
                stop = outcome.stop
                if stop is not None:
                    # A step that failed has no answer of its own to release: it ends with its
                    # failure, as a fallback the cost cap, the deadline, a spent quota or the
                    # budget stops is skipped, unless an earlier step's answer is in hand. An
                    # answer is released, the reason saying why it was not escalated.
                    if outcome.error is not None:
                        if held is None:
                            raise outcome.error from stop.cause
                        for event in self._release_held(attempt, *held, step, _failed(outcome.error)):
                            yield event
                        return
                    if held is not None and _no_answer(outcome.completion, outcome.deltas):
                        # An empty answer is none to give either: the answer in hand, paid for, is
                        # released instead (a filtered one stands: releasing the answer in hand
                        # would step around the provider's filter).
                        for event in self._release_unanswered(attempt, *held, step, f" ({stop.why})"):
                            yield event
                        return
                    released = True
                    quality = replace(quality, reason=f"{quality.reason}; {stop.why}")
                if released and held is not None and _no_answer(outcome.completion, outcome.deltas):
                    # Released by its score (a judge that failed with `on_failure: release`, or
                    # that liked it), an empty answer is still none to give: the answer in hand is.
                    for event in self._release_unanswered(attempt, *held, step):
                        yield event
                    return
                telemetry.record_cascade(released, outcome.quality.score if outcome.scored else None)
                if released and outcome.completion is not None:
                    # Its text reaches the caller from now on, however the call ends.
                    self._answered_by(attempt, outcome.completion.model)
                    for delta in _released(outcome.deltas):
                        yield delta
                    yield self._final(attempt, outcome.completion, quality)
                    return
                if outcome.completion is not None:
                    rejected = attempt.mark_escalated()
                    if _releasable(outcome):
                        held = (outcome, rejected)
                telemetry.record_escalation(
                    step, next_model, f"{quality.scorer}: {quality.reason}", quality.score if outcome.scored else None
                )
                yield Escalation(
                    from_model=step,
                    to_model=next_model,
                    quality=quality,
                    threshold=threshold,
                    cost_usd=attempt.cost - outcome.cost_before,
                    usage=outcome.usage,
                )
                index = outcome.next_step
            # aclosing: when the caller goes away mid-stream, the attempt is closed (and its cost
            # recorded) here, before the reservation below settles with ``attempt.cost``. With an
            # answer in hand, only the escalated model's first text must come by the earlier end:
            # once it is sent the answer can no longer be released, so the stream runs to the end.
            step_deadline = self._escalated_deadline(deadline, keeping=held is not None)
            if step_deadline != deadline:
                attempt.first_text_by = step_deadline
            last = replace(decision, model=steps[-1])
            serving = self._serve(attempt, last, request, deadline, headers, escalated=len(steps) > 1)
            try:
                async with contextlib.aclosing(serving):
                    async for event in serving:
                        if not isinstance(event, Completion):
                            yield event
                        elif held is not None and not attempt.chunks and _no_answer(event, ()):
                            # It answered nothing (reasoned to the output limit, or sent no text):
                            # nothing was sent, so the answer in hand is released, as on a failure.
                            for release in self._release_unanswered(attempt, *held, steps[-1]):
                                yield release
                        else:
                            yield self._final(attempt, event)
            except (ProviderError, DeadlineExceeded, TimeoutError) as error:
                # Nothing of the escalation reached the caller: the answer in hand, paid for, is
                # released rather than thrown away with the call (the commit rule holds: it is the
                # first text sent), also when the escalated model ran into the time kept for it.
                # After text, the stream is committed and the error stands.
                if held is None or attempt.chunks:
                    raise
                if not isinstance(error, ProviderError) and step_deadline == deadline:
                    raise
                for event in self._release_held(attempt, *held, steps[-1], _failed(error)):
                    yield event
        finally:
            # Waited for briefly, so that the client's next call (on another replica too) finds
            # this one settled, never long: the call's status must not wait for a slow shared
            # store (that would turn an answer delivered and billed into DEADLINE_EXCEEDED).
            cost = attempt.cost - decision.routing_cost_usd
            await reservation.settle(attempt.tokens, cost, wait_at_most=_settle_wait(deadline))

    def _decide_by(self, ends_at: float | None, timeout: float | None, *, for_completion: bool) -> float | None:
        """When (``time.monotonic()``) a paid call made to decide (an LLM classifier's) must have
        answered: before the server's own end of the call (``ends_at``, ``timeout`` seconds from now) by what
        follows the decision, so that it still fits. A Complete's answer needs ``min_attempt_seconds`` to
        start (a classifier held only to its own ``timeout_s`` ran the request past a shorter
        deadline, DEADLINE_EXCEEDED and charged, where the local fallback answered in
        milliseconds); a Route only writes its reply. What follows is kept at least a third of
        ``timeout`` (``_DECIDED_SHARE``): many requests cut at once share the loop for it. None
        without a deadline."""
        if ends_at is None or timeout is None:
            return None
        needs = _DECIDED_SLACK_SECONDS
        if for_completion:
            # The slack too: the answer's first attempt starts after the decision is admitted.
            needs += self._reliability.min_attempt_seconds
        return ends_at - max(needs, _DECIDED_SHARE * timeout)

    def _escalated_deadline(self, deadline: float | None, *, keeping: bool) -> float | None:
        """The deadline a cascade step escalated to runs to (a buffered step whole, the last step
        until its first text): ``keeping`` an answer in hand, ``_release_seconds`` before the
        caller's, so that the answer can still be sent if the step runs into it before any text
        (as a judge's call ends); else the caller's."""
        if deadline is None or not keeping:
            return deadline
        return deadline - self._release_seconds

    @property
    def _release_seconds(self) -> float:
        """The time a cascade keeps before the deadline to release an answer in hand:
        ``reliability.min_attempt_seconds``, at least ``_RELEASE_SECONDS``."""
        return max(self._reliability.min_attempt_seconds, _RELEASE_SECONDS)

    @property
    def _lag_forgiven(self) -> float:
        """The most of the time since a judge's cut that a cascade's check of the time forgives
        (``_AttemptState.counted_now``): half the time an escalated step needs to start
        (``_release_seconds``), so that an escalation announced starts with at least the other
        half of it, however late the event loop got back to the verdict."""
        return self._release_seconds / 2

    def _release_held(
        self,
        state: _AttemptState,
        held: _StepOutcome,
        rejected: int,
        failed_model: str,
        how: str,
    ) -> list[TextDelta | Completion]:
        """The events that release ``held``, an answer the cascade rejected (its attempt at
        ``rejected`` in the summaries), after the escalation to ``failed_model`` gave the caller
        nothing, ``how`` (``_failed``: it failed before any text, or ran out of the time kept for
        the answer; or it gave no answer): its deltas, then the completion, its quality reason
        saying so. Its attempt answered the caller: COMPLETED again. Its text goes in a few large
        deltas (``_released``), so that it is written within the time kept for it."""
        assert held.completion is not None
        if rejected >= 0:
            state.summaries[rejected] = replace(state.summaries[rejected], result=AttemptResult.COMPLETED)
        reason = f"{held.quality.reason}; escalation to {failed_model} {how}, released"
        telemetry.record_cascade(True, held.quality.score if held.scored else None)
        completion = self._final(state, held.completion, replace(held.quality, reason=reason))
        return [*_released(held.deltas), completion]

    def _release_unanswered(
        self,
        state: _AttemptState,
        held: _StepOutcome,
        rejected: int,
        empty_model: str,
        why: str = "",
    ) -> list[TextDelta | Completion]:
        """``_release_held`` after the escalation to ``empty_model`` answered nothing (no text:
        it reasoned to its output limit or sent none; ``why`` says more): its attempt is rejected
        too (ESCALATED), then ``held`` is released."""
        state.mark_escalated()
        return self._release_held(state, held, rejected, empty_model, f"gave no answer{why}")

    def _final(self, state: _AttemptState, completion: Completion, quality: QualityScore | None = None) -> Completion:
        """The last message: every attempt, their summed usage and cost, and the released score."""
        total = _usage_of(state.summaries)
        self._answered_by(state, completion.model)
        telemetry.record_answer(completion.model, completion.usage)
        return replace(
            completion, cost_usd=state.cost, attempts=tuple(state.summaries), total_usage=total, quality=quality
        )

    def _answered_by(self, state: _AttemptState, model_id: str) -> None:
        """``model_id`` gave the answer the caller gets: when it is not the model the decision is
        filed under (the decided one, until a cascade escalated or a fallback served), feedback on
        that answer is filed under it, once (its first text, then its completion, both say so)."""
        if model_id == (state.answered_by or state.decision.model):
            return
        state.answered_by = model_id
        for stage in self._policy.learning_stages:
            stage.answered(state.decision.decision_id, model_id)

    async def _buffered_step(
        self,
        state: _AttemptState,
        index: int,
        request: RoutingRequest,
        deadline: float | None,
        headers: Mapping[str, str] | None,
        *,
        in_hand: bool,
    ) -> _StepOutcome:
        """Run the cascade's step ``index`` with its retries, keep its answer, and score it; the
        outcome says which step it escalates to, and why it cannot, when it cannot (``stop``).
        ``in_hand``: an earlier step's answer is held (``deadline`` is already the one an
        escalated step runs to).

        Nothing is sent, so nothing commits: a failure, also mid-answer, is retried and falls
        back as one before the first chunk does (the text of a failed attempt is dropped), and a
        step that still fails lets the cascade escalate; errors that the next model would meet
        too (4xx before any text) are raised.
        """
        decision = state.decision
        model_id = decision.cascade_models[index]
        cost_before = state.cost
        attempts_before = len(state.summaries)
        deltas: list[TextDelta] = []
        answering = 0  # the attempt whose text ``deltas`` holds
        completion: Completion | None = None
        state.buffering = True
        try:
            step = replace(decision, model=model_id)
            async for event in self._serve(state, step, request, deadline, headers, escalated=index > 0):
                if state.number != answering:
                    # A retry or fallback answers after a failed attempt's partial text, which is
                    # dropped also when the answer has no text (an empty or filtered one).
                    deltas.clear()
                    answering = state.number
                if isinstance(event, TextDelta):
                    deltas.append(event)
                else:
                    completion = event
        except ProviderError as error:
            cut = bool(deltas) and answering == state.number  # the last attempt failed mid-answer
            if not (is_retryable(error) or skips_provider(error) or cut):
                raise
            failed = QualityScore(0.0, "none", f"{model_id} failed ({error.reason})")
            used = _usage_of(state.summaries[attempts_before:])
            if cut:
                # If this failure ends the request, it says where it came, and that nothing was
                # sent (so the call is not committed, and safe to retry).
                error = ProviderUnavailable(
                    f"{error.message} mid-answer (nothing was sent)", provider=error.provider, model=error.model
                )
            next_step, stop = await self._escalation_stop(state, request, index, deadline, hold=True)
            # No answer, so no score: its 0.0 is the Escalation message's, not a quality to record.
            return _StepOutcome((), None, failed, cost_before, used, next_step, error, stop, scored=False)
        finally:
            state.buffering = False
        assert completion is not None  # _serve ends with a completion or raises
        used = _usage_of(state.summaries[attempts_before:])
        threshold = decision.cascade_thresholds[index]
        answer = "".join(delta.text for delta in deltas)
        # Whether the next model could be called is known before the answer is scored (checked,
        # nothing held: the answer may well be released): when it could not, the answer is
        # released whatever its score, and a judge's paid verdict would change nothing, so only the
        # scorers that make no call score it. An escalation from an answer that would be kept runs
        # to the time kept for its release (``_escalated_deadline``): it must start by then.
        keeps = not in_hand and completion.finish_reason is not FinishReason.CONTENT_FILTER and bool(answer.strip())
        next_step, stop = await self._escalation_stop(state, request, index, deadline, hold=False, keeping=keeps)
        reasoned = state.reasoned == state.number  # the answering attempt's model reasoned
        if stop is None and completion.finish_reason is FinishReason.LENGTH and answer.strip() and not reasoned:
            # Cut at the request's output limit, which every step is called with: the next model
            # would be cut there too, so paying it cannot give the caller a whole answer. (An
            # answer whose model reasoned spent part of the limit on that, and one with no text
            # all of it: the next model may answer whole within it, so they still escalate.)
            next_model = decision.cascade_models[next_step]
            stop = _EscalationStop(
                f"not escalated to {next_model}: the answer reached the request's output limit"
                f" ({decision.estimated_output_tokens} tokens), which {next_model} is held to as well"
            )
        scorer: Scorer | None = self._escalation.scorer
        if stop is not None and self._escalation.judged:
            scorer = self._escalation.unpaid_scorer
            stop = replace(stop, why=f"{stop.why} (so the judge was not asked)")
        if scorer is None:
            quality, scored = QualityScore(1.0, "none", "not scored"), False
        else:
            result = await self._score(
                scorer, state, model_id, request, answer, completion, threshold, deadline, next_step, keeping=keeps
            )
            quality, scored = result.quality, result.scored
        if stop is None and quality.score < threshold:
            # It escalates: the reservation now holds the next model (the judge's call is in the
            # cost so far, and may have found the next model's provider spent). The time left is
            # counted from the judge's end at the latest: a judge cut there left just the time
            # the escalation needs, and the moments since its cut must not refuse its verdict.
            judged_by = self._scoring_end(deadline, keeping=keeps)
            next_step, stop = await self._escalation_stop(
                state, request, index, deadline, hold=True, keeping=keeps, as_of=judged_by
            )
        return _StepOutcome(tuple(deltas), completion, quality, cost_before, used, next_step, stop=stop, scored=scored)

    async def _score(
        self,
        scorer: Scorer,
        state: _AttemptState,
        model_id: str,
        request: RoutingRequest,
        answer: str,
        completion: Completion,
        threshold: float,
        deadline: float | None,
        next_step: int,
        *,
        keeping: bool,
    ) -> ScoreResult:
        """``scorer``'s score of a cascade step's ``answer``, which escalates to step ``next_step``
        when too low. Its calls end when ``_scoring_end`` says, so that the answer can still be
        released if they fail and, ``keeping`` it for a release, a verdict to escalate can still
        be acted on (a call that could not have ``min_attempt_seconds`` is not made)."""
        min_attempt = self._reliability.min_attempt_seconds
        end = self._scoring_end(deadline, keeping=keeping)
        timeout = None if end is None else end - time.monotonic()
        if timeout is not None and timeout < min_attempt:
            timeout = 0.0
        return await scorer.score(
            ScoringInput(
                request=request,
                model=model_id,
                answer=answer,
                finish_reason=completion.finish_reason,
                threshold=threshold,
                timeout=timeout,
                min_timeout=min_attempt,
                # Charged as each judge call ends, so a cancelled request still pays for it once;
                # reserved before it starts, as every model a request calls is.
                charge=lambda call: self._record_scoring(state, call),
                reserve=lambda cost: self._hold_judge(state, request, next_step, cost),
                spent_providers=state.exhausted,
                allow_list=self.allow_list(request.context.tenant),
                breakers=self._breakers,
            )
        )

    def _scoring_end(self, deadline: float | None, *, keeping: bool) -> float | None:
        """When a cascade step's scorers' calls end (``_score``): before ``deadline`` by the time
        an escalation from the answer needs (``_escalation_needs``), so that a verdict to escalate
        can still be acted on, and, with no escalation, the answer still released."""
        if deadline is None:
            return None
        return deadline - self._escalation_needs(keeping=keeping)

    def _escalation_needs(self, *, keeping: bool) -> float:
        """The time an escalation needs left before its deadline: ``min_attempt_seconds`` to
        start, at least the time kept to release an answer (``_release_seconds``: a judge's call
        ends so long before a deadline); ``keeping`` the answer for a release, that time too,
        before which the step escalated to runs (``_escalated_deadline``)."""
        start = self._release_seconds
        return start + self._release_seconds if keeping else start

    async def _escalation_stop(
        self,
        state: _AttemptState,
        request: RoutingRequest,
        index: int,
        deadline: float | None,
        *,
        hold: bool,
        keeping: bool = False,
        as_of: float | None = None,
    ) -> tuple[int, _EscalationStop | None]:
        """The step the cascade escalates to from step ``index``: the next one that the request
        has not found its provider's quota spent for (nor its fallbacks' within the cap), else the
        last; and why it cannot escalate now, or None when it can: the cost so far plus that step's
        estimate would pass the cost cap, too little of the deadline is left to start it, its
        provider's quota was found spent, or the tenant's budget cannot take it. With ``hold``
        (it escalates now) the reservation then holds that step; without, the budget is only
        checked, nothing held (the request's other calls, and the tenant's other requests, are not
        refused for an escalation that may never be made). ``keeping`` the answer for a release,
        the step runs to ``reliability.min_attempt_seconds`` before ``deadline`` and must be able to
        start by then (``_escalated_deadline``). The time left is counted from ``as_of`` when that
        is earlier than now (the moment a judge's call was cut, whose verdict this acts on), plus
        the round trips to the tenant's budget since, and at most ``_lag_forgiven`` before now
        (``_AttemptState.counted_now``); the hold, or the check without it, is given only the time
        until that check would refuse (a slow shared store's round trips cannot run past the time
        kept to release the answer in hand), and the time checked again after a hold, its round
        trips counted."""
        decision = state.decision
        steps = decision.cascade_models
        cap = self._escalation.max_cost(request)
        target = index + 1
        while target < len(steps) - 1 and not self._servable(state, steps[target], cap):
            target += 1  # its call would fail at once: the cascade goes past it, as past a failure
        next_model = steps[target]
        next_cost = estimated_cost(self._catalog.get(next_model), decision)
        would_cost = state.cost + next_cost
        if cap is not None and would_cost > cap:
            return target, _EscalationStop(max_cost_reason(next_model, would_cost, cap))
        if stop := self._too_late(deadline, state.counted_now(as_of, self._lag_forgiven), next_model, keeping=keeping):
            return target, stop
        if why := self._unservable(state, next_model, cap):
            return target, _EscalationStop(f"not escalated to {next_model}: {why}")
        # The check (without ``hold``) or the hold waits at most until the check after it would
        # refuse (the real time left to the deadline down to what an escalation needs, less the
        # lag forgiven): a slow shared store must not keep the answer in hand past the time kept
        # to release it.
        hold_for = None
        if deadline is not None:
            hold_for = deadline - time.monotonic() - (self._escalation_needs(keeping=keeping) - self._lag_forgiven)
            if hold_for <= 0:
                return target, _EscalationStop(
                    f"not escalated to {next_model}: {max(deadline - time.monotonic(), 0.0):.3f} s of the deadline left"
                )
        timer = asyncio.timeout(hold_for)
        try:
            async with timer:
                if not hold:
                    if why := await self._budget_refuses(state, next_cost):
                        return target, _EscalationStop(f"not escalated to {next_model}: {why}")
                    return target, None
                # The next model is another call to pay for: the tenant's budget must take it
                # before the cheaper answer is given up.
                await self._cover_cost(state, next_cost)
        except (LimitExceeded, SharedStateUnavailable) as refused:
            return target, _EscalationStop(f"not escalated to {next_model}: {refused.message}", refused)
        except TimeoutError:
            if not timer.expired():
                raise
            # Cut mid-check or mid-hold: whatever the store held by then is released with the
            # reservation.
            why = f"the tenant's budget store did not answer within the {hold_for:.3f} s left for it"
            return target, _EscalationStop(f"not escalated to {next_model}: {why}")
        # Checked again after the hold, its round trips to the shared store counted: the last check
        # before the Escalation is yielded (nothing is awaited between), so that an escalation
        # announced is made (``_serve`` starts its first attempt on this check).
        if stop := self._too_late(deadline, state.counted_now(as_of, self._lag_forgiven), next_model, keeping=keeping):
            return target, stop
        return target, None

    def _too_late(
        self, deadline: float | None, now: float, next_model: str, *, keeping: bool
    ) -> _EscalationStop | None:
        """Why an escalation to ``next_model`` cannot start at ``now``: too little of ``deadline``
        is left for it (``_escalation_needs``); None when it can. A judge cut at its end left just
        the time needed, which ``deadline - (deadline - needs)`` gives back a hair short at
        time.monotonic()'s scale (0.4 s as 0.39999999999...): compared with ``_TIME_SLACK`` to
        spare."""
        left = None if deadline is None else deadline - now
        if left is None or left >= self._escalation_needs(keeping=keeping) - _TIME_SLACK:
            return None
        # No attempt starts that cannot finish.
        return _EscalationStop(f"not escalated to {next_model}: {max(left, 0.0):.3f} s of the deadline left")

    async def _budget_refuses(self, state: _AttemptState, estimate: Decimal) -> str:
        """Why the tenant's budget could not take calls estimated at ``estimate`` more than the
        request has spent, beyond what its reservation holds ("" when it could): checked, nothing
        held (a tenant without budgets costs no look-up, nor a reservation that holds enough)."""
        needed = state.cost - state.decision.routing_cost_usd + estimate
        if needed <= state.reserved:
            return ""
        started = time.monotonic()
        try:
            return await self._admission.exhausted(state.tenant, needed - state.reserved)
        finally:
            state.budget_trips.append((started, time.monotonic()))

    async def _hold_judge(self, state: _AttemptState, request: RoutingRequest, target: int, estimate: Decimal) -> str:
        """Hold a judge's call estimated at ``estimate`` in the request's reservation, or say why it
        is not to be made: the tenant's budget cannot take it, or, with it, the escalation to step
        ``target`` that its verdict may lead to would pass the cascade's cost cap or the budget
        (a verdict that could change nothing is not paid for)."""
        decision = state.decision
        next_model = decision.cascade_models[target]
        next_cost = estimated_cost(self._catalog.get(next_model), decision)
        cap = self._escalation.max_cost(request)
        would_cost = state.cost + estimate + next_cost
        if cap is not None and would_cost > cap:
            return f"with its call, {max_cost_reason(next_model, would_cost, cap)}"
        # Checked before the judge's call is held: a judge not asked holds nothing.
        if why := await self._budget_refuses(state, estimate + next_cost):
            if alone := await self._budget_refuses(state, estimate):
                return alone  # the budget cannot take the judge's call itself
            return f"with its call, no escalation to {next_model}: {why}"
        try:
            await self._cover_cost(state, estimate)
        except (LimitExceeded, SharedStateUnavailable) as refused:
            return refused.message
        return ""

    def _servable(self, state: _AttemptState, model_id: str, cap: Decimal | None) -> bool:
        """Whether a cascade step on ``model_id`` could call a model (``_unservable``)."""
        return not self._unservable(state, model_id, cap)

    def _unservable(self, state: _AttemptState, model_id: str, cap: Decimal | None) -> str:
        """Why a cascade step on ``model_id`` could call no model, or "" when it could: it, or one
        of its fallbacks within the cascade's cost ``cap``, on a provider whose quota the request
        has not found spent and with a circuit breaker that lets a call through (asked, not
        claimed: its call would be refused at once, as by a spent quota)."""
        spent = breakers_open = False
        for name in self._attempt_chain(replace(state.decision, model=model_id)):
            model = self._catalog.get(name)
            if name != model_id and not self._within_cascade_cap(state, model, cap):
                continue
            if model.provider in state.exhausted:
                spent = spent or name == model_id
            elif self._breakers.refuses(name):
                breakers_open = breakers_open or name == model_id
            else:
                return ""
        if spent:
            provider = self._catalog.get(model_id).provider
            return f"provider {provider}'s quota was found spent earlier in this request"
        assert breakers_open  # the step's own model is either spent or refused
        return f"circuit breaker open for model {model_id}"

    def _within_cascade_cap(self, state: _AttemptState, model: ModelSpec, cap: Decimal | None) -> bool:
        """Whether the cost so far plus ``model``'s estimate is within a cascade's cost ``cap``."""
        return cap is None or state.cost + estimated_cost(model, state.decision, state.decision.mode) <= cap

    def _record_scoring(self, state: _AttemptState, call: UpstreamCall) -> None:
        """A judge's call is charged to the request like any attempt."""
        model = self._catalog.get(call.model)
        state.number += 1
        cost = cost_of_usage(model, call.usage, state.decision.mode)
        outcome = _side_call_outcome(call)
        self._record(state, model, state.number, outcome, call.usage, cost, estimated=call.estimated)
        state.summaries[-1] = replace(state.summaries[-1], result=AttemptResult.JUDGE)

    async def _serve(
        self,
        attempt: _AttemptState,
        decision: RouteDecision,
        request: RoutingRequest,
        deadline: float | None,
        headers: Mapping[str, str] | None,
        *,
        escalated: bool = False,
    ) -> AsyncGenerator[TextDelta | Completion, None]:
        """The retry loop for ``decision.model`` and its fallbacks (see ``complete``); ``max_attempts``
        counts this loop's attempts (a cascade step's), not earlier steps' or judge calls.
        ``escalated``: a cascade step escalated to, whose first attempt ``_escalation_stop`` let
        through already (its last check of the time, right before the Escalation was yielded):
        that one starts with whatever time the moments since (the Escalation written, the event
        loop's lag) left it, if any, so that an escalation announced is made.

        A fallback estimated over the request's ``max_cost_usd`` is skipped; in a cascade step, one
        whose estimate plus the cost so far would pass the cascade's cap (the lower of the
        request's and ``cascade.max_cost_usd``), as an escalation over it is not made."""
        reliability = self._reliability
        first = attempt.number
        # Every attempt here starts before any text is sent: by the time the first text is due.
        start_by = deadline if attempt.first_text_by is None else attempt.first_text_by
        # The next attempt to start was let through by the escalation's check, or is the first
        # after a decision whose classifier was cut to keep its time (``_AttemptState``).
        checked = escalated or attempt.start_unchecked
        attempt.start_unchecked = False
        last_error: ProviderError | None = None
        retryable_error: ProviderError | None = None  # the last failure a later retry may get past
        refused: list[tuple[ModelSpec, float | None]] = []  # models open breakers refused, with their waits
        open_breaker: ProviderUnavailable | None = None  # the refusal that speaks for them
        # The failure of the model tried last, its own (an open breaker's refusal of it alone, not
        # the one that speaks for all): a fallback is from it, in chain order.
        previous_failure: ProviderError | None = None
        cascade_cap = self._escalation.max_cost(request) if decision.cascade_models else None
        for model_id in self._attempt_chain(decision):
            model = self._catalog.get(model_id)
            if model_id != decision.model:
                cap = request.context.max_cost_usd
                if cap is not None and estimated_cost(model, decision, decision.mode) > cap:
                    continue
                if not self._within_cascade_cap(attempt, model, cascade_cap):
                    continue
            if model.provider in attempt.exhausted:
                spent = ProviderQuotaExhausted(
                    f"provider {model.provider} model {model_id}: quota spent (found earlier in this request)",
                    provider=model.provider,
                    model=model_id,
                )
                last_error = last_error or spent
                previous_failure = previous_failure or spent
                continue
            try:
                # Bounded by the time its attempt must start by (``start_by``: an escalated step's
                # first text, with an answer in hand to release), less the least it starts with:
                # a slow shared store must not keep the answer in hand past its release.
                needed = 0.0 if checked else reliability.min_attempt_seconds
                covered = await self._cover(attempt, model, within=None if start_by is None else start_by - needed)
            except (LimitExceeded, SharedStateUnavailable):
                if last_error is None:
                    raise  # the model this step was decided for: nothing cheaper to try
                # A fallback the tenant's budget cannot take (or that cannot be checked) is
                # skipped, like one over max_cost_usd; the request ends with the model's failure.
                continue
            if not covered:
                if last_error is None:
                    raise TimeoutError  # no time left to start it, as below
                continue  # skipped as one that cannot be checked
            # Recorded when its first attempt starts: a fallback the attempt limit, the retry
            # budget, the deadline or an open breaker stops was never called.
            fallen_from = previous_failure
            # Recorded when it starts: a retry the budget, the deadline or the breaker stops after
            # its wait (another request's doing meanwhile) was never made.
            retry_made: tuple[str, float] | None = None  # the failure's reason, the wait
            for try_on_model in range(reliability.retries_per_model + 1):
                if attempt.number - first >= reliability.max_attempts:
                    break
                # Checked again after a retry's wait: other requests' failures spend it meanwhile.
                if attempt.number > first and not self._retry_budget.can_retry():
                    break
                # The deadline first: a half-open breaker's one probe is claimed only by an attempt
                # that starts (``_attempt`` releases or settles it however it ends).
                remaining = None if deadline is None else deadline - time.monotonic()
                left = None if start_by is None else start_by - time.monotonic()
                needed = 0.0 if checked else reliability.min_attempt_seconds
                checked = False
                if left is not None and (left < needed or left <= 0):
                    if last_error is None or left <= 0:
                        raise TimeoutError
                    # The deadline has not passed: what the caller is told is the failure that
                    # made this retry or fallback needed, as when none is configured.
                    raise _failure_to_report(last_error, retryable_error)
                permit = self._breakers.allow(model_id)
                if permit is None:
                    # When its probe may go; none while a half-open breaker's probe runs.
                    refused.append((model, self._breakers.retry_in(model_id) or None))
                    previous_failure = _open_breakers_refusal(refused[-1:])
                    # One refusal speaks for every model an open breaker refused: the caller may
                    # come back when the soonest of them lets a probe through.
                    refusal = _open_breakers_refusal(refused)
                    if last_error is None or last_error is open_breaker:
                        last_error = refusal
                    if retryable_error is None or retryable_error is open_breaker:
                        retryable_error = refusal  # it half-opens again soon
                    open_breaker = refusal
                    break
                if fallen_from is not None:
                    telemetry.record_fallback(fallen_from.model, model_id, fallen_from.reason)
                    fallen_from = None
                if retry_made is not None:
                    telemetry.record_retry(model_id, *retry_made)
                    retry_made = None
                attempted = self._attempt(attempt, model, permit, request, remaining, headers)
                async with contextlib.aclosing(attempted) as events:
                    try:
                        async for event in events:
                            yield event
                        return
                    except ProviderError as error:
                        if attempt.chunks or not (is_retryable(error) or skips_provider(error)):
                            raise
                        last_error = previous_failure = error
                        if skips_provider(error):
                            attempt.exhausted.add(model.provider)
                            break
                        retryable_error = error
                if try_on_model == reliability.retries_per_model:
                    break
                delay = await self._retry_delay(attempt, first, model, last_error, try_on_model + 1, start_by)
                if delay is None:
                    break
                retry_made = (last_error.reason, delay)
                await asyncio.sleep(delay)
        if last_error is None:
            raise no_eligible_model_for(decision)
        raise _failure_to_report(last_error, retryable_error)

    async def _retry_delay(
        self,
        state: _AttemptState,
        first: int,
        model: ModelSpec,
        error: ProviderError,
        retry_number: int,
        deadline: float | None,
    ) -> float | None:
        """Seconds to wait before retry ``retry_number`` (1-based) on ``model``, whose attempt
        failed with ``error``, or None when the retry could not be made: the request then moves
        to its next model at once.

        Everything that would refuse the retry once the wait is over is asked before it, so a
        request never sleeps the provider's wait into a refusal: the attempts left to this loop
        (``state.number - first`` of ``max_attempts``), the retry budget (this failure may have
        spent it), the provider's wait over ``max_retry_after_seconds`` (its wait alone: the
        jittered backoff is bounded by ``max_backoff_seconds``), the deadline, the model's
        breaker (this failure may have opened it until after the wait), and the tenant's budget
        (a retry may cost again what the failed attempt was charged, a stall; one it cannot take
        is not made, as a fallback)."""
        reliability = self._reliability
        if state.number - first >= reliability.max_attempts or not self._retry_budget.can_retry():
            return None
        if error.retry_after is not None and error.retry_after > reliability.max_retry_after_seconds:
            return None
        delay = backoff_delay(reliability, retry_number, error.retry_after)
        left = None if deadline is None else deadline - time.monotonic() - reliability.min_attempt_seconds
        if left is not None and delay > left:
            return None
        if self._breakers.retry_in(model.id) > delay:
            return None
        try:
            # Waited for only while the retry could still start after its wait, with the least
            # time an attempt is given (as ``left`` above).
            latest = None if deadline is None else deadline - delay - reliability.min_attempt_seconds
            covered = await self._cover(state, model, within=latest)
        except (LimitExceeded, SharedStateUnavailable):
            return None
        return delay if covered else None

    async def _cover(self, state: _AttemptState, model: ModelSpec, *, within: float | None = None) -> bool:
        """Make the request's reservation hold what it has spent on answers so far plus ``model``'s
        estimate, before ``model`` is called (a fallback, a retry): the tenant's budget is checked
        for every model a request calls, not only the decided one. Raises ``LimitExceeded`` when
        the budget cannot take the difference (``SharedStateUnavailable`` when the shared store
        cannot say). False when the store did not answer by ``within`` (time.monotonic(), the
        latest ``model`` could be called: a slow store is not waited for past it), True when held."""
        decision = state.decision
        timer = asyncio.timeout(None if within is None else within - time.monotonic())
        try:
            async with timer:
                await self._cover_cost(state, estimated_cost(model, decision, decision.mode))
        except TimeoutError:
            if not timer.expired():
                raise
            # Whatever the store held by then is released with the reservation at its settle.
            return False
        return True

    async def _cover_cost(self, state: _AttemptState, estimate: Decimal) -> None:
        """``_cover`` for a call estimated at ``estimate`` (a cascade judge's, an escalation's)."""
        needed = state.cost - state.decision.routing_cost_usd + estimate
        if needed > state.reserved:
            started = time.monotonic()
            try:
                await state.reservation.extend(needed - state.reserved)
            finally:
                state.budget_trips.append((started, time.monotonic()))
            state.reserved = needed

    async def _attempt(
        self,
        state: _AttemptState,
        model: ModelSpec,
        permit: Permit,
        request: RoutingRequest,
        remaining: float | None,
        headers: Mapping[str, str] | None,
    ) -> AsyncGenerator[TextDelta | Completion, None]:
        """One upstream call, started on the breaker's ``permit``: yields its deltas and, on
        success, the ``Completion``.

        The first chunk must come within ``first_token_timeout_seconds`` and each next one within
        ``stream_idle_timeout_seconds``; a stall closes the upstream request. Any chunk the model
        produced counts, answer text or not (reasoning, a tool call's piece: a ``Heartbeat``, not
        forwarded). The attempt is written to the ledger exactly once however it ends.
        """
        reliability = self._reliability
        state.number += 1
        number = state.number
        provider = self._providers[model.provider]
        decision = state.decision
        call = ProviderCall(
            model=model.id,
            provider_model=model.provider_model,
            messages=request.chat.messages,
            tools=request.chat.tools,
            max_output_tokens=decision.estimated_output_tokens,
            temperature=request.chat.temperature,
            stop=request.chat.stop,
            tool_choice=request.chat.tool_choice,
            parallel_tool_calls=request.chat.parallel_tool_calls,
            response_format=request.chat.response_format,
            timeout=remaining,
            headers=MappingProxyType(dict(headers or {})),
            image_token_scale=model.image_token_scale,
        )
        received: list[str] = []  # what each chunk carried: answer text, reasoning, tool calls
        reported: Usage | None = None  # the input the provider said it bills, before any output
        ended_by_us = False  # our stream timers or the call's deadline ended it after it was sent
        sent = 0  # text chunks yielded: past the first, a failure is no longer retried
        outcome = AttemptOutcome.CANCELLED
        usage: Usage | None = None
        # The timers run inside the observed stream, so the attempt's span ends with the failure
        # they raise, as the router reports it.
        timed = _Timed(
            checked(provider, model),
            model,
            reliability.first_token_timeout_seconds,
            reliability.stream_idle_timeout_seconds,
        )
        stream = telemetry.observed_stream(timed, model, call, decision.mode)
        # The time the first text must come by (an answer held for release), not set after it.
        first_text = None if state.first_text_by is None else state.first_text_by - time.monotonic()
        first_text_timer = asyncio.timeout(first_text)
        try:
            async with first_text_timer:
                async for event in stream:
                    if isinstance(event, TextDelta):
                        received.append(event.text)
                        if not state.buffering:
                            sent += 1
                            state.chunks += 1
                            if sent == 1:
                                # Its text reaches the caller from now on, however the call ends.
                                self._answered_by(state, model.id)
                        # Disarmed before anything is yielded: the timer cancels this task,
                        # which runs the caller's code while this generator waits at a yield.
                        first_text_timer.reschedule(None)
                        yield event
                    elif isinstance(event, Heartbeat):
                        received.append(event.text)
                        if event.reasoning:
                            state.reasoned = number
                    elif isinstance(event, InputReported):
                        reported = event.usage
                    else:
                        usage = event.usage
                        finish = event
            if usage is None:
                message = f"provider {model.provider} ended the stream without a finish event"
                raise ProviderUnavailable(message, provider=model.provider, model=model.id)
            outcome = AttemptOutcome.COMPLETED
            cost = cost_of_usage(model, usage, decision.mode)
            self._record(state, model, number, outcome, usage, cost, estimated=finish.estimated)
            self._breakers.record_success(model.id)
            self._retry_budget.record_success()
            yield Completion(
                model=model.id,
                provider=model.provider,
                provider_model=finish.provider_model or model.provider_model,
                usage=usage,
                cost_usd=state.cost,
                finish_reason=finish.finish_reason,
                tool_calls=finish.tool_calls,
            )
        except ProviderTimedOut as error:
            # ``call.timeout`` is what was left of the caller's deadline: the request ran out of
            # time (the RPC's own timer fires at the same moment), the model did not fail.
            outcome = AttemptOutcome.INTERRUPTED if received else AttemptOutcome.FAILED
            ended_by_us = True
            self._breakers.release_probe(permit)
            raise DeadlineExceeded("deadline exceeded") from error
        except TimeoutError:
            if not first_text_timer.expired():
                raise
            # No text by the time the answer held must be released: as the deadline, not the
            # model's failure.
            outcome = AttemptOutcome.INTERRUPTED if received else AttemptOutcome.FAILED
            ended_by_us = True
            self._breakers.release_probe(permit)
            raise DeadlineExceeded("deadline exceeded") from None
        except ProviderError as error:
            outcome = AttemptOutcome.INTERRUPTED if received else AttemptOutcome.FAILED
            ended_by_us = isinstance(error, ProviderStalled)
            if counts_against_model(error, bool(received)):
                self._breakers.record_failure(model.id, error.retry_after)
                self._retry_budget.record_failure()
            else:  # the request's or the key's doing; a spent quota skips the provider
                self._breakers.release_probe(permit)
            if sent:
                raise StreamInterrupted(
                    f"{error.message} after {sent} chunks were sent",
                    provider=error.provider,
                    model=model.id,
                    chunks_sent=state.chunks,
                ) from error
            raise
        finally:
            try:
                # Closing the generator closes the upstream HTTP response (also on cancellation).
                await close_stream(stream)
            finally:
                # Recorded even when a second cancellation interrupts the close.
                self._record_unfinished(state, model, call, permit, number, outcome, received, ended_by_us, reported)

    def _record_unfinished(
        self,
        state: _AttemptState,
        model: ModelSpec,
        call: ProviderCall,
        permit: Permit,
        number: int,
        outcome: AttemptOutcome,
        received: list[str],
        ended_by_us: bool,
        reported: Usage | None,
    ) -> None:
        """Write an attempt that did not complete to the ledger (a completed one wrote itself).

        Ended by the provider's error before any output, or from our side before its request went
        out (``call.sent``: its connection never made): nothing billed. Ended from our side once
        the provider had the call (a cancellation, our timers, the deadline), or cut after output:
        ``interrupted_usage`` of ``call`` (what came, and the input as the provider ``reported``
        it, when it did, else the tokenizer's), as its span counts it."""
        if outcome is AttemptOutcome.COMPLETED:
            return
        if outcome is AttemptOutcome.CANCELLED:
            self._breakers.release_probe(permit)
        cut_by_us = ended_by_us or outcome is AttemptOutcome.CANCELLED
        charged = bool(received) or (cut_by_us and call.sent.is_set())
        estimate = interrupted_usage(model, call.as_chat(), received, reported) if charged else Usage()
        cost = cost_of_usage(model, estimate, state.decision.mode)
        self._record(state, model, number, outcome, estimate, cost, estimated=charged)

    def _record(
        self,
        state: _AttemptState,
        model: ModelSpec,
        number: int,
        outcome: AttemptOutcome,
        usage: Usage,
        cost: Decimal,
        *,
        estimated: bool,
    ) -> None:
        state.tokens += usage.input_tokens + usage.output_tokens
        state.cost += cost
        result = AttemptResult.COMPLETED if outcome is AttemptOutcome.COMPLETED else AttemptResult.FAILED
        state.summaries.append(AttemptSummary(model.id, result, usage, cost))
        self._ledger.record(
            request_id=state.request_id,
            decision_id=state.decision.decision_id,
            tenant=state.tenant,
            model=model.id,
            provider=model.provider,
            attempt=number,
            outcome=outcome,
            usage=usage,
            cost_usd=cost,
            estimated=estimated,
        )


@dataclass
class _AttemptState:
    """What the attempts of one request share."""

    request_id: str
    decision: RouteDecision
    tenant: str
    reservation: Reservation
    reserved: Decimal  # USD the reservation holds: the decision's estimate, then any extensions
    exhausted: set[str] = field(default_factory=set)  # providers whose quota ran out: not tried again
    number: int = 0
    chunks: int = 0  # text chunks sent to the caller (a buffered cascade step's are not)
    buffering: bool = False  # a cascade step runs: its text is kept, not sent, so nothing commits
    reasoned: int = 0  # the last attempt whose model sent reasoning; 0: none
    # An answer is held: the first text of the last cascade step must come by then (monotonic)
    first_text_by: float | None = None
    # The decision's LLM classifier was cut by ``Router._decide_by``: the answer's first attempt
    # starts with whatever time deciding left (``_serve``), as an escalation announced does.
    start_unchecked: bool = False
    tokens: int = 0
    cost: Decimal = Decimal(0)
    summaries: list[AttemptSummary] = field(default_factory=list)
    answered_by: str = ""  # the model the decision was re-filed under for feedback ("": none)
    # When the request waited for the tenant's budget (checks and holds: round trips to a
    # ``shared_state`` store), as (start, end) monotonic times.
    budget_trips: list[tuple[float, float]] = field(default_factory=list)

    def counted_now(self, as_of: float | None, lag_forgiven: float) -> float:
        """The moment a cascade's check of the time counts as now: now, or ``as_of`` (a judge's cut,
        whose verdict it acts on) when that is earlier, plus the time since spent waiting for the
        tenant's budget beyond ``_BUDGET_WAIT_FORGIVEN_SECONDS`` in all (a slow shared store's
        round trips), never later than now nor earlier than ``lag_forgiven`` before it. The rest
        since the cut, the judge's call closed and charged and the event loop's lag, is not
        counted up to ``lag_forgiven``: the cut left just the time the escalation needs (under
        load the loop's lag after it is tens of ms, which refused the verdict the judge was paid
        for); beyond it, it is (forgiven whole, escalations were announced with their time already
        gone, then paid and released)."""
        now = time.monotonic()
        if as_of is None or as_of >= now:
            return now
        waited = sum(max(0.0, end - max(start, as_of)) for start, end in self.budget_trips)
        return min(now, max(now - lag_forgiven, as_of + max(0.0, waited - _BUDGET_WAIT_FORGIVEN_SECONDS)))

    def mark_escalated(self) -> int:
        """The last answering attempt's answer was rejected by the cascade: its index in
        ``summaries`` (-1: none)."""
        for index in range(len(self.summaries) - 1, -1, -1):
            if self.summaries[index].result is AttemptResult.COMPLETED:
                self.summaries[index] = replace(self.summaries[index], result=AttemptResult.ESCALATED)
                return index
        return -1


@dataclass(frozen=True, slots=True)
class _EscalationStop:
    """Why a cascade step cannot escalate (a few words for the quality reason), and the refusal
    that said so, if any (the tenant's budget)."""

    why: str
    cause: RouteSvcError | None = None


@dataclass(frozen=True, slots=True)
class _StepOutcome:
    """A buffered cascade step: its answer (None when it failed, with its ``error``), score, the
    cost before it, the usage of its attempts (a failed or cut one's estimated), the index of the
    step it escalates to, and why it cannot escalate, when it cannot (``stop``)."""

    deltas: tuple[TextDelta, ...]
    completion: Completion | None
    quality: QualityScore
    cost_before: Decimal
    usage: Usage
    next_step: int
    error: ProviderError | None = None
    stop: _EscalationStop | None = None
    scored: bool = True  # False: no scorer scored it (the judge alone, not asked or failed)


def _releasable(outcome: _StepOutcome) -> bool:
    """Whether a rejected step's answer may still be released when the escalation fails before
    any text: one with text that the provider did not filter (an empty or filtered answer is no
    answer to give)."""
    completion = outcome.completion
    if completion is None or completion.finish_reason is FinishReason.CONTENT_FILTER:
        return False
    return any(delta.text.strip() for delta in outcome.deltas)


def _no_answer(completion: Completion | None, deltas: Iterable[TextDelta]) -> bool:
    """Whether an escalated step's ``completion`` (its text in ``deltas``) gave the caller no
    answer, so that the answer in hand is released for it: no text, no tool call, and not
    filtered by the provider (the filter's word stands: the answer in hand is not released
    around it)."""
    if completion is None or completion.finish_reason is FinishReason.CONTENT_FILTER or completion.tool_calls:
        return False
    return not any(delta.text.strip() for delta in deltas)


def _failed(error: ProviderError | DeadlineExceeded | TimeoutError) -> str:
    """How an escalation that ended with ``error`` before any text went, for the released answer's
    reason: ``failed (REASON)``, or ``timed out`` (the time kept for the answer in hand came)."""
    return f"failed ({error.reason})" if isinstance(error, ProviderError) else "timed out"


def _usage_of(summaries: Iterable[AttemptSummary]) -> Usage:
    """The summed usage of ``summaries``."""
    return sum((summary.usage for summary in summaries), Usage())


def _side_call_outcome(call: UpstreamCall) -> AttemptOutcome:
    """How a judge's or a classifier's call ended, for the ledger: finished (its usage reported or
    estimated), cancelled with the request (also before it was sent), refused, or cut short (a
    timeout, an error)."""
    if call.finished:
        return AttemptOutcome.COMPLETED
    if call.cancelled:
        return AttemptOutcome.CANCELLED
    return AttemptOutcome.FAILED if call.refused else AttemptOutcome.INTERRUPTED


def _open_breakers_refusal(refused: Sequence[tuple[ModelSpec, float | None]]) -> ProviderUnavailable:
    """The error of a request whose models ``refused`` (in the order tried, each with the seconds
    until its breaker lets a probe through) open breakers refused: RetryInfo of the soonest probe,
    and the error names its model (ErrorInfo's ``model`` and ``provider``, the message). None of
    it when a half-open breaker's probe runs (its end may come any moment): the message lists the
    models, and the error names the first."""
    waits = [wait for _, wait in refused]
    soonest = None if None in waits else min(wait for wait in waits if wait is not None)
    named = next(model for model, wait in refused if soonest is None or wait == soonest)
    if len(refused) == 1:
        message = f"circuit breaker open for model {named.id}"
    else:
        message = f"circuit breakers open for models {', '.join(model.id for model, _ in refused)}"
        if soonest is not None:
            message += f" (the soonest probe: {named.id}'s)"
    return ProviderUnavailable(message, provider=named.provider, model=named.id, retry_after=soonest)


def _failure_to_report(last_error: ProviderError, retryable_error: ProviderError | None) -> ProviderError:
    """The error a request whose attempts all failed ends with: the last one's, except that a
    spent quota says "do not retry until paid", so when another model only failed for now (rate
    limited, unavailable), that is what the caller is told, so a retry may succeed."""
    return retryable_error if skips_provider(last_error) and retryable_error is not None else last_error


def no_eligible_model_for(decision: RouteDecision) -> ProviderUnavailable:
    """The error when no attempt could even start (every breaker open, no budget)."""
    return ProviderUnavailable(
        f"no attempt could start for model {decision.model}", provider=decision.provider, model=decision.model
    )


class _Timed:
    """``provider``'s streams of ``model``, failing with ``ProviderStalled`` when no event comes
    within ``first_event`` seconds of the call, or within ``idle`` seconds of the last one (a
    reasoning or tool-call piece counts: the model is working)."""

    def __init__(self, provider: Provider, model: ModelSpec, first_event: float, idle: float) -> None:
        self._provider = provider
        self._model = model
        self._first_event = first_event
        self._idle = idle

    async def stream(self, call: ProviderCall) -> AsyncGenerator[ProviderEvent, None]:
        """The provider's events, each within its time."""
        stream = self._provider.stream(call)
        iterator = aiter(stream)
        loop = asyncio.get_running_loop()
        # The first chunk's time runs from the call, through anything before it that is not
        # output (Anthropic's input report); each next chunk's from when it is asked for.
        answering = False
        deadline = loop.time() + self._first_event
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await anext(iterator)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    model, limit = self._model, self._idle if answering else self._first_event
                    raise ProviderStalled(
                        f"model {model.id} sent no chunk for {limit:g} s", provider=model.provider, model=model.id
                    ) from None
                answering = answering or not isinstance(event, InputReported)
                yield event
                if answering:
                    deadline = loop.time() + self._idle
        finally:
            await close_stream(stream)
