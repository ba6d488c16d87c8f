"""Circuit breakers, one per model: stop calling a model that keeps failing, probe it later.

closed --(failure_threshold consecutive failures)--> open
open --(open_seconds passed, or the provider's Retry-After if longer, up to max_open_seconds)--> half-open
half-open --(the one probe succeeds)--> closed
half-open --(the probe fails)--> open

A call that tells only of failures (an LLM classifier's small one: a model that labels a prompt
may still fail every answer) reports its success with ``record_probe_success``, which closes the
breaker only when that call was the half-open probe and leaves a closed one's count alone.

``allow`` hands each call a ``Permit``; the one that took the half-open probe is the only one
whose ``release_probe`` gives the turn back, when it ends without a verdict (another call ending
so, one started while the breaker was closed, frees nothing: two probes never run at once). A
probe that never reports (a bug) holds the turn for at most ``open_seconds``, so a lost probe
cannot keep a model out.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from routesvc.config import BreakerConfig

log = structlog.get_logger("routesvc.breaker")


class BreakerState(enum.Enum):
    """Where a breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, eq=False)
class Permit:
    """Leave for one call to ``model`` to start (from ``Breakers.allow``); ``probe`` when the call
    is a half-open breaker's one probe. Compared by identity: each call's permit is its own."""

    model: str
    probe: bool = False


@dataclass
class _Breaker:
    failures: int = 0
    opened_until: float = 0.0
    state: BreakerState = BreakerState.CLOSED
    probe: Permit | None = None  # the half-open breaker's running probe
    probe_started: float = 0.0


class Breakers:
    """The breakers of every model, created on first use."""

    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._breakers: dict[str, _Breaker] = {}

    def state(self, model: str) -> BreakerState:
        """The state of ``model``'s breaker now (open turns half-open once its time is up)."""
        breaker = self._breakers.get(model)
        if breaker is None:
            return BreakerState.CLOSED
        if breaker.state is BreakerState.OPEN and self._clock() >= breaker.opened_until:
            breaker.state = BreakerState.HALF_OPEN
            breaker.probe = None
        return breaker.state

    def allow(self, model: str) -> Permit | None:
        """A permit for a call to ``model`` to start now, or None; a half-open breaker lets one
        probe through (its permit is the probe's)."""
        state = self.state(model)
        if state is BreakerState.CLOSED:
            return Permit(model)
        if state is BreakerState.OPEN:
            return None
        breaker = self._breakers[model]
        now = self._clock()
        if breaker.probe is not None and now - breaker.probe_started < self._config.open_seconds:
            return None
        breaker.probe = Permit(model, probe=True)
        breaker.probe_started = now
        return breaker.probe

    def refuses(self, model: str) -> bool:
        """Whether ``allow`` would refuse a call to ``model`` now (open, or half-open with its
        probe running), asked without claiming the probe."""
        state = self.state(model)
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.OPEN:
            return True
        breaker = self._breakers[model]
        return breaker.probe is not None and self._clock() - breaker.probe_started < self._config.open_seconds

    def retry_in(self, model: str) -> float:
        """Seconds until ``model``'s open breaker lets a probe through (0 when not open)."""
        breaker = self._breakers.get(model)
        if breaker is None or self.state(model) is not BreakerState.OPEN:
            return 0.0
        return max(0.0, breaker.opened_until - self._clock())

    def record_success(self, model: str) -> None:
        """A call to ``model`` succeeded: close its breaker."""
        previous = self._breakers.get(model)
        self._breakers[model] = _Breaker()
        if previous is not None and previous.state is not BreakerState.CLOSED:
            log.info("breaker_closed", model=model)

    def record_failure(self, model: str, retry_after: float | None = None) -> None:
        """A call to ``model`` failed; open the breaker at the threshold, or when a probe fails."""
        breaker = self._breakers.setdefault(model, _Breaker())
        breaker.failures += 1
        if breaker.state is BreakerState.HALF_OPEN or breaker.failures >= self._config.failure_threshold:
            was_open = breaker.state is BreakerState.OPEN
            breaker.state = BreakerState.OPEN
            breaker.probe = None
            # The provider's wait, when longer, but never past the operator's bound: one 503 saying
            # "Retry-After: 86400" must not take the model out for a day.
            seconds = min(self._config.longest_open_seconds, max(self._config.open_seconds, retry_after or 0.0))
            breaker.opened_until = self._clock() + seconds
            if not was_open:
                log.warning("breaker_opened", model=model, failures=breaker.failures, open_seconds=seconds)

    def record_probe_success(self, permit: Permit) -> None:
        """A call on ``permit`` that speaks only for probes succeeded: close the breaker if the call
        was its running half-open probe, else change nothing (a closed breaker's consecutive
        failures are not reset by it)."""
        breaker = self._breakers.get(permit.model)
        if breaker is not None and breaker.probe is permit:
            self.record_success(permit.model)

    def release_probe(self, permit: Permit) -> None:
        """The call ``permit`` let start ended without a verdict (e.g. the client cancelled): if it
        is the running half-open probe, allow another; any other call's permit frees nothing."""
        breaker = self._breakers.get(permit.model)
        if breaker is not None and breaker.probe is permit:
            breaker.probe = None
