"""``FakeProvider``: the server, its routes, script selection, request records and control API."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import Any

from routesvc.testing import _anthropic, _openai
from routesvc.testing._batches import BatchOutcome, FakeBatch, FakeBatches
from routesvc.testing._connection import BadRequest, ClientGone, Connection, ConnectionDone, Request
from routesvc.testing._responses import ErrorBody
from routesvc.testing._script import RecordedRequest, Script

_Handler = Callable[[Connection, Request], Awaitable[bool]]
"""Answers one request; returns whether the connection may serve another."""

_Respond = Callable[[Connection, RecordedRequest, Script], Awaitable[None]]


class FakeProvider:
    """A scriptable fake OpenAI and Anthropic server on loopback.

    ``api_key``: when set, API requests with another key get a provider-shaped 401.
    ``default``: the script used when no queued or per-model script applies.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default: Script | None = None,
        api_key: str | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._api_key = api_key
        self._made_with_key = api_key  # what ``reset`` restores after a rotation
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._default = default or Script()
        self._defaults: dict[str | None, Script] = {None: self._default}
        self._queues: dict[str | None, collections.deque[Script]] = collections.defaultdict(collections.deque)
        self._requests: list[RecordedRequest] = []
        self._connection_numbers = itertools.count(1)
        self._accepted = 0
        self._batches = FakeBatches(self._take_script, lambda: self.base_url)
        # One handler per (method, path); ``*`` in a path matches one segment (an id).
        self._routes: dict[tuple[str, str], _Handler] = {
            **{route: self._with_key(handler) for route, handler in self._batches.routes().items()},
            ("POST", _openai.PATH): self._api(_openai.respond, _openai.error_body),
            ("POST", _anthropic.PATH): self._api(_anthropic.respond, _anthropic.error_body),
            ("POST", "/_fake/script"): self._control_script,
            ("GET", "/_fake/requests"): self._control_requests,
            ("POST", "/_fake/reset"): self._control_reset,
        }

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening (port 0 picks a free port)."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- addresses -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``."""
        return f"http://{self._host}:{self._port}"

    @property
    def openai_base_url(self) -> str:
        """What the OpenAI SDK wants: the root plus ``/v1``."""
        return f"{self.base_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """What the Anthropic SDK wants: the bare root."""
        return self.base_url

    # -- scripts and records ---------------------------------------------------------------------

    def set_default(self, script: Script, *, model: str | None = None) -> None:
        """Answer with ``script`` when no queued script applies (for ``model`` only, if given)."""
        self._defaults[model] = script

    def enqueue(self, *scripts: Script, model: str | None = None) -> None:
        """Answer the next requests (for ``model`` only, if given) with ``scripts``, in order."""
        self._queues[model].extend(scripts)

    @property
    def api_key(self) -> str | None:
        """The key API requests must carry (None: any); set it to rotate the provider's key."""
        return self._api_key

    @api_key.setter
    def api_key(self, key: str | None) -> None:
        self._api_key = key

    @property
    def batch_outcome(self) -> BatchOutcome:
        """How batches end at their next retrieve (default ``COMPLETE``)."""
        return self._batches.outcome

    @batch_outcome.setter
    def batch_outcome(self, outcome: BatchOutcome) -> None:
        self._batches.outcome = outcome

    @property
    def batch_answered_before_cancel(self) -> int:
        """How many of a batch's requests (the first ones) the provider has answered when a cancel
        reaches it (default 0): the cancelled batch ends with their answers, billed, as the real
        APIs do (OpenAI's output file, Anthropic's ``succeeded`` results), the others cancelled."""
        return self._batches.answered_before_cancel

    @batch_answered_before_cancel.setter
    def batch_answered_before_cancel(self, answered: int) -> None:
        self._batches.answered_before_cancel = answered

    @property
    def batch_answered_before_expiry(self) -> int:
        """How many of a batch's requests (the first ones) the provider has answered when its
        window ends it (``BatchOutcome.EXPIRE``; default 0): the expired batch ends with their
        answers (or HTTP errors), the others expired, as the real APIs do."""
        return self._batches.answered_before_expiry

    @batch_answered_before_expiry.setter
    def batch_answered_before_expiry(self, answered: int) -> None:
        self._batches.answered_before_expiry = answered

    @property
    def batch_create_error(self) -> tuple[int, Any] | None:
        """``(status, JSON body)`` that creating a batch answers in both APIs, or None (created)."""
        return self._batches.create_error

    @batch_create_error.setter
    def batch_create_error(self, error: tuple[int, Any] | None) -> None:
        self._batches.create_error = error

    @property
    def batch_delete_error(self) -> tuple[int, Any] | None:
        """``(status, JSON body)`` that deleting an OpenAI file or an Anthropic message batch
        answers, or None (deleted)."""
        return self._batches.delete_error

    @batch_delete_error.setter
    def batch_delete_error(self, error: tuple[int, Any] | None) -> None:
        self._batches.delete_error = error

    @property
    def batch_retrieve_errors(self) -> dict[str, tuple[int, Any, dict[str, str]]]:
        """``(status, JSON body, headers)`` that retrieving a batch answers, by API (``"openai"``,
        ``"anthropic"``; an API not in it retrieves); each refused retrieve counts in the batch's
        ``refused``. Mutable in place."""
        return self._batches.retrieve_errors

    @property
    def batch_results_errors(self) -> dict[str, tuple[int, Any, dict[str, str]]]:
        """``(status, JSON body, headers)`` that reading an ended batch's results answers, by API
        (OpenAI's output and error files, Anthropic's results; an API not in it reads); each
        refused read counts in ``batch_results_refused``. Mutable in place."""
        return self._batches.results_errors

    @property
    def batch_results_refused(self) -> int:
        """How many results reads ``batch_results_errors`` refused."""
        return self._batches.results_refused

    @property
    def batch_create_hold(self) -> asyncio.Event | None:
        """While set to an event that is not set, creating a batch (either API) waits for it
        before answering; None (the default) answers at once."""
        return self._batches.create_hold

    @batch_create_hold.setter
    def batch_create_hold(self, hold: asyncio.Event | None) -> None:
        self._batches.create_hold = hold

    @property
    def batch_create_reply_hold(self) -> asyncio.Event | None:
        """While set to an event that is not set, a batch create (either API) makes the batch,
        then waits for it before answering (``batch_create_waiting`` is set): a create that
        reached the provider whose reply is late or lost. None (the default) answers at once."""
        return self._batches.create_reply_hold

    @batch_create_reply_hold.setter
    def batch_create_reply_hold(self, hold: asyncio.Event | None) -> None:
        self._batches.create_reply_hold = hold

    @property
    def batch_delete_hold(self) -> asyncio.Event | None:
        """While set to an event that is not set, deleting an OpenAI file or an Anthropic message
        batch waits for it before answering; None (the default) answers at once."""
        return self._batches.delete_hold

    @batch_delete_hold.setter
    def batch_delete_hold(self, hold: asyncio.Event | None) -> None:
        self._batches.delete_hold = hold

    @property
    def batch_retrieve_hold(self) -> asyncio.Event | None:
        """While set to an event that is not set, retrieving a batch (either API: a status
        check) waits for it before answering (``batch_retrieve_waiting`` is set); None (the
        default) answers at once."""
        return self._batches.retrieve_hold

    @batch_retrieve_hold.setter
    def batch_retrieve_hold(self, hold: asyncio.Event | None) -> None:
        self._batches.retrieve_hold = hold

    @property
    def batch_retrieve_waiting(self) -> asyncio.Event:
        """Set once a retrieve waits at ``batch_retrieve_hold``."""
        return self._batches.retrieve_waiting

    @property
    def batch_list_hold(self) -> asyncio.Event | None:
        """While set to an event that is not set, listing message batches (Anthropic: a lookup
        of a send by its shape) waits for it before answering (``batch_list_waiting`` is set),
        once ``batch_lists_unheld`` more lists have been answered at once; None (the default)
        answers at once."""
        return self._batches.list_hold

    @batch_list_hold.setter
    def batch_list_hold(self, hold: asyncio.Event | None) -> None:
        self._batches.list_hold = hold

    @property
    def batch_list_waiting(self) -> asyncio.Event:
        """Set once a list waits at ``batch_list_hold``."""
        return self._batches.list_waiting

    @property
    def batch_lists_unheld(self) -> int:
        """How many more lists of message batches answer at once before ``batch_list_hold``
        holds them (0, the default: it holds the next)."""
        return self._batches.lists_unheld

    @batch_lists_unheld.setter
    def batch_lists_unheld(self, count: int) -> None:
        self._batches.lists_unheld = count

    @property
    def batch_results_hold(self) -> asyncio.Event | None:
        """While set to an event that is not set, reading an ended batch's results (OpenAI's
        output or error file, Anthropic's results) sends the answer's head, then waits for it
        before the body (``batch_results_waiting`` is set): a body that stalls. None (the
        default) answers at once."""
        return self._batches.results_hold

    @batch_results_hold.setter
    def batch_results_hold(self, hold: asyncio.Event | None) -> None:
        self._batches.results_hold = hold

    @property
    def batch_results_waiting(self) -> asyncio.Event:
        """Set once a results read waits at ``batch_results_hold``."""
        return self._batches.results_waiting

    @property
    def batch_cancel_hold(self) -> asyncio.Event | None:
        """While set to an event that is not set, cancelling a batch (either API) waits for it
        before answering (``batch_cancel_waiting`` is set); None (the default) answers at once."""
        return self._batches.cancel_hold

    @batch_cancel_hold.setter
    def batch_cancel_hold(self, hold: asyncio.Event | None) -> None:
        self._batches.cancel_hold = hold

    @property
    def batch_cancel_waiting(self) -> asyncio.Event:
        """Set once a cancel waits at ``batch_cancel_hold``."""
        return self._batches.cancel_waiting

    @property
    def batch_delete_waiting(self) -> asyncio.Event:
        """Set once a delete waits at ``batch_delete_hold``."""
        return self._batches.delete_waiting

    @property
    def batch_create_waiting(self) -> asyncio.Event:
        """Set once a batch create waits at ``batch_create_hold``."""
        return self._batches.create_waiting

    @property
    def batches_per_key(self) -> bool:
        """Whether a batch is the account's of the key that created it (as OpenAI's are a
        project's): retrieved or cancelled with another key it is 404, and a list with another
        key leaves it out (default False)."""
        return self._batches.per_key

    @batches_per_key.setter
    def batches_per_key(self, per_key: bool) -> None:
        self._batches.per_key = per_key

    @property
    def batches_other_account_status(self) -> int:
        """With ``batches_per_key``, the HTTP status a retrieve or cancel of a batch with another
        account's key gets (default 404, as OpenAI answers; an OpenAI-compatible gateway may
        answer 400)."""
        return self._batches.other_account_status

    @batches_other_account_status.setter
    def batches_other_account_status(self, status: int) -> None:
        self._batches.other_account_status = status

    @property
    def batch_accounts(self) -> dict[str, str]:
        """With ``batches_per_key``, the account of each key named (keys of one account, as a
        project's rotated keys, see each other's batches); a key not named is an account of its
        own. Mutable in place."""
        return self._batches.accounts

    @property
    def openai_batch_http_errors_in_error_file(self) -> bool:
        """Whether an OpenAI batch request answered with an HTTP error is written to the error
        file (``response`` set, ``error`` null, as the Batch API does) rather than the output file
        (default False)."""
        return self._batches.http_errors_in_error_file

    @openai_batch_http_errors_in_error_file.setter
    def openai_batch_http_errors_in_error_file(self, enabled: bool) -> None:
        self._batches.http_errors_in_error_file = enabled

    @property
    def anthropic_batch_results_deleted(self) -> bool:
        """Whether an ended Anthropic batch has no ``results_url`` (its results deleted, as
        Anthropic does 29 days after creation; default False)."""
        return self._batches.results_deleted

    @anthropic_batch_results_deleted.setter
    def anthropic_batch_results_deleted(self, deleted: bool) -> None:
        self._batches.results_deleted = deleted

    @property
    def batches(self) -> list[FakeBatch]:
        """Every batch created through either API, oldest first, deleted ones too (``deleted``)."""
        return list(self._batches.batches.values())

    @property
    def files(self) -> list[str]:
        """The ids of the OpenAI files the fake holds (uploaded and not deleted, and batch
        output and error files), oldest first."""
        return list(self._batches.files)

    @property
    def deleted_files(self) -> list[str]:
        """The ids of the OpenAI files deleted, in the order they were."""
        return list(self._batches.deleted_files)

    def reset(self) -> None:
        """Forget queued scripts, defaults set since start (per model and for all models: the
        constructor's ``default`` answers again), recorded requests and batches, and set every
        knob back as the constructor made it (the batch faults and holds off, the constructor's
        ``api_key`` after a rotation)."""
        self._batches.reset()
        self._api_key = self._made_with_key
        self._queues.clear()
        self._defaults = {None: self._default}
        self._requests.clear()

    @property
    def connections_accepted(self) -> int:
        """How many TCP connections the fake has accepted (keep-alive reuse keeps this low)."""
        return self._accepted

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every API request received so far, oldest first (control requests are not recorded)."""
        return list(self._requests)

    def _take_script(self, model: str) -> Script:
        """The model's queue, the shared queue, the model's default, the default: first that has one."""
        for key in (model, None):
            queue = self._queues.get(key)
            if queue:
                return queue.popleft()
        return self._defaults.get(model) or self._defaults[None]

    # -- serving ---------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        connection = Connection(reader, writer, number=next(self._connection_numbers))
        self._accepted = connection.number
        try:
            while (request := await connection.read_request()) is not None:
                handler = self._route(request.method, request.path.split("?")[0])
                if handler is None:
                    await connection.send_json(404, {"error": {"type": "not_found_error"}})
                    keep_alive = True
                else:
                    keep_alive = await handler(connection, request)
                if not keep_alive or request.headers.get("connection", "").lower() == "close":
                    break
        except (ClientGone, ConnectionDone, BadRequest, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            connection.close()

    def _route(self, method: str, path: str) -> _Handler | None:
        """The handler for ``path``: an exact entry, else one whose ``*`` segments match."""
        exact = self._routes.get((method, path))
        if exact is not None:
            return exact
        segments = path.split("/")
        for (route_method, pattern), handler in self._routes.items():
            parts = pattern.split("/")
            if (
                route_method == method
                and "*" in parts
                and len(parts) == len(segments)
                and all(p in ("*", s) for p, s in zip(parts, segments, strict=True))
            ):
                return handler
        return None

    def _with_key(self, handler: _Handler) -> _Handler:
        """``handler`` behind the API-key check: another key gets a provider-shaped 401."""

        async def handle(connection: Connection, request: Request) -> bool:
            headers = request.headers
            bearer = headers.get("authorization", "")
            key = headers.get("x-api-key") or (bearer[7:] if bearer.lower().startswith("bearer ") else None)
            if self._api_key is not None and key != self._api_key:
                anthropic = request.path.startswith("/v1/messages/")
                error_body = _anthropic.error_body if anthropic else _openai.error_body
                await connection.send_json(401, error_body(401, "authentication_error", "invalid api key"))
                return True
            return await handler(connection, request)

        return handle

    def _api(self, respond: _Respond, error_body: ErrorBody) -> _Handler:
        """A handler that records an API request, picks its script and answers it with ``respond``."""

        async def handle(connection: Connection, request: Request) -> bool:
            return await self._exchange(connection, request, respond, error_body)

        return handle

    async def _exchange(
        self, connection: Connection, request: Request, respond: _Respond, error_body: ErrorBody
    ) -> bool:
        """Answer one API request while watching for the client leaving; record how it ended."""
        try:
            body = json.loads(request.body) if request.body else None
        except ValueError:
            body = None
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            headers=MappingProxyType(dict(request.headers)),
            body=body,
            received_at=time.monotonic(),
            connection=connection.number,
        )
        self._requests.append(record)
        watcher = asyncio.create_task(connection.watch())
        keep_alive = False
        try:
            if not isinstance(body, dict):
                await connection.send_json(400, error_body(400, "invalid_request_error", "body is not JSON"))
            elif self._api_key is not None and record.api_key != self._api_key:
                message = f"invalid api key {record.api_key}"
                await connection.send_json(401, error_body(401, "authentication_error", message))
            else:
                record.script = self._take_script(record.model)
                await respond(connection, record, record.script)
            keep_alive = True
            record.completed = True
        except ClientGone:
            record.aborted = True
            record.aborted_at = connection.gone_at
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            record.ended.set()
        return keep_alive

    # -- control ---------------------------------------------------------------------------------

    async def _control_script(self, connection: Connection, request: Request) -> bool:
        try:
            data = json.loads(request.body)
            script = Script.from_json(data.get("script") or {})
            model = data.get("model")
            mode = data.get("mode", "enqueue")
            if mode not in ("enqueue", "default") or not (model is None or isinstance(model, str)):
                raise ValueError("mode must be enqueue or default; model a string")
        except (ValueError, TypeError, AttributeError) as exc:
            await connection.send_json(400, {"error": {"type": "invalid_script", "message": str(exc)}})
            return True
        if mode == "default":
            self.set_default(script, model=model)
        else:
            self.enqueue(script, model=model)
        await connection.send_json(200, {"ok": True})
        return True

    async def _control_requests(self, connection: Connection, request: Request) -> bool:
        await connection.send_json(200, {"requests": [record.to_json() for record in self._requests]})
        return True

    async def _control_reset(self, connection: Connection, request: Request) -> bool:
        self.reset()
        await connection.send_json(200, {"ok": True})
        return True
