"""The fake's batch APIs: OpenAI files + batches, and Anthropic message batches.

    POST /v1/files                          multipart upload (purpose "batch") of a JSONL file
    GET  /v1/files                          list files, newest first (``purpose``, ``after``, ``limit``)
    GET  /v1/files/{id}/content             a file's bytes (input, output or error file)
    DELETE /v1/files/{id}                   delete a file (recorded in ``deleted_files``)
    POST /v1/batches                        create from an uploaded file (with ``metadata``)
    GET  /v1/batches                        list batches, newest first (``after``, ``limit``)
    GET  /v1/batches/{id}                   retrieve (ends the batch per the outcome, see below)
    POST /v1/batches/{id}/cancel            cancel ("cancelling"; "cancelled" at the next retrieve)
    POST /v1/messages/batches               create with inline requests
    GET  /v1/messages/batches               list batches, newest first (``after_id``, ``limit``)
    GET  /v1/messages/batches/{id}          retrieve
    GET  /v1/messages/batches/{id}/results  JSONL results once ended
    POST /v1/messages/batches/{id}/cancel   cancel ("canceling"; "ended" at the next retrieve)
    DELETE /v1/messages/batches/{id}        delete an ended batch (``deleted``; then 404 like an unknown one)

Every batch stays in progress until a retrieve finds ``BatchOutcome`` (``FakeProvider.batch_outcome``)
other than ``PENDING``, then ends as it says: ``COMPLETE`` answers each request with the script
the fake would use for a realtime request to its model (text, usage, or an error status; with
``omit_usage`` a result's body, OpenAI's, or message, Anthropic's, has no ``usage``);
``EXPIRE`` and ``FAIL`` end it without answers. Changing the outcome later ends batches that are
still in progress, so tests can restart the service in between. With ``answered_before_expiry``
an expired batch has answered its first requests first (the window cut off the rest), as a real
one may. An OpenAI request answered with an HTTP error is a line of the output file, or with
``http_errors_in_error_file`` a line of the error file with its ``response`` and ``error`` null, as
the Batch API writes it; its body is OpenAI's error JSON (``code`` null), or the script's
``error_body`` (JSON) to carry a code such as ``context_length_exceeded``. Output lines hold
non-ASCII characters raw (UTF-8), U+2028 and U+2029 too: JSON Lines ends a line at "\n" only.

A cancel ends a batch still in progress as the real APIs do, at the next retrieve: the first
``answered_before_cancel`` requests (as many as the provider had finished when the cancel came)
are answered by their scripts, and billed; the others are cancelled. An OpenAI batch then is
"cancelled" with those answers in its output file and the rest in its error file
(``batch_cancelled``); an Anthropic one "ended" with ``succeeded`` (or ``errored``) results for
them and ``canceled`` for the rest.

Faults: ``create_error`` answers creates (both APIs), ``delete_error`` deletes (files and message
batches), ``retrieve_errors`` an API's retrieves (counted in the batch's ``refused``) with an
error, ``results_errors`` an API's reads of an ended batch's results (OpenAI's output and error
files, Anthropic's results; counted in ``results_refused``); ``create_hold`` keeps creates
waiting until the test sets it (``create_waiting`` is set once one waits), ``create_reply_hold``
the replies of creates made (a create that reached the provider, its reply late or lost), and
``delete_hold`` deletes (``delete_waiting``), ``retrieve_hold`` retrieves (``retrieve_waiting``),
``results_hold`` results reads after their head (``results_waiting``: a body that stalls) and
``cancel_hold`` cancels (``cancel_waiting``).
An Anthropic batch's times have microseconds, as the API's do.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from routesvc.testing import _anthropic, _openai
from routesvc.testing._connection import Connection, Request
from routesvc.testing._responses import ERROR_TYPES
from routesvc.testing._script import RecordedRequest, Script, usage_numbers

# What OpenAI says of a batch that failed validation (it then writes no output or error file).
_VALIDATION_ERRORS = {
    "object": "list",
    "data": [
        {
            "code": "token_limit_exceeded",
            "message": "Enqueued token limit reached for this model in the organization.",
            "param": None,
            "line": None,
        }
    ],
}


# The statuses of a batch not ended yet, in either API.
_RUNNING = ("in_progress", "validating", "cancelling", "canceling")


class BatchOutcome(enum.Enum):
    """How the fake ends a batch at its next retrieve."""

    PENDING = "pending"  # stays in progress
    COMPLETE = "complete"  # every request answered by its script
    EXPIRE = "expire"  # the 24 h window passed: no request answered
    FAIL = "fail"  # OpenAI: the batch failed validation (token_limit_exceeded); Anthropic: every request errored


@dataclass(slots=True)
class FakeBatch:
    """One batch the fake holds: which API, its requests, and how far it got."""

    id: str
    api: str  # "openai" or "anthropic"
    requests: list[dict[str, Any]]
    created_at: float
    input_file_id: str | None = None  # OpenAI
    metadata: dict[str, str] | None = None  # OpenAI
    status: str = "in_progress"
    cancelled: bool = False
    # How many requests (the first ones) the provider had answered when the cancel came.
    answered_before_cancel: int = 0
    # How many requests (the first ones) it had answered when the 24 h window ended it.
    answered_before_expiry: int = 0
    deleted: bool = False  # Anthropic: deleted once ended
    lost: bool = False  # the provider no longer knows it (a test's): 404, as for an unknown id
    output_file_id: str | None = None
    error_file_id: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    retrieved: int = 0
    # Retrieves answered ``retrieve_error`` instead.
    refused: int = 0
    # The Anthropic results file served instead of ``results`` (a test's damaged file).
    raw_results: bytes | None = None
    # The headers of the request that created it (lower-case names).
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def custom_ids(self) -> list[str]:
        """The requests' ``custom_id``s, in order."""
        return [str(r.get("custom_id")) for r in self.requests]


def _key_of(headers: dict[str, str]) -> str | None:
    """The API key a request's (lower-case) headers carry, in either API's header."""
    bearer = headers.get("authorization", "")
    return headers.get("x-api-key") or (bearer[7:] if bearer.lower().startswith("bearer ") else None)


def _iso(seconds: float) -> str:
    micros = int(seconds % 1 * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def _http_error_body(script: Script) -> Any:
    """The body of a batch request's HTTP error: the script's ``error_body`` (JSON), else OpenAI's
    error JSON for its status."""
    if script.error_body is not None:
        return json.loads(script.error_body)
    error_type = script.error_type or ERROR_TYPES.get(script.status, "api_error")
    return _openai.error_body(script.status, error_type, f"fake error {script.status}")


def _query(request: Request) -> dict[str, str]:
    """The request's query parameters (the last of each name)."""
    return dict(urllib.parse.parse_qsl(request.path.partition("?")[2]))


def _page(ids: list[str], after: str | None, limit: str | None) -> list[str]:
    """The ids of one page of a listing: those after ``after`` (all without), at most ``limit`` (20)."""
    start = ids.index(after) + 1 if after in ids else 0
    return ids[start : start + int(limit or 20)]


def _openai_list(data: list[dict[str, Any]], page: list[str], *, has_more: bool) -> dict[str, Any]:
    """An OpenAI list object."""
    first, last = (page[0], page[-1]) if page else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more}


def _multipart_filename(request: Request) -> str | None:
    """The ``filename`` of the ``file`` part of a multipart/form-data body."""
    found = re.search(rb'name="file"; filename="([^"]*)"', request.body)
    return found.group(1).decode() if found else None


def _multipart_file(request: Request) -> bytes | None:
    """The ``file`` part of a multipart/form-data body."""
    content_type = request.headers.get("content-type", "")
    if "boundary=" not in content_type:
        return None
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"').encode()
    for part in request.body.split(b"--" + boundary):
        head, sep, body = part.partition(b"\r\n\r\n")
        if sep and b'name="file"' in head:
            return body.removesuffix(b"\r\n")
    return None


class FakeBatches:
    """The batch endpoints of both APIs; ``take_script`` picks the script answering a request."""

    def __init__(self, take_script: Callable[[str], Script], base_url: Callable[[], str]) -> None:
        self._take_script = take_script
        self._base_url = base_url
        # Set while a request waits at its hold (``reset`` clears them, keeping each one).
        self.create_waiting = asyncio.Event()
        self.delete_waiting = asyncio.Event()
        self.retrieve_waiting = asyncio.Event()
        self.results_waiting = asyncio.Event()
        self.cancel_waiting = asyncio.Event()
        self.list_waiting = asyncio.Event()
        # Made once and emptied by ``reset`` (a reference taken before it still steers the fake).
        # (status, JSON body, headers) that retrieving a batch of this API ("openai", "anthropic")
        # answers instead; none for an API: retrieved.
        self.retrieve_errors: dict[str, tuple[int, Any, dict[str, str]]] = {}
        # The same for reading an ended batch's results (OpenAI: its output and error files).
        self.results_errors: dict[str, tuple[int, Any, dict[str, str]]] = {}
        # With ``per_key``, the account of each key named here (keys of one account see each
        # other's batches, as a project's rotated keys do); a key not named is its own account.
        self.accounts: dict[str, str] = {}
        self._knobs_off()
        self.files: dict[str, bytes] = {}
        # Each file's name and when it was uploaded (files.list).
        self.file_names: dict[str, tuple[str, float]] = {}
        self.deleted_files: list[str] = []
        self.batches: dict[str, FakeBatch] = {}
        self._numbers = itertools.count(1)

    def routes(self) -> dict[tuple[str, str], Callable[[Connection, Request], Any]]:
        """The route table entries; ``*`` matches one path segment."""
        return {
            ("POST", "/v1/files"): self._upload,
            ("GET", "/v1/files"): self._file_list,
            ("GET", "/v1/files/*/content"): self._file_content,
            ("DELETE", "/v1/files/*"): self._file_delete,
            ("POST", "/v1/batches"): self._openai_create,
            ("GET", "/v1/batches"): self._openai_list,
            ("GET", "/v1/batches/*"): self._openai_retrieve,
            ("POST", "/v1/batches/*/cancel"): self._openai_cancel,
            ("POST", "/v1/messages/batches"): self._anthropic_create,
            ("GET", "/v1/messages/batches"): self._anthropic_list,
            ("GET", "/v1/messages/batches/*"): self._anthropic_retrieve,
            ("GET", "/v1/messages/batches/*/results"): self._anthropic_results,
            ("POST", "/v1/messages/batches/*/cancel"): self._anthropic_cancel,
            ("DELETE", "/v1/messages/batches/*"): self._anthropic_delete,
        }

    def reset(self) -> None:
        """Forget files, deletes and batches; batches complete again, and faults are off."""
        self.files.clear()
        self.file_names.clear()
        self.deleted_files.clear()
        self.batches.clear()
        self._knobs_off()

    def _knobs_off(self) -> None:
        """Every knob as a new fake has it (the constructor and ``reset`` alike, so that a knob
        added here is one ``reset`` restores)."""
        self.outcome = BatchOutcome.COMPLETE
        self.http_errors_in_error_file = False
        self.results_deleted = False
        # How many of a batch's requests (the first ones) are answered when a cancel reaches it,
        # and when the 24 h window ends it (EXPIRE).
        self.answered_before_cancel = 0
        self.answered_before_expiry = 0
        # (status, JSON body) that creating a batch answers instead, in both APIs; None: created.
        self.create_error: tuple[int, Any] | None = None
        # (status, JSON body) that deleting a file or a message batch answers instead; None: deleted.
        self.delete_error: tuple[int, Any] | None = None
        self.retrieve_errors.clear()
        self.results_errors.clear()
        self.results_refused = 0
        # Batches are the account's of the key that created them (as OpenAI's are a project's):
        # a retrieve or cancel with another key gets 404, as for an unknown id, and a list with
        # it leaves them out.
        self.per_key = False
        self.accounts.clear()
        # With ``per_key``, the status another account's key gets for a batch (404: as for an
        # unknown id; a gateway may answer 400).
        self.other_account_status = 404
        # A create waits until this is set (None: answers at once); ``create_waiting`` says one does.
        self.create_hold: asyncio.Event | None = None
        self.create_waiting.clear()
        # A create's reply, the batch made, waits until this is set (None: answers at once).
        self.create_reply_hold: asyncio.Event | None = None
        # The same for deleting a file or a message batch.
        self.delete_hold: asyncio.Event | None = None
        self.delete_waiting.clear()
        # The same for retrieving a batch (a status check).
        self.retrieve_hold: asyncio.Event | None = None
        self.retrieve_waiting.clear()
        # A results read (OpenAI's file content, Anthropic's results) sends its head, then its
        # body only once this is set (None: at once); a cancel answers once ``cancel_hold`` is.
        self.results_hold: asyncio.Event | None = None
        self.results_waiting.clear()
        self.cancel_hold: asyncio.Event | None = None
        self.cancel_waiting.clear()
        # A list of message batches (Anthropic) waits at ``list_hold`` once ``lists_unheld`` more
        # lists have been answered at once (each answered so counts it down).
        self.list_hold: asyncio.Event | None = None
        self.list_waiting.clear()
        self.lists_unheld = 0

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._numbers):04d}{uuid.uuid4().hex[:12]}"

    # -- answering one request -----------------------------------------------------------------

    def _answer(self, body: dict[str, Any]) -> tuple[Script, int, int]:
        model = str(body.get("model", ""))
        script = self._take_script(model)
        record = RecordedRequest(method="POST", path="batch", headers={}, body=body, received_at=time.monotonic())
        input_tokens, output_tokens = usage_numbers(record, script)
        return script, input_tokens, output_tokens

    def _end(self, batch: FakeBatch) -> None:
        """End ``batch`` per the outcome, or as cancelled (once); fills its results."""
        if batch.status not in _RUNNING:
            return
        outcome = self.outcome
        if batch.cancelled:
            batch.status = "cancelled"
        elif outcome is BatchOutcome.PENDING:
            return
        elif outcome is BatchOutcome.EXPIRE:
            batch.status = "expired"
            batch.answered_before_expiry = self.answered_before_expiry
        elif outcome is BatchOutcome.FAIL:
            batch.status = "failed"
        else:
            batch.status = "completed"
        if batch.api == "openai":
            self._end_openai(batch)
        else:
            self._end_anthropic(batch)

    @staticmethod
    def _answered(batch: FakeBatch) -> int:
        """How many of an ended batch's requests (the first ones) the provider answered."""
        if batch.status == "completed":
            return len(batch.requests)
        if batch.cancelled:
            return min(batch.answered_before_cancel, len(batch.requests))
        if batch.status == "expired":
            return min(batch.answered_before_expiry, len(batch.requests))
        return 0

    def _end_openai(self, batch: FakeBatch) -> None:
        output: list[str] = []
        errors: list[str] = []
        if batch.status == "failed":
            # Validation failed: no output or error file, the reason in the batch's ``errors``.
            return
        done = self._answered(batch)
        for number, line in enumerate(batch.requests):
            custom_id = line.get("custom_id")
            if number >= done:
                code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(batch.status, "batch_failed")
                error = {"code": code, "message": f"request {batch.status}"}
                errors.append(json.dumps({"id": self._new_id("batch_req_"), "custom_id": custom_id, "error": error}))
                continue
            body = line.get("body") or {}
            script, input_tokens, output_tokens = self._answer(body)
            if script.status != 200:
                response = {
                    "status_code": script.status,
                    "request_id": self._new_id("req_"),
                    "body": _http_error_body(script),
                }
                if self.http_errors_in_error_file:
                    line_id = self._new_id("batch_req_")
                    line = {"id": line_id, "custom_id": custom_id, "response": response, "error": None}
                    errors.append(json.dumps(line))
                    continue
            else:
                response = {
                    "status_code": 200,
                    "request_id": self._new_id("req_"),
                    "body": {
                        "id": self._new_id("chatcmpl-"),
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": script.model or body.get("model"),
                        "choices": [
                            {
                                "index": 0,
                                "message": _openai.answer_message(script, body),
                                "finish_reason": _openai.finish_reason_for(script, body),
                            }
                        ],
                        "usage": {
                            "prompt_tokens": input_tokens,
                            "completion_tokens": output_tokens,
                            "total_tokens": input_tokens + output_tokens,
                            "prompt_tokens_details": {"cached_tokens": script.cached_input_tokens},
                        },
                    },
                }
                if script.omit_usage:
                    del response["body"]["usage"]
            answered = {"id": self._new_id("batch_req_"), "custom_id": custom_id, "response": response}
            encoded = json.dumps(answered, ensure_ascii=False)
            try:
                encoded.encode()
            except UnicodeEncodeError:
                # A lone surrogate (a script's half of an emoji's pair): escaped, as a server sends it.
                encoded = json.dumps(answered)
            output.append(encoded)
        if output:
            batch.output_file_id = self._new_id("file-out-")
            self.files[batch.output_file_id] = ("\n".join(output) + "\n").encode()
        if errors:
            batch.error_file_id = self._new_id("file-err-")
            self.files[batch.error_file_id] = ("\n".join(errors) + "\n").encode()

    def _end_anthropic(self, batch: FakeBatch) -> None:
        status = batch.status
        done = self._answered(batch)
        batch.status = "ended"
        for number, item in enumerate(batch.requests):
            custom_id = item.get("custom_id")
            params = item.get("params") or {}
            if status in ("cancelled", "expired") and number >= done:
                result: dict[str, Any] = {"type": "canceled" if status == "cancelled" else "expired"}
            elif status == "failed":
                result = {"type": "errored", "error": {"type": "error", "error": {"type": "api_error"}}}
            else:
                script, input_tokens, output_tokens = self._answer(params)
                if script.status != 200:
                    error_type = script.error_type or "invalid_request_error"
                    error = {"type": "error", "error": {"type": error_type, "message": "fake"}}
                    result = {"type": "errored", "error": error}
                else:
                    message = {
                        "id": self._new_id("msg_"),
                        "type": "message",
                        "role": "assistant",
                        "model": script.model or params.get("model"),
                        "content": _anthropic.answer_content(script, params),
                        "stop_reason": _anthropic.stop_reason_for(script, params),
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": input_tokens
                            - script.cached_input_tokens
                            - script.cache_creation_input_tokens,
                            "cache_read_input_tokens": script.cached_input_tokens,
                            "cache_creation_input_tokens": script.cache_creation_input_tokens,
                            "cache_creation": _anthropic.cache_creation(script),
                            "output_tokens": output_tokens,
                        },
                    }
                    if script.omit_usage:
                        del message["usage"]
                    result = {"type": "succeeded", "message": message}
            batch.results.append({"custom_id": custom_id, "result": result})

    # -- OpenAI --------------------------------------------------------------------------------

    async def _upload(self, connection: Connection, request: Request) -> bool:
        content = _multipart_file(request)
        if content is None:
            await connection.send_json(400, {"error": {"type": "invalid_request_error", "message": "no file"}})
            return True
        file_id = self._new_id("file-")
        self.files[file_id] = content
        self.file_names[file_id] = (_multipart_filename(request) or "upload", time.time())
        await connection.send_json(200, self._file_json(file_id))
        return True

    def _file_json(self, file_id: str) -> dict[str, Any]:
        name, created_at = self.file_names.get(file_id, ("", time.time()))
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(self.files[file_id]),
            "created_at": int(created_at),
            "filename": name,
            "purpose": "batch",
            "status": "processed",
        }

    async def _file_list(self, connection: Connection, request: Request) -> bool:
        query = _query(request)
        if query.get("purpose", "batch") != "batch":
            ids: list[str] = []  # the fake holds batch files only
        else:
            ids = list(self.files)
        if query.get("order", "desc") == "desc":
            ids.reverse()
        page = _page(ids, query.get("after"), query.get("limit"))
        data = [self._file_json(file_id) for file_id in page]
        await connection.send_json(200, _openai_list(data, page, has_more=page[-1:] != ids[-1:]))
        return True

    async def _file_content(self, connection: Connection, request: Request) -> bool:
        file_id = request.path.split("?")[0].split("/")[3]
        content = self.files.get(file_id)
        if content is None:
            await connection.send_json(404, {"error": {"type": "not_found_error", "message": "no such file"}})
            return True
        apis = [batch.api for batch in self.batches.values() if file_id in (batch.output_file_id, batch.error_file_id)]
        if await self._refuse_results(connection, next(iter(apis), None)):
            return True
        headers = {"content-type": "application/octet-stream", "content-length": str(len(content))}
        await connection.send_head(200, headers)
        await _wait_at(self.results_hold, self.results_waiting)
        await connection.send(content)
        return True

    async def _file_delete(self, connection: Connection, request: Request) -> bool:
        file_id = request.path.split("?")[0].split("/")[3]
        if file_id not in self.files:
            await connection.send_json(404, {"error": {"type": "not_found_error", "message": "no such file"}})
            return True
        await _wait_at(self.delete_hold, self.delete_waiting)
        if self.delete_error is not None:
            await connection.send_json(*self.delete_error)
            return True
        del self.files[file_id]
        self.file_names.pop(file_id, None)
        self.deleted_files.append(file_id)
        await connection.send_json(200, {"id": file_id, "object": "file", "deleted": True})
        return True

    def _openai_json(self, batch: FakeBatch) -> dict[str, Any]:
        ended = batch.status not in _RUNNING
        done = self._answered(batch) if ended else 0
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": batch.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": int(batch.created_at),
            "completed_at": int(time.time()) if ended else None,
            "request_counts": {"total": len(batch.requests), "completed": done, "failed": len(batch.requests) - done},
            "errors": _VALIDATION_ERRORS if batch.status == "failed" else None,
            "metadata": batch.metadata,
        }

    async def _openai_list(self, connection: Connection, request: Request) -> bool:
        query = _query(request)
        ids = [
            batch.id
            for batch in reversed(self.batches.values())
            if batch.api == "openai" and not batch.lost and not self._other_account(batch, request)
        ]
        page = _page(ids, query.get("after"), query.get("limit"))
        data = [self._openai_json(self.batches[batch_id]) for batch_id in page]
        await connection.send_json(200, _openai_list(data, page, has_more=page[-1:] != ids[-1:]))
        return True

    async def _openai_create(self, connection: Connection, request: Request) -> bool:
        await _wait_at(self.create_hold, self.create_waiting)
        if self.create_error is not None:
            await connection.send_json(*self.create_error)
            return True
        body = json.loads(request.body or b"{}")
        content = self.files.get(str(body.get("input_file_id")))
        if content is None:
            await connection.send_json(400, {"error": {"type": "invalid_request_error", "message": "no such file"}})
            return True
        lines = [json.loads(line) for line in content.decode().split("\n") if line.strip()]
        batch = FakeBatch(
            self._new_id("batch_"), "openai", lines, time.time(), str(body["input_file_id"]), headers=request.headers
        )
        metadata = body.get("metadata")
        batch.metadata = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else None
        self.batches[batch.id] = batch
        await _wait_at(self.create_reply_hold, self.create_waiting)
        await connection.send_json(200, self._openai_json(batch))
        return True

    async def _openai_found(self, connection: Connection, request: Request) -> FakeBatch | None:
        batch = self.batches.get(request.path.split("?")[0].split("/")[3])
        if batch is not None and batch.api == "openai" and not batch.lost and self._other_account(batch, request):
            status = self.other_account_status
            kind = "not_found_error" if status == 404 else "invalid_request_error"
            await connection.send_json(status, {"error": {"type": kind, "message": "no such batch"}})
            return None
        if batch is None or batch.api != "openai" or batch.lost:
            await connection.send_json(404, {"error": {"type": "not_found_error", "message": "no such batch"}})
            return None
        return batch

    def _other_account(self, batch: FakeBatch, request: Request) -> bool:
        """Whether ``per_key`` hides ``batch`` from the key of ``request``."""
        return self.per_key and self._account(_key_of(request.headers)) != self._account(_key_of(batch.headers))

    def _account(self, key: str | None) -> str | None:
        return None if key is None else self.accounts.get(key, key)

    async def _refuse_retrieve(self, connection: Connection, batch: FakeBatch) -> bool:
        """Answer the retrieve with ``retrieve_errors``' error for the batch's API, if any."""
        error = self.retrieve_errors.get(batch.api)
        if error is None:
            return False
        batch.refused += 1
        await connection.send_json(*error)
        return True

    async def _refuse_results(self, connection: Connection, api: str | None) -> bool:
        """Answer a results read with ``results_errors``' error for the batch's API, if any."""
        error = None if api is None else self.results_errors.get(api)
        if error is None:
            return False
        self.results_refused += 1
        await connection.send_json(*error)
        return True

    async def _openai_retrieve(self, connection: Connection, request: Request) -> bool:
        await _wait_at(self.retrieve_hold, self.retrieve_waiting)
        batch = await self._openai_found(connection, request)
        if batch is not None and not await self._refuse_retrieve(connection, batch):
            batch.retrieved += 1
            self._end(batch)
            await connection.send_json(200, self._openai_json(batch))
        return True

    def _cancel(self, batch: FakeBatch, cancelling: str) -> None:
        """Cancel ``batch`` if it still runs: ``cancelling`` until the next retrieve ends it, with
        the answers of the requests finished by now."""
        if batch.status in _RUNNING and not batch.cancelled:
            batch.cancelled = True
            batch.answered_before_cancel = self.answered_before_cancel
            batch.status = cancelling

    async def _openai_cancel(self, connection: Connection, request: Request) -> bool:
        await _wait_at(self.cancel_hold, self.cancel_waiting)
        batch = await self._openai_found(connection, request)
        if batch is not None:
            self._cancel(batch, "cancelling")
            await connection.send_json(200, self._openai_json(batch))
        return True

    # -- Anthropic -----------------------------------------------------------------------------

    def _anthropic_json(self, batch: FakeBatch) -> dict[str, Any]:
        ended = batch.status == "ended"
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if not ended:
            counts["processing"] = len(batch.requests)
        for entry in batch.results:
            counts[entry["result"]["type"]] += 1
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status if batch.status in ("in_progress", "canceling", "ended") else "ended",
            "request_counts": counts,
            "created_at": _iso(batch.created_at),
            "expires_at": _iso(batch.created_at + 86400),
            "ended_at": _iso(time.time()) if ended else None,
            "archived_at": None,
            "cancel_initiated_at": _iso(time.time()) if batch.cancelled else None,
            "results_url": (
                f"{self._base_url()}/v1/messages/batches/{batch.id}/results"
                if ended and not self.results_deleted
                else None
            ),
        }

    async def _anthropic_create(self, connection: Connection, request: Request) -> bool:
        await _wait_at(self.create_hold, self.create_waiting)
        if self.create_error is not None:
            await connection.send_json(*self.create_error)
            return True
        body = json.loads(request.body or b"{}")
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            error = {"type": "error", "error": {"type": "invalid_request_error", "message": "requests required"}}
            await connection.send_json(400, error)
            return True
        batch = FakeBatch(self._new_id("msgbatch_"), "anthropic", requests, time.time(), headers=request.headers)
        self.batches[batch.id] = batch
        await _wait_at(self.create_reply_hold, self.create_waiting)
        await connection.send_json(200, self._anthropic_json(batch))
        return True

    async def _anthropic_list(self, connection: Connection, request: Request) -> bool:
        if self.lists_unheld > 0:
            self.lists_unheld -= 1
        else:
            await _wait_at(self.list_hold, self.list_waiting)
        query = _query(request)
        ids = [
            batch.id
            for batch in reversed(self.batches.values())
            if batch.api == "anthropic"
            and not batch.deleted
            and not batch.lost
            and not self._other_account(batch, request)
        ]
        page = _page(ids, query.get("after_id"), query.get("limit"))
        data = [self._anthropic_json(self.batches[batch_id]) for batch_id in page]
        first, last = (page[0], page[-1]) if page else (None, None)
        body = {"data": data, "first_id": first, "last_id": last, "has_more": page[-1:] != ids[-1:]}
        await connection.send_json(200, body)
        return True

    async def _anthropic_found(self, connection: Connection, request: Request) -> FakeBatch | None:
        batch = self.batches.get(request.path.split("?")[0].split("/")[4])
        if (
            batch is None
            or batch.api != "anthropic"
            or batch.deleted
            or batch.lost
            or self._other_account(batch, request)
        ):
            error = {"type": "error", "error": {"type": "not_found_error", "message": "no such batch"}}
            await connection.send_json(404, error)
            return None
        return batch

    async def _anthropic_retrieve(self, connection: Connection, request: Request) -> bool:
        await _wait_at(self.retrieve_hold, self.retrieve_waiting)
        batch = await self._anthropic_found(connection, request)
        if batch is not None and not await self._refuse_retrieve(connection, batch):
            batch.retrieved += 1
            self._end(batch)
            await connection.send_json(200, self._anthropic_json(batch))
        return True

    async def _anthropic_results(self, connection: Connection, request: Request) -> bool:
        batch = await self._anthropic_found(connection, request)
        if batch is None:
            return True
        if batch.status != "ended":
            error = {"type": "error", "error": {"type": "invalid_request_error", "message": "not ended"}}
            await connection.send_json(400, error)
            return True
        if await self._refuse_results(connection, batch.api):
            return True
        content = batch.raw_results
        if content is None:
            content = "".join(json.dumps(entry) + "\n" for entry in batch.results).encode()
        headers = {"content-type": "application/binary", "content-length": str(len(content))}
        await connection.send_head(200, headers)
        await _wait_at(self.results_hold, self.results_waiting)
        await connection.send(content)
        return True

    async def _anthropic_cancel(self, connection: Connection, request: Request) -> bool:
        await _wait_at(self.cancel_hold, self.cancel_waiting)
        batch = await self._anthropic_found(connection, request)
        if batch is not None:
            self._cancel(batch, "canceling")
            await connection.send_json(200, self._anthropic_json(batch))
        return True

    async def _anthropic_delete(self, connection: Connection, request: Request) -> bool:
        batch = await self._anthropic_found(connection, request)
        if batch is None:
            return True
        if batch.status != "ended":
            message = "Message Batches can only be deleted once they've finished processing."
            await connection.send_json(
                400, {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
            )
            return True
        await _wait_at(self.delete_hold, self.delete_waiting)
        if self.delete_error is not None:
            await connection.send_json(*self.delete_error)
            return True
        batch.deleted = True
        await connection.send_json(200, {"id": batch.id, "type": "message_batch_deleted"})
        return True


async def _wait_at(hold: asyncio.Event | None, waiting: asyncio.Event) -> None:
    """Wait at ``hold`` (a test's ``create_hold``, ``delete_hold``, ...) while it is set to an
    event not set yet, setting ``waiting`` first, so the test knows a request waits there."""
    if hold is not None and not hold.is_set():
        waiting.set()
        await hold.wait()
