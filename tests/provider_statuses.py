"""The HTTP statuses every provider adapter maps alike: each status to the one error class it
becomes (both SDK formats read them through the same table, routesvc.providers._http)."""

from __future__ import annotations

from routesvc.errors import (
    ProviderAuthFailed,
    ProviderQuotaExhausted,
    ProviderRateLimited,
    ProviderRejected,
    ProviderUnavailable,
)

STATUS_ERRORS = [
    (400, ProviderRejected),
    (401, ProviderAuthFailed),
    (403, ProviderAuthFailed),
    (404, ProviderRejected),
    (408, ProviderUnavailable),
    (409, ProviderRejected),
    (413, ProviderRejected),
    (422, ProviderRejected),
    # Any other 4xx is the request refused too, final (they were unavailable: retried, fallen back
    # and counted against the breaker).
    (405, ProviderRejected),
    (410, ProviderRejected),
    (415, ProviderRejected),
    (418, ProviderRejected),
    (451, ProviderRejected),
    (425, ProviderUnavailable),  # Too Early (RFC 8470): retry
    (499, ProviderUnavailable),  # Google's APIs: an operation cancelled under load
    (429, ProviderRateLimited),
    (402, ProviderQuotaExhausted),  # a gateway's "insufficient credits" (OpenRouter)
    (500, ProviderUnavailable),
    (502, ProviderUnavailable),
    (503, ProviderUnavailable),
    (504, ProviderUnavailable),
    (529, ProviderUnavailable),
    (300, ProviderUnavailable),  # a 3xx not followed (no Location): its status, not an in-band error
]
