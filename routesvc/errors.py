"""The one error tree of routesvc.

Every error raised on purpose is a ``RouteSvcError``; the gRPC layer maps each class to one
status code (``routesvc.service.STATUS_TABLE``) and a stable ``ErrorInfo`` reason. Messages
name fields and models, never prompt text or credentials.

    RouteSvcError
    ├── ConfigError                     bad configuration file or value (raised at start)
    ├── InvalidRequest                  malformed request: names the field       INVALID_ARGUMENT
    ├── ModelNotFound                   unknown model id                         NOT_FOUND
    ├── BatchNotFound                   unknown batch job, or another tenant's   NOT_FOUND
    ├── RequestTooLarge                 over a configured size limit             RESOURCE_EXHAUSTED
    ├── NoEligibleModel                 no catalog model can serve the request   FAILED_PRECONDITION
    │   └── ContextWindowExceeded       ... because the input is too long        RESOURCE_EXHAUSTED
    ├── CostLimitExceeded               estimate over the request's max cost     RESOURCE_EXHAUSTED
    ├── Unauthenticated                 missing or unknown API key               UNAUTHENTICATED
    ├── PermissionDenied                tenant may not use this model / tenant   PERMISSION_DENIED
    ├── LimitExceeded                   tenant rate limit or budget (retry_after) RESOURCE_EXHAUSTED
    │   └── Overloaded                  the process is at its concurrency cap    RESOURCE_EXHAUSTED
    ├── ProviderNotConfigured           the provider has no credentials          FAILED_PRECONDITION
    ├── FeedbackNotEnabled              no embedding stage keeps feedback        FAILED_PRECONDITION
    ├── FeedbackStoreUnavailable        feedback_db cannot be written (read-only) FAILED_PRECONDITION
    │   ├── FeedbackStoreBusy           locked past the busy timeout (retry_after) UNAVAILABLE
    │   ├── FeedbackStoreFull           its disk is full                         RESOURCE_EXHAUSTED
    │   └── FeedbackStoreDiskError      a disk I/O error                         UNAVAILABLE
    ├── ShuttingDown                    the server is stopping                   UNAVAILABLE
    ├── SharedStateUnavailable          the shared limits store (Redis) failed   UNAVAILABLE
    ├── BatchStoreUnavailable           batch.store_path cannot be opened/written FAILED_PRECONDITION
    │   ├── BatchStoreBusy              locked past the busy timeout (retry_after) UNAVAILABLE
    │   └── BatchStoreFull              its request cap or disk is full (retry_after) RESOURCE_EXHAUSTED
    ├── DeadlineExceeded                the caller's deadline passed             DEADLINE_EXCEEDED
    │   └── ClientStalled               the caller stopped reading a stream      DEADLINE_EXCEEDED
    └── ProviderError                   a provider call failed
        ├── ProviderAuthFailed          401/403 from the provider                FAILED_PRECONDITION
        ├── ProviderRejected            400/404/409/413/422 from the provider    FAILED_PRECONDITION
        ├── ProviderRateLimited         429 (retry_after)                        RESOURCE_EXHAUSTED
        ├── ProviderQuotaExhausted      the key's credit or quota is spent       FAILED_PRECONDITION
        ├── ProviderUnavailable         5xx, 408, connection, timeout (retry_after) UNAVAILABLE
        │   ├── ProviderTimedOut        the call's own deadline passed           (the router: DEADLINE_EXCEEDED)
        │   └── ProviderStalled         no chunk within the router's stream timers UNAVAILABLE
        └── StreamInterrupted           failed after content was sent            UNAVAILABLE
"""

from __future__ import annotations

QUOTED_ID_CHARS = 64
"""The most characters of a caller-given id that an error message quotes (``quoted_id``)."""


def quoted_id(value: str) -> str:
    """A caller-given id (a model, decision or batch id, a tenant) as an error message quotes it:
    the ``repr`` of its first ``QUOTED_ID_CHARS`` characters, with "..." after it when cut.

    The message travels twice in the status trailers (``grpc-message``, percent-encoded, and the
    ``google.rpc.Status`` of ``grpc-status-details-bin``), and grpc clients refuse trailers over
    8 KiB by default, at random up to 16 KiB and always past it: an id of the 1024 characters
    validation allows, quoted whole, made NOT_FOUND a RESOURCE_EXHAUSTED without ``ErrorInfo``.
    """
    if len(value) <= QUOTED_ID_CHARS:
        return repr(value)
    return f"{value[:QUOTED_ID_CHARS]!r}..."


class RouteSvcError(Exception):
    """Root of every error routesvc raises on purpose.

    ``retry_after`` (seconds) is set when the caller should wait before trying again, and
    ``chunks_sent`` when the call failed after that many content chunks reached the client.
    ``operator_must_act`` marks a failure only the service's operator can end (a provider key
    refused, an account unpaid, a store that cannot be written) although its status is not a
    server error: it is logged at warning and marks the server span as an error, so it can be
    alerted on like UNAVAILABLE and INTERNAL.
    """

    reason = "INTERNAL"
    retry_after: float | None = None
    chunks_sent: int = 0
    operator_must_act = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(RouteSvcError):
    """The configuration file or a configured value is invalid."""

    reason = "INVALID_CONFIG"

    @classmethod
    def port_in_use(cls, field: str, host: str, port: int) -> ConfigError:
        """The error for a port ``field`` names that cannot be listened on."""
        return cls(f"{field}: cannot listen on {host}:{port} (the port is in use, or the host is not this machine's)")


class InvalidRequest(RouteSvcError):
    """The request is malformed; ``field`` names the offending field path."""

    reason = "INVALID_REQUEST"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class ModelNotFound(RouteSvcError):
    """A model id is not in the catalog."""

    reason = "MODEL_NOT_FOUND"


class BatchNotFound(RouteSvcError):
    """No batch job with this id belongs to the caller's tenant (unknown ids look the same)."""

    reason = "BATCH_NOT_FOUND"


class RequestTooLarge(RouteSvcError):
    """The request exceeds a configured size limit."""

    reason = "REQUEST_TOO_LARGE"


class NoEligibleModel(RouteSvcError):
    """No catalog model can serve the request (tools, credentials, cost)."""

    reason = "NO_ELIGIBLE_MODEL"


class ContextWindowExceeded(NoEligibleModel):
    """The input plus requested output fits no model's context window."""

    reason = "CONTEXT_WINDOW_EXCEEDED"


class CostLimitExceeded(RouteSvcError):
    """The estimated cost exceeds the request's ``max_cost_usd``."""

    reason = "COST_LIMIT_EXCEEDED"


class Unauthenticated(RouteSvcError):
    """The call carries no API key, or one that no tenant has."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(RouteSvcError):
    """The authenticated tenant may not do this (a model outside its allow-list, another tenant)."""

    reason = "PERMISSION_DENIED"


class LimitExceeded(RouteSvcError):
    """A tenant limit or budget is reached; ``retry_after`` in seconds when known.

    ``reason`` is one of RATE_LIMITED, TOKEN_RATE_LIMITED, CONCURRENCY_LIMITED, BUDGET_EXCEEDED.
    ``held_in_flight``: a budget refused only for what requests in flight have reserved (what was
    spent leaves room for the request), so a short wait may admit it.
    """

    def __init__(
        self, message: str, *, reason: str, retry_after: float | None = None, held_in_flight: bool = False
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
        self.held_in_flight = held_in_flight


class Overloaded(LimitExceeded):
    """The process already serves its maximum of concurrent RPCs; the call is shed."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, reason="OVERLOADED", retry_after=retry_after)


class FeedbackNotEnabled(RouteSvcError):
    """Feedback arrived but no routing stage keeps it (no embedding stage with a feedback_db)."""

    reason = "FEEDBACK_NOT_ENABLED"


class FeedbackStoreUnavailable(RouteSvcError):
    """The feedback store (an embedding stage's ``feedback_db``) cannot be written (a read-only
    file, a damaged one), so the outcome was not stored: an operator must fix the file first.
    Routing goes on."""

    reason = "FEEDBACK_STORE_UNAVAILABLE"


class FeedbackStoreBusy(FeedbackStoreUnavailable):
    """The feedback store stayed locked by another process (another worker, an operator's
    ``sqlite3`` shell, a backup) past SQLite's busy timeout, so the outcome was not stored: a
    passing condition; retry shortly."""

    reason = "FEEDBACK_STORE_BUSY"
    retry_after = 1.0


class FeedbackStoreFull(FeedbackStoreUnavailable):
    """The feedback store's disk is full (SQLITE_FULL), so the outcome was not stored: retry once
    space is freed."""

    reason = "FEEDBACK_STORE_FULL"


class FeedbackStoreDiskError(FeedbackStoreUnavailable):
    """The feedback store's disk failed to read or write (SQLITE_IOERR: a network volume that went
    away, a failing disk), so the outcome was not stored: it may pass; retry with backoff."""

    reason = "FEEDBACK_STORE_DISK_ERROR"


class ProviderNotConfigured(RouteSvcError):
    """The chosen model's provider has no credentials; names the missing variable."""

    reason = "PROVIDER_NOT_CONFIGURED"
    operator_must_act = True


class ShuttingDown(RouteSvcError):
    """The server stopped this call at the end of its shutdown grace period.

    ``chunks_sent`` content chunks had reached the client (0: none, the call may be retried).
    """

    reason = "SHUTTING_DOWN"

    def __init__(self, message: str, *, chunks_sent: int = 0) -> None:
        super().__init__(message)
        self.chunks_sent = chunks_sent
        self.retry_after = 1.0


class SharedStateUnavailable(RouteSvcError):
    """The store that tenant limits are counted in (``shared_state.redis_url``) could not be
    reached, so the request could not be admitted; retry shortly. ``store_error``: the type of
    the store's error (as ``TimeoutError``), also when it came from an earlier command (a settle
    the store failed), or ""."""

    reason = "SHARED_STATE_UNAVAILABLE"
    retry_after = 1.0

    def __init__(self, message: str, *, store_error: str = "") -> None:
        super().__init__(message)
        self.store_error = store_error


class BatchStoreUnavailable(RouteSvcError):
    """The batch job store (``batch.store_path``) cannot be opened or written, so no batch job can
    be queued or read; realtime requests are not affected."""

    reason = "BATCH_STORE_UNAVAILABLE"
    operator_must_act = True


class BatchStoreBusy(BatchStoreUnavailable):
    """The batch job store stayed locked by another writer (another worker) past SQLite's busy
    timeout: a passing condition; retry shortly."""

    reason = "BATCH_STORE_BUSY"
    retry_after = 1.0


class BatchStoreFull(BatchStoreUnavailable):
    """The batch job store holds ``batch.max_stored_request_bytes`` of requests no provider has
    taken yet (a provider down, a quota spent), or its disk is full: no new job is queued until
    queued ones are sent; realtime requests are not affected."""

    reason = "BATCH_STORE_FULL"
    operator_must_act = False
    retry_after = 30.0


class DeadlineExceeded(RouteSvcError):
    """The caller's deadline passed before the call finished; ``chunks_sent`` content chunks
    had reached the client."""

    reason = "DEADLINE_EXCEEDED"

    def __init__(self, message: str, *, chunks_sent: int = 0) -> None:
        super().__init__(message)
        self.chunks_sent = chunks_sent


class ClientStalled(DeadlineExceeded):
    """The caller stopped reading a stream: one message's write waited longer than
    ``reliability.client_write_timeout_seconds`` (HTTP/2 flow control held it), so the server
    ended the call rather than hold its slot, upstream request and reservation for as long as the
    caller does not read. ``chunks_sent`` content chunks had been handed to the transport."""

    reason = "CLIENT_STALLED"

    def __init__(self, message: str, *, write_timeout: float, chunks_sent: int = 0) -> None:
        super().__init__(message, chunks_sent=chunks_sent)
        self.write_timeout = write_timeout


class ProviderError(RouteSvcError):
    """A provider call failed. ``provider`` and ``model`` say where; never the prompt."""

    reason = "PROVIDER_ERROR"

    def __init__(self, message: str, *, provider: str, model: str, status: int | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.model = model
        self.status = status


class ProviderAuthFailed(ProviderError):
    """The provider refused our credentials (HTTP 401 or 403)."""

    reason = "PROVIDER_AUTH_FAILED"
    operator_must_act = True


class ProviderRejected(ProviderError):
    """The provider refused the request itself: any HTTP 4xx but 401/403 (auth), 402 (quota), 408,
    425, 429 and 499 (transient): 400, 404, 405, 409, 413, 415, 422, 451 ..."""

    reason = "PROVIDER_REJECTED"


class ProviderRateLimited(ProviderError):
    """The provider rate-limited us (HTTP 429); ``retry_after`` in seconds when it said."""

    reason = "PROVIDER_RATE_LIMITED"

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        model: str,
        status: int | None = 429,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, provider=provider, model=model, status=status)
        self.retry_after = retry_after


class ProviderQuotaExhausted(ProviderError):
    """The provider says our account's credit or quota is spent (OpenAI's 429
    ``insufficient_quota``, Anthropic's ``billing_error``): no wait helps until someone pays, so
    it is not retried on the provider's models, carries no ``retry_after``, opens no breaker, and
    the request may fall back to another provider's model."""

    reason = "PROVIDER_QUOTA_EXHAUSTED"
    operator_must_act = True


def counts_against_model(error: ProviderError, answered: bool) -> bool:
    """Whether a call that failed with ``error`` (after some output when ``answered``) is a
    failure of its model, for the model's circuit breaker: not when the provider refused this
    request before any output (400/404/409/413/422: the caller's doing, so one tenant's bad
    requests open no breaker for all), nor when the key's quota is spent (the key's, not the
    model's)."""
    return answered or not isinstance(error, ProviderRejected | ProviderQuotaExhausted)


class ProviderUnavailable(ProviderError):
    """The provider failed or could not be reached (5xx, 408, connection, timeout);
    ``retry_after`` in seconds when it said how long to wait (a 503's or a 529's Retry-After)."""

    reason = "PROVIDER_UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        model: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, provider=provider, model=model, status=status)
        self.retry_after = retry_after


class ProviderTimedOut(ProviderUnavailable):
    """The call's deadline (``ProviderCall.timeout``) passed while the provider was working.

    The router gives a provider call what is left of the caller's deadline, so there this means
    the request ran out of time, not that the model failed: the router answers DEADLINE_EXCEEDED
    and counts it against neither the model's breaker nor the retry budget.
    """


class ProviderStalled(ProviderUnavailable):
    """The provider took the call and sent nothing, or nothing more, within the router's
    ``first_token_timeout_seconds`` or ``stream_idle_timeout_seconds``: the router gave up on it.

    Like ``ProviderTimedOut``, the call was ended from our side after the provider had it, so it
    is charged an estimate of its input (and of what it sent), not nothing.
    """


class StreamInterrupted(ProviderError):
    """The provider failed after ``chunks_sent`` content chunks reached the client."""

    reason = "STREAM_INTERRUPTED"

    def __init__(self, message: str, *, provider: str, model: str, chunks_sent: int) -> None:
        super().__init__(message, provider=provider, model=model)
        self.chunks_sent = chunks_sent
