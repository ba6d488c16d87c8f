"""What both adapters share at the HTTP edge: status -> error class, ``Retry-After``, safe codes.

Provider error bodies may echo the prompt, so nothing from a body is copied into a message
except a short machine code (``rate_limit_error``, ``server_error``) that passes ``safe_code``.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import json
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
import anyio
import httpx2
import structlog

from routesvc.cost import billed_input_of_chat
from routesvc.errors import (
    ProviderAuthFailed,
    ProviderError,
    ProviderQuotaExhausted,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimedOut,
    ProviderUnavailable,
)
from routesvc.models import ProviderKind
from routesvc.providers._event_size import UnreadableStream
from routesvc.providers.base import ProviderCall

_T = TypeVar("_T")

_log = structlog.get_logger("routesvc.providers")

# Once an answer is whole (OpenAI: its finish and usage; Anthropic: ``message_stop``), what is left
# of the body is read for this long, so the connection is reused, and never past the call's
# deadline less ``DEADLINE_MARGIN_SECONDS``: the whole answer must not reach the caller too late.
DRAIN_SECONDS = 0.1
DEADLINE_MARGIN_SECONDS = 0.05
# Within that margin, what has come already (the event written with the last one) is still read,
# for at most this long (and at most half the time left).
BUFFERED_READ_SECONDS = 0.01

# Machine codes are short words; anything longer (or shaped like a key) is not copied.
_SAFE_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,40}")
_KEY_PREFIX = "sk-"
# A model id as providers and OpenAI-compatible servers name them: ``gpt-4o-mini-2024-07-18``,
# ``meta-llama/Llama-3.1-8B-Instruct``, ``llama3.1:8b``, ``@cf/meta/llama-3-8b-instruct``,
# ``anthropic.claude-3-5-sonnet-20240620-v1:0``; no spaces, at most 128 characters.
_MODEL_ID = re.compile(r"[A-Za-z0-9_.:/@\-]{1,128}")
_MODEL_ID_SEPARATORS = re.compile(r"[:/@]")
# What of a reported model name counts as an echo (``safe_model``): a run of this many of its
# characters found in a message, a whole message of this many found in it, a run of this many
# found in the key.
_ECHO_PIECE = 12
_ECHO_MESSAGE = 8
_KEY_PIECE = 8
# An HTTP status as a code (vLLM's 400, LiteLLM's "429"): three digits say nothing of a prompt or a
# key, and a prompt with a number in it ("1400") must not turn the status into no code at all.
_STATUS_CODE = re.compile(r"[0-9]{1,3}")

# Error codes that say the account's credit or quota is spent: OpenAI's 429 ``insufficient_quota``
# (code and type), Anthropic's ``billing_error`` (and any HTTP 402: ``error_for_status``).
_QUOTA_CODES = frozenset({"insufficient_quota", "billing_error"})
# Rate limits as error codes and types: OpenAI's ``rate_limit_exceeded``, Anthropic's
# ``rate_limit_error``, vLLM's exception class (``error_for_event`` reads any with ``rate_limit``).
_RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded", "rate_limit_error", "ratelimiterror"})
# In-band error events that say the server is at fault, for now: Anthropic's types, OpenAI's code
# (``error_for_event`` reads them as it reads any code it does not know: unavailable).
_UNAVAILABLE_EVENT_TYPES = frozenset({"overloaded_error", "api_error", "timeout_error", "server_error"})
# In-band error events that say the request, not the server, is at fault, or the key.
_REJECTED_EVENT_TYPES = frozenset(
    {
        "invalid_request_error",
        "not_found_error",
        "request_too_large",
        "context_length_exceeded",
        "badrequesterror",
        "notfounderror",
        "unprocessableentityerror",
    }
)
_AUTH_EVENT_TYPES = frozenset(
    {"authentication_error", "permission_error", "invalid_api_key", "authenticationerror", "permissiondeniederror"}
)
# The codes ``safe_code`` always keeps, lower case: every error code and type read here, and the
# finish reasons the adapters map (added where they are mapped: ``known_codes``).
_KNOWN_CODES: set[str] = set(
    _QUOTA_CODES | _RATE_LIMIT_CODES | _UNAVAILABLE_EVENT_TYPES | _REJECTED_EVENT_TYPES | _AUTH_EVENT_TYPES
)

_AUTH = frozenset({401, 403})
# The 4xx that say "not now" rather than "not this request": a request timeout, 425 Too Early
# (RFC 8470: retry), a rate limit, and 499, which Google's APIs (Gemini, its OpenAI-compatible
# endpoint too) answer for an operation cancelled under load and a retry passes (our own closed
# connection never gets an answer). Every other 4xx (400, 404, 405, 409, 410, 413, 415, 422,
# 451 ...) is the provider refusing the request: final, not retried, not counted against the
# model's breaker.
_TRANSIENT_4XX = frozenset({408, 425, 429, 499})


_DEFAULT_PORTS = {"http": 80, "https": 443}


def server_url(url: httpx2.URL) -> str:
    """An SDK's resolved base URL as one string for each server and path: scheme and host in lower
    case, no default port, no trailing slashes, no credentials (a changed password is the same
    server). The SDKs keep a URL as written (a host-only ``http://h:8080/`` keeps its slash,
    ``http://h:8080`` has none), so ``http://H:80/v1/`` and ``http://h/v1`` name one server."""
    scheme = url.scheme.lower()
    port = None if url.port == _DEFAULT_PORTS.get(scheme) else url.port
    same = url.copy_with(
        scheme=scheme,
        host=url.host.lower(),
        port=port,
        path=url.path.rstrip("/"),
        username=None,
        password=None,
        fragment=None,
    )
    return str(same)


def safe_code(value: object, *, messages: Iterable[str] = (), key: str = "") -> str:
    """``value`` when it looks like a machine code (letters, digits, ``_.-``, at most 40) and is no
    echo of the request's ``messages`` or the ``key``, else "".

    A code an adapter reads (a finish reason it maps, an error type or code ``error_for_event``
    or ``quota_exhausted`` reads: ``known_codes``) is always kept: a prompt asking about
    ``insufficient_quota`` or "the length of the Nile" must not strip the code that classifies
    the error or names the finish. So is a number of at most three digits (an HTTP status). Any
    other code is dropped as an echo, in case a server echoed the prompt or the key into its
    error code: when a message holds it, however short (a code is a display string only, so
    nothing is lost but the string: "my pin is Zq7-Wx9-Kp2" must not come back as the code
    ``Zq7-Wx9-Kp2``), and by ``safe_model``'s reasoning (``_echo``): when it holds a whole
    message, a piece of it of ``_ECHO_PIECE`` characters is found in a message, or it holds the
    key, is held in it, or has a piece of ``_KEY_PIECE`` characters of it. One that looks like a
    credential (``sk-...``) is dropped whatever the texts."""
    if not isinstance(value, str) or not _SAFE_CODE.fullmatch(value):
        return ""
    if value.lower().startswith(_KEY_PREFIX):
        return ""
    if value.lower() in _KNOWN_CODES or _STATUS_CODE.fullmatch(value):
        return value
    if key and value in key:
        return ""
    if any(value in message for message in messages):
        return ""
    return "" if _echo(value, value, messages=messages, key=key, whole_message=1) else value


def known_codes(codes: Iterable[str]) -> None:
    """Add ``codes`` (an adapter's finish reasons, as it maps them) to the codes ``safe_code``
    always keeps; called where they are mapped, so the set is not a copy of the adapters' tables."""
    _KNOWN_CODES.update(code.lower() for code in codes)


def safe_model(value: object, *, asked: str = "", messages: Iterable[str] = (), key: str = "") -> str:
    """``value`` when it looks like a model id (``_MODEL_ID``) and echoes neither the request's
    ``messages`` nor the ``key``, else "" (the adapter then names the model it ``asked`` for).

    A response's ``model`` goes into spans, metric labels and the Completion with content
    capture off, so a gateway that echoes the prompt or the key there, whole, cut or wrapped
    (``echo:<prompt>``, ``key-<key>``), must not get it through. But real names are made of
    pieces ordinary text holds (``ft``, ``org``, ``id``, ``4o``, ``models``, ``latest``,
    ``anthropic``), and a message may be a single ``4`` or ``5``: a name is not an echo because
    a short piece of it is in a message or a short message is in it. So, for the messages,
    only what can carry content counts: a piece of the name of at least ``_ECHO_PIECE``
    characters found in a message, or a whole message of at least ``_ECHO_MESSAGE`` characters
    found in the name. The start of the name that is the model asked for (a dated or
    fine-tuned version, ``gpt-4o-mini-2024-07-18``, is named after it) is the caller's own
    choice, not the provider's, and is left out of that search. The key is random, so no real
    name has a piece of it: the name may not hold the key, nor a piece of ``_KEY_PIECE``
    characters of it, nor a ``:``/``/``/``@``-separated part shaped like a key (``sk-...``).
    Each check runs once per name (callers check a streamed name again only when it changes):
    a piece search is up to ~120 substring scans of each message."""
    if not isinstance(value, str) or not _MODEL_ID.fullmatch(value):
        return _not_taken(value, "shape")
    parts = _MODEL_ID_SEPARATORS.split(value)
    if any(part.lower().startswith(_KEY_PREFIX) for part in parts):
        return _not_taken(value, "credential")
    own = value[len(asked) :] if asked and value.startswith(asked) else value
    echo = _echo(value, own, messages=messages, key=key, whole_message=_ECHO_MESSAGE)
    return _not_taken(value, echo) if echo else value


def _echo(value: str, own: str, *, messages: Iterable[str], key: str, whole_message: int) -> str:
    """Why ``value``, reported by a provider, echoes the request ("key", "prompt"), or "" if it
    does not: it holds the ``key`` or a piece of ``_KEY_PIECE`` characters of it; or ``own``
    (``value`` less what the caller chose, such as the model asked for) holds a whole message of
    at least ``whole_message`` characters, or a piece of it of ``_ECHO_PIECE`` characters is found
    in a message."""
    if key and (key in value or any(piece in key for piece in _pieces(value, _KEY_PIECE))):
        return "key"
    texts = [text for text in messages if text]
    if any(len(text) >= whole_message and text in own for text in texts):
        return "prompt"
    if any(piece in text for piece in _pieces(own, _ECHO_PIECE) for text in texts):
        return "prompt"
    return ""


def _pieces(value: str, size: int) -> set[str]:
    """Every run of ``size`` characters in ``value`` (none if it is shorter)."""
    return {value[start : start + size] for start in range(len(value) - size + 1)}


def _not_taken(value: object, reason: str) -> str:
    """ "" for a reported model name ``safe_model`` does not take, logged with why (never the name)."""
    if value not in (None, ""):
        _log.info("provider_model_not_taken", reason=reason)
    return ""


# A longer wait than this is read as this: "inf" or "1e400" must not become an endless breaker.
MAX_RETRY_AFTER_SECONDS = 86_400.0


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date), at most
    ``MAX_RETRY_AFTER_SECONDS``; None if absent or not a number or date (``nan`` included)."""
    milliseconds = _seconds(headers.get("retry-after-ms"), scale=1000.0)
    if milliseconds is not None:
        return milliseconds
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    current = time.time() if now is None else now
    return min(MAX_RETRY_AFTER_SECONDS, max(0.0, when.timestamp() - current))


# OpenAI's reset headers hold a Go duration ("1s", "6m0s", "20ms", "1m30.5s", "850µs"): runs of
# a number and a unit, as Go's time.ParseDuration reads them (micro as "us", "µs" or "μs").
# ``[0-9]``, not ``\d``: Go reads ASCII digits only (``\d`` would take "٣s", which float() reads as 3).
_DURATION_PARTS = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
# One leading sign, as Go's ParseDuration reads it ("+5s" is 5s, "-0" is 0); a bare 0 needs no unit.
_DURATION = re.compile(f"([-+]?)(?:0|(?:{_DURATION_PARTS.pattern})+)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# The rate limits each API reports, by what a request takes of each (one request, or tokens).
_OPENAI_LIMITS = ("requests", "tokens")
_ANTHROPIC_LIMITS = ("requests", "tokens", "input-tokens", "output-tokens")


@dataclass(frozen=True)
class TokensAsked:
    """What a request takes of a provider's token limits, as the adapter estimates it: its
    prompt's input tokens, and the output tokens it allows (``max_tokens``, which OpenAI's and
    Anthropic's limits count when the request starts). An estimate: the provider counts its own
    (Anthropic's input-tokens limit leaves cache reads out, OpenAI's count of images may differ
    from ours), so it decides only when no limit is at 0 (``rate_limit_reset``)."""

    input_tokens: int
    output_tokens: int

    def of(self, limit: str) -> int:
        """The tokens the request takes of ``limit`` (``tokens``, ``input-tokens``, ``output-tokens``):
        of ``tokens`` (OpenAI's combined limit), its input and output."""
        if limit == "input-tokens":
            return self.input_tokens
        if limit == "output-tokens":
            return self.output_tokens
        return self.input_tokens + self.output_tokens


def tokens_asked(call: ProviderCall, kind: ProviderKind) -> TokensAsked:
    """What ``call`` takes of its provider's token limits (``TokensAsked``), its input counted as
    ``kind`` bills it."""
    input_tokens = billed_input_of_chat(call.as_chat(), kind, call.image_token_scale)
    return TokensAsked(input_tokens=input_tokens, output_tokens=call.max_output_tokens)


@dataclass(frozen=True)
class _Limit:
    """One rate limit a 429's headers report."""

    name: str  # requests, tokens, input-tokens, output-tokens
    remaining: float | None  # None when not sent or not a number
    size: float | None  # the limit itself; None when not sent or not a positive number
    reset: float | None  # seconds until it is whole again; None when unreadable

    @property
    def spent(self) -> bool:
        """Whether its remaining is at 0 (or below)."""
        return self.remaining is not None and self.remaining <= 0

    def takes(self, asked: TokensAsked | None) -> float:
        """What a request takes of this limit: one request, its tokens when the adapter knows
        them, else at least one token."""
        if self.name == "requests" or asked is None:
            return 1.0
        return float(asked.of(self.name))


def rate_limit_reset(
    headers: Mapping[str, str], *, now: float | None = None, asked: TokensAsked | None = None
) -> float | None:
    """Seconds until the rate limit that refused a request resets, from the rate-limit headers of
    OpenAI (``x-ratelimit-reset-requests`` / ``-tokens``: a duration such as ``6m0s``) or
    Anthropic (``anthropic-ratelimit-*-reset``: an RFC 3339 moment); at most
    ``MAX_RETRY_AFTER_SECONDS``. None if no such reset header reads as one (a 429 without
    Retry-After is read so, as the SDKs' own retries read it). ``asked``: what the request takes
    of the token limits, when the adapter knows it.

    Anthropic's ``anthropic-ratelimit-tokens-*`` report the most restrictive of its input- and
    output-tokens limits, not a limit of their own: beside those limits' headers they are left
    out (they repeat one of them, with its reset, as a limit the request would take both of).

    Which limit refused:

    1. A limit at 0 remaining, the provider's own word that it is spent: the latest reset of such
       limits (a request passes only once each has reset); a spent limit's unreadable reset is
       not replaced by the reset of one with room, which says nothing of the wait.
    2. Else a token limit whose remaining is below the request's tokens (``asked``), the latest
       reset of such. Only when none is at 0: the tokens are routesvc's estimate, not the
       provider's count (``TokensAsked``), and must not outweigh a limit the provider says is
       spent.
    3. Else not a requests limit with a request left (a request takes one): of the others, the
       one closest to spent, the lowest remaining over its limit (``x-ratelimit-limit-*``,
       ``anthropic-ratelimit-*-limit``; the later reset of a tie). Its reset, not the sooner of
       all (cb962ef): a limit with visible room did not refuse, and a retry at its reset is
       refused again.
    4. Without a limit size for each (a gateway's partial headers), the latest reset of those
       limits: which refused is not known, and the latest is the one guess never too soon (a
       reset is when a limit is whole again). A guess too soon is a certain second 429, one more
       failure to the breaker and the retry budget, and a caller sent back into the refusal; one
       too late only waits longer than needed, and ``max_retry_after_seconds`` moves the retry to
       the next model instead, ``max_open_seconds`` bounds the breaker."""
    limits = _rate_limits(headers, time.time() if now is None else now)
    spent = [limit for limit in limits if limit.spent]
    if spent:
        return _latest_reset(spent)
    short = [limit for limit in limits if limit.remaining is not None and limit.remaining < limit.takes(asked)]
    if short:
        return _latest_reset(short)
    # A request takes one of a requests limit: one with a request left did not refuse it.
    candidates = [limit for limit in limits if limit.name != "requests" or limit.remaining is None] or limits
    fractions = [
        (limit.remaining / limit.size, limit)
        for limit in candidates
        if limit.remaining is not None and limit.size is not None
    ]
    if not fractions or len(fractions) < len(candidates):
        return _latest_reset(candidates)
    lowest = min(fraction for fraction, _ in fractions)
    return _latest_reset(limit for fraction, limit in fractions if fraction == lowest)


def _rate_limits(headers: Mapping[str, str], now: float) -> list[_Limit]:
    """The rate limits whose reset header ``headers`` carry; Anthropic's tokens only without its
    input- and output-tokens limits (it repeats the more restrictive of them)."""
    limits: list[_Limit] = []
    for name in _OPENAI_LIMITS:
        if (value := headers.get(f"x-ratelimit-reset-{name}")) is not None:
            remaining, size = headers.get(f"x-ratelimit-remaining-{name}"), headers.get(f"x-ratelimit-limit-{name}")
            limits.append(_Limit(name, _count(remaining), _size(size), _duration(value)))
    split = any(f"anthropic-ratelimit-{name}-reset" in headers for name in ("input-tokens", "output-tokens"))
    for name in _ANTHROPIC_LIMITS:
        if name == "tokens" and split:
            continue
        if (value := headers.get(f"anthropic-ratelimit-{name}-reset")) is not None:
            prefix = f"anthropic-ratelimit-{name}"
            remaining, size = headers.get(f"{prefix}-remaining"), headers.get(f"{prefix}-limit")
            limits.append(_Limit(name, _count(remaining), _size(size), _until(value, now)))
    return limits


def _latest_reset(limits: Iterable[_Limit]) -> float | None:
    """The latest readable reset of ``limits``, at most ``MAX_RETRY_AFTER_SECONDS``; None if none reads."""
    readable = [limit.reset for limit in limits if limit.reset is not None]
    return min(MAX_RETRY_AFTER_SECONDS, max(readable)) if readable else None


def _count(value: str | None) -> float | None:
    """A ``*-remaining`` or ``*-limit`` header's number; None if absent or not a number."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return None if math.isnan(number) else number


def _size(value: str | None) -> float | None:
    """A ``*-limit`` header's number; None if absent, not a number, or not above 0 (no limit
    to take a fraction of)."""
    number = _count(value)
    return number if number is not None and 0 < number < math.inf else None


def _duration(value: str | None) -> float | None:
    """A Go duration (``1m30.5s``, ``20ms``, ``850µs``, ``+5s``, ``0``, ``-0``) in seconds, in
    [0, one day]; None if absent or not one (a negative one included)."""
    if not value:
        return None
    text = value.strip()
    match = _DURATION.fullmatch(text)
    if match is None:
        return None
    seconds = sum((float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PARTS.findall(text)), 0.0)
    if match.group(1) == "-" and seconds > 0:
        return None
    return min(MAX_RETRY_AFTER_SECONDS, seconds)


def _until(value: str | None, now: float) -> float | None:
    """Seconds from ``now`` until an RFC 3339 moment, in [0, one day]; None if absent or not one
    (or one without a time zone, which says no moment)."""
    if not value:
        return None
    try:
        moment = datetime.datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return min(MAX_RETRY_AFTER_SECONDS, max(0.0, moment.timestamp() - now))


def _seconds(value: str | None, *, scale: float = 1.0) -> float | None:
    """``value`` (a number of seconds times ``scale``) as seconds in [0, one day]; None if absent,
    not a number, or NaN."""
    if value is None:
        return None
    try:
        number = float(value) / scale
    except ValueError:
        return None
    if math.isnan(number):
        return None
    return min(MAX_RETRY_AFTER_SECONDS, max(0.0, number))


def describe(provider: str, model: str, what: str, code: str = "") -> str:
    """A sanitized one-line message: provider, model, what happened and an optional safe code."""
    suffix = f" ({code})" if code else ""
    return f"provider {provider} model {model}: {what}{suffix}"


def quota_exhausted(*codes: object) -> bool:
    """Whether any of an error's ``codes`` (its code, its type; as received) says the account's
    credit or quota is spent."""
    return any(isinstance(code, str) and code.lower() in _QUOTA_CODES for code in codes)


def error_for_status(
    status: int,
    *,
    provider: str,
    model: str,
    code: str = "",
    headers: Mapping[str, str] | None = None,
    quota: bool = False,
    asked: TokensAsked | None = None,
) -> ProviderError:
    """The error for an HTTP error status; ``code`` must already be safe (see ``safe_code``).

    ``quota`` (see ``quota_exhausted``) quota exhausted whatever the status; else 402 (a gateway's
    "insufficient credits", OpenRouter's) quota exhausted too, 401/403 auth, 429 rate limited, 408,
    425 and 499 unavailable, any other 4xx (400, 404, 405, 409, 413, 415, 422, 451 ...) rejected, and
    everything else (5xx, 529, a 3xx or 1xx the stack did not follow) unavailable. Rate
    limited and unavailable carry ``retry_after``: the ``headers``' Retry-After (``parse_retry_after``:
    a 503 or Anthropic's 529 overloaded sends one too), or for a 429 without one the reset of its
    rate limit (``rate_limit_reset``, told what the request takes of the token limits: ``asked``).
    """
    message = describe(provider, model, f"HTTP {status}", code)
    if quota:
        return ProviderQuotaExhausted(message, provider=provider, model=model, status=status)
    retry_after = None
    if headers is not None:
        retry_after = parse_retry_after(headers)
        if retry_after is None and status == 429:
            retry_after = rate_limit_reset(headers, asked=asked)
    return _by_status(status, message, provider=provider, model=model, recorded=status, retry_after=retry_after)


def _by_status(
    status: int, message: str, *, provider: str, model: str, recorded: int | None, retry_after: float | None = None
) -> ProviderError:
    """The error HTTP ``status`` says (see ``error_for_status``), with ``message`` and the
    ``recorded`` status (None for an in-band error, which came in a 200)."""
    if status == 402:
        return ProviderQuotaExhausted(message, provider=provider, model=model, status=recorded)
    if status in _AUTH:
        return ProviderAuthFailed(message, provider=provider, model=model, status=recorded)
    if status == 429:
        return ProviderRateLimited(message, provider=provider, model=model, status=recorded, retry_after=retry_after)
    if 400 <= status < 500 and status not in _TRANSIENT_4XX:
        return ProviderRejected(message, provider=provider, model=model, status=recorded)
    return ProviderUnavailable(message, provider=provider, model=model, status=recorded, retry_after=retry_after)


def error_for_event(code: str, error_type: str = "", *, provider: str, model: str) -> ProviderError:
    """The error for an in-band error event that arrived inside a 200 stream, by its ``code`` and
    ``error_type`` (both safe, see ``safe_code``; either may be empty).

    A spent quota in either wins; a code of digits is the HTTP status the server would have
    answered (vLLM sends 400, LiteLLM "429"), read as ``error_for_status`` reads it; else the
    code, when it is a word known here, and then the type: OpenAI's and Anthropic's types and
    codes, and the exception class names vLLM sends as types. Anything else is unavailable.
    """
    message = describe(provider, model, "error event in stream", code or error_type)
    if quota_exhausted(code, error_type):
        return ProviderQuotaExhausted(message, provider=provider, model=model)
    if code.isdigit():
        return _by_status(int(code), message, provider=provider, model=model, recorded=None)
    for word in (code.lower(), error_type.lower()):
        if "rate_limit" in word or word == "ratelimiterror":
            return ProviderRateLimited(message, provider=provider, model=model, status=None)
        if word in _AUTH_EVENT_TYPES:
            return ProviderAuthFailed(message, provider=provider, model=model)
        if word in _REJECTED_EVENT_TYPES:
            return ProviderRejected(message, provider=provider, model=model)
    return ProviderUnavailable(message, provider=provider, model=model)


async def guarded(
    name: str,
    call: ProviderCall,
    deadline: float | None,
    awaitable: Awaitable[_T],
    translate: Callable[[ProviderCall, Exception], ProviderError | None],
) -> _T:
    """Await one SDK step of provider ``name`` within ``deadline`` (loop time), translating what it
    raises with ``translate``; exceptions ``translate`` does not know (our bugs) propagate. A
    stream event over ``reliability.max_event_bytes``, or a stream compressed though asked not
    to be, says so, whatever the SDK wrapped it in (the openai SDK raises it as a connection error)."""
    try:
        async with asyncio.timeout_at(deadline):
            return await awaitable
    except TimeoutError as exc:
        raise ProviderTimedOut(
            describe(name, call.model, f"timed out after {call.timeout or 0:.3g}s"), provider=name, model=call.model
        ) from exc
    except ProviderError:
        raise
    except Exception as exc:
        unreadable = _caused_by(exc, UnreadableStream)
        if unreadable is not None:
            raise ProviderUnavailable(
                describe(name, call.model, unreadable.what, unreadable.reason), provider=name, model=call.model
            ) from exc
        error = translate(call, exc)
        if error is None:
            raise
        raise error from exc


_E = TypeVar("_E", bound=BaseException)


def _caused_by(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of ``kind`` in ``exc``'s chain of causes, ``exc`` included."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, kind):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def aiohttp_connection_failure(exc: BaseException) -> bool:
    """Whether ``exc`` was caused by an aiohttp connection failure that is not a timeout (refused,
    DNS, TLS, closed before the headers). The openai SDK's aiohttp transport maps those to
    ``httpx.ConnectTimeout``, so the SDK raises them as ``APITimeoutError``."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(cause, TimeoutError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def transport_error(exc: Exception, *, provider: str, model: str) -> ProviderUnavailable | None:
    """The error for what an SDK lets through from below it: a transport failure (cut, reset) or
    bytes that do not decode (malformed JSON, non-UTF-8, an event that does not parse), both of
    which leave the stream unusable; None for anything else (a request we could not encode
    included: a bug of ours, which must not count against the provider's breaker). The SDKs' aiohttp transport maps most
    aiohttp errors to httpx ones, but not all (``ClientResponseError`` on a malformed response)."""
    if isinstance(exc, httpx2.HTTPError | httpx2.StreamError | anyio.EndOfStream | OSError | aiohttp.ClientError):
        what = "connection failed"
    elif isinstance(exc, UnicodeEncodeError):
        # A request body we could not encode: our fault, not the provider's (it never saw it).
        return None
    elif isinstance(exc, ValueError):
        what = "malformed stream"
    else:
        return None
    return ProviderUnavailable(describe(provider, model, what, type(exc).__name__), provider=provider, model=model)


# Both SDKs' default (10 minutes, 5 s to connect) where a call has no deadline, read excepted.
_NO_DEADLINE = 600.0
_NO_DEADLINE_CONNECT = 5.0


def request_options(call: ProviderCall) -> dict[str, object]:
    """The SDK request options of ``call`` (the ``options`` of ``AsyncOpenAI.post`` and
    ``AsyncAnthropic.post``): its extra headers when set, and its timeout.

    The timeout has no socket-read part: the call's deadline (``guarded``) and the router's
    first-token and idle timers bound every read already, and aiohttp rearms its read timer when
    it resumes reading after a pause even if the body has ended; fired later on the connection
    idle in the pool, that timer failed the next request at once, before it reached the provider.
    """
    options: dict[str, object] = {}
    if call.headers:
        options["headers"] = dict(call.headers)
    if call.timeout is not None:
        options["timeout"] = httpx2.Timeout(call.timeout, read=None)
    else:
        options["timeout"] = httpx2.Timeout(_NO_DEADLINE, connect=_NO_DEADLINE_CONNECT, read=None)
    return options


def text_field(value: object) -> str:
    """A string field of a streamed event, read as the SDKs hand events over here (decoded JSON,
    unvalidated); anything else (missing, null, a number, an object) reads as empty."""
    return value if isinstance(value, str) else ""


def arguments_field(value: object) -> str:
    """A tool call's ``arguments``: JSON text, or an object some OpenAI-compatible servers send in
    its place, written as its JSON with the model's characters (no ``\\uXXXX`` escapes); anything
    else reads as empty."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else text_field(value)


def count_field(value: object) -> int | None:
    """A token count of a streamed event: a non-negative integer (or a float with an integral
    value, as some servers write counts), else None (missing or malformed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    return value


END_OF_STREAM = object()


async def next_event(stream: AsyncIterator[object]) -> object:
    """The SDK stream's next decoded event, or ``END_OF_STREAM`` (an event can itself be ``null``)."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return END_OF_STREAM


def event_object(event: object, *, provider: str, model: str) -> dict[str, object]:
    """A decoded stream event as the JSON object it must be; anything else (``null``, a list, a
    number) is a broken stream: ``ProviderUnavailable``."""
    if not isinstance(event, dict):
        raise ProviderUnavailable(
            describe(provider, model, "stream event is not a JSON object"), provider=provider, model=model
        )
    return event


def object_field(value: object) -> dict[str, object]:
    """An object field of a streamed event; anything else reads as empty."""
    return value if isinstance(value, dict) else {}


class EstimatedUsageLog:
    """Says that a model's usage was estimated (its server reported none): a warning the first
    time for each model, then at debug, since a server that never reports usage (many
    OpenAI-compatible ones) would otherwise warn on every request."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def estimated(self, provider: str, model: str, **fields: object) -> None:
        """Log one estimate of ``model``'s usage."""
        if model in self._warned:
            _log.debug("provider_usage_estimated", provider=provider, model=model, **fields)
            return
        self._warned.add(model)
        _log.warning(
            "provider_usage_estimated", provider=provider, model=model, repeats="at debug from now on", **fields
        )
