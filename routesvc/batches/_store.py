"""Batch jobs in embedded SQLite, so that a restart loses none.

One row per job. A queued job keeps its request (messages, tools and sampling: what is needed to
send it); the request is kept while its provider batch may still be refused whole for a reason
that passes (OpenAI's enqueued token limit, found as it validates the batch: ``requeue`` then
queues the jobs again), and cleared once the provider has accepted the batch (``drop_requests``)
or the job has ended. A job ends exactly once:
``finish`` changes only a job that has not ended, and says whether it did, so a result is charged
once. A job cancelled after it was sent stays tied to its provider batch (``provider_pending``),
which the provider may still answer it in (and bill), until that batch's results are read:
``close_cancelled`` then stores what it was billed, once. Calls run in a worker thread; one lock
serialises them on the one connection. Any SQLite error of the store on a call (a full disk, a
read-only file) is raised as ``BatchStoreUnavailable``, the file locked by another writer past the
busy timeout as its subclass ``BatchStoreBusy`` (``store_failure``).

Several processes may share the file (``server.workers``). A queued job is sent by whoever
``claim``s it: one ``BEGIN IMMEDIATE`` transaction marks it with the claimant and a lease, and
only the claimant may ``mark_submitted`` it. A claim that was neither turned into a submission nor
``release``d (its process died or stopped while sending) lapses with its lease, and the job is
claimable again.

Processes that share the file may send one provider name to different endpoints (a test run
against the fake provider beside a server on the real one, two deployments with their own keys).
Each job records the endpoint it is for: ``endpoint``, the provider's base URL where it was queued
and then where it was sent, and ``key_id``, a fingerprint (``key_id``) of the key of the process it
was queued through and then of the key that sent it. The queue sends only jobs queued for its own
endpoints and keys, and polls and cancels only batches of its own endpoints (see ``BatchQueue``);
rows stored before these columns, or queued before queued jobs kept their key, have none, and are
anyone's (at their endpoint), as they were.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from routesvc.catalog import ModelSpec
from routesvc.errors import BatchStoreBusy, BatchStoreFull, BatchStoreUnavailable, RequestTooLarge, quoted_id
from routesvc.models import (
    BatchJob,
    BatchResult,
    BatchState,
    BatchStatus,
    CacheTtl,
    FinishReason,
    Image,
    ImageDetail,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
    Usage,
)
from routesvc.provider_text import valid_calls
from routesvc.sqlite import create_private, immediate, is_busy, result_code, use_wal

_T = TypeVar("_T")

# The states a job ends in: nothing changes it any more.
_ENDED_STATES = (BatchState.SUCCEEDED, BatchState.FAILED, BatchState.EXPIRED, BatchState.CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    decision_id TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    estimated_cost_usd TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    provider_batch_id TEXT,
    text TEXT,
    input_tokens INTEGER,
    output_tokens INTEGER,
    cached_input_tokens INTEGER,
    cost_usd TEXT,
    finish_reason TEXT,
    provider_model TEXT,
    error TEXT NOT NULL DEFAULT '',
    claimed_by TEXT,
    claimed_until REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, provider, model);
CREATE TABLE IF NOT EXISTS endpoints (
    provider TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    seen_at REAL NOT NULL,
    every REAL,
    PRIMARY KEY (provider, endpoint)
);
CREATE TABLE IF NOT EXISTS keys (
    provider TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    key_id TEXT NOT NULL,
    seen_at REAL NOT NULL,
    every REAL NOT NULL,
    PRIMARY KEY (provider, endpoint, key_id)
);
"""
# endpoints: for each provider name and base URL a process serves, its last mark
# (``mark_endpoints``): when (seen_at, by the marking process's clock: only compared with itself)
# and how often that process marks (every). A row without ``every`` was written by an earlier
# release (when one first saw the URL, not a mark): it is no mark.
# keys: the same for each (provider, base URL, key fingerprint) a process sends with
# (``mark_keys``): whether the account that sent a batch still has a live process, which another
# account at the same URL (that gets 404 for the batch) must leave its jobs to. Created in files
# of earlier releases as they are opened (IF NOT EXISTS).

# Columns added after the first release, for files created before them.
# budget_usd: what the job's tenant budget counted when it was queued (set once that count is
# made), budget_by: the queue that counted it, budget_done: 1 once the end's correction is made.
# tool_calls: the result's tool calls, as a JSON list of {id, name, arguments_json}.
# cache_write_tokens, cache_write_1h_tokens: the result's prompt-cache writes (Usage).
# provider_pending: 1 while a job cancelled after it was sent waits for its provider batch's
# results (its usage and cost_usd are then what the provider billed for it, if it answered it);
# NULL otherwise. Jobs cancelled before the column was added have none: their batches are not read.
# endpoint: the provider's base URL the job was queued for, then the one it was sent to; key_id:
# the fingerprint of the key it was queued under (``add``; kept while it is queued again), then of
# the key that sent it (``key_id``). NULL in rows stored before they were added, and in jobs queued
# by releases before queued jobs kept their key (sent by any process at their endpoint).
# send_tag, send_at, send_count: the tag (our id) of the last provider batch create of the job that
# may have reached the provider without its reply reaching us, when it began, and how many requests
# it held; kept once it is placed (the send whose batch holds the job: ``knows``), NULL once the
# provider refused it (nothing created) or once the job is queued again.
# unverified: 1 while the job waits for a provider batch adopted by its shape (Anthropic keeps no
# tag: ``BatchAPI.tags_batches``), until its results show whether it holds the job; NULL otherwise.
# 2 (``_MOVED``): a job queued under another key by its lost send's lookup (``rekey_queued``
# ``tag``: its old key taken as gone), kept while its send adopts a batch by its shape: if that
# batch's results name none of its jobs (another account's client's, found by the new key), it
# ends FAILED ``provider_changed`` (``disown``) rather than be sent again with that key, as it
# does when its send's own lookup finds that batch no more, or several (``sends``,
# ``BatchQueue._adopt_earlier``); cleared by a new send (``tag_send``) and by an adoption by tag.
# Read as 1 by releases before it.
# request_bytes: the size of the stored request while it is kept, 0 once it is cleared (NULL in
# rows stored before it was added, counted as 0), summed through its own index (``add``).
# estimated_input_tokens: the decision's estimate of the request's input as its model bills it
# (images at its image_token_scale), charged for a result that reports no usage (NULL in rows
# stored before it was added: no input is charged then).
# model_spec: the job's model as the catalog had it when the job was queued (``encode_model``):
# its prices, for an answer the provider billed after a reload removed the model (NULL in rows
# stored before it was added: such an answer is then FAILED model_not_in_catalog, uncharged).
# provider_ended: the provider batch id a status check found ended (``mark_ended``): billed, so
# never given up, whatever process reads it and however often it restarts; NULL until then (and in
# rows stored before it was added). The job's batch counts as ended only while it is that batch's
# id: an earlier release, which does not know the column, leaves it as it was when it queues the
# job again and sends it in another batch. 1 (stored by releases that kept a flag, and cleared it
# in every write that moves a job) also counts.
# placed_in: the provider batch id the job was placed in (``mark_submitted``, ``tie_unplaced``): while
# it is still the job's batch, the job's ``send_at`` is when that batch was sent (its create began),
# which a cancel never moves. NULL until then (and in rows stored before it was added: their last
# change, ``updated_at``, is taken instead, as before); an earlier release that sends the job again
# in another batch leaves it naming the old one, so it no longer counts.
_ADDED_COLUMNS = (
    ("claimed_by", "TEXT"),
    ("claimed_until", "REAL"),
    ("budget_usd", "TEXT"),
    ("budget_by", "TEXT"),
    ("budget_done", "INTEGER"),
    ("tool_calls", "TEXT"),
    ("cache_write_tokens", "INTEGER"),
    ("cache_write_1h_tokens", "INTEGER"),
    ("provider_pending", "INTEGER"),
    ("endpoint", "TEXT"),
    ("key_id", "TEXT"),
    ("send_tag", "TEXT"),
    ("send_at", "REAL"),
    ("request_bytes", "INTEGER"),
    ("send_count", "INTEGER"),
    ("unverified", "INTEGER"),
    ("estimated_input_tokens", "INTEGER"),
    ("model_spec", "TEXT"),
    ("provider_ended", "INTEGER"),
    ("placed_in", "TEXT"),
)

# How long a statement, and the switch of a new file to WAL, wait for another process's lock.
_BUSY_TIMEOUT_SECONDS = 5.0

# ``unverified`` of a job moved to another key by its lost send's lookup (``rekey_queued``).
_MOVED = 2

# The holder of jobs queued again after their provider batch was refused for a while, until their
# delay has passed (``requeue``).
_BACKING_OFF = "backing-off"

_COLUMNS = (
    "id, tenant, decision_id, model, provider, state, estimated_cost_usd, created_at, updated_at, "
    "text, input_tokens, output_tokens, cached_input_tokens, cost_usd, finish_reason, provider_model, error, "
    "tool_calls, cache_write_tokens, cache_write_1h_tokens, estimated_input_tokens"
)


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """What a queued job's provider request is made of (the model is the job's)."""

    messages: tuple[Message, ...]
    max_output_tokens: int
    temperature: float | None = None
    tools: tuple[ToolSpec, ...] = ()
    stop: tuple[str, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """A queued job as the poller groups it: its request's size, not the request."""

    batch_id: str
    model: str
    created_at: float
    request_chars: int
    provider: str = ""
    # The base URL it was queued for; None in a row stored before endpoints were recorded.
    endpoint: str | None = None
    # The fingerprint of the key it was queued under (``key_id``); None: stored before queued
    # jobs kept it (anyone's at its endpoint).
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class SentJobs:
    """The jobs of one provider batch that wait for its results: ``waiting`` (SUBMITTED: the
    results end them) and ``cancelled`` (cancelled after they were sent: the provider may have
    answered them, and billed them, all the same)."""

    waiting: tuple[str, ...] = ()
    cancelled: tuple[str, ...] = ()
    # Where the batch was sent (base URL) and with which key (``key_id``); None in rows stored
    # before these were recorded.
    endpoint: str | None = None
    key_id: str | None = None
    # When the batch was sent (the earliest of its jobs' send times, ``placed_in``; for a row
    # placed before those were kept, its last change); None: no job of it listed.
    sent_at: float | None = None
    # When the last of its ``cancelled`` jobs was cancelled (their latest change); None: none is.
    cancelled_at: float | None = None
    # Adopted by its shape, not by a tag (``BatchStore.mark_submitted``): it may be another
    # client's, which only its results can tell.
    unverified: bool = False
    # A status check (of any process) found it ended (``BatchStore.mark_ended``).
    ended: bool = False


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long jobs whose provider batch was refused for a while wait before they are sent again:
    as long as they have waited so far (so the waits double), at least ``floor`` and at most
    ``cap`` seconds; never past ``max_age`` seconds after they were queued."""

    floor: float
    cap: float
    max_age: float

    def delay(self, age: float) -> float:
        """The wait of a job queued ``age`` seconds ago."""
        return min(self.cap, max(self.floor, age))


@dataclass(frozen=True, slots=True)
class EarlierSend:
    """A send whose reply was lost (``tag_send``), as its jobs' next send looks it up
    (``BatchStore.sends``): when it began, how many requests it held (jobs cancelled since
    included), its jobs among those asked about, and those of them moved to another key by its
    lookup (``rekey_queued`` ``tag``: ``unverified`` ``_MOVED``)."""

    since: float
    count: int
    jobs: list[str]
    moved: list[str]


@dataclass(frozen=True, slots=True)
class UnplacedSend:
    """A send whose reply was lost (``tag_send``) none of whose jobs was placed in a batch and none
    of which will be sent again: all ended (cancelled, expired) before their next send. The batch
    it may have created is still to be looked up (``BatchQueue._look_up_unplaced``)."""

    tag: str
    provider: str
    since: float
    count: int
    endpoint: str | None
    # The fingerprint of the key its jobs were queued under, and sent with (None: not recorded).
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class SentBatch:
    """A provider batch: its provider name and id, the endpoint it was sent to (None: not
    recorded), and whether it was adopted by its shape and may be another client's (``SentJobs``)."""

    provider: str
    provider_batch_id: str
    endpoint: str | None
    unverified: bool = False


@dataclass(frozen=True, slots=True)
class GoneMark:
    """A (provider, base URL) taken as gone from its last mark (``seen_at``, ``every``), or with
    ``key_id`` a (provider, base URL, key) no process sends with any more: what is done to its
    jobs is done only while the store still holds that mark, checked in the write itself (a
    process back at the URL, or with the key, has marked it anew: its jobs are left to it). A
    key's mark is checked in a write of jobs rows, each only while it still names that key (a
    process that reads the batch with a rotated key has made it that key's since: ``adopt``);
    ``seen_at`` None: a key no process has marked, only while none has."""

    provider: str
    endpoint: str
    seen_at: float | None
    every: float
    key_id: str | None = None

    @property
    def still(self) -> str:
        """An SQL condition true while the store holds the mark (``params`` follow it)."""
        if self.key_id is None:
            return _STILL_GONE
        if self.seen_at is None:
            return _KEY_NEVER_MARKED
        return _KEY_STILL_GONE

    def params(self) -> tuple[str | float, ...]:
        if self.key_id is None:
            assert self.seen_at is not None  # a URL's mark always has one
            return (self.provider, self.endpoint, self.seen_at, self.every)
        if self.seen_at is None:
            return (self.key_id, self.provider, self.endpoint, self.key_id)
        return (self.key_id, self.provider, self.endpoint, self.key_id, self.seen_at, self.every)


# True while the endpoints (keys) row holds a GoneMark's mark (its ``params`` follow); a key's,
# in a write of jobs rows, only for a row that still names the key.
_STILL_GONE = "EXISTS (SELECT 1 FROM endpoints WHERE provider = ? AND endpoint = ? AND seen_at = ? AND every = ?)"
_KEY_STILL_GONE = (
    "jobs.key_id = ? AND EXISTS (SELECT 1 FROM keys WHERE provider = ? AND endpoint = ? AND key_id = ?"
    " AND seen_at = ? AND every = ?)"
)
_KEY_NEVER_MARKED = (
    "jobs.key_id = ? AND NOT EXISTS (SELECT 1 FROM keys WHERE provider = ? AND endpoint = ? AND key_id = ?)"
)


def key_id(api_key: str | None) -> str:
    """A fingerprint of ``api_key`` that is safe to store and log: the first 8 hex digits of its
    SHA-256 ("" without a key). It tells two keys apart, never the key itself."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:8] if api_key else ""


def encode_model(model: ModelSpec) -> str:
    """``model`` as JSON text, kept with a job (``model_spec``): prices as decimal strings."""
    data: dict[str, Any] = {}
    for name in ModelSpec.__slots__:
        value = getattr(model, name)
        if isinstance(value, Decimal):
            value = str(value)
        elif isinstance(value, frozenset):
            value = sorted(value)
        data[name] = value
    return json.dumps(data)


_DECIMAL_FIELDS = frozenset(
    name for name in ModelSpec.__slots__ if ModelSpec.__dataclass_fields__[name].type in ("Decimal", Decimal)
)
_SET_FIELDS = frozenset(
    name for name in ModelSpec.__slots__ if str(ModelSpec.__dataclass_fields__[name].type).startswith("frozenset")
)


def decode_model(text: str) -> ModelSpec:
    """The model ``encode_model`` wrote."""
    data = json.loads(text)
    for name in _DECIMAL_FIELDS & data.keys():
        data[name] = Decimal(data[name])
    for name in _SET_FIELDS & data.keys():
        data[name] = frozenset(data[name])
    return ModelSpec(**{name: value for name, value in data.items() if name in ModelSpec.__dataclass_fields__})


def encode_request(request: QueuedRequest) -> str:
    """A queued job's request as JSON."""
    return json.dumps(
        {
            "messages": [_encode_message(m) for m in request.messages],
            "max_output_tokens": request.max_output_tokens,
            "temperature": request.temperature,
            "tools": [_encode_tool(tool) for tool in request.tools],
            "stop": list(request.stop),
            "tool_choice": _encode_tool_choice(request.tool_choice),
            "parallel_tool_calls": request.parallel_tool_calls,
            "response_format": _encode_response_format(request.response_format),
        }
    )


def decode_request(text: str) -> QueuedRequest:
    """The request ``encode_request`` stored; rows stored before tools (or stop sequences, a tool
    choice, a response format, cache breakpoints, tool errors) were kept have none."""
    data = json.loads(text)
    return QueuedRequest(
        messages=tuple(
            Message(
                Role(m["role"]),
                m["content"],
                _decode_calls(m.get("tool_calls")),
                m.get("tool_call_id", ""),
                _decode_parts(m.get("parts")),
                _decode_cache(m.get("cache_breakpoint")),
                bool(m.get("tool_error", False)),
            )
            for m in data["messages"]
        ),
        max_output_tokens=int(data["max_output_tokens"]),
        temperature=data["temperature"],
        tools=tuple(
            ToolSpec(
                t["name"],
                t.get("description", ""),
                MappingProxyType(dict(t.get("parameters") or {})),
                _decode_cache(t.get("cache_breakpoint")),
            )
            for t in data.get("tools", ())
        ),
        stop=tuple(data.get("stop", ())),
        tool_choice=_decode_tool_choice(data.get("tool_choice")),
        parallel_tool_calls=data.get("parallel_tool_calls"),
        response_format=_decode_response_format(data.get("response_format")),
    )


def _encode_tool_choice(choice: ToolChoice | None) -> dict[str, str] | None:
    return None if choice is None else {"mode": choice.mode.value, "name": choice.name}


def _encode_response_format(response_format: ResponseFormat | None) -> dict[str, Any] | None:
    if response_format is None:
        return None
    return {
        "type": response_format.type.value,
        "name": response_format.name,
        "schema": dict(response_format.schema),
        "strict": response_format.strict,
    }


def _decode_response_format(data: dict[str, Any] | None) -> ResponseFormat | None:
    if data is None:
        return None
    schema = MappingProxyType(dict(data.get("schema") or {}))
    return ResponseFormat(ResponseFormatType(data["type"]), data.get("name", ""), schema, bool(data.get("strict")))


def _decode_tool_choice(data: dict[str, str] | None) -> ToolChoice | None:
    return None if data is None else ToolChoice(ToolChoiceMode(data["mode"]), data.get("name", ""))


def _encode_tool(tool: ToolSpec) -> dict[str, Any]:
    encoded: dict[str, Any] = {"name": tool.name, "description": tool.description, "parameters": dict(tool.parameters)}
    if tool.cache_breakpoint is not None:
        encoded["cache_breakpoint"] = tool.cache_breakpoint.value
    return encoded


def _decode_cache(value: str | None) -> CacheTtl | None:
    """A cache breakpoint as ``CacheTtl.value`` stored it ("5m", "1h"); None when none was."""
    return None if value is None else CacheTtl(value)


def _encode_message(message: Message) -> dict[str, Any]:
    encoded: dict[str, Any] = {"role": message.role.value, "content": message.content}
    if message.cache_breakpoint is not None:
        encoded["cache_breakpoint"] = message.cache_breakpoint.value
    if message.tool_calls:
        encoded["tool_calls"] = _encode_calls(message.tool_calls)
    if message.tool_call_id:
        encoded["tool_call_id"] = message.tool_call_id
    if message.tool_error:
        encoded["tool_error"] = True
    if message.parts:
        encoded["parts"] = [_encode_part(part) for part in message.parts]
    return encoded


def _encode_part(part: str | Image) -> dict[str, Any]:
    """A text part as ``{"text"}``, an image as ``{"image"}`` with its bytes in base64."""
    if isinstance(part, str):
        return {"text": part}
    return {
        "image": {
            "media_type": part.media_type,
            "url": part.url,
            "data": base64.b64encode(part.data).decode("ascii"),
            "width": part.width,
            "height": part.height,
            "detail": part.detail.value,
        }
    }


def _decode_parts(data: list[dict[str, Any]] | None) -> tuple[str | Image, ...]:
    parts: list[str | Image] = []
    for part in data or ():
        if "text" in part:
            parts.append(part["text"])
        else:
            image = part["image"]
            parts.append(
                Image(
                    image["media_type"],
                    image["url"],
                    base64.b64decode(image["data"]),
                    image["width"],
                    image["height"],
                    # Stored before images had a detail: auto, as they were sent.
                    ImageDetail(image.get("detail", ImageDetail.AUTO.value)),
                )
            )
    return tuple(parts)


def _encode_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, str]]:
    return [{"id": c.id, "name": c.name, "arguments_json": c.arguments_json} for c in calls]


def _decode_calls(data: list[dict[str, str]] | None) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(c["id"], c["name"], c["arguments_json"]) for c in data or ())


def _add_missing_columns(connection: sqlite3.Connection) -> None:
    with immediate(connection):
        present = {row["name"] for row in connection.execute("PRAGMA table_info(jobs)")}
        for name, kind in _ADDED_COLUMNS:
            if name not in present:
                connection.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        # The few jobs whose counted budget waits for its correction, read every poller round.
        connection.execute(
            "CREATE INDEX IF NOT EXISTS jobs_uncorrected ON jobs (budget_by)"
            " WHERE budget_usd IS NOT NULL AND budget_done IS NULL"
        )
        # The few cancelled jobs whose provider batch is still read, listed every poller round.
        connection.execute(
            "CREATE INDEX IF NOT EXISTS jobs_provider_pending ON jobs (provider, provider_batch_id)"
            " WHERE provider_pending IS NOT NULL"
        )
        # The few jobs of sends whose reply was lost not placed in a batch yet, read every poller
        # round (``unplaced_sends``).
        connection.execute(
            "CREATE INDEX IF NOT EXISTS jobs_unplaced_send ON jobs (send_tag)"
            " WHERE send_tag IS NOT NULL AND provider_batch_id IS NULL"
        )
        # What the kept requests weigh, summed from this index alone at every ``add``: the rows
        # themselves hold the requests, so a sum over them would read every stored byte.
        connection.execute("CREATE INDEX IF NOT EXISTS jobs_request_bytes ON jobs (request_bytes)")
        # ... and per tenant, from this one (``max_tenant_request_bytes``).
        connection.execute("CREATE INDEX IF NOT EXISTS jobs_tenant_request_bytes ON jobs (tenant, request_bytes)")
        if "every" not in {row["name"] for row in connection.execute("PRAGMA table_info(endpoints)")}:
            connection.execute("ALTER TABLE endpoints ADD COLUMN every REAL")


def _status(row: sqlite3.Row) -> BatchStatus:
    job = BatchJob(
        batch_id=row["id"],
        tenant=row["tenant"],
        state=BatchState(row["state"]),
        model=row["model"],
        provider=row["provider"],
        estimated_cost_usd=Decimal(row["estimated_cost_usd"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        decision_id=row["decision_id"],
        estimated_input_tokens=row["estimated_input_tokens"],
    )
    result = None
    if job.state is BatchState.SUCCEEDED:
        result = BatchResult(
            text=row["text"] or "",
            usage=Usage(
                row["input_tokens"] or 0,
                row["output_tokens"] or 0,
                row["cached_input_tokens"] or 0,
                row["cache_write_tokens"] or 0,
                row["cache_write_1h_tokens"] or 0,
            ),
            cost_usd=Decimal(row["cost_usd"] or "0"),
            finish_reason=FinishReason(row["finish_reason"] or "unspecified"),
            provider_model=row["provider_model"] or "",
            # A row stored before results were made valid text may hold half an emoji's pair
            # here (json.dumps escaped it; SQLite took it): it is made valid on the way out.
            tool_calls=valid_calls(_decode_calls(json.loads(row["tool_calls"] or "[]"))),
        )
    # A job queued again after its provider batch was refused for a while keeps that code, for
    # when it waits too long (``expire_queued``); callers see an error only once the job ended.
    return BatchStatus(job, result, row["error"] if job.state.ended else "")


def store_failure(path: Path, exc: sqlite3.Error | OSError, doing: str) -> BatchStoreUnavailable:
    """The error for the store at ``path`` failing with ``exc`` while it ``doing`` ("failed",
    "cannot be opened"): ``BatchStoreBusy`` (retry shortly) when another writer held its lock past
    the busy timeout (SQLITE_BUSY), else ``BatchStoreUnavailable`` (a full disk, a read-only file,
    not a database: something to fix)."""
    if isinstance(exc, sqlite3.Error) and is_busy(exc):
        return BatchStoreBusy(f"batch.store_path {path} stayed locked by another writer; retry shortly")
    if isinstance(exc, sqlite3.Error) and result_code(exc) == sqlite3.SQLITE_FULL:
        return BatchStoreFull(f"batch.store_path {path}: the disk is full; nothing was stored")
    return BatchStoreUnavailable(
        f"batch.store_path {path} {doing} ({type(exc).__name__}: {exc}); batch mode is unavailable"
    )


class BatchStore:
    """The jobs table of one SQLite file (created with its directory on open)."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        max_request_bytes: int | None = None,
        max_tenant_request_bytes: int | None = None,
    ) -> None:
        self._path = path
        self._max_request_bytes = max_request_bytes
        self._max_tenant_request_bytes = max_tenant_request_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        create_private(path)
        self._connection = sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT_SECONDS, check_same_thread=False, isolation_level=None
        )
        try:
            self._connection.row_factory = sqlite3.Row
            # Another process may be opening the new file too (a sibling's first batch request,
            # or its poller as soon as the file exists): the switch is retried (``use_wal``).
            use_wal(self._connection, path, _BUSY_TIMEOUT_SECONDS)
            self._connection.executescript(_SCHEMA)
            _add_missing_columns(self._connection)
        except BaseException:
            self._connection.close()  # a failed open keeps no file handle
            raise
        self._lock = threading.Lock()
        self._clock = clock
        # The last mark ``mark_keys`` wrote through this store for each key it was given.
        self._own_key_marks: dict[tuple[str, str, str], tuple[float, float]] = {}

    def own_key_mark(self, triple: tuple[str, str, str]) -> tuple[float, float] | None:
        """The last mark (when, how often) ``mark_keys`` wrote through this store for the
        (provider, base URL, key fingerprint) ``triple``; None if it never marked it."""
        return self._own_key_marks.get(triple)

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        def locked() -> _T:
            with self._lock:
                return work(self._connection)

        try:
            return await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            # A constraint or a misuse (IntegrityError, ProgrammingError, ...) is our bug: INTERNAL.
            if not isinstance(exc, sqlite3.OperationalError) and type(exc) is not sqlite3.DatabaseError:
                raise
            raise store_failure(self._path, exc, "failed") from exc

    async def aclose(self) -> None:
        """Close the file."""
        await self._run(lambda connection: connection.close())

    async def add(
        self,
        job: BatchJob,
        request: str,
        *,
        held_by: str,
        hold_seconds: float,
        endpoint: str | None = None,
        key: str | None = None,
        model_spec: str | None = None,
    ) -> None:
        """Store a new queued job with its request, claimed by ``held_by`` for ``hold_seconds``,
        unless the requests kept would pass the store's bound or its tenant's (``BatchStoreFull``);
        for its provider's ``endpoint`` (the base URL that is to send it) and ``key`` (the
        fingerprint of the key that is to send it, ``key_id``: only a process with that key
        sends it), with its model as the catalog has it now (``model_spec``: ``encode_model``).

        Held, no poller sends the job until ``held_by`` ``release``s it (or the hold lapses): the
        submitter first makes sure its caller learns the job's id. A request that alone is over
        either bound could never be stored: ``RequestTooLarge`` (waiting would not help).
        """
        if self._max_request_bytes is not None and len(request) > self._max_request_bytes:
            raise RequestTooLarge(
                f"batch.max_stored_request_bytes: this request takes {len(request)} bytes in the batch store,"
                f" more than the {self._max_request_bytes} it may keep in all; it can never be queued"
                " (send it realtime, or raise the setting)"
            )
        if self._max_tenant_request_bytes is not None and len(request) > self._max_tenant_request_bytes:
            raise RequestTooLarge(
                f"batch.max_tenant_share_of_stored_requests: this request takes {len(request)} bytes in the batch"
                f" store, more than the {self._max_tenant_request_bytes} one tenant may keep"
                " (that share of batch.max_stored_request_bytes); it can never be queued (send it realtime,"
                " or raise the settings)"
            )

        def insert(connection: sqlite3.Connection) -> None:
            with immediate(connection):
                if self._max_request_bytes is not None:
                    (kept,) = connection.execute(
                        "SELECT COALESCE(SUM(request_bytes), 0) FROM jobs INDEXED BY jobs_request_bytes"
                    ).fetchone()
                    if kept + len(request) > self._max_request_bytes:
                        raise BatchStoreFull(
                            f"batch.max_stored_request_bytes: the store keeps {kept} bytes of requests not yet"
                            f" taken by a provider, and this one ({len(request)}) would pass"
                            f" {self._max_request_bytes}; retry once queued jobs are sent"
                        )
                if self._max_tenant_request_bytes is not None:
                    (tenant_kept,) = connection.execute(
                        "SELECT COALESCE(SUM(request_bytes), 0) FROM jobs INDEXED BY jobs_tenant_request_bytes"
                        " WHERE tenant = ?",
                        (job.tenant,),
                    ).fetchone()
                    if tenant_kept + len(request) > self._max_tenant_request_bytes:
                        raise BatchStoreFull(
                            f"batch.max_tenant_share_of_stored_requests: the store keeps {tenant_kept} bytes of"
                            f" requests of tenant {quoted_id(job.tenant)} not yet taken by a provider, and this one"
                            f" ({len(request)}) would pass the tenant's {self._max_tenant_request_bytes};"
                            " retry once its queued jobs are sent"
                        )
                _insert(connection)

        def _insert(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT INTO jobs (id, tenant, decision_id, model, provider, state, request, estimated_cost_usd,"
                " created_at, updated_at, claimed_by, claimed_until, endpoint, key_id, request_bytes,"
                " estimated_input_tokens, model_spec) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.batch_id,
                    job.tenant,
                    job.decision_id,
                    job.model,
                    job.provider,
                    job.state.value,
                    request,
                    str(job.estimated_cost_usd),
                    job.created_at,
                    job.updated_at,
                    held_by,
                    self._clock() + hold_seconds,
                    endpoint,
                    key,
                    len(request),
                    job.estimated_input_tokens,
                    model_spec,
                ),
            )

        await self._run(insert)

    async def model_spec(self, batch_id: str) -> ModelSpec | None:
        """The job's model as the catalog had it when the job was queued; None: not kept."""

        def select(connection: sqlite3.Connection) -> str | None:
            row = connection.execute("SELECT model_spec FROM jobs WHERE id = ?", (batch_id,)).fetchone()
            return None if row is None else row["model_spec"]

        text = await self._run(select)
        return None if text is None else decode_model(text)

    async def get(self, batch_id: str, tenant: str) -> BatchStatus | None:
        """The job ``batch_id`` of ``tenant``, or None."""

        def select(connection: sqlite3.Connection) -> BatchStatus | None:
            row = connection.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE id = ? AND tenant = ?",  # noqa: S608 - constant column list
                (batch_id, tenant),
            ).fetchone()
            return None if row is None else _status(row)

        return await self._run(select)

    async def get_any(self, batch_id: str) -> BatchStatus | None:
        """The job ``batch_id`` whatever its tenant, or None (for the poller, never for callers)."""

        def select(connection: sqlite3.Connection) -> BatchStatus | None:
            row = connection.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE id = ?",  # noqa: S608 - constant column list
                (batch_id,),
            ).fetchone()
            return None if row is None else _status(row)

        return await self._run(select)

    async def queued(self) -> list[QueuedJob]:
        """Every queued job nobody holds a live claim on, oldest first, without its request (which
        may hold megabytes of images: ``requests`` reads those of one group once it is claimed)."""
        now = self._clock()

        def select(connection: sqlite3.Connection) -> list[QueuedJob]:
            rows = connection.execute(
                "SELECT id, model, created_at, length(request) AS request_chars, provider, endpoint, key_id FROM jobs"
                " WHERE state = ? AND (claimed_until IS NULL OR claimed_until <= ?) ORDER BY created_at",
                (BatchState.QUEUED.value, now),
            ).fetchall()
            return [
                QueuedJob(
                    row["id"],
                    row["model"],
                    row["created_at"],
                    row["request_chars"],
                    row["provider"],
                    row["endpoint"],
                    row["key_id"],
                )
                for row in rows
            ]

        return await self._run(select)

    async def requests(self, batch_ids: list[str], owner: str) -> dict[str, str]:
        """The requests of the jobs of ``batch_ids`` still queued and claimed by ``owner``, by id
        (a job cancelled since it was claimed is left out)."""

        def select(connection: sqlite3.Connection) -> dict[str, str]:
            found = {}
            for batch_id in batch_ids:
                row = connection.execute(
                    "SELECT request FROM jobs WHERE id = ? AND state = ? AND claimed_by = ?",
                    (batch_id, BatchState.QUEUED.value, owner),
                ).fetchone()
                if row is not None:
                    found[batch_id] = row["request"]
            return found

        return await self._run(select)

    async def expire_queued(self, queued_before: float, error: str) -> int:
        """End EXPIRED (with ``error``) every job queued before ``queued_before`` that is still
        queued and nobody holds a live claim on (a send under way decides its jobs' end); one
        queued again after its provider batch was refused (``requeue``) ends FAILED with that
        code instead. Returns how many ended."""
        now = self._clock()
        expired, failed = BatchState.EXPIRED.value, BatchState.FAILED.value

        def update(connection: sqlite3.Connection) -> int:
            # The right-hand sides read the row as it was.
            cursor = connection.execute(
                "UPDATE jobs SET state = CASE WHEN error = '' THEN ? ELSE ? END, updated_at = ?, request = '{}',"
                " request_bytes = 0, error = CASE WHEN error = '' THEN ? ELSE error END"
                " WHERE state = ? AND created_at < ? AND (claimed_until IS NULL OR claimed_until <= ?)",
                (expired, failed, now, error, BatchState.QUEUED.value, queued_before, now),
            )
            return cursor.rowcount

        return await self._run(update)

    async def prune_ended(self, ended_before: float, limit: int) -> int:
        """Delete at most ``limit`` jobs that ended before ``ended_before``, whose budget needs
        no more correction, whose provider batch is not still to be read, and that is not claimed
        (a job cancelled while its group is sent is tied to its provider batch only once the send
        ends); such a job is kept until all are done. Returns how many."""
        ended = tuple(state.value for state in _ENDED_STATES)
        now = self._clock()

        def delete(connection: sqlite3.Connection) -> int:
            cursor = connection.execute(
                "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs WHERE state IN (?, ?, ?, ?)"
                " AND updated_at < ? AND (budget_usd IS NULL OR budget_done IS NOT NULL)"
                " AND provider_pending IS NULL AND (claimed_until IS NULL OR claimed_until <= ?) LIMIT ?)",
                (*ended, ended_before, now, limit),
            )
            return cursor.rowcount

        return await self._run(delete)

    async def claim(self, batch_ids: list[str], owner: str, lease_seconds: float) -> list[str]:
        """Claim the queued jobs of ``batch_ids`` that nobody else holds, for ``lease_seconds``.

        Returns the ids claimed, in order; only these may be sent by ``owner``. Atomic across
        processes: of two claimants of one job, exactly one gets it.
        """
        now = self._clock()

        def update(connection: sqlite3.Connection) -> list[str]:
            claimed = []
            with immediate(connection):
                for batch_id in batch_ids:
                    cursor = connection.execute(
                        "UPDATE jobs SET claimed_by = ?, claimed_until = ? WHERE id = ? AND state = ?"
                        " AND (claimed_until IS NULL OR claimed_until <= ?)",
                        (owner, now + lease_seconds, batch_id, BatchState.QUEUED.value, now),
                    )
                    if cursor.rowcount == 1:
                        claimed.append(batch_id)
            return claimed

        return await self._run(update)

    async def release(self, batch_ids: list[str], owner: str, *, refused: bool = False) -> None:
        """Give up ``owner``'s claims on still-queued jobs (a send failed); anyone may send them.
        ``refused``: the provider answered the send's create with a refusal (nothing was
        created), so its tag is forgotten and no lookup follows (``sends``). (A job just added is
        released by ``commit``.)"""
        forget = ", send_tag = NULL, send_at = NULL, send_count = NULL" if refused else ""

        def update(connection: sqlite3.Connection) -> None:
            connection.executemany(
                f"UPDATE jobs SET claimed_by = NULL, claimed_until = NULL{forget}"  # noqa: S608 - constant text
                " WHERE id = ? AND claimed_by = ? AND state = ?",
                [(batch_id, owner, BatchState.QUEUED.value) for batch_id in batch_ids],
            )

        await self._run(update)

    async def tag_send(self, batch_ids: list[str], owner: str, tag: str) -> list[str]:
        """Record, before it leaves, that ``owner`` is sending its claimed jobs of ``batch_ids`` in
        a provider batch tagged ``tag``: until they are placed (``mark_submitted``), whoever sends
        them next looks that batch up first (``sends``), as it may have been created. The send
        holds every job tagged: their count is recorded, as the batch's size. Returns
        the ids tagged, the only ones to send: a job no longer queued and claimed by ``owner``
        (cancelled, or placed since by a sibling send's lookup: ``mark_submitted`` ``tag``) is
        not sent."""
        now = self._clock()

        def update(connection: sqlite3.Connection) -> list[str]:
            tagged = []
            with immediate(connection):
                for batch_id in batch_ids:
                    cursor = connection.execute(
                        "UPDATE jobs SET send_tag = ?, send_at = ?, send_count = ?, unverified = NULL"
                        " WHERE id = ? AND state = ? AND claimed_by = ?",
                        (tag, now, len(batch_ids), batch_id, BatchState.QUEUED.value, owner),
                    )
                    if cursor.rowcount == 1:
                        tagged.append(batch_id)
                connection.execute("UPDATE jobs SET send_count = ? WHERE send_tag = ?", (len(tagged), tag))
            return tagged

        return await self._run(update)

    async def sends(self, batch_ids: list[str]) -> dict[str, EarlierSend]:
        """Earlier sends of the jobs of ``batch_ids`` that may have reached the provider, by tag
        (``EarlierSend``)."""

        def select(connection: sqlite3.Connection) -> dict[str, EarlierSend]:
            found: dict[str, EarlierSend] = {}
            for batch_id in batch_ids:
                row = connection.execute(
                    "SELECT send_tag, send_at, send_count, unverified FROM jobs WHERE id = ? AND send_tag IS NOT NULL",
                    (batch_id,),
                ).fetchone()
                if row is None:
                    continue
                send = found.setdefault(row["send_tag"], EarlierSend(row["send_at"], row["send_count"] or 0, [], []))
                send.jobs.append(batch_id)
                if row["unverified"] == _MOVED:
                    send.moved.append(batch_id)
            return {
                tag: EarlierSend(send.since, send.count or len(send.jobs), send.jobs, send.moved)
                for tag, send in found.items()
            }

        return await self._run(select)

    async def unplaced_sends(self) -> list[UnplacedSend]:
        """Sends whose reply was lost none of whose jobs is queued (to be looked up by its next
        send), placed in a batch, or claimed (a send under way, or one whose claim has not lapsed:
        its create may still be stamped)."""
        now = self._clock()
        queued = BatchState.QUEUED.value

        def select(connection: sqlite3.Connection) -> list[UnplacedSend]:
            # A tag with a job placed (one failed before it was sent stays unplaced) is no lost send.
            rows = connection.execute(
                "SELECT send_tag, MIN(provider) AS provider, MIN(send_at) AS since, MAX(send_count) AS count,"
                " MIN(endpoint) AS endpoint, MIN(key_id) AS key_id FROM jobs INDEXED BY jobs_unplaced_send"
                " WHERE send_tag IS NOT NULL AND provider_batch_id IS NULL GROUP BY send_tag"
                " HAVING SUM(state = ?) = 0 AND SUM(claimed_until IS NOT NULL AND claimed_until > ?) = 0"
                " AND NOT EXISTS (SELECT 1 FROM jobs AS placed WHERE placed.send_tag = jobs.send_tag"
                " AND placed.provider_batch_id IS NOT NULL)",
                (queued, now),
            ).fetchall()
            return [
                UnplacedSend(
                    row["send_tag"], row["provider"], row["since"], row["count"] or 1, row["endpoint"], row["key_id"]
                )
                for row in rows
            ]

        return await self._run(select)

    async def tie_unplaced(
        self, tag: str, provider: str, provider_batch_id: str, sent_to: tuple[str, str], *, unverified: bool
    ) -> int:
        """Tie the ended jobs of the send tagged ``tag`` (``unplaced_sends``) to the batch it
        created, found since, as sent jobs cancelled are (``provider_pending``): read once it
        ends, for what the provider billed. Returns how many."""
        endpoint, sent_key = sent_to
        shape = 1 if unverified else None
        states = (BatchState.CANCELLED.value, BatchState.EXPIRED.value)

        def update(connection: sqlite3.Connection) -> int:
            cursor = connection.execute(
                "UPDATE jobs SET provider = ?, provider_batch_id = ?, provider_pending = 1, claimed_by = NULL,"
                " claimed_until = NULL, endpoint = ?, key_id = ?, unverified = ?, provider_ended = NULL,"
                " budget_usd = CASE WHEN budget_done IS NULL THEN budget_usd ELSE '0' END, budget_done = NULL,"
                " placed_in = ?"
                " WHERE send_tag = ? AND state IN (?, ?) AND provider_batch_id IS NULL",
                (provider, provider_batch_id, endpoint, sent_key, shape, provider_batch_id, tag, *states),
            )
            return cursor.rowcount

        return await self._run(update)

    async def mark_endpoints(
        self, served: list[tuple[str, str]], every: float
    ) -> dict[tuple[str, str], tuple[float, float] | None]:
        """Mark the (provider, base URL) pairs of ``served`` as served now by a process that marks
        them every ``every`` seconds, and return, for each other pair that jobs not read yet are
        queued for or sent to (or a lost send is to be looked up at), its last mark: (when, by the
        marker's clock; how often it marks), or None when no process that marks has marked it (a
        process of an earlier release serves it, or served it last)."""
        now = self._clock()
        states = (BatchState.QUEUED.value, BatchState.SUBMITTED.value)
        serving = set(served)

        def update(connection: sqlite3.Connection) -> dict[tuple[str, str], tuple[float, float] | None]:
            with immediate(connection):
                connection.executemany(
                    "INSERT INTO endpoints (provider, endpoint, seen_at, every) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (provider, endpoint) DO UPDATE SET seen_at = excluded.seen_at,"
                    " every = excluded.every",
                    [(provider, endpoint, now, every) for provider, endpoint in served],
                )
                # Through their indexes: the jobs not read yet and the sends still to look up
                # (``unplaced_sends``), never the ended jobs kept for GetBatch.
                rows = connection.execute(
                    "SELECT provider, endpoint FROM jobs INDEXED BY jobs_state WHERE state IN (?, ?)"
                    " AND endpoint IS NOT NULL UNION SELECT provider, endpoint FROM jobs"
                    " INDEXED BY jobs_provider_pending WHERE provider_pending IS NOT NULL AND endpoint IS NOT NULL"
                    " UNION SELECT provider, endpoint FROM jobs INDEXED BY jobs_unplaced_send"
                    " WHERE send_tag IS NOT NULL AND provider_batch_id IS NULL AND endpoint IS NOT NULL",
                    states,
                ).fetchall()
                named = {(row["provider"], row["endpoint"]) for row in rows} - serving
                marks: dict[tuple[str, str], tuple[float, float | None]] = {
                    (row["provider"], row["endpoint"]): (row["seen_at"], row["every"])
                    for row in connection.execute("SELECT provider, endpoint, seen_at, every FROM endpoints")
                }
                # A row no job waiting names, not marked for a day, is forgotten (a process that
                # serves it marks it again): the table stays as small as the URLs in use.
                connection.executemany(
                    "DELETE FROM endpoints WHERE provider = ? AND endpoint = ? AND seen_at = ?",
                    [
                        (*pair, seen_at)
                        for pair, (seen_at, every) in marks.items()
                        if pair not in named and pair not in serving and (every is None or seen_at < now - 86400)
                    ],
                )
            found: dict[tuple[str, str], tuple[float, float] | None] = {}
            for pair in named:
                seen_at, marked_every = marks.get(pair, (None, None))
                found[pair] = None if seen_at is None or marked_every is None else (seen_at, marked_every)
            return found

        return await self._run(update)

    async def mark_keys(
        self, served: list[tuple[str, str, str]], every: float, *, for_others: Iterable[tuple[str, str, str]] = ()
    ) -> dict[tuple[str, str, str], tuple[float, float] | None]:
        """Mark the (provider, base URL, key fingerprint) triples of ``served`` as sent with now
        by a process that marks them every ``every`` seconds, and return, for each other key that
        provider batches not read yet at one of those base URLs were sent with (or jobs there are
        queued under, or a lost send there is to be looked up with), its last mark
        (when, by the marker's clock; how often it marks), or None when no process that marks
        keys has marked it (an earlier release sent with it). The keys ``for_others`` (of batches
        another key sent, marked on its behalf) are marked too, but recorded as this store's own
        mark (``own_key_mark``) only where the store held this store's last own mark of the key
        before: once another process has marked it since, never (a key this process once sent
        with by mistake, then reverted, is the key of the process that marked it since, however
        often this one marks it for that process's batches)."""
        now = self._clock()
        states = (BatchState.QUEUED.value, BatchState.SUBMITTED.value)
        own = set(served)
        marked = [*served, *(set(for_others) - own)]
        serving = set(marked)
        urls = {(provider, endpoint) for provider, endpoint, _ in marked}
        others_before: dict[tuple[str, str, str], tuple[float, float]] = {}

        def update(connection: sqlite3.Connection) -> dict[tuple[str, str, str], tuple[float, float] | None]:
            with immediate(connection):
                for triple in serving - own:
                    row = connection.execute(
                        "SELECT seen_at, every FROM keys WHERE provider = ? AND endpoint = ? AND key_id = ?", triple
                    ).fetchone()
                    if row is not None:
                        others_before[triple] = (row["seen_at"], row["every"])
                connection.executemany(
                    "INSERT INTO keys (provider, endpoint, key_id, seen_at, every) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (provider, endpoint, key_id) DO UPDATE SET seen_at = excluded.seen_at,"
                    " every = excluded.every",
                    [(*triple, now, every) for triple in marked],
                )
                rows = connection.execute(
                    "SELECT provider, endpoint, key_id FROM jobs INDEXED BY jobs_state WHERE state IN (?, ?)"
                    " AND key_id IS NOT NULL AND endpoint IS NOT NULL UNION SELECT provider, endpoint, key_id"
                    " FROM jobs INDEXED BY jobs_provider_pending WHERE provider_pending IS NOT NULL"
                    " AND key_id IS NOT NULL AND endpoint IS NOT NULL UNION SELECT provider, endpoint, key_id"
                    " FROM jobs INDEXED BY jobs_unplaced_send WHERE send_tag IS NOT NULL"
                    " AND provider_batch_id IS NULL AND key_id IS NOT NULL AND endpoint IS NOT NULL",
                    states,
                ).fetchall()
                named = {(row["provider"], row["endpoint"], row["key_id"]) for row in rows}
                marks = {
                    (row["provider"], row["endpoint"], row["key_id"]): (row["seen_at"], row["every"])
                    for row in connection.execute("SELECT provider, endpoint, key_id, seen_at, every FROM keys")
                }
                # A key no batch waiting names, not marked for a day, is forgotten.
                connection.executemany(
                    "DELETE FROM keys WHERE provider = ? AND endpoint = ? AND key_id = ? AND seen_at = ?",
                    [
                        (*triple, seen_at)
                        for triple, (seen_at, _) in marks.items()
                        if triple not in named and triple not in serving and seen_at < now - 86400
                    ],
                )
            return {triple: marks.get(triple) for triple in named - serving if (triple[0], triple[1]) in urls}

        others = await self._run(update)
        self._own_key_marks.update((triple, (now, every)) for triple in served)
        self._own_key_marks.update(
            (triple, (now, every))
            for triple, before in others_before.items()
            if self._own_key_marks.get(triple) == before
        )
        return others

    async def move_queued(
        self, provider: str, old_endpoint: str, to: tuple[str, str], *, gone: GoneMark | None = None
    ) -> tuple[int, list[str]]:
        """Queue for ``to`` (a base URL and the fingerprint of the key that sends there) the jobs of
        ``provider`` queued for ``old_endpoint`` (its base URL
        changed) that were never sent and are not claimed; returns how many moved, and the ids of those left whose
        last send's reply was lost there (``tag_send``: the batch it may have made is at the old
        endpoint, so they are not sent again elsewhere). With ``gone``, nothing is moved nor
        returned unless the store still holds that mark of ``old_endpoint``."""
        return await self._requeue(
            ("endpoint = ?, key_id = ?", to), ("provider = ? AND endpoint = ?", (provider, old_endpoint)), gone=gone
        )

    async def rekey_queued(
        self,
        provider: str,
        endpoint: str,
        old_key: str,
        key: str,
        *,
        gone: GoneMark | None = None,
        rotated: bool = False,
        tag: str | None = None,
    ) -> tuple[int, list[str]]:
        """Queue for ``key`` (a fingerprint) the jobs of ``provider`` at ``endpoint`` queued for
        ``old_key`` (a key rotated, or one no process sends with any more) that are not claimed;
        returns how many moved, and the ids of those left. With ``gone`` (``old_key``'s mark), only
        while the store still holds it. A job whose last send's reply was lost (``tag_send``) is
        left, its id returned, as ``move_queued`` leaves one: the batch it may have made is
        ``old_key``'s, which another account's key neither finds nor reads, so it would be sent
        again; unless ``rotated`` (a key this process rotated away from: the same account's,
        which finds that batch), its send then looking the batch up with ``key``. With ``tag``,
        only the jobs of the send so tagged, whose batch ``key`` found (the same account's, or,
        found by its shape, maybe another account's client's): they are marked moved
        (``unverified`` ``_MOVED``), never to be sent again with ``key`` (``disown``)."""
        params: tuple[str, ...] = (provider, endpoint, old_key)
        where = ("provider = ? AND endpoint = ? AND key_id = ?", params)
        assign: tuple[str, tuple[str, ...]] = ("key_id = ?", (key,))
        if tag is not None:
            where = (f"{where[0]} AND send_tag = ?", (*params, tag))
            assign = (f"key_id = ?, unverified = {_MOVED}", (key,))
        return await self._requeue(assign, where, gone=gone, tagged_too=rotated or tag is not None)

    async def _requeue(
        self,
        assign: tuple[str, tuple[str, ...]],
        where: tuple[str, tuple[str, ...]],
        *,
        gone: GoneMark | None,
        tagged_too: bool = False,
    ) -> tuple[int, list[str]]:
        """``move_queued`` and ``rekey_queued``: set ``assign`` on the QUEUED jobs matching
        ``where`` (SQL and its parameters, constant text) that are not claimed (a job held by its
        submitter, or being sent, is left to its claim's end) and, unless ``tagged_too``, whose
        last send's reply was not lost; the ids of those left unclaimed. With ``gone``, each only
        while the store still holds that mark."""
        queued = BatchState.QUEUED.value
        now = self._clock()
        still = "" if gone is None else f" AND {gone.still}"
        marked = () if gone is None else gone.params()
        untagged = "" if tagged_too else " AND send_tag IS NULL"
        unclaimed = " AND (claimed_until IS NULL OR claimed_until <= ?)"

        def update(connection: sqlite3.Connection) -> tuple[int, list[str]]:
            with immediate(connection):
                moved = connection.execute(
                    f"UPDATE jobs SET {assign[0]} WHERE state = ? AND {where[0]}{unclaimed}{untagged}{still}",  # noqa: S608 - constant text
                    (*assign[1], queued, *where[1], now, *marked),
                ).rowcount
                left = connection.execute(
                    f"SELECT id FROM jobs WHERE state = ? AND {where[0]}{unclaimed}{still}",  # noqa: S608 - constant text
                    (queued, *where[1], now, *marked),
                ).fetchall()
            return moved, [row["id"] for row in left]

        return await self._run(update)

    async def forget_send(self, tag: str, *, gone: GoneMark | None = None) -> bool:
        """The send tagged ``tag`` made no batch the provider shows (or none that can be told):
        its tag is forgotten, no lookup follows. With ``gone``, only while the store still holds
        that mark (``GoneMark``). Whether any job's tag was forgotten."""
        still = "" if gone is None else f" AND {gone.still}"
        params = () if gone is None else gone.params()

        def update(connection: sqlite3.Connection) -> bool:
            cursor = connection.execute(
                "UPDATE jobs SET send_tag = NULL, send_at = NULL, send_count = NULL"  # noqa: S608 - constant text
                f" WHERE send_tag = ? AND provider_batch_id IS NULL{still}",
                (tag, *params),
            )
            return cursor.rowcount > 0

        return await self._run(update)

    async def knows(self, provider: str, provider_batch_id: str, *, other_than: str | None = None) -> bool:
        """Whether a job of the store was placed in ``provider``'s batch ``provider_batch_id``;
        with ``other_than``, by another send than the one tagged so (a batch holding jobs of that send
        only is the one it created: the send's other jobs go in it too, never again to the
        provider)."""

        def select(connection: sqlite3.Connection) -> bool:
            row = connection.execute(
                "SELECT 1 FROM jobs WHERE provider = ? AND provider_batch_id = ?"
                " AND (? IS NULL OR send_tag IS NULL OR send_tag != ?) LIMIT 1",
                (provider, provider_batch_id, other_than, other_than),
            ).fetchone()
            return row is not None

        return await self._run(select)

    async def mark_submitted(
        self,
        batch_ids: list[str],
        owner: str,
        provider: str,
        provider_batch_id: str,
        sent_to: tuple[str, str],
        *,
        tag: str | None = None,
        unverified: bool = False,
    ) -> int:
        """``owner``'s claimed jobs are in ``provider``'s batch ``provider_batch_id``, sent to
        ``sent_to`` (the endpoint, the key's ``key_id``); their requests are kept until the
        provider has accepted the batch (``drop_requests``).

        A job cancelled meanwhile (it was sent all the same) stays cancelled, tied to the batch
        to be read once it ends (``provider_pending``); its budget, if the cancel already
        corrected it to nothing, is due a correction again, from nothing to what the provider
        bills for it. Returns how many jobs wait for the batch: 0 means every job was cancelled,
        and the caller cancels it at the provider. One transaction, so a ``cancel`` sees either
        none of the group in the batch or all of it.

        ``tag``: the batch is the one an earlier send tagged ``tag`` created (its reply lost), and
        jobs of that send cancelled since are tied to it as well, as sent. ``unverified``: it was
        found by its shape, not its tag, and may be another client's (``SentJobs.unverified``).
        """
        now = self._clock()
        shape = 1 if unverified else None
        # A job moved to this key by its lost send's lookup stays marked so (``rekey_queued``).
        kept = f"CASE WHEN ? IS NULL THEN NULL WHEN unverified = {_MOVED} THEN {_MOVED} ELSE 1 END"
        submitted, queued, cancelled = BatchState.SUBMITTED.value, BatchState.QUEUED.value, BatchState.CANCELLED.value
        endpoint, sent_key = sent_to
        # The batch it is in now, and when it was sent: as its send began (``tag_send``), else now.
        sent_in = (provider_batch_id, now)
        tie_cancelled = (
            "provider = ?, provider_batch_id = ?, provider_pending = 1,"
            " claimed_by = NULL, claimed_until = NULL, endpoint = ?, key_id = ?, unverified = ?, provider_ended = NULL,"
            " budget_usd = CASE WHEN budget_done IS NULL THEN budget_usd ELSE '0' END, budget_done = NULL,"
            " placed_in = ?, send_at = COALESCE(send_at, ?)"
        )

        def update(connection: sqlite3.Connection) -> int:
            placed = 0
            with immediate(connection):
                for batch_id in batch_ids:
                    cursor = connection.execute(
                        "UPDATE jobs SET state = ?, provider = ?, provider_batch_id = ?, error = '',"  # noqa: S608 - constant text
                        " updated_at = ?, claimed_by = NULL, claimed_until = NULL, endpoint = ?, key_id = ?,"
                        f" unverified = {kept}, provider_ended = NULL, placed_in = ?, send_at = COALESCE(send_at, ?)"
                        " WHERE id = ? AND state = ? AND claimed_by = ?",
                        (
                            submitted,
                            provider,
                            provider_batch_id,
                            now,
                            endpoint,
                            sent_key,
                            shape,
                            *sent_in,
                            batch_id,
                            queued,
                            owner,
                        ),
                    )
                    placed += cursor.rowcount
                    if cursor.rowcount:
                        continue
                    # A correction made counts nothing for the job now: budget_usd says so.
                    connection.execute(
                        f"UPDATE jobs SET {tie_cancelled}"  # noqa: S608 - constant text
                        " WHERE id = ? AND state = ? AND claimed_by = ? AND provider_batch_id IS NULL",
                        (provider, provider_batch_id, endpoint, sent_key, shape, *sent_in, batch_id, cancelled, owner),
                    )
                if tag is not None:
                    # Every job of that send still queued is in the batch, whoever groups it now
                    # (a restart may cut the send's jobs into other groups): none is sent again.
                    # One another worker is sending is left out of its send (``tag_send``).
                    placed += connection.execute(
                        "UPDATE jobs SET state = ?, provider = ?, provider_batch_id = ?, error = '',"  # noqa: S608 - constant text
                        " updated_at = ?, claimed_by = NULL, claimed_until = NULL, endpoint = ?, key_id = ?,"
                        f" unverified = {kept}, provider_ended = NULL, placed_in = ?, send_at = COALESCE(send_at, ?)"
                        " WHERE send_tag = ? AND state = ? AND provider_batch_id IS NULL",
                        (submitted, provider, provider_batch_id, now, endpoint, sent_key, shape, *sent_in, tag, queued),
                    ).rowcount
                    connection.execute(
                        f"UPDATE jobs SET {tie_cancelled}"  # noqa: S608 - constant text
                        " WHERE send_tag = ? AND state = ? AND provider_batch_id IS NULL",
                        (provider, provider_batch_id, endpoint, sent_key, shape, *sent_in, tag, cancelled),
                    )
            return placed

        return await self._run(update)

    async def drop_requests(self, provider: str, provider_batch_id: str) -> None:
        """Clear the requests of the jobs waiting for ``provider``'s batch ``provider_batch_id``,
        which the provider has accepted (they are not sent again)."""

        def update(connection: sqlite3.Connection) -> None:
            connection.execute(
                "UPDATE jobs SET request = '{}', request_bytes = 0"
                " WHERE provider = ? AND provider_batch_id = ? AND state = ? AND request != '{}'",
                (provider, provider_batch_id, BatchState.SUBMITTED.value),
            )

        await self._run(update)

    async def disown(
        self,
        provider: str,
        provider_batch_id: str,
        moved_error: str,
        *,
        gone: GoneMark | None = None,
        resend: bool = True,
    ) -> tuple[list[str], list[str]]:
        """Queue again the jobs waiting for ``provider``'s batch ``provider_batch_id``, adopted by
        its shape (``mark_submitted`` ``unverified``) and shown by its results to be another
        client's: they were never sent. Their requests were kept (``drop_requests`` is not asked
        for such a batch). A job moved to the key that found it by its lost send's lookup
        (``rekey_queued`` ``tag``) ends FAILED ``moved_error`` instead: that key may be
        another account's, which must not send it again (its lost send's batch, with the old key,
        may have answered it). One transaction. Returns the ids queued again and those failed;
        jobs cancelled since are the caller's to close. With ``gone`` (the mark of the key the
        batch was adopted with, taken as gone), none unless the store still holds that mark; without
        ``resend`` (that key may be another account's, whose batch may hold them), every job ends
        FAILED ``moved_error``, none is queued again."""
        now = self._clock()
        queued, submitted, failed = BatchState.QUEUED.value, BatchState.SUBMITTED.value, BatchState.FAILED.value
        still = "" if gone is None else f" AND {gone.still}"
        marked = () if gone is None else gone.params()

        def update(connection: sqlite3.Connection) -> tuple[list[str], list[str]]:
            with immediate(connection):
                rows = connection.execute(
                    "SELECT id, unverified FROM jobs WHERE provider = ? AND provider_batch_id = ? AND state = ?"  # noqa: S608 - constant text
                    f"{still}",
                    (provider, provider_batch_id, submitted, *marked),
                ).fetchall()
                again = [row["id"] for row in rows if resend and row["unverified"] != _MOVED]
                moved = [row["id"] for row in rows if not resend or row["unverified"] == _MOVED]
                connection.executemany(
                    "UPDATE jobs SET state = ?, provider_batch_id = NULL, unverified = NULL, provider_ended = NULL,"
                    " send_tag = NULL, send_at = NULL, send_count = NULL,"
                    " updated_at = ?, claimed_by = NULL, claimed_until = NULL WHERE id = ?",
                    [(queued, now, batch_id) for batch_id in again],
                )
                # As ``finish`` ends a job FAILED, out of the batch that was never its own.
                connection.executemany(
                    "UPDATE jobs SET state = ?, provider_batch_id = NULL, unverified = NULL, provider_ended = NULL,"
                    " send_tag = NULL, send_at = NULL, send_count = NULL, request = '{}', request_bytes = 0,"
                    " error = ?, updated_at = ?, claimed_by = NULL, claimed_until = NULL WHERE id = ?",
                    [(failed, moved_error, now, batch_id) for batch_id in moved],
                )
            return again, moved

        return await self._run(update)

    async def requeue(
        self, provider: str, provider_batch_id: str, batch_ids: list[str], error: str, backoff: Backoff
    ) -> tuple[list[str], list[str]]:
        """Queue again the jobs of ``batch_ids`` still waiting for ``provider``'s batch
        ``provider_batch_id``, which the provider refused whole for a while (``error``, kept for
        ``expire_queued``): held for ``backoff.delay`` of the oldest one's age, then any worker
        may send them. Returns the ids queued again, and those left to end with the batch: a job
        that would be older than ``backoff.max_age`` by then, or whose request was dropped
        (stored before requests were kept). A job no longer waiting for the batch (another
        worker read it) is in neither. One transaction."""
        now = self._clock()
        queued, submitted = BatchState.QUEUED.value, BatchState.SUBMITTED.value

        def update(connection: sqlite3.Connection) -> tuple[list[str], list[str]]:
            again: list[str] = []
            left: list[str] = []
            with immediate(connection):
                rows = []
                for batch_id in batch_ids:
                    row = connection.execute(
                        "SELECT id, created_at, request != '{}' AS kept FROM jobs"
                        " WHERE id = ? AND state = ? AND provider = ? AND provider_batch_id = ?",
                        (batch_id, submitted, provider, provider_batch_id),
                    ).fetchone()
                    if row is not None:
                        rows.append(row)
                if not rows:
                    return again, left
                # One wait for the group, by its oldest job, so that it is sent again as one batch.
                wait = backoff.delay(max(now - row["created_at"] for row in rows))
                for row in rows:
                    if not row["kept"] or now - row["created_at"] + wait >= backoff.max_age:
                        left.append(row["id"])
                        continue
                    connection.execute(
                        "UPDATE jobs SET state = ?, provider_batch_id = NULL, provider_ended = NULL,"
                        " updated_at = ?,"
                        " send_tag = NULL, send_at = NULL, send_count = NULL, error = ?, claimed_by = ?,"
                        " claimed_until = ? WHERE id = ?",
                        (queued, now, error, _BACKING_OFF, now + wait, row["id"]),
                    )
                    again.append(row["id"])
            return again, left

        return await self._run(update)

    async def submitted(self) -> dict[tuple[str, str], SentJobs]:
        """The jobs of provider batches still to be read, by (provider, provider batch id): those
        waiting for their results, and those cancelled after they were sent, with where the
        batch was sent (``SentJobs``)."""
        submitted = BatchState.SUBMITTED.value

        def select(connection: sqlite3.Connection) -> dict[tuple[str, str], SentJobs]:
            rows = connection.execute(
                "SELECT id, provider, provider_batch_id, state, endpoint, key_id, updated_at, unverified,"
                " (provider_ended = provider_batch_id OR provider_ended = 1) AS ended,"
                " CASE WHEN placed_in = provider_batch_id AND send_at IS NOT NULL THEN send_at ELSE updated_at END"
                " AS sent FROM jobs"
                " WHERE state = ? OR provider_pending IS NOT NULL ORDER BY created_at",
                (submitted,),
            ).fetchall()
            found: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
            sent_to: dict[tuple[str, str], tuple[str | None, str | None]] = {}
            sent_at: dict[tuple[str, str], float] = {}
            cancelled_at: dict[tuple[str, str], float] = {}
            unverified: set[tuple[str, str]] = set()
            ended: set[tuple[str, str]] = set()
            for row in rows:
                key = (row["provider"], row["provider_batch_id"])
                waiting, cancelled = found.setdefault(key, ([], []))
                (waiting if row["state"] == submitted else cancelled).append(row["id"])
                sent_to.setdefault(key, (row["endpoint"], row["key_id"]))
                # When its batch was sent (a row placed before ``placed_in``: its last change).
                sent_at[key] = min(sent_at.get(key, row["sent"]), row["sent"])
                if row["state"] != submitted:
                    cancelled_at[key] = max(cancelled_at.get(key, row["updated_at"]), row["updated_at"])
                if row["unverified"]:
                    unverified.add(key)
                if row["ended"]:
                    ended.add(key)
            return {
                key: SentJobs(
                    tuple(waiting),
                    tuple(cancelled),
                    *sent_to[key],
                    sent_at=sent_at[key],
                    cancelled_at=cancelled_at.get(key),
                    unverified=key in unverified,
                    ended=key in ended,
                )
                for key, (waiting, cancelled) in found.items()
            }

        return await self._run(select)

    async def cancel(self, batch_id: str) -> SentBatch | None:
        """End the job CANCELLED if it has not ended. Returns its provider batch when that batch
        has no job left waiting for its answer, for the caller to cancel there.

        A job already sent stays tied to its provider batch (``provider_pending``), to be read
        once that batch ends: the provider may have answered it, and billed it, before a cancel
        reaches it, or answer it anyway when other jobs keep the batch running. Its budget is not
        corrected until then. One transaction: of sibling jobs cancelled at once, exactly the
        last learns that the batch is left with none.
        """
        now = self._clock()
        queued, submitted = BatchState.QUEUED.value, BatchState.SUBMITTED.value

        def update(connection: sqlite3.Connection) -> SentBatch | None:
            with immediate(connection):
                # The right-hand sides read the row as it was: provider_pending is set for a job
                # that was SUBMITTED.
                cursor = connection.execute(
                    "UPDATE jobs SET state = ?, updated_at = ?, request = '{}', request_bytes = 0, error = 'cancelled',"
                    " provider_pending = CASE WHEN state = ? THEN 1 END"
                    " WHERE id = ? AND state IN (?, ?)",
                    (BatchState.CANCELLED.value, now, submitted, batch_id, queued, submitted),
                )
                if cursor.rowcount != 1:
                    return None
                row = connection.execute(
                    "SELECT provider, provider_batch_id, endpoint, unverified FROM jobs WHERE id = ?", (batch_id,)
                ).fetchone()
                if row["provider_batch_id"] is None:
                    return None  # not sent yet (or being sent: ``mark_submitted`` then finds none)
                waiting = connection.execute(
                    "SELECT 1 FROM jobs WHERE provider = ? AND provider_batch_id = ? AND state IN (?, ?) LIMIT 1",
                    (row["provider"], row["provider_batch_id"], queued, submitted),
                ).fetchone()
                if waiting is not None:
                    return None
                return SentBatch(row["provider"], row["provider_batch_id"], row["endpoint"], bool(row["unverified"]))

        return await self._run(update)

    async def mark_ended(self, provider: str, provider_batch_id: str) -> None:
        """Record that a status check found the provider batch ended (``SentJobs.ended``)."""

        def update(connection: sqlite3.Connection) -> None:
            connection.execute(
                "UPDATE jobs SET provider_ended = provider_batch_id WHERE provider = ? AND provider_batch_id = ?"
                " AND provider_ended IS NOT provider_batch_id",
                (provider, provider_batch_id),
            )

        await self._run(update)

    async def adopt(self, provider: str, provider_batch_id: str, sent_key: str) -> None:
        """Record ``sent_key`` as the key of the provider batch: a key that reads it (a rotated
        key of the same account) is its key from now on, and so of the jobs queued at its base URL
        under the key it was sent with (that key's account's), not claimed."""
        now = self._clock()

        def update(connection: sqlite3.Connection) -> None:
            with immediate(connection):
                row = connection.execute(
                    "SELECT endpoint, key_id FROM jobs WHERE provider = ? AND provider_batch_id = ?"
                    " AND key_id IS NOT NULL AND endpoint IS NOT NULL LIMIT 1",
                    (provider, provider_batch_id),
                ).fetchone()
                connection.execute(
                    "UPDATE jobs SET key_id = ? WHERE provider = ? AND provider_batch_id = ?",
                    (sent_key, provider, provider_batch_id),
                )
                if row is not None and row["key_id"] != sent_key:
                    connection.execute(
                        "UPDATE jobs SET key_id = ? WHERE state = ? AND provider = ? AND endpoint = ? AND key_id = ?"
                        " AND (claimed_until IS NULL OR claimed_until <= ?)",
                        (sent_key, BatchState.QUEUED.value, provider, row["endpoint"], row["key_id"], now),
                    )

        await self._run(update)

    async def commit(self, batch_id: str, owner: str, budget_usd: Decimal | None) -> None:
        """Release ``owner``'s hold on a job its caller now knows of, so a poller may send it, and
        record ``budget_usd``, what its tenant's budget counted for it (None: nothing), with
        ``owner`` as the one that counted it. One transaction."""

        def update(connection: sqlite3.Connection) -> None:
            with immediate(connection):
                if budget_usd is not None:
                    connection.execute(
                        "UPDATE jobs SET budget_usd = ?, budget_by = ? WHERE id = ? AND budget_usd IS NULL",
                        (str(budget_usd), owner, batch_id),
                    )
                connection.execute(
                    "UPDATE jobs SET claimed_by = NULL, claimed_until = NULL"
                    " WHERE id = ? AND claimed_by = ? AND state = ?",
                    (batch_id, owner, BatchState.QUEUED.value),
                )

        await self._run(update)

    async def budget_corrections(self, owner: str, *, any_owner: bool) -> list[tuple[str, Decimal, float]]:
        """(tenant, USD, queued at) for each ended job whose counted budget is not corrected yet:
        its real cost (what the provider billed: nothing unless it answered the job) less what
        was counted; those ``owner`` counted only, unless ``any_owner`` (budgets shared by every
        process). A job cancelled after it was sent waits until its provider batch is read
        (``close_cancelled``). Each is returned once: a job is marked corrected in the same
        transaction that returns it."""
        ended = tuple(state.value for state in BatchState if state.ended)
        marks = ", ".join("?" for _ in ended)
        # The partial index holds only jobs waiting for a correction (INDEXED BY: the planner
        # would take the state index, which holds every ended job); by owner, a lookup.
        where = f"budget_usd IS NOT NULL AND budget_done IS NULL AND provider_pending IS NULL AND state IN ({marks})"
        query = "SELECT id FROM jobs INDEXED BY jobs_uncorrected"
        query += f" WHERE {where}" if any_owner else f" WHERE budget_by = ? AND {where}"
        parameters = ended if any_owner else (owner, *ended)

        def update(connection: sqlite3.Connection) -> list[tuple[str, Decimal, float]]:
            rows = connection.execute(query, parameters).fetchall()  # read first: most rounds find none
            if not rows:
                return []
            corrections = []
            with immediate(connection):
                for row in rows:
                    # Read again under the write lock: another worker may have corrected it, or
                    # tied it to its provider batch (``mark_submitted``), since the read above.
                    job = connection.execute(
                        "SELECT tenant, cost_usd, budget_usd, created_at FROM jobs"
                        " WHERE id = ? AND budget_done IS NULL AND provider_pending IS NULL",
                        (row["id"],),
                    ).fetchone()
                    if job is None:
                        continue
                    connection.execute("UPDATE jobs SET budget_done = 1 WHERE id = ?", (row["id"],))
                    # cost_usd is set only for a job the provider answered (SUCCEEDED, or billed
                    # though cancelled).
                    cost = Decimal(job["cost_usd"] or 0)
                    corrections.append((job["tenant"], cost - Decimal(job["budget_usd"]), job["created_at"]))
            return corrections

        return await self._run(update)

    async def close_cancelled(self, batch_id: str, billed: BatchResult | None, *, gone: GoneMark | None = None) -> bool:
        """A job cancelled after it was sent, once its provider batch's results are read: store
        what the provider billed for it (``billed``: its usage and cost, the answer's text left
        out, as a cancelled job returns none; None: it was not answered), which its budget is
        then corrected to (an EXPIRED job of a lost send's batch found since, ``tie_unplaced``,
        likewise). True for the one call that closed it (whose caller charges it);
        False when it was not waiting (never sent, or closed by another worker). With ``gone``,
        only while the store still holds that mark (``GoneMark``)."""
        usage = billed.usage if billed is not None else None
        still = "" if gone is None else f" AND {gone.still}"
        params = () if gone is None else gone.params()

        def update(connection: sqlite3.Connection) -> bool:
            cursor = connection.execute(
                "UPDATE jobs SET provider_pending = NULL, cost_usd = ?, input_tokens = ?, output_tokens = ?,"  # noqa: S608 - constant text
                " cached_input_tokens = ?, cache_write_tokens = ?, cache_write_1h_tokens = ?, provider_model = ?"
                f" WHERE id = ? AND state IN (?, ?) AND provider_pending IS NOT NULL{still}",
                (
                    None if billed is None else str(billed.cost_usd),
                    None if usage is None else usage.input_tokens,
                    None if usage is None else usage.output_tokens,
                    None if usage is None else usage.cached_input_tokens,
                    None if usage is None else usage.cache_write_input_tokens,
                    None if usage is None else usage.cache_write_1h_input_tokens,
                    None if billed is None else billed.provider_model,
                    batch_id,
                    BatchState.CANCELLED.value,
                    BatchState.EXPIRED.value,
                    *params,
                ),
            )
            return cursor.rowcount == 1

        return await self._run(update)

    async def finish(
        self,
        batch_id: str,
        state: BatchState,
        *,
        result: BatchResult | None = None,
        error: str = "",
        gone: GoneMark | None = None,
    ) -> bool:
        """End a job that has not ended; False (and nothing changed) when it already had, or,
        with ``gone``, when the store no longer holds that mark (``GoneMark``)."""
        still = "" if gone is None else f" AND {gone.still}"
        params = () if gone is None else gone.params()
        now = self._clock()
        values: dict[str, Any] = {"text": None, "input": None, "output": None, "cached": None}
        values.update(cost=None, finish=None, provider_model=None, tool_calls=None, writes=None, writes_1h=None)
        if result is not None:
            values.update(
                text=result.text,
                input=result.usage.input_tokens,
                output=result.usage.output_tokens,
                cached=result.usage.cached_input_tokens,
                cost=str(result.cost_usd),
                finish=result.finish_reason.value,
                provider_model=result.provider_model,
                tool_calls=json.dumps(_encode_calls(result.tool_calls)) if result.tool_calls else None,
                writes=result.usage.cache_write_input_tokens,
                writes_1h=result.usage.cache_write_1h_input_tokens,
            )

        def update(connection: sqlite3.Connection) -> bool:
            cursor = connection.execute(
                "UPDATE jobs SET state = ?, updated_at = ?, request = '{}', request_bytes = 0, text = ?,"  # noqa: S608 - constant text
                " input_tokens = ?, output_tokens = ?, cached_input_tokens = ?, cost_usd = ?, finish_reason = ?,"
                " provider_model = ?, tool_calls = ?, cache_write_tokens = ?, cache_write_1h_tokens = ?, error = ?"
                f" WHERE id = ? AND state IN (?, ?){still}",
                (
                    state.value,
                    now,
                    values["text"],
                    values["input"],
                    values["output"],
                    values["cached"],
                    values["cost"],
                    values["finish"],
                    values["provider_model"],
                    values["tool_calls"],
                    values["writes"],
                    values["writes_1h"],
                    error,
                    batch_id,
                    BatchState.QUEUED.value,
                    BatchState.SUBMITTED.value,
                    *params,
                ),
            )
            return cursor.rowcount == 1

        return await self._run(update)
