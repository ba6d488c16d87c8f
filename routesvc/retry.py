"""When to try again: which errors are retryable, backoff, and a retry budget.

One retry loop per request lives in ``router.py``; this module holds its rules. Retries and
fallbacks happen only before the first content chunk was sent (the commit rule), never start
when too little of the caller's deadline is left, and stop when the process-wide retry budget
is spent, so a total outage does not multiply upstream load.
"""

from __future__ import annotations

import random

from routesvc.config import ReliabilityConfig
from routesvc.errors import ProviderError, ProviderQuotaExhausted, ProviderRateLimited, ProviderUnavailable


def is_retryable(error: ProviderError) -> bool:
    """5xx, 408, 429, connection failures and timeouts may be retried; other 4xx never."""
    return isinstance(error, ProviderUnavailable | ProviderRateLimited)


def skips_provider(error: ProviderError) -> bool:
    """Whether ``error`` rules out every model of its provider for the rest of the request, but not
    another provider's fallback: the key's quota is spent (no retry, no wait, no breaker helps)."""
    return isinstance(error, ProviderQuotaExhausted)


def backoff_delay(config: ReliabilityConfig, retry_number: int, retry_after: float | None) -> float:
    """Seconds to wait before retry ``retry_number`` (1-based) on the same model.

    Exponential backoff with full jitter, capped at ``max_backoff_seconds``; a provider's wait
    (``retry_after``: its Retry-After, a 429's rate-limit reset) is honoured when it is longer.
    A shorter one (``Retry-After: 0`` from an overloaded provider) is no reason to skip the
    jitter: the calls it refused at once would all come back at once.
    """
    ceiling = min(config.max_backoff_seconds, config.backoff_seconds * (2 ** (retry_number - 1)))
    jittered = random.uniform(0, ceiling)  # noqa: S311 - jitter, not cryptography
    return jittered if retry_after is None else max(retry_after, jittered)


class RetryBudget:
    """gRPC-style retry throttling shared by all requests of the process.

    Each failed attempt takes a token, each success gives back ``ratio``; retries (and
    fallbacks) are allowed only while more than half the bucket is left.
    """

    def __init__(self, tokens: float, ratio: float) -> None:
        self._max = tokens
        self._tokens = tokens
        self._ratio = ratio

    @property
    def tokens(self) -> float:
        """Tokens left."""
        return self._tokens

    def can_retry(self) -> bool:
        """Whether another attempt may follow a failure."""
        return self._tokens > self._max / 2

    def record_failure(self) -> None:
        """An attempt failed."""
        self._tokens = max(0.0, self._tokens - 1)

    def record_success(self) -> None:
        """An attempt succeeded."""
        self._tokens = min(self._max, self._tokens + self._ratio)
