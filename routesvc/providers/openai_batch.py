"""The OpenAI Batch API via ``AsyncOpenAI``: upload a JSONL file, create a batch, poll, read output files.

SDK exceptions are translated here: ``openai.APIStatusError`` by HTTP status (``status_error``), connection and
timeout errors to ``ProviderUnavailable``. An input file whose batch OpenAI refused (a 4xx) is
deleted again; one whose create may have reached OpenAI (its reply lost, or its send cancelled:
cut off by the queue's timeout, a shutdown) is kept for the batch, and ``find`` looks the batch up
by the tag in its metadata, or deletes the file by its name; an ended batch's input, output and
error files are deleted by ``discard`` once its results are stored. A delete that fails is logged
and left.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Final, TypeVar

import openai
import structlog

from routesvc.errors import ProviderError, ProviderRejected, ProviderUnavailable
from routesvc.models import BatchState, FinishReason, ToolCall, Usage
from routesvc.providers._http import arguments_field, describe, object_field, safe_code, safe_model
from routesvc.providers._sending import direct_to_loopback
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
from routesvc.providers.openai import DEFAULT_BASE_URL, _messages, chat_params, map_finish_reason, quota_spent
from routesvc.tasks import keep_until_done

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_ENDED = frozenset({"completed", "expired", "failed", "cancelled"})
_ENDPOINT: Final = "/v1/chat/completions"
# Why OpenAI fails a whole batch at validation for a while: the organization's enqueued tokens
# for the model are at its limit ("try again once some in_progress batches have been completed").
_PASSING_ERRORS = frozenset({"token_limit_exceeded"})
# The metadata key of a batch's tag, and the difference between our clock and the provider's that
# a lookup of a batch created since a moment allows for.
_TAG_KEY: Final = "routesvc_send"
_CLOCK_SLACK: Final = 300.0
# Items the output and error files leave out end as the batch did.
_UNANSWERED = {"expired": BatchState.EXPIRED, "cancelled": BatchState.CANCELLED}
# A file delete is given up after this long: one run when the send was cancelled meanwhile holds
# up the cancellation (a shutdown) at most this long.
_DELETE_SECONDS: Final = 10.0


class OpenAIBatches:
    """Batches of chat completions through the Batch API (files + batches)."""

    def __init__(self, name: str, api_key: str | None, base_url: str | None = None, *, timeout: float = 60.0) -> None:
        self._name = name
        # What a result's ``model`` may not echo (``safe_model``): the key. A job's prompt is not
        # at hand when its result is read.
        self._key = api_key or ""
        self._client = openai.AsyncOpenAI(
            api_key=api_key or "unused",
            base_url=base_url or DEFAULT_BASE_URL,
            max_retries=0,
            timeout=timeout,
            http_client=direct_to_loopback(error_capped(openai.DefaultAsyncHttpxClient), base_url or DEFAULT_BASE_URL),
        )
        # Deletes of input files of batches not created (see ``submit``), kept until they end.
        self._deleting: set[asyncio.Task[bool]] = set()

    @property
    def name(self) -> str:
        """The configured provider name."""
        return self._name

    async def aclose(self) -> None:
        """Let the deletes under way end (each is bounded), then close the SDK's connection pool."""
        if self._deleting:
            await asyncio.wait(self._deleting)
        await self._client.close()

    async def _guard(self, what: str, awaitable: Awaitable[_T]) -> _T:
        try:
            return await awaitable
        except openai.APIStatusError as exc:
            raise status_error(exc.status_code, exc.response, provider=self._name, quota=quota_spent(exc)) from exc
        except (openai.APIConnectionError, openai.APIResponseValidationError) as exc:
            message = describe(self._name, "batch", f"{what}: connection failed")
            raise ProviderUnavailable(message, provider=self._name, model="batch") from exc

    async def submit(self, items: list[BatchItem], tag: str) -> str:
        """Upload the items as one JSONL file named after ``tag`` and create a batch of it, with
        ``tag`` in its metadata (``find``)."""
        lines = []
        for item in items:
            body: dict[str, Any] = {
                "model": item.provider_model,
                "messages": _messages(item.messages),
                "max_completion_tokens": item.max_output_tokens,
            }
            body |= chat_params(item)
            lines.append(json.dumps({"custom_id": item.custom_id, "method": "POST", "url": _ENDPOINT, "body": body}))
        content = ("\n".join(lines) + "\n").encode()
        uploaded = await self._guard(
            "upload", self._client.files.create(file=(_filename(tag), content), purpose="batch")
        )
        try:
            batch = await self._guard(
                "create",
                self._client.batches.create(
                    input_file_id=uploaded.id,
                    endpoint=_ENDPOINT,
                    completion_window="24h",
                    metadata={_TAG_KEY: tag},
                ),
            )
        except ProviderError as exc:
            if exc.status is None or exc.status >= 500:
                # The create may have reached OpenAI, its reply lost (a reset, a timeout): the
                # batch would need its file. The next send of these jobs finds the batch by its
                # tag, or else deletes the file by its name (``find``).
                raise
            await self._forget_file(uploaded.id)
            raise
        except Exception:
            await self._forget_file(uploaded.id)
            raise
        # A cancelled send (cut off by the queue's timeout, a shutdown) keeps the file: the create
        # may have reached OpenAI, as when its reply is lost (``find`` then, as above).
        return batch.id

    async def _forget_file(self, file_id: str) -> None:
        """Delete the input file of a batch that was not created."""
        # The file is of no use without its batch, and a retry uploads the jobs again: each round
        # of a spent quota would leave one more file of prompts in the account. (A created batch
        # needs its file until it ends, so it is kept then, and when the create may have landed.)
        # Shielded, so that a cancellation does not cut the delete off, and bounded, so that it
        # goes on within _DELETE_SECONDS; ``aclose`` waits for a delete a second cancellation
        # left running.
        deleting = asyncio.ensure_future(self._delete_file(file_id))
        keep_until_done(deleting, self._deleting)
        await asyncio.shield(deleting)

    @property
    def tags_batches(self) -> bool:
        """True: a batch keeps the tag in its metadata (``find``)."""
        return True

    async def find(self, tag: str, count: int, since: float, until: float) -> list[str]:
        """The batch whose metadata holds ``tag`` (newest first, back to ``since``); without one,
        the files the submit uploaded (named after ``tag``) are deleted."""
        after = since - _CLOCK_SLACK
        async for batch in self._pages("list batches", self._client.batches.list(limit=100)):
            if batch.created_at < after:
                break
            if (batch.metadata or {}).get(_TAG_KEY) == tag:
                return [batch.id]
        files = self._client.files.list(purpose="batch", limit=100, order="desc")
        async for file in self._pages("list files", files):
            if file.created_at < after:
                break
            if file.filename == _filename(tag):
                await self._delete_file(file.id)
        return []

    async def _pages(self, what: str, pages: Any) -> AsyncIterator[Any]:
        """Every item of a listing, page after page, its errors translated."""
        iterator = pages.__aiter__()
        while True:
            try:
                yield await self._guard(what, iterator.__anext__())
            except StopAsyncIteration:
                return

    async def _delete_file(self, file_id: str) -> bool:
        """Delete a file within ``_DELETE_SECONDS``; whether it is gone. A failure is logged, never
        raised (the file is left over). A file already gone (another worker deleted it) counts as
        deleted."""
        try:
            async with asyncio.timeout(_DELETE_SECONDS):
                await self._guard("delete", self._client.files.delete(file_id))
        except ProviderRejected as exc:
            if exc.status != 404:
                log.warning("batch_file_delete_failed", provider=self._name, file_id=file_id, reason=exc.reason)
                return False
        except Exception as exc:
            reason = exc.reason if isinstance(exc, ProviderError) else type(exc).__name__
            log.warning("batch_file_delete_failed", provider=self._name, file_id=file_id, reason=reason)
            return False
        return True

    async def discard(self, batch: ProviderBatch) -> bool:
        """Delete the ended batch's input, output and error files (the batch itself cannot be
        deleted: it keeps only their ids and counts)."""
        gone = True
        for file_id in (batch.input_file_id, batch.output_file_id, batch.error_file_id):
            if file_id:
                gone = await self._delete_file(file_id) and gone
        return gone

    async def poll(self, batch_id: str) -> ProviderBatch:
        """Retrieve the batch."""
        batch = await self._guard("retrieve", self._client.batches.retrieve(batch_id))
        # A batch that failed validation (an enqueued token limit, a bad line) says why here and
        # writes no file: its jobs end with the first error's code, or are sent again when that
        # passes (the token limit, once other batches have completed).
        errors = batch.errors.data if batch.errors is not None and batch.errors.data else []
        error = safe_code(errors[0].code) if errors else ""
        return ProviderBatch(
            id=batch.id,
            ended=batch.status in _ENDED,
            status=batch.status,
            input_file_id=batch.input_file_id,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            error=error,
            accepted=batch.status not in ("validating", "failed"),
            retry_later=batch.status == "failed" and error in _PASSING_ERRORS,
        )

    async def _lines(self, file_id: str | None) -> tuple[list[dict[str, Any]], list[str]]:
        """The file's JSON lines, and the custom_ids of lines that are not JSON (``result_lines``)."""
        if not file_id:
            return [], []
        content = await self._guard("download", self._client.files.content(file_id))
        return result_lines(content.text, provider=self._name, file_id=file_id)

    async def results(self, batch: ProviderBatch) -> list[ItemResult]:
        """Read the output and error files of an ended batch. A line that is not JSON fails its
        job (``malformed_result``); one whose job cannot be told is left out (the job then ends
        as an item with no result)."""
        results: list[ItemResult] = []
        output, unreadable = await self._lines(batch.output_file_id)
        errors, unreadable_errors = await self._lines(batch.error_file_id)
        for line in output:
            results.append(guarded_line(line, lambda line: self._item(line, batch.status, self._key)))
        for line in errors:
            results.append(guarded_line(line, lambda line: _error_item(line, batch.status)))
        for custom_id in unreadable + unreadable_errors:
            results.append(ItemResult(custom_id, BatchState.FAILED, error="malformed_result"))
        return results

    @staticmethod
    def _item(line: dict[str, Any], status: str, key: str) -> ItemResult:
        custom_id = str(line.get("custom_id"))
        response = line.get("response") or {}
        body = response.get("body") or {}
        if response.get("status_code") != 200 or not body.get("choices"):
            return ItemResult(custom_id, BatchState.FAILED, error=_http_error_code(response))
        choice = body["choices"][0]
        message = choice.get("message") or {}
        # A count the result does not report is estimated by the queue, as a stream's is by the adapter.
        usage = object_field(body.get("usage"))
        input_tokens = reported_count(usage, "prompt_tokens")
        output_tokens = reported_count(usage, "completion_tokens")
        details = object_field(usage.get("prompt_tokens_details"))
        # A refusal (structured outputs) is the answer, and the answer was filtered.
        refusal = str(message.get("refusal") or "")
        # A call that names no tool is no call (as in a stream: ``ToolCallParts``).
        calls = tuple(call for call in map(_tool_call, message.get("tool_calls") or ()) if call.name)
        finish = map_finish_reason(choice.get("finish_reason"), made_calls=bool(calls))
        return ItemResult(
            custom_id,
            BatchState.SUCCEEDED,
            text=str(message.get("content") or "") + refusal,
            usage=Usage(
                input_tokens=input_tokens or 0,
                output_tokens=output_tokens or 0,
                cached_input_tokens=reported_count(details, "cached_tokens") or 0,
            ),
            finish_reason=FinishReason.CONTENT_FILTER if refusal else finish,
            provider_model=safe_model(body.get("model"), key=key),
            tool_calls=calls,
            input_reported=input_tokens is not None,
            output_reported=output_tokens is not None,
        )

    async def cancel(self, batch_id: str) -> None:
        """Cancel the batch (the provider finishes what is running and keeps its output)."""
        await self._guard("cancel", self._client.batches.cancel(batch_id))


def _error_item(line: dict[str, Any], status: str) -> ItemResult:
    """A line of the error file. A request the API answered with an HTTP error has its response
    here and error null: it failed, whatever the batch's status (it was run, not cut off by the
    window or a cancel), with the code of its error body. Any other line is a request the batch
    never ran: EXPIRED or CANCELLED as the batch ended (``batch_expired`` EXPIRED in any batch)."""
    custom_id = str(line.get("custom_id"))
    response = line.get("response")
    if isinstance(response, dict) and response.get("status_code") != 200:
        return ItemResult(custom_id, BatchState.FAILED, error=_http_error_code(response))
    error = line.get("error") or {}
    code = safe_code(error.get("code")) or "error"
    state = BatchState.EXPIRED if code == "batch_expired" else _UNANSWERED.get(status, BatchState.FAILED)
    return ItemResult(custom_id, state, error=code)


def _http_error_code(response: dict[str, Any]) -> str:
    """The machine code of a request's HTTP error (its body's ``error.code``, such as
    ``context_length_exceeded``), else ``http_<status>``."""
    body = response.get("body")
    error = body.get("error") if isinstance(body, dict) else None
    code = safe_code(error.get("code")) if isinstance(error, dict) else ""
    return code or f"http_{response.get('status_code', 'error')}"


def _filename(tag: str) -> str:
    """The name of the input file of the send tagged ``tag``."""
    return f"routesvc-{tag}.jsonl"


def _tool_call(call: dict[str, Any]) -> ToolCall:
    """One of a result message's ``tool_calls``."""
    function = call.get("function") or {}
    arguments = arguments_field(function.get("arguments"))
    return ToolCall(str(call.get("id") or ""), str(function.get("name") or ""), arguments)
