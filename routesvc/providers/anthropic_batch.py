"""Anthropic Message Batches via ``AsyncAnthropic``: create, poll, stream results, cancel, delete.

SDK exceptions are translated here: ``anthropic.APIStatusError`` by HTTP status (``status_error``), connection and
timeout errors and an unreadable results file to ``ProviderUnavailable``; a results line that is
cut short or of another shape fails its own job (``malformed_result``). An ended batch (its requests
and results) is deleted by ``discard`` once its results are stored; a delete that fails is logged
and left.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, Final, TypeVar

import anthropic
import structlog

from routesvc.errors import ProviderError, ProviderRejected, ProviderUnavailable
from routesvc.models import BatchState, ToolCall, Usage
from routesvc.providers._http import describe, object_field, safe_code, safe_model
from routesvc.providers._sending import direct_to_loopback
from routesvc.providers.anthropic import DEFAULT_BASE_URL, map_stop_reason, quota_spent, request_params
from routesvc.providers.batch import (
    BatchItem,
    ItemResult,
    ProviderBatch,
    error_capped,
    guarded_line,
    reported_count,
    result_lines,
    status_error,
)

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_STATES = {
    "succeeded": BatchState.SUCCEEDED,
    "errored": BatchState.FAILED,
    "expired": BatchState.EXPIRED,
    "canceled": BatchState.CANCELLED,
}


_RESULTS_DELETED = "results_deleted"
# A batch delete is given up after this long (a poll round waits for it).
_DELETE_SECONDS: Final = 10.0


class AnthropicBatches:
    """Batches of messages requests through the Message Batches API."""

    def __init__(self, name: str, api_key: str | None, base_url: str | None = None, *, timeout: float = 60.0) -> None:
        self._name = name
        # What a result's ``model`` may not echo (``safe_model``): the key. A job's prompt is not
        # at hand when its result is read.
        self._key = api_key or ""
        # As for realtime calls (``AnthropicProvider``): the SDK's own spans and trace propagation
        # off, so it reads no ANTHROPIC_OPEN_TELEMETRY* variable (config.py owns the environment)
        # and a global tracer provider gets no spans of batch calls, whose bodies hold prompts.
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key or "unused",
            base_url=base_url or DEFAULT_BASE_URL,
            max_retries=0,
            timeout=timeout,
            http_client=direct_to_loopback(
                error_capped(anthropic.DefaultAsyncHttpxClient), base_url or DEFAULT_BASE_URL
            ),
            open_telemetry={"traces": False, "propagation": False},
        )

    @property
    def name(self) -> str:
        """The configured provider name."""
        return self._name

    async def aclose(self) -> None:
        """Close the SDK's connection pool."""
        await self._client.close()

    async def _guard(self, what: str, awaitable: Awaitable[_T]) -> _T:
        try:
            return await awaitable
        except anthropic.APIStatusError as exc:
            raise status_error(exc.status_code, exc.response, provider=self._name, quota=quota_spent(exc)) from exc
        except (anthropic.APIError, ValueError) as exc:
            message = describe(self._name, "batch", f"{what}: failed")
            raise ProviderUnavailable(message, provider=self._name, model="batch") from exc

    @property
    def tags_batches(self) -> bool:
        """False: a message batch keeps no tag of ours (``find``)."""
        return False

    async def submit(self, items: list[BatchItem], tag: str) -> str:
        """Create one message batch with the items inline (a message batch keeps no tag of ours:
        ``find``)."""
        requests: list[Any] = []
        for item in items:
            params = request_params(self._name, item)
            requests.append({"custom_id": item.custom_id, "params": params})
        batch = await self._guard("create", self._client.messages.batches.create(requests=requests))
        return batch.id

    async def find(self, tag: str, count: int, since: float, until: float) -> list[str]:
        """Every message batch of ``count`` requests created from ``since`` to ``until`` (newest
        first). Anthropic keeps no metadata of a batch nor, before it ends, its requests'
        custom_ids, so the one a lost reply created cannot be told from another batch of as many
        requests created meanwhile in the workspace (another client of it): the caller verifies
        the batch once its results name its requests. No allowance is made for a difference
        between our clock and Anthropic's: a batch stamped before ``since`` by Anthropic's clock
        (ours ahead of it by more than the create's way there, which NTP keeps to milliseconds)
        is not taken, so its jobs are sent again, as they would be without a lookup, rather than
        placed in a batch that a client created before this send began."""
        found: list[str] = []
        pages = self._client.messages.batches.list(limit=100).__aiter__()
        while True:
            try:
                batch = await self._guard("list batches", pages.__anext__())
            except StopAsyncIteration:
                return found
            created = batch.created_at.timestamp()
            if created < since:
                return found
            if created > until:
                continue
            counts = batch.request_counts
            total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
            if total == count:
                found.append(batch.id)

    async def poll(self, batch_id: str) -> ProviderBatch:
        """Retrieve the batch."""
        batch = await self._guard("retrieve", self._client.messages.batches.retrieve(batch_id))
        ended = batch.processing_status == "ended"
        # Anthropic deletes a batch's results 29 days after its creation (a long outage, a key
        # missing for weeks): no results URL then, and none will come.
        deleted = ended and not batch.results_url
        return ProviderBatch(
            id=batch.id,
            ended=ended,
            status=batch.processing_status,
            error=_RESULTS_DELETED if deleted else "",
        )

    async def results(self, batch: ProviderBatch) -> list[ItemResult]:
        """Stream the results of an ended batch; none when they were deleted (its jobs end with
        the batch's error)."""
        if batch.error == _RESULTS_DELETED:
            return []
        return await self._guard("results", self._read_results(batch.id))

    async def _read_results(self, batch_id: str) -> list[ItemResult]:
        # Read as JSON Lines here, not through the SDK's results stream, which parses every line
        # and raises at the first one cut short: the whole batch would be read again every round,
        # none of its jobs ending. Such a line fails its own job (``result_lines``, ``guarded_line``).
        batch = await self._client.messages.batches.retrieve(batch_id)
        if not batch.results_url:
            raise ValueError("the batch has no results_url")
        content = await self._client.get(
            batch.results_url, cast_to=bytes, options={"headers": {"Accept": "application/binary"}}
        )
        text = content.decode("utf-8", errors="replace")
        lines, malformed = result_lines(text, provider=self._name, provider_batch=batch_id)
        results = [guarded_line(line, lambda line: _entry_result(line, self._key)) for line in lines]
        results += [ItemResult(custom_id, BatchState.FAILED, error="malformed_result") for custom_id in malformed]
        return results

    async def cancel(self, batch_id: str) -> None:
        """Ask for the batch to be cancelled."""
        await self._guard("cancel", self._client.messages.batches.cancel(batch_id))

    async def discard(self, batch: ProviderBatch) -> bool:
        """Delete the ended batch, its requests and results with it, within ``_DELETE_SECONDS``.
        A batch already gone (another worker deleted it) counts as deleted."""
        try:
            async with asyncio.timeout(_DELETE_SECONDS):
                await self._guard("delete", self._client.messages.batches.delete(batch.id))
        except ProviderRejected as exc:
            if exc.status != 404:
                log.warning("batch_delete_failed", provider=self._name, provider_batch_id=batch.id, reason=exc.reason)
                return False
        except Exception as exc:
            reason = exc.reason if isinstance(exc, ProviderError) else type(exc).__name__
            log.warning("batch_delete_failed", provider=self._name, provider_batch_id=batch.id, reason=reason)
            return False
        return True


def _entry_result(line: dict[str, Any], key: str) -> ItemResult:
    """One line of a batch's results (a line of another shape raises: ``guarded_line``)."""
    custom_id = line["custom_id"]
    if not isinstance(custom_id, str):
        raise TypeError("custom_id")
    result = line["result"]
    kind = str(result["type"])
    state = _STATES.get(kind, BatchState.FAILED)
    if kind == "succeeded":
        message = result["message"]
        # A count the result does not report is estimated by the queue, as a stream's is by the adapter.
        usage = object_field(message.get("usage"))
        input_tokens = reported_count(usage, "input_tokens")
        output_tokens = reported_count(usage, "output_tokens")
        cached = reported_count(usage, "cache_read_input_tokens") or 0
        written = reported_count(usage, "cache_creation_input_tokens") or 0
        written_1h = reported_count(object_field(usage.get("cache_creation")), "ephemeral_1h_input_tokens") or 0
        blocks = message.get("content") or []
        text = "".join(str(block["text"]) for block in blocks if block["type"] == "text")
        # A tool_use block that names no tool is no call (as in a stream: ``ToolCallParts``). The
        # result holds the input parsed: its JSON text keeps the characters the model wrote (no
        # ``\uXXXX`` escapes) and the spacing of Anthropic's streamed input.
        calls = tuple(
            ToolCall(str(block["id"]), str(block["name"]), json.dumps(block.get("input") or {}, ensure_ascii=False))
            for block in blocks
            if block["type"] == "tool_use" and block.get("name")
        )
        return ItemResult(
            custom_id,
            state,
            text=text,
            usage=Usage(
                input_tokens=(input_tokens or 0) + cached + written,
                output_tokens=output_tokens or 0,
                cached_input_tokens=cached,
                cache_write_input_tokens=written,
                cache_write_1h_input_tokens=min(written_1h, written),
            ),
            finish_reason=map_stop_reason(message.get("stop_reason"), made_calls=bool(calls)),
            provider_model=safe_model(message.get("model"), key=key),
            tool_calls=calls,
            input_reported=input_tokens is not None,
            output_reported=output_tokens is not None,
        )
    if kind == "errored":
        # Shown to the caller by GetBatch: only what looks like a machine code (as OpenAI's).
        error_type = safe_code(((result.get("error") or {}).get("error") or {}).get("type"))
        return ItemResult(custom_id, state, error=error_type or "errored")
    return ItemResult(custom_id, state, error=safe_code(kind) or "errored")
