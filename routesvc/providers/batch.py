"""The ``BatchAPI`` protocol: a provider's batch endpoint (OpenAI Batch API, Anthropic Message Batches).

A batch is created from several ``BatchItem``s at once, polled until the provider says it ended,
then its per-item results are read, and once they are stored what the provider keeps of it (the
requests and answers) is deleted. Adapters translate every SDK exception to a ``ProviderError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

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


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One item's end: ``SUCCEEDED`` with text, tool calls and usage, else ``FAILED``, ``EXPIRED`` or ``CANCELLED``
    with a short machine ``error`` (never prompt text)."""

    custom_id: str
    state: BatchState
    text: str = ""
    usage: Usage = field(default_factory=Usage)
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    provider_model: str = ""
    error: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


class BatchAPI(Protocol):
    """A provider's batch endpoint."""

    @property
    def name(self) -> str:
        """The configured provider name."""
        ...

    async def submit(self, items: list[BatchItem]) -> str:
        """Create one provider batch of ``items``; returns its id."""
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

    async def discard(self, batch: ProviderBatch) -> None:
        """Delete what the provider keeps of an ended batch whose results are stored (its requests
        and answers); a failure is logged (never with their text), never raised."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
