"""Admission control: per-tenant rate limits, concurrency and USD budgets.

Admission reserves, completion settles. ``admit`` checks every limit of the tenant and reserves
the request's estimate in one atomic step; ``Reservation.settle`` replaces the estimate with the
real usage and cost. A rejected request reserves nothing. ``LocalAdmission`` keeps the counts in
this process (one synchronous step on the event loop, so nothing slips in between);
``routesvc.redis_admission.RedisAdmission`` keeps them in Redis, shared by every replica.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from routesvc.config import Settings, TenantConfig
from routesvc.cost import format_usd
from routesvc.errors import LimitExceeded, RequestTooLarge, quoted_id

_WINDOW = 60.0


@dataclass
class _TokenEntry:
    at: float
    tokens: int
    in_window: bool = True  # false once pruned: its tokens no longer count in ``tokens_used``


@dataclass
class _TenantState:
    requests: collections.deque[float] = field(default_factory=collections.deque)
    routes: collections.deque[float] = field(default_factory=collections.deque)  # Route calls
    tokens: collections.deque[_TokenEntry] = field(default_factory=collections.deque)
    # The sum of ``tokens``' entries, kept as they come, settle and leave the window, so that a
    # check costs the same however many the minute holds.
    tokens_used: int = 0
    in_flight: int = 0
    spent: dict[str, Decimal] = field(default_factory=lambda: collections.defaultdict(Decimal))
    reserved: dict[str, Decimal] = field(default_factory=lambda: collections.defaultdict(Decimal))


@dataclass
class _Held:
    """The USD one local reservation holds: the estimate admitted, then any extensions."""

    usd: Decimal


class Reservation(Protocol):
    """What ``admit`` reserved for one request."""

    @property
    def counted(self) -> bool:
        """Whether ``settle`` has counted the request in its tenant's budget: false before it, for
        a tenant without limits, and when the shared store could not be reached and the settle
        could not be left to a retry in the background. One left to a retry counts as counted:
        the retry counts it, unless the store stays away until the lease ends (or the process
        stops meanwhile)."""
        ...

    async def extend(self, cost: Decimal) -> None:
        """Reserve ``cost`` more USD for this request, checked against the tenant's budgets only:
        it is about to call another model (a fallback, a cascade escalation or judge). Raises
        ``LimitExceeded`` (``BUDGET_EXCEEDED``) having reserved nothing more (or
        ``SharedStateUnavailable`` when the shared store cannot be reached); ``settle`` releases
        it with the rest. Does nothing once settled."""
        ...

    async def settle(self, tokens: int, cost: Decimal, *, wait_at_most: float | None = None) -> None:
        """Replace the estimate by the real ``tokens`` and ``cost``; later calls do nothing.
        ``wait_at_most``: wait for the shared store's reply at most that many seconds, then return
        with the settle on its way (a request's status must not wait long for the store, yet its
        client's next call, on any replica, should find it settled): ``aclose`` waits for it, and
        so do this process's next admission, check and ``spent`` of the tenant; ``counted`` is
        then true (on its way, as a settle left to a retry)."""
        ...


class Admission(Protocol):
    """Per-tenant limits and budgets; tenants without limits are admitted at once."""

    async def admit(self, tenant: str, *, tokens: int = 0, cost: Decimal = Decimal(0)) -> Reservation:
        """Check and reserve one request; raises ``LimitExceeded`` having reserved nothing."""
        ...

    async def count_route(self, tenant: str) -> Callable[[], None]:
        """Count one ``Route`` call of ``tenant`` against its ``route_requests_per_minute``: raises
        ``LimitExceeded`` (``RATE_LIMITED``) having counted nothing when its minute is full. Route
        calls are counted apart from ``requests_per_minute`` (Complete calls and batch jobs), so
        that a client asking Route before it completes is not counted twice. Returns what gives
        the count back, for a Route refused before it cost anything (rejected requests consume
        nothing); a no-op when nothing was counted."""
        ...

    async def exhausted(self, tenant: str, cost: Decimal = Decimal(0)) -> str:
        """Why ``tenant`` may not spend anything more now (a budget spent or reserved in full), or
        "" when it may: the router pays to decide (an LLM classifier's call) only when it may.
        With a ``cost``: why it may not spend that much more (a budget would be passed), checked
        and reserving nothing (a cascade asks before it pays a judge whose verdict could lead to
        an escalation costing that much)."""
        ...

    async def precheck(self, tenant: str, *, tokens: int = 0, cost: Decimal = Decimal(0)) -> None:
        """Raise what ``admit`` would raise now for a request of ``tokens`` and ``cost`` (requests
        per minute used up, tokens per minute, concurrency full, a budget passed); reserves nothing.
        Complete asks with its tokens and the least it can cost before it pays to decide, so that
        a request refused anyway costs no label."""
        ...

    def configure(self, tenants: Mapping[str, TenantConfig]) -> None:
        """Apply new limits (hot reload); what was spent and reserved so far still counts."""
        ...

    def charge(self, tenant: str, cost: Decimal, *, at: float | None = None) -> None:
        """Add ``cost`` to what ``tenant`` has spent, with no check: money already spent outside
        a reservation (an LLM classifier's call made to decide a route), or, negative, given back
        (a batch job that ended for less than the estimate its budget counted). Counted in the
        budget periods of wall time ``at`` (default now). Never raises."""
        ...

    async def spent(self, tenant: str) -> Decimal:
        """What ``tenant`` has spent today (UTC)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


async def _nothing_extended(cost: Decimal) -> None:
    del cost


class SettleOnce:
    """A reservation settled at most once: the first ``settle`` applies the real usage, later
    calls do nothing (a request's finally and an error path may both try). ``extend`` reserves
    more until then (default: nothing to check, as for a tenant without limits)."""

    def __init__(
        self,
        apply: Callable[[int, Decimal, float | None], Awaitable[bool]],
        extend: Callable[[Decimal], Awaitable[None]] = _nothing_extended,
    ) -> None:
        # ``apply(tokens, cost, wait_at_most)`` returns whether it counted the request in a budget
        # (past ``wait_at_most``: whether it is on its way)
        self._apply = apply
        self._extend = extend
        self._settled = False
        self._counted = False

    @property
    def counted(self) -> bool:
        """Whether ``settle`` has counted the request in a budget."""
        return self._counted

    async def extend(self, cost: Decimal) -> None:
        """Reserve ``cost`` more USD (see ``Reservation.extend``); nothing once settled."""
        if not self._settled and cost > 0:
            await self._extend(cost)

    async def settle(self, tokens: int, cost: Decimal, *, wait_at_most: float | None = None) -> None:
        """Replace the estimate by the real ``tokens`` and ``cost`` (``wait_at_most``: see
        ``Reservation.settle``); later calls do nothing."""
        if self._settled:
            return
        self._settled = True
        self._counted = await self._apply(tokens, cost, wait_at_most)


def has_limits(limits: TenantConfig | None) -> bool:
    """Whether a tenant's entry sets any limit or budget. One that sets none (it only names its
    keys, allow-list or tier: with auth on, every tenant has an entry) is admitted as a tenant
    without an entry is: at once, counted nowhere, and never refused because the shared state
    store cannot be reached."""
    if limits is None:
        return False
    bounds = (
        limits.requests_per_minute,
        limits.route_requests_per_minute,
        limits.tokens_per_minute,
        limits.max_concurrent,
        limits.daily_budget_usd,
        limits.monthly_budget_usd,
    )
    return any(bound is not None for bound in bounds)


def limited_tenants(tenants: Mapping[str, TenantConfig]) -> dict[str, TenantConfig]:
    """The tenants of ``tenants`` that have limits (``has_limits``): the only ones an admission
    counts or checks."""
    return {name: limits for name, limits in tenants.items() if has_limits(limits)}


def check_fits_token_rate(tenant: str, limits: TenantConfig, tokens: int) -> None:
    """Raise ``RequestTooLarge`` (no retry delay) when one request's estimate alone is over the
    tenant's tokens per minute: waiting would never admit it."""
    if limits.tokens_per_minute is not None and tokens > limits.tokens_per_minute:
        raise RequestTooLarge(
            f"the request is estimated at {tokens} tokens (input as its model bills it, images included,"
            f" plus max output), more than tenant {quoted_id(tenant)}'s {limits.tokens_per_minute} tokens per"
            " minute; lower chat.max_output_tokens or send less input"
        )


def check_fits_budgets(tenant: str, limits: TenantConfig, cost: Decimal) -> None:
    """Raise ``RequestTooLarge`` (no retry delay) when one request's estimate alone is over the
    tenant's daily or monthly budget: no day or month would ever admit it."""
    for name, budget in (("daily", limits.daily_budget_usd), ("monthly", limits.monthly_budget_usd)):
        if budget is not None and cost > budget:
            raise RequestTooLarge(
                f"the request is estimated at {format_usd(cost)} USD (input plus max output), more than"
                f" tenant {quoted_id(tenant)}'s {name} budget of {format_usd(budget)} USD; lower"
                " chat.max_output_tokens or choose a cheaper model"
            )


def route_rate_limited(tenant: str, limits: TenantConfig, retry_after: float) -> LimitExceeded:
    """The refusal of a Route call over the tenant's ``route_requests_per_minute``."""
    return LimitExceeded(
        f"tenant {quoted_id(tenant)} is over its {limits.route_requests_per_minute} Route calls per minute",
        reason="RATE_LIMITED",
        retry_after=retry_after,
    )


def budget_name(period: str) -> str:
    """ "daily" or "monthly" for a period key of ``_periods``."""
    return "daily" if period.startswith("day") else "monthly"


# The retry delay of a budget refused only for what requests in flight have reserved: they end,
# and settle (most often far under the estimates they hold), within seconds, not at the period's end.
HELD_IN_FLIGHT_RETRY_SECONDS = 1.0


def budget_exceeded(
    tenant: str, limits: TenantConfig, period: str, now: float, *, held_in_flight: bool
) -> LimitExceeded:
    """The refusal of a request that ``period``'s budget cannot take (wall time ``now``): told to
    retry at the period's end when what was spent blocks it, or in a second (``held_in_flight``,
    said in the message and the ErrorInfo) when only what requests in flight reserved does."""
    budget = limits.daily_budget_usd if period.startswith("day") else limits.monthly_budget_usd
    name, amount = budget_name(period), format_usd(budget or Decimal(0))
    message = f"tenant {quoted_id(tenant)} would exceed its {name} budget of {amount} USD"
    if held_in_flight:
        return LimitExceeded(
            f"{message} with what its requests in flight have reserved; retry once they end",
            reason="BUDGET_EXCEEDED",
            retry_after=HELD_IN_FLIGHT_RETRY_SECONDS,
            held_in_flight=True,
        )
    return LimitExceeded(message, reason="BUDGET_EXCEEDED", retry_after=_seconds_to_next(period, now))


def exhausted_budget(
    tenant: str, limits: TenantConfig, periods: Sequence[str], committed: Sequence[Decimal], cost: Decimal = Decimal(0)
) -> str:
    """Why ``tenant`` may not spend more: the first budget that its spent plus reserved USD
    (``committed``, one amount per period of ``periods``) has reached, or that ``cost`` more would
    pass (as ``Reservation.extend`` would refuse it); "" when none has."""
    budgets = (limits.daily_budget_usd, limits.monthly_budget_usd)
    for period, budget, used in zip(periods, budgets, committed, strict=True):
        if budget is None:
            continue
        if cost > 0 and used + cost > budget:
            return (
                f"tenant {quoted_id(tenant)} would exceed its {budget_name(period)} budget of {format_usd(budget)} USD"
            )
        if used >= budget:
            return f"tenant {quoted_id(tenant)} has spent or reserved its {budget_name(period)} budget"
    return ""


def _nothing_counted() -> None:
    """The give-back of a Route call that was not counted (its tenant has no Route limit)."""


async def _nothing_reserved(tokens: int, cost: Decimal, wait_at_most: float | None) -> bool:
    del tokens, cost, wait_at_most
    return False


def _periods(now: float) -> tuple[str, str]:
    day = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
    return f"day:{day:%Y-%m-%d}", f"month:{day:%Y-%m}"


def _seconds_to_next(period: str, now: float) -> float:
    moment = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
    if period.startswith("day:"):
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0) + datetime.timedelta(days=1)
    else:
        year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
        start = moment.replace(year=year, month=month, day=1, hour=0, minute=0, second=0, microsecond=0)
    return (start - moment).total_seconds()


class LocalAdmission:
    """Per-tenant limits from config, counted in this process; tenants without limits (no entry, or
    one that sets none) are unlimited."""

    def __init__(
        self,
        tenants: Mapping[str, TenantConfig],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._tenants = limited_tenants(tenants)
        self._clock = clock
        self._wall_clock = wall_clock
        self._state: dict[str, _TenantState] = collections.defaultdict(_TenantState)

    def configure(self, tenants: Mapping[str, TenantConfig]) -> None:
        """Apply new limits (hot reload); what was spent and reserved so far still counts."""
        self._tenants = limited_tenants(tenants)

    def _prune(self, state: _TenantState, now: float) -> None:
        while state.requests and state.requests[0] <= now - _WINDOW:
            state.requests.popleft()
        while state.routes and state.routes[0] <= now - _WINDOW:
            state.routes.popleft()
        while state.tokens and state.tokens[0].at <= now - _WINDOW:
            entry = state.tokens.popleft()
            entry.in_window = False
            state.tokens_used -= entry.tokens

    async def admit(self, tenant: str, *, tokens: int = 0, cost: Decimal = Decimal(0)) -> Reservation:
        """Check and reserve one request of ``tokens`` estimated tokens and ``cost`` estimated USD.

        Raises ``LimitExceeded`` (nothing reserved) when any limit of the tenant would be passed.
        """
        limits = self._tenants.get(tenant)
        if limits is None:
            # Only counted in flight, so that limits a reload adds see the requests already running;
            # the entry goes with the last of them (tenant names are unbounded when auth is off).
            state = self._state[tenant]
            state.in_flight += 1
            return SettleOnce(functools.partial(self._settle_unlimited, tenant, state))
        now = self._clock()
        state = self._state[tenant]
        periods = self._check(tenant, limits, state, now, tokens, cost)
        state.requests.append(now)
        entry = None
        if tokens:
            entry = _TokenEntry(now, tokens)
            state.tokens.append(entry)
            state.tokens_used += tokens
        state.in_flight += 1
        for period in periods:
            state.reserved[period] += cost
        held = _Held(cost)
        return SettleOnce(
            functools.partial(self._settle, tenant, entry, held, periods),
            functools.partial(self._extend, tenant, held, periods),
        )

    async def count_route(self, tenant: str) -> Callable[[], None]:
        """Count one Route call against the tenant's ``route_requests_per_minute``, or refuse it."""
        limits = self._tenants.get(tenant)
        if limits is None or limits.route_requests_per_minute is None:
            return _nothing_counted
        now = self._clock()
        state = self._state[tenant]
        self._prune(state, now)
        if len(state.routes) >= limits.route_requests_per_minute:
            raise route_rate_limited(tenant, limits, max(0.001, state.routes[0] + _WINDOW - now))
        state.routes.append(now)

        def give_back() -> None:
            with contextlib.suppress(ValueError):  # pruned already: its minute is over
                state.routes.remove(now)

        return give_back

    async def exhausted(self, tenant: str, cost: Decimal = Decimal(0)) -> str:
        """Why ``tenant`` may not spend anything more now (``cost`` more, when given), or ""."""
        limits = self._tenants.get(tenant)
        if limits is None:
            return ""
        state = self._state[tenant]
        periods = _periods(self._wall_clock())
        committed = [state.spent[p] + state.reserved[p] for p in periods]
        return exhausted_budget(tenant, limits, periods, committed, cost)

    async def precheck(self, tenant: str, *, tokens: int = 0, cost: Decimal = Decimal(0)) -> None:
        """Raise what ``admit`` would raise now for ``tokens`` and ``cost``, reserving nothing."""
        limits = self._tenants.get(tenant)
        if limits is not None:
            self._check(tenant, limits, self._state[tenant], self._clock(), tokens, cost)

    def _check(
        self, tenant: str, limits: TenantConfig, state: _TenantState, now: float, tokens: int, cost: Decimal
    ) -> tuple[str, str]:
        """Raise ``LimitExceeded`` if a request of ``tokens`` and ``cost`` would pass a limit; the
        budget periods it would count in otherwise."""
        # First what waiting would never cure (as the shared admission checks it), so that a client
        # is not told to retry a request that can never be admitted.
        check_fits_token_rate(tenant, limits, tokens)
        check_fits_budgets(tenant, limits, cost)
        self._prune(state, now)
        if limits.requests_per_minute is not None and len(state.requests) >= limits.requests_per_minute:
            raise LimitExceeded(
                f"tenant {quoted_id(tenant)} is over its {limits.requests_per_minute} requests per minute",
                reason="RATE_LIMITED",
                retry_after=max(0.001, state.requests[0] + _WINDOW - now),
            )
        tpm = limits.tokens_per_minute
        if tpm is not None and tokens and state.tokens_used + tokens > tpm:
            retry_after = max(0.001, state.tokens[0].at + _WINDOW - now) if state.tokens else _WINDOW
            raise LimitExceeded(
                f"tenant {quoted_id(tenant)} is over its {tpm} tokens per minute",
                reason="TOKEN_RATE_LIMITED",
                retry_after=retry_after,
            )
        if limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
            raise LimitExceeded(
                f"tenant {quoted_id(tenant)} already has {limits.max_concurrent} requests in flight",
                reason="CONCURRENCY_LIMITED",
                retry_after=1.0,
            )
        wall = self._wall_clock()
        periods = _periods(wall)
        self._check_budgets(tenant, limits, state, periods, wall, cost)
        return periods

    @staticmethod
    def _check_budgets(
        tenant: str,
        limits: TenantConfig,
        state: _TenantState,
        periods: Sequence[str],
        wall: float,
        cost: Decimal,
        own: Decimal = Decimal(0),
    ) -> None:
        # The month first: when both budgets are passed, the retry delay is the later boundary's.
        # One passed only with what requests in flight reserved (spent, plus ``own``, what the
        # request itself holds, plus ``cost`` fit) says so, with a short delay, unless the other
        # budget's spend blocks the request too.
        budgets = zip(periods, (limits.daily_budget_usd, limits.monthly_budget_usd), strict=True)
        held = ""
        for period, budget in reversed(list(budgets)):
            if budget is None or state.spent[period] + state.reserved[period] + cost <= budget:
                continue
            if state.spent[period] + own + cost > budget:
                raise budget_exceeded(tenant, limits, period, wall, held_in_flight=False)
            held = held or period
        if held:
            raise budget_exceeded(tenant, limits, held, wall, held_in_flight=True)

    async def _extend(self, tenant: str, held: _Held, periods: tuple[str, str], cost: Decimal) -> None:
        # Checked against the budgets as they stand now (a reload may have changed them), counted in
        # the periods the request was admitted in, where its settle will release it.
        limits = self._tenants.get(tenant)
        state = self._state[tenant]
        if limits is not None:
            self._check_budgets(tenant, limits, state, periods, self._wall_clock(), cost, held.usd)
        for period in periods:
            state.reserved[period] += cost
        held.usd += cost

    async def _settle(
        self,
        tenant: str,
        entry: _TokenEntry | None,
        held: _Held,
        periods: tuple[str, ...],
        tokens: int,
        cost: Decimal,
        wait_at_most: float | None,
    ) -> bool:
        del wait_at_most  # applied at once either way
        state = self._state[tenant]
        state.in_flight -= 1
        if entry is not None:
            if entry.in_window:
                state.tokens_used += tokens - entry.tokens
            entry.tokens = tokens
        for period in periods:
            state.reserved[period] -= held.usd
            state.spent[period] += cost
        return True

    async def _settle_unlimited(
        self, tenant: str, state: _TenantState, tokens: int, cost: Decimal, wait_at_most: float | None
    ) -> bool:
        del tokens, cost, wait_at_most
        state.in_flight -= 1
        idle = not (state.in_flight or state.requests or state.routes or state.tokens)
        counted = any(state.spent.values()) or any(state.reserved.values())
        if idle and not counted and tenant not in self._tenants and self._state.get(tenant) is state:
            del self._state[tenant]
        return False

    def charge(self, tenant: str, cost: Decimal, *, at: float | None = None) -> None:
        """Add ``cost`` to what a limited ``tenant`` has spent in the periods of ``at`` (unlimited
        tenants are not counted)."""
        if tenant not in self._tenants:
            return
        state = self._state[tenant]
        for period in _periods(self._wall_clock() if at is None else at):
            state.spent[period] += cost

    async def spent(self, tenant: str) -> Decimal:
        """What ``tenant`` has spent today (UTC)."""
        state = self._state.get(tenant)
        return Decimal(0) if state is None else state.spent[_periods(self._wall_clock())[0]]

    async def aclose(self) -> None:
        """Nothing to release."""

    def in_flight(self, tenant: str) -> int:
        """Requests of ``tenant`` admitted and not settled."""
        state = self._state.get(tenant)
        return 0 if state is None else state.in_flight

    def tracked_tenants(self) -> int:
        """How many tenants this process keeps counts for (limited ones, and unlimited ones with
        requests in flight)."""
        return len(self._state)


def build_admission(settings: Settings) -> Admission:
    """Redis-backed admission when a Redis URL is configured, else counted in this process."""
    if settings.redis_url:
        from routesvc.redis_admission import RedisAdmission

        shared = settings.config.shared_state
        return RedisAdmission(
            settings.redis_url, settings.config.tenants, prefix=shared.key_prefix, lease_seconds=shared.lease_seconds
        )
    return LocalAdmission(settings.config.tenants)
