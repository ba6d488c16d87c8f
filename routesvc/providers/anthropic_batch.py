"""Anthropic Message Batches via ``AsyncAnthropic``: create, poll, stream results, cancel, delete.

SDK exceptions are translated here: ``anthropic.APIStatusError`` by HTTP status, connection and
timeout errors and unreadable results to ``ProviderUnavailable``. An ended batch (its requests
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
from routesvc.providers._http import describe, error_for_status
from routesvc.providers.anthropic import DEFAULT_BASE_URL, map_stop_reason, quota_spent, request_params
from routesvc.providers.batch import BatchItem, ItemResult, ProviderBatch

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
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key or "unused", base_url=base_url or DEFAULT_BASE_URL, max_retries=0, timeout=timeout
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
            raise error_for_status(
                exc.status_code,
                provider=self._name,
                model="batch",
                headers=exc.response.headers,
                quota=quota_spent(exc),
            ) from exc
        except (anthropic.APIError, ValueError) as exc:
            message = describe(self._name, "batch", f"{what}: failed")
            raise ProviderUnavailable(message, provider=self._name, model="batch") from exc

    async def submit(self, items: list[BatchItem]) -> str:
        """Create one message batch with the items inline."""
        requests: list[Any] = []
        for item in items:
            params = request_params(self._name, item)
            requests.append({"custom_id": item.custom_id, "params": params})
        batch = await self._guard("create", self._client.messages.batches.create(requests=requests))
        return batch.id

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
        results: list[ItemResult] = []
        async for entry in await self._client.messages.batches.results(batch_id):
            result = entry.result
            state = _STATES.get(result.type, BatchState.FAILED)
            if result.type == "succeeded":
                message = result.message
                usage = message.usage
                cached = usage.cache_read_input_tokens or 0
                written = usage.cache_creation_input_tokens or 0
                written_1h = usage.cache_creation.ephemeral_1h_input_tokens if usage.cache_creation else 0
                text = "".join(block.text for block in message.content if block.type == "text")
                calls = tuple(
                    ToolCall(block.id, block.name, json.dumps(block.input))
                    for block in message.content
                    if block.type == "tool_use"
                )
                results.append(
                    ItemResult(
                        entry.custom_id,
                        state,
                        text=text,
                        usage=Usage(
                            input_tokens=usage.input_tokens + cached + written,
                            output_tokens=usage.output_tokens,
                            cached_input_tokens=cached,
                            cache_write_input_tokens=written,
                            cache_write_1h_input_tokens=min(written_1h, written),
                        ),
                        finish_reason=map_stop_reason(message.stop_reason),
                        provider_model=message.model,
                        tool_calls=calls,
                    )
                )
            elif result.type == "errored":
                error_type = str(getattr(getattr(result.error, "error", None), "type", "") or "errored")
                results.append(ItemResult(entry.custom_id, state, error=error_type[:64]))
            else:
                results.append(ItemResult(entry.custom_id, state, error=result.type))
        return results

    async def cancel(self, batch_id: str) -> None:
        """Ask for the batch to be cancelled."""
        await self._guard("cancel", self._client.messages.batches.cancel(batch_id))

    async def discard(self, batch: ProviderBatch) -> None:
        """Delete the ended batch, its requests and results with it, within ``_DELETE_SECONDS``.
        A batch already gone (another worker deleted it) counts as deleted."""
        try:
            async with asyncio.timeout(_DELETE_SECONDS):
                await self._guard("delete", self._client.messages.batches.delete(batch.id))
        except ProviderRejected as exc:
            if exc.status != 404:
                log.warning("batch_delete_failed", provider=self._name, provider_batch_id=batch.id, reason=exc.reason)
        except Exception as exc:
            reason = exc.reason if isinstance(exc, ProviderError) else type(exc).__name__
            log.warning("batch_delete_failed", provider=self._name, provider_batch_id=batch.id, reason=reason)
