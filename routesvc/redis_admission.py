"""Admission shared by every replica: the same limits and budgets as ``LocalAdmission``, counted
in Redis. Each check-and-reserve, each extension and each settle is one Lua script, so it is
atomic across replicas. The rate windows and leases are scored by Redis's clock (``TIME`` inside
the script), the same for every replica; the budget periods (UTC day and month) by the replica's.

A settle or a charge that fails (Redis unreachable for a moment), and the undo of an admission
whose script may have run without its reply reaching us, are sent again in the background by one
loop, in the order they failed, in batches, after jittered doubling delays, until they reach Redis
or a lease has run out (at most ``_RETRY_MAX_PENDING`` wait at once; when full, a settle or a
charge takes the place of the oldest undo). Each is safe to run twice, and to arrive late: a
retried settle settles only a reservation still in flight (its first try may have run and lost its
reply) and leaves a marker that makes a first try arriving after it count nothing; a charge counts
only if its marker is not there yet; an undo leaves a marker that makes its admission, if it
arrives after it, reserve nothing. An admission that failed while its connection was made (refused,
timed out, its greeting refused) sent nothing, and needs no undo. A request whose settle never
reaches Redis (its replica died, or Redis stayed away past the lease) leaves its request and
tokens to expire with the window, and its in-flight slot and reserved USD to be released once its
lease runs out (by the next admission of the tenant); what it really cost is never known, so
nothing is added to what was spent.

Keys, per tenant T (``routesvc:`` prefix configurable):
    {prefix}T:req              sorted set of admitted request ids scored by time (requests/min)
    {prefix}T:route            sorted set of Route call ids scored by time (Route calls/min)
    {prefix}T:tok              sorted set of reservation ids scored by time, and
    {prefix}T:tokn             hash reservation id -> tokens (tokens/min), and
    {prefix}T:tokused          hash: ``sum`` of tokn's tokens and ``count`` of its entries,
                               kept by every script, so that a check reads no reservation
    {prefix}T:inflight         sorted set of reservation ids in flight scored by lease expiry
                               (concurrency)
    {prefix}T:spent:P          spent USD in period P (day:YYYY-MM-DD, month:YYYY-MM),
    {prefix}T:reserved:P       USD reserved and not yet settled, and
    {prefix}T:reservations:P   hash reservation id -> the USD it holds in reserved:P (its
                               estimate plus extensions), released by its settle or its lease's end
    {prefix}T:settled:ID       set by a retried settle of reservation ID (and by the settle of a
                               retried admission),
    {prefix}T:undone:ID        by the undo of admission ID, and
    {prefix}T:charged:ID       by charge ID, each for a lease (a charge's for at most 10 minutes)
    {prefix}T:extensions:ID    set of the ids of the extensions reservation ID holds, while it is
                               in flight: deleted by its settle (else it expires with the lease)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import decimal
import functools
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from decimal import Decimal
from typing import Any

import structlog
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from routesvc.admission import (
    Reservation,
    SettleOnce,
    _nothing_counted,
    _nothing_reserved,
    _periods,
    budget_exceeded,
    check_fits_budgets,
    check_fits_token_rate,
    exhausted_budget,
    limited_tenants,
    route_rate_limited,
)
from routesvc.config import TenantConfig
from routesvc.cost import format_usd
from routesvc.errors import LimitExceeded, SharedStateUnavailable, quoted_id
from routesvc.tasks import keep_until_done

log = structlog.get_logger("routesvc.admission")

_WINDOW = 60.0
# Budgets are compared in Lua doubles; amounts are kept as decimal strings with 12 places.
_PLACES = Decimal("0.000000000001")

# Lua shared by the scripts below. Sums of doubles can land a few ulps past a budget that the
# exact decimals meet (0.1 + 0.2 against 0.3, which ``LocalAdmission`` admits): a budget is passed
# only by more than 1e-9 USD, far under any price and far over the rounding of realistic sums.
# Amounts stay stored as before, as replicas of an older version may share these keys.
# ``reserve`` and ``release`` keep each reservation's share of reserved:P in reservations:P.
# ``clock``: the time a script was given (tests), else Redis's own. Reading ``TIME`` before
# writing needs the script's effects replicated, not the script: the default from Redis 5, asked
# for on Redis 3.2 and 4 by ``replicate_commands`` (on later ones it changes nothing; it must
# come before any write, and ``clock`` is called before any).
_CLOCK = """
local function clock(given)
  if given ~= '' then return tonumber(given) end
  redis.replicate_commands()
  local time = redis.call('TIME')
  return tonumber(time[1]) + tonumber(time[2]) / 1000000
end
"""

_FUNCTIONS = (
    _CLOCK
    + """
local function amount(key) return tonumber(redis.call('GET', key) or '0') end
local function over(budget, spent, reserved, cost)
  return budget > 0 and amount(spent) + amount(reserved) + cost > budget + 1e-9
end
-- What keeps a budget from taking ``cost`` more: '' nothing, 'spent' what was spent (with
-- ``own``, what the request holds itself), 'reserved' only what requests in flight hold.
local function blocked(budget, spent, reserved, cost, own)
  if not over(budget, spent, reserved, cost) then return '' end
  if amount(spent) + own + cost > budget + 1e-9 then return 'spent' end
  return 'reserved'
end
-- The month first: when both budgets are passed, the retry delay is the later boundary's; a
-- budget passed only with what requests in flight hold is said so (a short retry delay) when
-- the other's spend does not block the request too.
local function budgets_refuse(month_budget, spent_m, res_m, own_m, day_budget, spent_d, res_d, own_d, cost)
  local month = blocked(month_budget, spent_m, res_m, cost, own_m)
  if month == 'spent' then return {'BUDGET_EXCEEDED', 'month'} end
  local day = blocked(day_budget, spent_d, res_d, cost, own_d)
  if day == 'spent' then return {'BUDGET_EXCEEDED', 'day'} end
  if month ~= '' then return {'BUDGET_EXCEEDED', 'month:reserved'} end
  if day ~= '' then return {'BUDGET_EXCEEDED', 'day:reserved'} end
  return nil
end
local function reserve(reserved, holds, id, usd, ttl)
  redis.call('INCRBYFLOAT', reserved, usd)
  redis.call('HINCRBYFLOAT', holds, id, usd)
  redis.call('EXPIRE', reserved, ttl)
  redis.call('EXPIRE', holds, ttl)
end
local function release(reserved, holds, id)
  local usd = redis.call('HGET', holds, id)
  if usd then
    redis.call('INCRBYFLOAT', reserved, '-' .. usd)
    redis.call('HDEL', holds, id)
  end
end
local DAY_TTL, MONTH_TTL = 3 * 86400, 40 * 86400
-- ``tokused`` keeps the tokens of the minute (``sum``) and how many reservations they are
-- (``count``): changed by ``held_tokens`` where tokn is, and only while it is there (a field
-- created alone would have no expiry; the admission counts it again from tokn when missing).
local function held_tokens(tokused, delta, entries)
  if redis.call('HEXISTS', tokused, 'sum') == 1 then
    redis.call('HINCRBY', tokused, 'sum', delta)
    redis.call('HINCRBY', tokused, 'count', entries)
  end
end
"""
)

_ADMIT = (
    _FUNCTIONS
    + """
local req, tok, tokn, inflight, tokused = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local spent_d, spent_m, res_d, res_m, holds_d, holds_m = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local now, window = clock(ARGV[1]), tonumber(ARGV[2])
local rpm, tpm, maxc = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tokens, cost = tonumber(ARGV[6]), tonumber(ARGV[7])
local day_budget, month_budget = tonumber(ARGV[8]), tonumber(ARGV[9])
local id, lease = ARGV[10], tonumber(ARGV[11])
local dry = ARGV[12] == '1'
-- Undone before it arrived (its caller gave up on it, ``_UNDO``), or settled (a retry admitted
-- it, and it ended, before this first try arrived; ``_SETTLE`` marks such a settle): it reserves
-- nothing.
if redis.call('EXISTS', KEYS[12], KEYS[13]) > 0 then return {'UNDONE', ''} end
-- A retry whose first try reserved (only its reply was lost): admitted as it stands.
if not dry and redis.call('ZSCORE', inflight, id) then return {'OK', ''} end
redis.call('ZREMRANGEBYSCORE', req, '-inf', now - window)
-- The tokens of the minute: the running total, less each reservation as it leaves the window
-- (each leaves once: the same work in all as the admissions that added them), so a check costs
-- the same however many the minute holds. Counted again from tokn (once) when the total is
-- missing, or when its count is not the window's (an older replica sharing the keys adds and
-- prunes without it).
local totals = redis.call('HMGET', tokused, 'sum', 'count')
local used, counted = tonumber(totals[1]), tonumber(totals[2])
local stored = used
local expired = redis.call('ZRANGEBYSCORE', tok, '-inf', now - window)
for _, old in ipairs(expired) do
  local held = redis.call('HGET', tokn, old)
  if held and used then used, counted = used - tonumber(held), counted - 1 end
  redis.call('HDEL', tokn, old)
end
redis.call('ZREMRANGEBYSCORE', tok, '-inf', now - window)
local entries = redis.call('ZCARD', tok)
if not used or counted ~= entries or used < 0 then
  used = 0
  if entries > 0 then
    for _, value in ipairs(redis.call('HVALS', tokn)) do used = used + tonumber(value) end
  end
  stored = nil
end
if used ~= stored or #expired > 0 then
  redis.call('HSET', tokused, 'sum', string.format('%d', used))
  redis.call('HSET', tokused, 'count', entries)
  redis.call('EXPIRE', tokused, math.ceil(window) + 1)
end
-- A lease that ran out is a request whose settle never came: free its slot and its USD. Only
-- the current periods' counters are corrected (an older period's is read by no check again),
-- so a request admitted yesterday frees this month's USD and leaves yesterday's to expire.
for _, old in ipairs(redis.call('ZRANGEBYSCORE', inflight, '-inf', now)) do
  release(res_d, holds_d, old)
  release(res_m, holds_m, old)
end
redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
if rpm > 0 and redis.call('ZCARD', req) >= rpm then
  local oldest = redis.call('ZRANGE', req, 0, 0, 'WITHSCORES')
  return {'RATE_LIMITED', tostring(tonumber(oldest[2]) + window - now)}
end
if tpm > 0 and tokens > 0 then
  if used + tokens > tpm then
    local oldest = redis.call('ZRANGE', tok, 0, 0, 'WITHSCORES')
    local wait = window
    if oldest[2] then wait = tonumber(oldest[2]) + window - now end
    return {'TOKEN_RATE_LIMITED', tostring(wait)}
  end
end
if maxc > 0 and redis.call('ZCARD', inflight) >= maxc then
  return {'CONCURRENCY_LIMITED', '1'}
end
local refused = budgets_refuse(month_budget, spent_m, res_m, 0, day_budget, spent_d, res_d, 0, cost)
if refused then return refused end
if dry then return {'OK', ''} end
redis.call('ZADD', req, now, id)
redis.call('EXPIRE', req, math.ceil(window) + 1)
if tokens > 0 then
  redis.call('ZADD', tok, now, id)
  redis.call('HSET', tokn, id, tokens)
  redis.call('HINCRBY', tokused, 'sum', tokens)
  redis.call('HINCRBY', tokused, 'count', 1)
  redis.call('EXPIRE', tok, math.ceil(window) + 1)
  redis.call('EXPIRE', tokn, math.ceil(window) + 1)
  redis.call('EXPIRE', tokused, math.ceil(window) + 1)
end
redis.call('ZADD', inflight, now + lease, id)
reserve(res_d, holds_d, id, ARGV[7], DAY_TTL)
reserve(res_m, holds_m, id, ARGV[7], MONTH_TTL)
return {'OK', ''}
"""
)

_COUNT_ROUTE = (
    _CLOCK
    + """
local key = KEYS[1]
local now, window, limit, id = clock(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
-- A retry whose first try counted the call (only its reply was lost): counted as it stands.
if redis.call('ZSCORE', key, id) then return {'OK', ''} end
if redis.call('ZCARD', key) >= limit then
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return {'RATE_LIMITED', tostring(tonumber(oldest[2]) + window - now)}
end
redis.call('ZADD', key, now, id)
redis.call('EXPIRE', key, math.ceil(window) + 1)
return {'OK', ''}
"""
)

# A reservation no longer recorded in a period (its lease ran out and released it) has nothing
# there for its settle to release, so it reserves nothing more there; its budgets still decide.
# Each extension has an id of its own, which it records in its reservation's set (``extensions``,
# for a lease; deleted by the settle, so it costs no key once the request ended) as it reserves: a
# retry whose first try ran (only its reply lost), or a first try arriving after its retry, finds
# it and reserves nothing more, so an extension is held once however many tries run. A try that
# finds the reservation released (settled, or its lease ended) reserves nothing and records
# nothing.
_EXTEND = (
    _FUNCTIONS
    + """
local spent_d, spent_m, res_d, res_m, holds_d, holds_m = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local extensions = KEYS[7]
local id, cost = ARGV[1], tonumber(ARGV[2])
local day_budget, month_budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local extension = ARGV[6]
if redis.call('SISMEMBER', extensions, extension) == 1 then return {'OK', ''} end
local own_d = tonumber(redis.call('HGET', holds_d, id) or '0')
local own_m = tonumber(redis.call('HGET', holds_m, id) or '0')
local refused = budgets_refuse(month_budget, spent_m, res_m, own_m, day_budget, spent_d, res_d, own_d, cost)
if refused then return refused end
local held = false
if redis.call('HEXISTS', holds_d, id) == 1 then reserve(res_d, holds_d, id, ARGV[2], DAY_TTL); held = true end
if redis.call('HEXISTS', holds_m, id) == 1 then reserve(res_m, holds_m, id, ARGV[2], MONTH_TTL); held = true end
if held then
  redis.call('SADD', extensions, extension)
  redis.call('EXPIRE', extensions, ARGV[5])
end
return {'OK', ''}
"""
)

# The real cost is spent even when the lease ran out before the settle (the request outlived
# it): the lease's end released the reservation, not the spending. So a second run would count
# the cost twice: ``SettleOnce`` runs it once per reservation, and its tries are told apart. A
# retry (ARGV[5] '1', after a first try that failed and may have run, sent only while the lease
# lasts) settles only a reservation still in flight, as one no longer there was settled by the
# first try; and it leaves a marker (``settled``, for a lease) that makes the first try, if it
# arrives after it (held up on the network past its timeout), count nothing. A first try leaves
# none, which would cost a key per request: it takes the reservation out of flight for a retry to
# see; but the first try of an admission that was retried (ARGV[6] '1') does, so that its
# admission's first try, if it arrives after the settle, reserves nothing (``_ADMIT``).
_SETTLE = (
    _FUNCTIONS
    + """
local tokn, inflight, settled = KEYS[1], KEYS[2], KEYS[3]
local spent_d, spent_m, res_d, res_m, holds_d, holds_m = KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local tokused, extensions = KEYS[10], KEYS[11]
local id, tokens, cost, marked_for, retry = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1'
-- The request ended: its extensions' ids are needed no more (a late try finds nothing held).
redis.call('DEL', extensions)
if redis.call('EXISTS', settled) == 1 then return 0 end
if retry and not redis.call('ZSCORE', inflight, id) then return 0 end
if retry or ARGV[6] == '1' then redis.call('SET', settled, '1', 'EX', marked_for) end
redis.call('ZREM', inflight, id)
local held = redis.call('HGET', tokn, id)
if held then
  redis.call('HSET', tokn, id, tokens)
  held_tokens(tokused, tonumber(tokens) - tonumber(held), 0)
end
release(res_d, holds_d, id)
release(res_m, holds_m, id)
redis.call('INCRBYFLOAT', spent_d, cost)
redis.call('INCRBYFLOAT', spent_m, cost)
redis.call('EXPIRE', spent_d, DAY_TTL)
redis.call('EXPIRE', spent_m, MONTH_TTL)
return 1
"""
)

# Undoes an admission that may have run (its reply lost, its caller cancelled): everything it
# reserved, its place in the requests and tokens per minute too, so a refused request reserves
# nothing; and it marks the id undone for a lease, so that the admission, if it arrives after
# this (held up on the network past its timeout), reserves nothing either. Running it again, or
# for an admission that never ran, changes nothing more.
_UNDO = (
    _FUNCTIONS
    + """
local req, tok, tokn, inflight, tokused = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local res_d, res_m, holds_d, holds_m, undone = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local id, marked_for = ARGV[1], ARGV[2]
redis.call('SET', undone, '1', 'EX', marked_for)
redis.call('ZREM', req, id)
redis.call('ZREM', tok, id)
local held = redis.call('HGET', tokn, id)
if held then
  redis.call('HDEL', tokn, id)
  held_tokens(tokused, -tonumber(held), -1)
end
redis.call('ZREM', inflight, id)
release(res_d, holds_d, id)
release(res_m, holds_m, id)
return 1
"""
)

# Each try of a charge (its first, and those of the retry loop) leaves its marker (for a lease, at
# most _CHARGE_MARKER_SECONDS), and counts only if the marker was not there: however many run, the
# charge counts once.
_CHARGE_MARKER_SECONDS = 600
_CHARGE = """
local spent_d, spent_m, charged = KEYS[1], KEYS[2], KEYS[3]
if not redis.call('SET', charged, '1', 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('INCRBYFLOAT', spent_d, ARGV[1])
redis.call('INCRBYFLOAT', spent_m, ARGV[1])
redis.call('EXPIRE', spent_d, 3 * 86400)
redis.call('EXPIRE', spent_m, 40 * 86400)
return 1
"""


class _NotConnected(RedisConnectionError):
    """No connection to Redis could be made ready for a command (refused, timed out, the host name
    not found, the greeting refused: AUTH, HELLO, SELECT), so no command was sent. Raised from
    the error that said so."""


class _Pool(BlockingConnectionPool):
    """redis-py's pool, whose failures to hand out a connection are ``_NotConnected``: it connects
    (and greets Redis) before a command is written, so a failure there sent nothing. Any failure
    after it (a timeout, a connection lost) may have come after the command was sent.

    A blocking pool: a command past ``_POOL_CONNECTIONS`` in flight waits up to the store's timeout
    for a connection (a wait of its own, before the connect, greeting and command each have
    theirs), where redis-py's plain pool (100 connections by default since redis-py 8) refused it
    at once, so a burst on a healthy Redis was SHARED_STATE_UNAVAILABLE."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]  # untyped in redis-py
        except (RedisError, OSError) as exc:
            raise _NotConnected(str(exc)) from exc

    async def drop_idle(self) -> None:
        """Close the connections waiting in the pool, without waiting for Redis to see them
        closed, and raise nothing: they are thrown away. (redis-py's ``disconnect`` waits for each
        close, up to its second, and raises a timeout: a TLS close waits for the peer's close
        notice, which a Redis host that stopped answering never sends, and the admission retried
        for a connection Redis closed ended INTERNAL, not SHARED_STATE_UNAVAILABLE.)"""
        for connection in list(self._available_connections):
            with contextlib.suppress(RedisError, OSError):
                await connection.disconnect(nowait=True)


def _error_type(exc: BaseException) -> str:
    """The name of the error ``exc`` (for a ``_NotConnected``: of the error behind it)."""
    return type(exc.__cause__ if isinstance(exc, _NotConnected) else exc).__name__


def _connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection that Redis closed under a command (a pooled connection
    left from before Redis restarted), not one that could not be made or a command timed out:
    the command is worth one more try on a new connection, if it is safe to run twice."""
    return isinstance(exc, RedisConnectionError) and not isinstance(exc, _NotConnected)


def _store_failed(exc: BaseException | str) -> SharedStateUnavailable:
    """The error for a store that failed with ``exc`` (or the error type named so)."""
    error_type = exc if isinstance(exc, str) else _error_type(exc)
    message = f"tenant limits could not be checked: the shared state store failed ({error_type})"
    return SharedStateUnavailable(message, store_error=error_type)


def _retry_after(detail: str) -> float:
    """The retry delay of a window the scripts found full: when its oldest entry leaves. Within the
    window, whatever clocks scored it (a test's, or an older replica's own)."""
    return min(_WINDOW, max(0.001, float(detail)))


def _usd(amount: Decimal) -> str:
    # In a context with room for every digit of ``amount`` and the 12 places: in the default one
    # (28 digits) a budget of 1e16 USD or more, which the config accepts as "no real cap", raised
    # decimal.InvalidOperation, and every call of its tenant ended INTERNAL.
    digits = decimal.Context(prec=max(decimal.getcontext().prec, amount.adjusted() + 14))
    return format_usd(amount.quantize(_PLACES, context=digits))


def _budgets(limits: TenantConfig) -> list[str | int]:
    """The daily and monthly budgets as the scripts take them (0: none)."""
    budgets = (limits.daily_budget_usd, limits.monthly_budget_usd)
    return [_usd(budget) if budget is not None else 0 for budget in budgets]


# How long a Redis command or connection may take before the store counts as unavailable.
_TIMEOUT_SECONDS = 1.0
# Connections to Redis one process keeps at most; more commands at once wait for one, up to
# _TIMEOUT_SECONDS (a wait of its own, before the command's connect, greeting and reply).
_POOL_CONNECTIONS = 100
# How long a settle's task may take in all, from its send to its end: both of its tries (the second
# on a new connection when Redis closed the first's), each wait for a pool connection, connect,
# greeting and reply included. Past it the settle is left to the retry loop, and the tenant's next
# call in this process, which waits for it, is refused SHARED_STATE_UNAVAILABLE "(TimeoutError)".
_SETTLE_SECONDS = 2 * _TIMEOUT_SECONDS
# Failed settles, charges and undos are sent again after these delays (jittered: from half of
# each), doubling from the first to the last while Redis fails, this many to a round trip; at most
# ``_RETRY_MAX_PENDING`` wait (about a kilobyte each), past which an undo is dropped (logged).
_RETRY_FIRST_SECONDS = 0.1
_RETRY_MAX_SECONDS = 10.0
_RETRY_BATCH = 100
_RETRY_MAX_PENDING = 10_000
# How long ``aclose`` waits for settles and the retry loop (which sends what waits once more, now).
_CLOSE_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class _Resend:
    """A settle, a charge or an undo that failed, to send again (``script`` with ``keys`` and
    ``args``: safe to run twice) until the loop time ``until``, when its lease ends."""

    operation: str
    tenant: str
    script: Any
    keys: list[str]
    args: list[str | int]
    until: float


@dataclasses.dataclass(frozen=True)
class _Settled:
    """How a settle's task ended: ``counted`` (what ``Reservation.settle`` returns), and ``failed``,
    the type of the store's error it ended on (its retry left to the loop), or ""."""

    counted: bool
    failed: str = ""


class RedisAdmission:
    """Per-tenant limits and budgets kept in Redis at ``url`` and shared by every replica. A tenant
    without limits (``has_limits``) costs no round trip, so a store that cannot be reached never
    refuses it. ``lease_seconds``: how long a reservation whose settle never reaches Redis holds
    its slot and USD. ``clock``: what scores the rate windows and leases (default: Redis's own
    ``TIME``, the same for every replica); ``wall_clock``: what dates the budget periods."""

    def __init__(
        self,
        url: str,
        tenants: Mapping[str, TenantConfig],
        *,
        prefix: str = "routesvc:",
        lease_seconds: float = 3600.0,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        import redis.asyncio as redis_asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No retries, said rather than left to redis-py's defaults (which have changed between
        # versions): a command whose reply is lost may have run, and an admission run twice
        # reserves twice (a settle is retried here, in a form that cannot count twice).
        # Timeouts said too (older releases have none): a Redis that takes a connection and
        # never answers is SHARED_STATE_UNAVAILABLE within a second, not a hang or the caller's
        # DEADLINE_EXCEEDED.
        pool = _Pool.from_url(
            url,
            max_connections=_POOL_CONNECTIONS,
            timeout=_TIMEOUT_SECONDS,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=_TIMEOUT_SECONDS,
            socket_connect_timeout=_TIMEOUT_SECONDS,
        )
        self._redis: Any = redis_asyncio.Redis.from_pool(pool)
        self._tenants = limited_tenants(tenants)
        self._prefix = prefix
        self._lease = lease_seconds
        self._marked_for = max(1, math.ceil(lease_seconds))  # seconds a settled or undone marker lasts
        # Every charge leaves a marker (an LLM classifier's call, a batch correction): a shorter
        # life for those keeps Redis's memory small at high rates, and a failed charge is retried
        # for as long.
        self._charge_marked_for = min(self._marked_for, _CHARGE_MARKER_SECONDS)
        self._store_clock = clock
        self._clock = wall_clock
        self._admit = self._redis.register_script(_ADMIT)
        self._extend_script = self._redis.register_script(_EXTEND)
        self._settle_script = self._redis.register_script(_SETTLE)
        self._undo_script = self._redis.register_script(_UNDO)
        self._charge_script = self._redis.register_script(_CHARGE)
        self._count_route_script = self._redis.register_script(_COUNT_ROUTE)
        # Settles, charges (``charge``) and give-backs on their way, and the one loop that sends
        # ``_resends`` again (``_retry``); awaited by ``aclose``, for a while.
        self._undoing: set[asyncio.Task[object]] = set()
        self._resends: list[_Resend] = []
        self._retrying: asyncio.Task[object] | None = None
        self._dropping = False  # whether the last resend was dropped (``_RETRY_MAX_PENDING``)
        self._closing = asyncio.Event()  # set by ``aclose``: send what waits once more, now
        self._settling: dict[str, set[asyncio.Task[_Settled]]] = {}  # tenant -> its settles on their way

    def configure(self, tenants: Mapping[str, TenantConfig]) -> None:
        """Apply new limits (hot reload)."""
        self._tenants = limited_tenants(tenants)

    def _key(self, tenant: str, name: str) -> str:
        return f"{self._prefix}{tenant}:{name}"

    def _now(self) -> str:
        """The time the scripts score windows and leases by: "" for Redis's own."""
        return "" if self._store_clock is None else repr(self._store_clock())

    def _window_keys(self, tenant: str) -> list[str]:
        """The requests, tokens and in-flight keys an admission reserves in and its undo gives
        back, in the order the scripts take them."""
        return [self._key(tenant, name) for name in ("req", "tok", "tokn", "inflight", "tokused")]

    def _usd_keys(self, tenant: str, periods: tuple[str, str]) -> list[str]:
        """The spent, reserved and reservations keys of the day and month of ``periods``, in the
        order the scripts take them."""
        day, month = periods
        return [
            self._key(tenant, f"{kind}:{period}")
            for kind in ("spent", "reserved", "reservations")
            for period in (day, month)
        ]

    async def admit(self, tenant: str, *, tokens: int = 0, cost: Decimal = Decimal(0)) -> Reservation:
        """Check and reserve atomically in Redis; raises ``LimitExceeded`` having reserved nothing."""
        limits = self._tenants.get(tenant)
        if limits is None:
            return SettleOnce(_nothing_reserved)
        check_fits_token_rate(tenant, limits, tokens)
        check_fits_budgets(tenant, limits, cost)
        async with self._in_time(tenant):
            now = self._clock()
            periods = _periods(now)
            lease_ends = asyncio.get_running_loop().time() + self._lease
            reservation_id = uuid.uuid4().hex
            retried = False
            while True:
                try:
                    verdict, detail = await self._run_admit(
                        tenant, limits, now, tokens, cost, reservation_id, dry=False
                    )
                    break
                except BaseException as exc:
                    try:
                        if not retried and _connection_lost(exc):
                            # Tried once more on a new connection, under the same id: if the first try
                            # ran (only its reply was lost), the script finds the id reserved and
                            # admits it as it is (under a new id it was refused by its own first try).
                            retried = True
                            await self._drop_idle_connections()
                            continue
                    except BaseException:
                        self._undo(tenant, reservation_id, periods, lease_ends)
                        raise
                    if retried or not isinstance(exc, _NotConnected):
                        # A try may have reserved before its reply was lost (the caller cancelled, a
                        # timeout, the connection dropped): undo by id in the background, a no-op if
                        # nothing was reserved, and one the script respects if it arrives after it.
                        self._undo(tenant, reservation_id, periods, lease_ends)
                    if isinstance(exc, RedisError | OSError):
                        raise _store_failed(exc) from exc
                    raise
        if verdict == "OK":
            # A retried admission's first try may still reach Redis after its settle: its settle
            # leaves the marker that makes that try reserve nothing.
            settle = functools.partial(self._settle, tenant, reservation_id, periods, lease_ends, marked=retried)
            return SettleOnce(settle, functools.partial(self._extend, tenant, reservation_id, periods))
        if retried:
            # Refused on its retry, so its first try had not reserved by then; undone all the same,
            # in case that try still reaches Redis after this (it then reserves nothing).
            self._undo(tenant, reservation_id, periods, lease_ends)
        raise self._refusal(tenant, limits, verdict, detail, now)

    async def count_route(self, tenant: str) -> Callable[[], None]:
        """Count one Route call against the tenant's ``route_requests_per_minute`` across
        replicas, or refuse it. A reply lost after the script ran leaves the call counted (one
        Route call too many in the minute, never one too few); so does a give-back that fails
        (logged), which runs in the background. A count cancelled while it waits for its reply is
        given back so (by its id: nothing if the script never ran)."""
        limits = self._tenants.get(tenant)
        if limits is None or limits.route_requests_per_minute is None:
            return _nothing_counted
        key, call_id = self._key(tenant, "route"), uuid.uuid4().hex
        args: list[str | int] = [self._now(), repr(_WINDOW), limits.route_requests_per_minute, call_id]
        try:
            # Under the same id when tried again: a first try that counted it is not counted twice.
            verdict, detail = await self._once_more_if_closed(lambda: self._count_route_script(keys=[key], args=args))
        except (RedisError, OSError) as exc:
            raise _store_failed(exc) from exc
        except asyncio.CancelledError:
            # Cancelled awaiting the reply (the call's deadline, the caller gone): the script may
            # have counted it, for a call that will pay nothing; given back by its id.
            self._in_background(self._uncount_route(tenant, key, call_id))
            raise
        if verdict != "OK":
            raise route_rate_limited(tenant, limits, _retry_after(detail))

        def give_back() -> None:
            self._in_background(self._uncount_route(tenant, key, call_id))

        return give_back

    async def _uncount_route(self, tenant: str, key: str, call_id: str) -> None:
        try:
            await self._redis.zrem(key, call_id)
        except (RedisError, OSError) as exc:
            log.warning("admission_uncount_failed", tenant=tenant, error_type=_error_type(exc))

    async def precheck(self, tenant: str, *, tokens: int = 0, cost: Decimal = Decimal(0)) -> None:
        """Raise what ``admit`` would raise now for ``tokens`` and ``cost`` (the admit script's
        checks, across replicas, with nothing reserved)."""
        limits = self._tenants.get(tenant)
        if limits is None:
            return
        check_fits_token_rate(tenant, limits, tokens)
        check_fits_budgets(tenant, limits, cost)
        async with self._in_time(tenant):
            now = self._clock()
            try:
                verdict, detail = await self._run_admit(tenant, limits, now, tokens, cost, "", dry=True)
            except (RedisError, OSError) as first:
                if not _connection_lost(first):
                    raise _store_failed(first) from first
                try:
                    await self._drop_idle_connections()  # it reserves nothing: tried once more
                    verdict, detail = await self._run_admit(tenant, limits, now, tokens, cost, "", dry=True)
                except (RedisError, OSError) as exc:
                    raise _store_failed(exc) from exc
        if verdict != "OK":
            raise self._refusal(tenant, limits, verdict, detail, now)

    async def _run_admit(
        self,
        tenant: str,
        limits: TenantConfig,
        now: float,
        tokens: int,
        cost: Decimal,
        reservation_id: str,
        *,
        dry: bool,
    ) -> tuple[str, str]:
        keys = [
            *self._window_keys(tenant),
            *self._usd_keys(tenant, _periods(now)),
            self._key(tenant, f"undone:{reservation_id}"),
            self._key(tenant, f"settled:{reservation_id}"),
        ]
        args: list[str | int] = [
            self._now(),
            repr(_WINDOW),
            limits.requests_per_minute or 0,
            limits.tokens_per_minute or 0,
            limits.max_concurrent or 0,
            tokens,
            _usd(cost),
            *_budgets(limits),
            reservation_id,
            repr(self._lease),
            "1" if dry else "0",
        ]
        verdict, detail = await self._admit(keys=keys, args=args)
        return str(verdict), str(detail)

    async def _extend(self, tenant: str, reservation_id: str, periods: tuple[str, str], cost: Decimal) -> None:
        # Checked against the budgets as they stand now (a reload may have changed them; one that
        # took every limit away leaves nothing to check or reserve: the settle still releases what
        # the reservation holds), counted in the periods the request was admitted in, where its
        # settle releases it. A reply lost after the script ran needs no undo: the extension is
        # recorded under the reservation's id, so the settle releases it with the rest. Tried once
        # more on a new connection if Redis closed the one it was sent on, under its own id, which
        # the script holds once.
        limits = self._tenants.get(tenant)
        if limits is None:
            return
        now = self._clock()
        keys = [*self._usd_keys(tenant, periods), self._key(tenant, f"extensions:{reservation_id}")]
        args = [reservation_id, _usd(cost), *_budgets(limits), self._marked_for, uuid.uuid4().hex]
        async with self._in_time(tenant):
            try:
                verdict, detail = await self._once_more_if_closed(lambda: self._extend_script(keys=keys, args=args))
            except (RedisError, OSError) as exc:
                raise _store_failed(exc) from exc
        if verdict != "OK":
            raise self._refusal(tenant, limits, str(verdict), str(detail), now)

    def _refusal(self, tenant: str, limits: TenantConfig, verdict: str, detail: str, now: float) -> LimitExceeded:
        """The error for a refusing verdict of the admit or the extend script."""
        day, month = _periods(now)
        who = f"tenant {quoted_id(tenant)}"
        if verdict == "BUDGET_EXCEEDED":
            name, _, held = detail.partition(":")
            period = day if name == "day" else month
            return budget_exceeded(tenant, limits, period, now, held_in_flight=held == "reserved")
        messages = {
            "RATE_LIMITED": f"{who} is over its {limits.requests_per_minute} requests per minute",
            "TOKEN_RATE_LIMITED": f"{who} is over its {limits.tokens_per_minute} tokens per minute",
            "CONCURRENCY_LIMITED": f"{who} already has {limits.max_concurrent} requests in flight",
        }
        return LimitExceeded(messages[verdict], reason=verdict, retry_after=_retry_after(detail))

    async def _once_more_if_closed(self, command: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``command`` (safe to run twice), and once more on a new connection if Redis closed
        the one it was sent on (as one left from before a restart), the idle ones closed first."""
        try:
            return await command()
        except (RedisError, OSError) as exc:
            if not _connection_lost(exc):
                raise
        await self._drop_idle_connections()
        return await command()

    async def _drop_idle_connections(self) -> None:
        """Close the connections waiting in the pool: one was found closed by Redis (which
        restarted, or whose connection a proxy dropped), so the others most likely are too, and
        the next command connects anew. Raises nothing, at once (``_Pool.drop_idle``)."""
        await self._redis.connection_pool.drop_idle()

    async def _settle(
        self,
        tenant: str,
        reservation_id: str,
        periods: tuple[str, str],
        lease_ends: float,
        tokens: int,
        cost: Decimal,
        wait_at_most: float | None,
        *,
        marked: bool = False,
    ) -> bool:
        keys = [
            self._key(tenant, "tokn"),
            self._key(tenant, "inflight"),
            self._key(tenant, f"settled:{reservation_id}"),
            *self._usd_keys(tenant, periods),
            self._key(tenant, "tokused"),
            self._key(tenant, f"extensions:{reservation_id}"),
        ]
        args: list[str | int] = [reservation_id, tokens, _usd(cost), self._marked_for]
        # A settle runs once (``SettleOnce``): a request's cleanup cancelled again while it runs
        # (a drain's cancel, then grpc's) must not lose it, which would hold the tenant's
        # in-flight slot and reserved USD until the lease ends. Its own task runs it to the end.
        # Waited for ``wait_at_most`` seconds at most (a realtime request's end: its status must
        # not wait long, yet the client's next call, on another replica too, should find it
        # settled), it runs on past them; it is in ``_settling`` until it ends: this process's next
        # admission, check or ``spent`` of the tenant waits for it, so that what it frees and
        # counts is seen in order, as when it was waited for. A crash of ours it ends in is logged
        # (``_settled``), not raised, once not waited for in full.
        mark = "1" if marked else "0"
        task = asyncio.get_running_loop().create_task(self._run_settle(tenant, keys, args, mark, lease_ends))
        keep_until_done(task, self._undoing)
        settling = self._settling.setdefault(tenant, set())
        settling.add(task)
        task.add_done_callback(functools.partial(self._settled, tenant))
        if wait_at_most is None:
            return (await asyncio.shield(task)).counted
        if wait_at_most > 0:
            await asyncio.wait({task}, timeout=wait_at_most)  # cancelled or not, the task runs on
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result().counted
        return True

    def _settled(self, tenant: str, task: asyncio.Task[_Settled]) -> None:
        settling = self._settling.get(tenant)
        if settling is not None:
            settling.discard(task)
            if not settling:
                del self._settling[tenant]
        # A store's failure is logged and resent by ``_run_settle``; anything else is a fault of
        # ours, which a settle not waited for (a realtime call already answered) would leave to
        # asyncio's "exception was never retrieved" at collection: the operator is told now.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("admission_settle_crashed", tenant=tenant, error_type=type(exc).__name__, exc_info=exc)

    @contextlib.asynccontextmanager
    async def _in_time(self, tenant: str) -> AsyncIterator[None]:
        """Wait until the settles of ``tenant`` on their way from this process have ended, then run
        the block, whose commands keep their own timeouts: a slow Redis takes the settle's round
        trips, then the block's, each within its second (both under one second, a Redis
        answering in 0.7 s had every second call of a tenant refused; a settle sent once more on a
        new connection, its connect, greeting and script each within its second, took two, and
        the next call was refused though Redis answered them all). A settle the store failed (a
        command or connect timed out, its connection refused or lost again; left to the retry
        loop) is a Redis failing now: ``SharedStateUnavailable`` is raised at once, naming its
        error, nothing sent (the block sent after it took a second more, and a Redis not
        answering refused the tenant's next call after 2 s, past a 1.5 s deadline). The wait is
        bounded by the settle task's own limit, ``_SETTLE_SECONDS`` from its send, its waits for
        a pool connection included (bounded only by each step's second, a settle waiting for the
        pool twice behind other tenants' commands, or retried on a slow Redis, made the next
        call wait 2.7 s and end DEADLINE_EXCEEDED under a 2.3 s deadline, not UNAVAILABLE); a
        Redis that stops answering with a connection free fails it within about 1 s."""
        settling = self._settling.get(tenant)
        if settling:
            waited = set(settling)
            await asyncio.wait(waited)
            for task in waited:
                if not task.cancelled() and task.exception() is None and task.result().failed:
                    raise _store_failed(task.result().failed)
        yield

    async def _run_settle(
        self, tenant: str, keys: list[str], args: list[str | int], mark: str, lease_ends: float
    ) -> _Settled:
        try:
            # Both tries within one limit, pool waits included (the tenant's next call waits for
            # this task); a limit's ``TimeoutError`` is an ``OSError``, left to the loop below.
            async with asyncio.timeout(_SETTLE_SECONDS):
                try:
                    await self._settle_script(keys=keys, args=[*args, "0", mark])
                except (RedisError, OSError) as first:
                    if not _connection_lost(first):
                        raise
                    # Redis closed the pooled connection (a restart, a failover, a proxy's reset):
                    # sent once more at once on a new one, as a retry (the first try may have run
                    # and lost its reply), so that the tenant's next admission, which waits for
                    # this task, sees it settled; left to the loop only when that fails too.
                    await self._drop_idle_connections()
                    await self._settle_script(keys=keys, args=[*args, "1", mark])
        except (RedisError, OSError) as exc:
            # The request is already answered: a store that fails now must not turn it into an
            # error. The settle is sent again in the background (see the module's docstring),
            # and counts as counted (``Reservation.counted``) unless it could not wait: a batch
            # job's end then corrects the estimate the retry counts.
            log.warning("admission_settle_failed", tenant=tenant, error_type=_error_type(exc))
            retry = _Resend("settle", tenant, self._settle_script, keys, [*args, "1", mark], lease_ends)
            return _Settled(self._resend_later(retry), failed=_error_type(exc))
        return _Settled(True)

    def _undo(self, tenant: str, reservation_id: str, periods: tuple[str, str], lease_ends: float) -> None:
        keys = [
            *self._window_keys(tenant),
            *self._usd_keys(tenant, periods)[2:],
            self._key(tenant, f"undone:{reservation_id}"),
        ]
        self._resend_later(
            _Resend("undo", tenant, self._undo_script, keys, [reservation_id, self._marked_for], lease_ends)
        )

    def _resend_later(self, resend: _Resend) -> bool:
        """Leave ``resend`` to the retry loop (started if it is not running); False when too many
        wait already and it is dropped. A settle or a charge is never dropped for an undo: when
        too many wait, it takes the oldest undo's place (an undo is most often of an admission
        that never ran; a lost settle holds its slot and USD for the lease, and loses its cost).
        Drops are logged once until one is taken again without a drop."""
        if len(self._resends) >= _RETRY_MAX_PENDING:
            undos = (index for index, waiting in enumerate(self._resends) if waiting.operation == "undo")
            oldest_undo = None if resend.operation == "undo" else next(undos, None)
            if not self._dropping:
                dropped = resend if oldest_undo is None else self._resends[oldest_undo]
                log.warning("admission_retries_dropped", operation=dropped.operation, waiting=len(self._resends))
            self._dropping = True
            if oldest_undo is None:
                return False
            del self._resends[oldest_undo]
        else:
            self._dropping = False
        self._resends.append(resend)
        if self._retrying is None or self._retrying.done():
            # A context of its own: the loop outlives the request that starts it, and is not its
            # work (its logs carry none of that request's fields).
            self._retrying = self._in_background(self._retry(), context=contextvars.Context())
        return True

    async def _retry(self) -> None:
        """Send the settles, charges and undos that wait (``_resends``) until none is left, in the
        order they failed (a batch job's correction after the settle it corrects: both add to
        what was spent, so they net out in either order, but a loop cut short by ``aclose`` then
        leaves the estimate counted, not given back uncounted): after a jittered delay that
        doubles while Redis fails, in batches of one round trip each, dropping those whose lease
        has ended (their reservations are released by it); once more at once when ``aclose``
        starts, and no more after that."""
        loop = asyncio.get_running_loop()
        delay = _RETRY_FIRST_SECONDS
        while self._resends:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(random.uniform(delay / 2, delay)):  # noqa: S311 - jitter, not cryptography
                    await self._closing.wait()
            now = loop.time()
            if expired := [resend for resend in self._resends if resend.until <= now]:
                log.warning("admission_retries_expired", count=len(expired))
                self._resends = [resend for resend in self._resends if resend.until > now]
            try:
                while batch := self._resends[:_RETRY_BATCH]:
                    async with self._redis.pipeline(transaction=False) as pipeline:
                        for resend in batch:
                            await resend.script(keys=resend.keys, args=resend.args, client=pipeline)
                        await pipeline.execute()
                    # By identity, not position: while the batch was on its way an undo in it may
                    # have made way for a settle (``_resend_later``), shifting the list.
                    sent = {id(resend) for resend in batch}
                    self._resends = [resend for resend in self._resends if id(resend) not in sent]
                    log.info("admission_retries_sent", count=len(batch))
            except (RedisError, OSError) as exc:
                if self._closing.is_set():
                    log.warning("admission_retries_abandoned", count=len(self._resends), error_type=_error_type(exc))
                    self._resends.clear()
                    return
                delay = min(2 * delay, _RETRY_MAX_SECONDS)
            else:
                delay = _RETRY_FIRST_SECONDS

    def _in_background(
        self, work: Coroutine[None, None, object], context: contextvars.Context | None = None
    ) -> asyncio.Task[object]:
        task = asyncio.get_running_loop().create_task(work, context=context)
        keep_until_done(task, self._undoing)
        return task

    def charge(self, tenant: str, cost: Decimal, *, at: float | None = None) -> None:
        """Add ``cost`` (negative: given back) to a limited ``tenant``'s spend in Redis in the
        periods of ``at``, in the background (called where the money was spent, which may be a
        cancelled request's cleanup); a failure is logged, and the charge sent again (as a settle
        is, for a lease, counted once however many tries reach Redis)."""
        if tenant not in self._tenants or cost == 0:
            return
        day, month = _periods(self._clock() if at is None else at)
        keys = [
            self._key(tenant, f"spent:{day}"),
            self._key(tenant, f"spent:{month}"),
            self._key(tenant, f"charged:{uuid.uuid4().hex}"),
        ]
        until = asyncio.get_running_loop().time() + self._charge_marked_for
        args: list[str | int] = [_usd(cost), self._charge_marked_for]
        self._in_background(self._charge(_Resend("charge", tenant, self._charge_script, keys, args, until)))

    async def _charge(self, charge: _Resend) -> None:
        try:
            await charge.script(keys=charge.keys, args=charge.args)
        except (RedisError, OSError) as exc:
            log.warning("admission_charge_failed", tenant=charge.tenant, error_type=_error_type(exc))
            self._resend_later(charge)

    async def exhausted(self, tenant: str, cost: Decimal = Decimal(0)) -> str:
        """Why ``tenant`` may not spend anything more now (a budget spent or reserved in full across
        replicas; ``cost`` more, when given: one read, nothing reserved), or ""; when the store
        cannot say, it may not (the caller decides without paying)."""
        limits = self._tenants.get(tenant)
        if limits is None or (limits.daily_budget_usd is None and limits.monthly_budget_usd is None):
            return ""
        periods = _periods(self._clock())
        keys = [self._key(tenant, f"{kind}:{period}") for period in periods for kind in ("spent", "reserved")]
        try:
            async with self._in_time(tenant):
                try:
                    values = await self._once_more_if_closed(lambda: self._redis.mget(keys))
                except (RedisError, OSError) as exc:
                    raise _store_failed(exc) from exc
        except SharedStateUnavailable as exc:
            # The store's error, also when it failed a settle this waited for (no ``__cause__``).
            return f"the shared state store failed ({exc.store_error})"
        amounts = [Decimal(value) if value else Decimal(0) for value in values]
        return exhausted_budget(tenant, limits, periods, [amounts[0] + amounts[1], amounts[2] + amounts[3]], cost)

    async def spent(self, tenant: str) -> Decimal:
        """What ``tenant`` has spent today (UTC), across replicas."""
        day, _ = _periods(self._clock())
        async with self._in_time(tenant):
            value = await self._once_more_if_closed(lambda: self._redis.get(self._key(tenant, f"spent:{day}")))
        return Decimal(value or 0).quantize(_PLACES).normalize() if value else Decimal(0)

    async def aclose(self) -> None:
        """Finish settling, and sending the settles and undos that wait (once more, at once), for
        at most ``_CLOSE_SECONDS``, cancel what is left, then close the connection pool."""
        self._closing.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CLOSE_SECONDS
        # A loop: a settle that fails now is left to the retry loop (which sends it at once).
        while self._undoing and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._undoing), timeout=left)
        left_over = set(self._undoing)
        for task in left_over:
            task.cancel()
        await asyncio.gather(*left_over, return_exceptions=True)
        await self._redis.aclose()
