"""Routing effectiveness over a rolling window: what ``GetStats`` and ``routesvc stats`` report.

Every finished Complete RPC adds one ``RequestOutcome``: the model that answered, what the
request cost (every upstream attempt, estimated usage included for interrupted ones), what the
same usage would have cost on the baseline model, the decision's estimates, latency, time to
first chunk, escalations, fallbacks and the cascade's verdict. ``RoutingStats.summary`` folds
the outcomes of a window (optionally of one tenant) into totals, per-model and per-tenant rows.
A classifier call a Complete left (cut by its deadline) and that was charged after the request
was folded in (``add_late_charge``) adds its cost to the request's model and tenant, as the
ledger has it. Feedback scores (``add_feedback``) are averaged per model over the same window. Savings are
``baseline cost - cost``; money stays ``Decimal`` until it is put on the wire.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """One finished Complete request as the window keeps it (no content, no keys)."""

    at: float
    tenant: str
    model: str
    selected_model: str
    strategy: str
    ok: bool
    cost_usd: Decimal
    baseline_cost_usd: Decimal
    estimated_cost_usd: Decimal
    estimated_baseline_cost_usd: Decimal
    latency_seconds: float
    time_to_first_chunk_seconds: float | None = None
    escalations: int = 0
    fallbacks: int = 0
    cascade_released: bool | None = None
    cascade_score: float | None = None
    baseline_model: str = ""  # the model its baseline costs were priced on


@dataclass(frozen=True, slots=True)
class LateCharge:
    """A finished Complete's classifier call charged after it finished: cost, no request."""

    at: float
    tenant: str
    model: str  # the model that answered the request (its outcome's)
    cost_usd: Decimal


@dataclass(frozen=True, slots=True)
class FeedbackOutcome:
    """A feedback score in [0, 1] reported for a past decision's answering model."""

    at: float
    tenant: str
    model: str
    score: float
    decision_id: str = ""


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50, p95 and p99 in seconds (0 when there were no samples)."""

    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0

    @classmethod
    def of(cls, samples: Iterable[float]) -> Percentiles:
        """Nearest-rank percentiles of ``samples``."""
        ordered = sorted(samples)
        if not ordered:
            return cls()

        def rank(q: float) -> float:
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        return cls(rank(0.50), rank(0.95), rank(0.99))


@dataclass(frozen=True, slots=True)
class Totals:
    """Requests, cost and savings of a set of outcomes."""

    requests: int
    cost_usd: Decimal
    baseline_cost_usd: Decimal
    estimated_cost_usd: Decimal
    estimated_baseline_cost_usd: Decimal
    errors: int

    @property
    def savings_usd(self) -> Decimal:
        """Baseline cost minus actual cost."""
        return self.baseline_cost_usd - self.cost_usd

    @property
    def savings_percent(self) -> float:
        """Savings as a percentage of the baseline cost (0 when the baseline cost is 0)."""
        return float(self.savings_usd / self.baseline_cost_usd * 100) if self.baseline_cost_usd else 0.0

    @classmethod
    def of(cls, outcomes: Sequence[RequestOutcome], late: Sequence[LateCharge] = ()) -> Totals:
        """The totals of ``outcomes``, and the cost of ``late`` charges of theirs."""
        return cls(
            requests=len(outcomes),
            cost_usd=sum((o.cost_usd for o in outcomes), _ZERO) + sum((c.cost_usd for c in late), _ZERO),
            baseline_cost_usd=sum((o.baseline_cost_usd for o in outcomes), _ZERO),
            estimated_cost_usd=sum((o.estimated_cost_usd for o in outcomes), _ZERO),
            estimated_baseline_cost_usd=sum((o.estimated_baseline_cost_usd for o in outcomes), _ZERO),
            errors=sum(1 for o in outcomes if not o.ok),
        )


@dataclass(frozen=True, slots=True)
class ModelRow:
    """One model's part of the window: requests answered (or attempted), share, cost."""

    model: str
    share: float
    totals: Totals
    feedback_count: int = 0
    mean_feedback_score: float | None = None


@dataclass(frozen=True, slots=True)
class TenantRow:
    """One tenant's part of the window."""

    tenant: str
    totals: Totals


@dataclass(frozen=True, slots=True)
class StatsSummary:
    """Routing effectiveness over ``window_seconds`` (for ``tenant``, or all when empty)."""

    window_seconds: float
    tenant: str
    baseline_model: str
    totals: Totals
    escalations: int
    escalated_requests: int
    fallbacks: int
    cascade_decisions: int
    cascade_released: int
    mean_released_score: float | None
    latency: Percentiles
    time_to_first_chunk: Percentiles
    models: tuple[ModelRow, ...]
    tenants: tuple[TenantRow, ...]

    @property
    def escalation_rate(self) -> float:
        """Share of requests that escalated at least once."""
        return self.escalated_requests / self.totals.requests if self.totals.requests else 0.0

    @property
    def cascade_release_rate(self) -> float:
        """Share of cascade decisions that released the cheap answer."""
        return self.cascade_released / self.cascade_decisions if self.cascade_decisions else 0.0


class RoutingStats:
    """A rolling window of ``RequestOutcome``s, bounded by age and by count."""

    def __init__(
        self,
        window_seconds: float,
        max_requests: int,
        baseline_model: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_seconds = window_seconds
        self.baseline_model = baseline_model
        self._clock = clock
        self._outcomes: deque[RequestOutcome] = deque(maxlen=max_requests)
        self._late: deque[LateCharge] = deque(maxlen=max_requests)
        self._max_feedback = max_requests
        # Scores in the order they came; a re-rated decision's earlier one stays until it expires
        # (stale: ``_latest`` names its replacement), so replacing costs O(1), not a scan of the
        # window (every Feedback scanned up to 100,000 scores on the event loop, ~5 ms).
        self._feedback: deque[FeedbackOutcome] = deque()
        self._latest: dict[str, FeedbackOutcome] = {}
        self._stale = 0

    def add(self, outcome: RequestOutcome) -> None:
        """Keep ``outcome``; drop what fell out of the window."""
        self._outcomes.append(outcome)
        self._expire(self._clock())

    def add_late_charge(self, charge: LateCharge) -> None:
        """Count the cost of a classifier call charged after its Complete was added."""
        self._late.append(charge)
        self._expire(self._clock())

    def add_feedback(self, feedback: FeedbackOutcome) -> None:
        """Keep a feedback score; it counts for its model while it is in the window. A later score
        for the same decision replaces the earlier one (the library keeps the latest too)."""
        if feedback.decision_id:
            if feedback.decision_id in self._latest:
                self._stale += 1
            self._latest[feedback.decision_id] = feedback
        self._feedback.append(feedback)
        if self._stale > len(self._feedback) // 2:
            # Mostly re-rated scores: drop the stale ones at once (amortized O(1) a score).
            self._feedback = deque(f for f in self._feedback if self._counts(f))
            self._stale = 0
        while len(self._feedback) - self._stale > self._max_feedback:  # the scores that count
            self._drop_oldest_feedback()
        self._expire(self._clock())

    def _counts(self, feedback: FeedbackOutcome) -> bool:
        """Whether ``feedback`` is its decision's latest score (not replaced by a re-rating)."""
        return not feedback.decision_id or self._latest.get(feedback.decision_id) is feedback

    def _drop_oldest_feedback(self) -> None:
        oldest = self._feedback.popleft()
        if not self._counts(oldest):
            self._stale -= 1
        elif oldest.decision_id:
            del self._latest[oldest.decision_id]

    def _expire(self, now: float) -> None:
        while self._outcomes and now - self._outcomes[0].at > self.window_seconds:
            self._outcomes.popleft()
        while self._late and now - self._late[0].at > self.window_seconds:
            self._late.popleft()
        while self._feedback and now - self._feedback[0].at > self.window_seconds:
            self._drop_oldest_feedback()

    def _baselines(self, outcomes: list[RequestOutcome]) -> str:
        """The model ``outcomes`` were priced on: a reload that changed the baseline within the window
        leaves outcomes of each, named oldest first (\"claude-sonnet, gpt-4o\")."""
        names = dict.fromkeys(o.baseline_model for o in outcomes if o.baseline_model)
        return ", ".join(names) if names else self.baseline_model

    def summary(self, *, tenant: str = "", window_seconds: float | None = None) -> StatsSummary:
        """Fold the last ``window_seconds`` (at most the whole window) of ``tenant`` (all when empty)."""
        now = self._clock()
        self._expire(now)
        window = self.window_seconds if not window_seconds else min(window_seconds, self.window_seconds)
        outcomes = [o for o in self._outcomes if now - o.at <= window and (not tenant or o.tenant == tenant)]
        late = [c for c in self._late if now - c.at <= window and (not tenant or c.tenant == tenant)]
        totals = Totals.of(outcomes, late)
        by_model: dict[str, list[RequestOutcome]] = {}
        by_tenant: dict[str, list[RequestOutcome]] = {}
        late_by_model: dict[str, list[LateCharge]] = {}
        late_by_tenant: dict[str, list[LateCharge]] = {}
        for outcome in outcomes:
            by_model.setdefault(outcome.model, []).append(outcome)
            by_tenant.setdefault(outcome.tenant, []).append(outcome)
        for charge in late:
            late_by_model.setdefault(charge.model, []).append(charge)
            late_by_tenant.setdefault(charge.tenant, []).append(charge)
            by_model.setdefault(charge.model, [])
            by_tenant.setdefault(charge.tenant, [])
        scores: dict[str, list[float]] = {}
        for feedback in self._feedback:
            if now - feedback.at <= window and (not tenant or feedback.tenant == tenant) and self._counts(feedback):
                scores.setdefault(feedback.model, []).append(feedback.score)
                by_model.setdefault(feedback.model, [])
        released = [o for o in outcomes if o.cascade_released]
        released_scores = [o.cascade_score for o in released if o.cascade_score is not None]
        return StatsSummary(
            window_seconds=window,
            tenant=tenant,
            baseline_model=self._baselines(outcomes),
            totals=totals,
            escalations=sum(o.escalations for o in outcomes),
            escalated_requests=sum(1 for o in outcomes if o.escalations),
            fallbacks=sum(o.fallbacks for o in outcomes),
            cascade_decisions=sum(1 for o in outcomes if o.cascade_released is not None),
            cascade_released=len(released),
            mean_released_score=sum(released_scores) / len(released_scores) if released_scores else None,
            latency=Percentiles.of(o.latency_seconds for o in outcomes),
            time_to_first_chunk=Percentiles.of(
                o.time_to_first_chunk_seconds for o in outcomes if o.time_to_first_chunk_seconds is not None
            ),
            models=tuple(
                ModelRow(
                    model,
                    len(rows) / len(outcomes) if outcomes else 0.0,
                    Totals.of(rows, late_by_model.get(model, ())),
                    len(scores.get(model, ())),
                    sum(scores[model]) / len(scores[model]) if scores.get(model) else None,
                )
                for model, rows in sorted(by_model.items(), key=lambda item: (-len(item[1]), item[0]))
            ),
            tenants=tuple(
                TenantRow(name, Totals.of(rows, late_by_tenant.get(name, ())))
                for name, rows in sorted(by_tenant.items())
            ),
        )
