"""The ``BatchAPI`` protocol: a provider's batch endpoint (OpenAI Batch API, Anthropic Message Batches).

A batch is created from several ``BatchItem``s at once, polled until the provider says it ended,
then its per-item results are read, and once they are stored what the provider keeps of it (the
requests and answers) is deleted. Adapters translate every SDK exception to a ``ProviderError``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx2
import structlog

from routesvc.errors import ProviderError, ProviderRejected, ProviderUnavailable
from routesvc.models import (
    BatchState,
    FinishReason,
    Message,
    ResponseFormat,
    ToolCall,
    ToolChoice,
    ToolSpec,
    Usage,
)
from routesvc.providers._event_size import CappedErrorsTransport, error_body_lost
from routesvc.providers._http import count_field, describe, error_for_status
from routesvc.providers._sending import wrap_transports

log = structlog.get_logger(__name__)

# A custom_id read from a line that is not JSON (cut short), to fail that line's job alone.
_CUSTOM_ID = re.compile(r'"custom_id"\s*:\s*"([^"\\]*)"')
# The 4xx a batch call takes for the provider refusing it (its jobs failed, or a polled batch lost).
# Any other 4xx (a proxy's 405 or 451) is tried again next round: for a Complete such a status is
# final (``error_for_status``), but a batch already paid for must not be given up on a proxy's say.
_BATCH_REJECTED = frozenset({400, 404, 409, 413, 422})


def error_capped(client_class: type[httpx2.AsyncClient]) -> httpx2.AsyncClient:
    """An instance of the SDK's ``DefaultAsyncHttpxClient`` class (its defaults) whose transports
    cap each error's or redirect's body as a stream's are (``CappedErrorsTransport``): one that
    never ends (a proxy gone wrong) was read into memory whole, the poll never ending either."""
    client = client_class()
    wrap_transports(client, CappedErrorsTransport)
    return client


def status_error(status: int, response: httpx2.Response, *, provider: str, quota: bool) -> ProviderError:
    """The error for a batch call answered HTTP ``status`` (``error_for_status``; ``quota`` as the
    body tells), but a 4xx that would be rejected outside 400/404/409/413/422 is unavailable (see
    ``_BATCH_REJECTED``). A 400 whose body was dropped or cut short (``error_body_lost``: it
    stalled, its gzip broke off, past the bound) is unavailable, retried: only its body tells
    Anthropic's "credit balance is too low" (the jobs wait queued) from a bad request (the jobs
    fail)."""
    if status == 400 and not quota and error_body_lost(response):
        message = describe(provider, "batch", f"HTTP {status}", "error_body_lost")
        return ProviderUnavailable(message, provider=provider, model="batch", status=status)
    error = error_for_status(status, provider=provider, model="batch", headers=response.headers, quota=quota)
    if isinstance(error, ProviderRejected) and status not in _BATCH_REJECTED:
        return ProviderUnavailable(error.message, provider=provider, model="batch", status=status)
    return error


def result_lines(text: str, **where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON objects of a results file in JSON Lines, and the custom_ids of lines that are not
    one (a line cut short: it fails its own job, not the file; a line whose job cannot be told is
    left out). Each such line is logged, with ``where`` and its number, never its text (it holds
    the answer)."""
    lines: list[dict[str, Any]] = []
    malformed: list[str] = []
    # JSON Lines ends a line at "\n" only: str.splitlines() also ends one at U+2028, U+2029 or
    # U+0085, which an answer may hold raw inside a JSON string.
    for number, line_text in enumerate(text.split("\n"), start=1):
        if not line_text.strip():
            continue
        try:
            line = json.loads(line_text)
        except ValueError:
            line = None
        if isinstance(line, dict):
            lines.append(line)
            continue
        found = _CUSTOM_ID.search(line_text)
        custom_id = found.group(1) if found else ""
        if custom_id:
            malformed.append(custom_id)
        log.warning("batch_result_malformed", **where, line=number, batch_id=custom_id)
    return lines, malformed


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One request of a provider batch; ``custom_id`` is our job id."""

    custom_id: str
    model: str
    provider_model: str
    messages: tuple[Message, ...]
    max_output_tokens: int
    temperature: float | None = None
    tools: tuple[ToolSpec, ...] = ()
    stop: tuple[str, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


@dataclass(frozen=True, slots=True)
class ProviderBatch:
    """A provider batch as last seen: ``ended`` once no item will change any more."""

    id: str
    ended: bool
    status: str
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    # Why the whole batch failed, a short machine code (OpenAI's validation errors), or "".
    error: str = ""
    # Whether the provider has accepted the batch's requests (OpenAI: past its validation), so
    # that they will never be sent again.
    accepted: bool = True
    # Whether the whole batch was refused for a reason that passes (OpenAI's enqueued token
    # limit): its jobs are to be sent again later, not failed.
    retry_later: bool = False


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One item's end: ``SUCCEEDED`` with text, tool calls and usage, else ``FAILED``, ``EXPIRED`` or ``CANCELLED``
    with a short machine ``error`` (never prompt text). ``input_reported`` and ``output_reported``
    are false when the provider's result had no such count (no ``usage``, or none of that count):
    ``usage`` holds 0 for it, and the queue charges an estimate instead."""

    custom_id: str
    state: BatchState
    text: str = ""
    usage: Usage = field(default_factory=Usage)
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    provider_model: str = ""
    error: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    input_reported: bool = True
    output_reported: bool = True


class BatchAPI(Protocol):
    """A provider's batch endpoint."""

    @property
    def name(self) -> str:
        """The configured provider name."""
        ...

    async def submit(self, items: list[BatchItem], tag: str) -> str:
        """Create one provider batch of ``items``, tagged ``tag`` (our id of this send) where the
        provider keeps such a tag; returns its id."""
        ...

    @property
    def tags_batches(self) -> bool:
        """Whether the provider keeps a send's tag with its batch, so that ``find`` names the
        batch a send created for certain; else ``find`` goes by the batch's size and time, and
        the batch may be another client's until its results show our jobs in it."""
        ...

    async def find(self, tag: str, count: int, since: float, until: float) -> list[str]:
        """The batches that a ``submit`` of ``count`` items tagged ``tag``, begun at ``since`` and
        cut off by ``until`` (epoch seconds), may have created without its reply reaching us (a
        connection reset, a timeout): the one tagged ``tag`` where the provider keeps tags, else
        every batch of ``count`` requests created between the two (the caller tells its own from
        others'). What such a submit left without a batch (an uploaded file) is deleted. Raises
        ``ProviderError`` when the provider cannot be asked."""
        ...

    async def poll(self, batch_id: str) -> ProviderBatch:
        """The batch's status now."""
        ...

    async def results(self, batch: ProviderBatch) -> list[ItemResult]:
        """Every item's result of an ended batch (items missing from the provider's files are not listed)."""
        ...

    async def cancel(self, batch_id: str) -> None:
        """Ask the provider to cancel the batch."""
        ...

    async def discard(self, batch: ProviderBatch) -> bool:
        """Delete what the provider keeps of an ended batch whose results are stored (its requests
        and answers). False when some of it could not be deleted (logged, never with their text,
        never raised): the caller may try again; what is already gone counts as deleted."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def reported_count(usage: Mapping[str, object], key: str) -> int | None:
    """The token count ``key`` of a result's ``usage`` (an object read with ``object_field``),
    read as a stream's is (``count_field``): None when the result has none, or one
    that is no count (negative, a string, a fraction), so that the queue estimates it
    (``ItemResult.input_reported``) instead of charging a broken server's figure, a negative one
    crediting the tenant. One too large to be believed is estimated by the queue too
    (``_billed_usage``)."""
    return count_field(usage.get(key))


def guarded_line(line: dict[str, Any], read: Callable[[dict[str, Any]], ItemResult]) -> ItemResult:
    """``read(line)``; a line of JSON that is not of the documented shape (a field of another
    type) fails its own job, ``malformed_result``, not the whole file (which would be read
    again and again, every job of the batch waiting)."""
    try:
        return read(line)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, OverflowError):
        custom_id = line.get("custom_id")
        log.warning("batch_result_malformed", batch_id=str(custom_id) if isinstance(custom_id, str) else "")
        return ItemResult(str(custom_id), BatchState.FAILED, error="malformed_result")
