"""The cost ledger: every upstream attempt's usage and cost, recorded exactly once.

Completed attempts carry the usage the provider reported. Attempts that ended early (the client
cancelled, the deadline passed, the stream was cut) carry an estimate from what was sent and
received, flagged ``estimated``. Failed attempts that produced nothing carry zero usage.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import structlog

from routesvc.models import Usage

log = structlog.get_logger("routesvc.ledger")


class AttemptOutcome(enum.Enum):
    """How an upstream attempt ended."""

    COMPLETED = "completed"
    """The provider answered; its reported usage (a batch job: once its result was read), or
    where it reported none an estimate, flagged (``estimated``)."""
    FAILED = "failed"
    """The provider refused or failed the call before any output: nothing billed, zero usage."""
    INTERRUPTED = "interrupted"
    """Cut after output (a stall, an error mid-stream): its input and what came, estimated."""
    CANCELLED = "cancelled"
    """The caller cancelled once the provider had the call, yet the provider bills it. A realtime
    call: its input and what came, estimated. A batch job cancelled after it was sent that the
    provider answered all the same: the provider's usage, not estimated unless it reported none
    (the job stays CANCELLED for its caller, and no answer is returned)."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One upstream attempt."""

    request_id: str
    decision_id: str
    tenant: str
    model: str
    provider: str
    attempt: int
    outcome: AttemptOutcome
    usage: Usage
    cost_usd: Decimal
    estimated: bool
    recorded_at: float


class Ledger:
    """The most recent ``capacity`` attempts, in order, with listeners for every new entry."""

    def __init__(self, capacity: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._entries: collections.deque[LedgerEntry] = collections.deque(maxlen=capacity)
        self._listeners: list[Callable[[LedgerEntry], None]] = []
        self._clock = clock

    def subscribe(self, listener: Callable[[LedgerEntry], None]) -> None:
        """Call ``listener`` with every entry recorded from now on."""
        self._listeners.append(listener)

    def record(
        self,
        *,
        request_id: str,
        decision_id: str,
        tenant: str,
        model: str,
        provider: str,
        attempt: int,
        outcome: AttemptOutcome,
        usage: Usage,
        cost_usd: Decimal,
        estimated: bool,
    ) -> LedgerEntry:
        """Record one attempt and tell the listeners."""
        entry = LedgerEntry(
            request_id,
            decision_id,
            tenant,
            model,
            provider,
            attempt,
            outcome,
            usage,
            cost_usd,
            estimated,
            self._clock(),
        )
        self._entries.append(entry)
        for listener in self._listeners:
            try:
                listener(entry)
            except Exception:
                # Entries are written in cleanup paths (a cancelled call's ``finally``): a listener
                # that fails must not replace the error or the cancellation being handled there.
                log.exception("ledger_listener_failed", decision_id=decision_id, model=model)
        return entry

    def entries(self, decision_id: str | None = None) -> list[LedgerEntry]:
        """Every entry kept, or only those of one decision."""
        return [e for e in self._entries if decision_id is None or e.decision_id == decision_id]

    def total_cost(self, tenant: str | None = None) -> Decimal:
        """The sum of the kept entries' costs, for one tenant or all."""
        return sum((e.cost_usd for e in self._entries if tenant is None or e.tenant == tenant), Decimal(0))
