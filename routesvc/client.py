"""A typed async client for RouterService, used by the CLI and usable from other Python code."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

import grpc

from routesvc.errors import ConfigError
from routesvc.images import sniff_media_type
from routesvc.loopback import is_loopback_host, is_loopback_ip
from routesvc.v1 import router_pb2 as pb
from routesvc.v1 import router_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 30.0
"""The deadline (seconds) of a unary call given no ``timeout``, unless the client says otherwise."""

DEFAULT_STREAM_TIMEOUT = 300.0
"""The deadline (seconds) of a Complete stream given no ``timeout``, unless the client says otherwise.
It bounds the whole answer, so it is longer than ``DEFAULT_TIMEOUT``: 30 s would cut long answers,
paid for, short."""

_ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
_CACHE_BREAKPOINTS = {"5m": pb.CACHE_BREAKPOINT_FIVE_MINUTES, "1h": pb.CACHE_BREAKPOINT_ONE_HOUR}


class CompleteCall(Protocol):
    """A started Complete call, as ``grpc.aio`` returns it."""

    def __aiter__(self) -> AsyncIterator[pb.CompleteResponse]: ...

    def cancel(self) -> bool: ...

    async def initial_metadata(self) -> grpc.aio.Metadata | None: ...

    async def trailing_metadata(self) -> grpc.aio.Metadata | None: ...


class CompleteStream:
    """The messages of one Complete call: the decision, text deltas, then the completion (or, in
    batch mode, the decision and the batch job); a cascade may send an escalation before the
    deltas, which are then the next model's, or, if it failed before any text, the rejected
    answer's (the completion's ``model`` says whose). The call starts when the stream is made (by
    ``complete``), so its timeout counts from then, however late the stream is first read.

    Leave it with ``async with``, which cancels a call still running when the block ends (a
    ``break``, an exception, task cancellation), or call ``aclose()``::

        async with client.complete(chat) as stream:
            async for message in stream:
                ...

    A stream held by nothing but a bare ``async for`` is cancelled as the loop is left, when it is
    dropped; one kept in a variable runs on (and the provider with it) until it is closed or
    dropped. The last message (the completion, or a batch job's id) is followed at once by the
    status: it is handed over only when the stream has ended, so a caller that stops at it does
    not cancel a finished call. (A cancel there makes the server's final status fail, and grpcio
    leaks native memory for every such call: grpc/grpc#43360.) When the call ends in an error
    after it, it is handed over before the error is raised: a batch job whose id came stands, and
    a caller that retried without it would queue a second one. Shared by this client and
    ``routesvc_client``.
    """

    def __init__(self, start: Callable[[], CompleteCall]) -> None:
        self._ended = True  # until the call has started: nothing for ``__del__`` to cancel
        self._call = start()
        self._messages: AsyncIterator[pb.CompleteResponse] = aiter(self._call)
        self._ready: collections.deque[pb.CompleteResponse] = collections.deque()
        self._last: pb.CompleteResponse | None = None  # held until the stream ends
        self._error: grpc.aio.AioRpcError | None = None  # raised once ``_ready`` is handed over
        self._ended = False

    def __aiter__(self) -> CompleteStream:
        return self

    async def __anext__(self) -> pb.CompleteResponse:
        while not self._ready:
            if self._ended:
                error, self._error = self._error, None
                if error is not None:
                    raise error
                raise StopAsyncIteration
            await self._read()
        return self._ready.popleft()

    async def _read(self) -> None:
        """Read one message of the call, or its end."""
        try:
            message = await anext(self._messages)
        except StopAsyncIteration:
            self._end(None)
            return
        except grpc.aio.AioRpcError as error:
            self._end(error)
            return
        except BaseException:
            # Task cancellation (or a failure of the transport itself): the call must not run on.
            self._end(None)
            self._cancel()
            raise
        if self._last is not None:
            self._ready.append(self._last)
            self._last = None
        if message.WhichOneof("event") in ("completion", "batch"):
            self._last = message
        else:
            self._ready.append(message)

    def _end(self, error: grpc.aio.AioRpcError | None) -> None:
        self._ended = True
        self._error = error
        if self._last is not None:
            self._ready.append(self._last)
            self._last = None

    def _cancel(self) -> None:
        self._call.cancel()  # a no-op once the call has ended

    async def initial_metadata(self) -> grpc.aio.Metadata | None:
        """The server's initial metadata (``x-request-id`` among it), once it has come."""
        return await self._call.initial_metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata | None:
        """The server's trailing metadata (``x-request-id`` among it), once the call has ended."""
        return await self._call.trailing_metadata()

    async def aclose(self) -> None:
        """Cancel the call if it is still running; the stream yields nothing more."""
        self._end(None)
        self._ready.clear()
        self._error = None
        self._cancel()

    async def __aenter__(self) -> CompleteStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped unclosed (a bare ``async for`` left by ``break``): cancel now rather than when
        # grpc's call object is collected, which can wait for a garbage collection.
        if not self._ended:
            self._cancel()


def build_chat(
    messages: Sequence[tuple[str, str] | tuple[str, str, str] | pb.Message],
    *,
    tools: Sequence[pb.Tool] = (),
    max_output_tokens: int | None = None,
    temperature: float | None = None,
    stop: Sequence[str] = (),
    tool_choice: pb.ToolChoice | None = None,
    parallel_tool_calls: bool | None = None,
    response_format: pb.ResponseFormat | None = None,
) -> pb.ChatRequest:
    """A ``ChatRequest`` from ``(role, content)`` pairs (role "system", "user" or "assistant") and
    ``pb.Message``s as they are (the turns of a tool-use loop: see ``tool_turns``). A third item,
    ``(role, content, "5m")`` or ``"1h"``, marks a prompt-cache breakpoint at the end of that turn
    (``Message.cache_breakpoint``); raises ``ValueError`` for any other."""
    chat = pb.ChatRequest(
        messages=[message if isinstance(message, pb.Message) else _message(*message) for message in messages],
        tools=list(tools),
        stop=list(stop),
        tool_choice=tool_choice,
        response_format=response_format,
    )
    if parallel_tool_calls is not None:
        chat.parallel_tool_calls = parallel_tool_calls
    if max_output_tokens is not None:
        chat.max_output_tokens = max_output_tokens
    if temperature is not None:
        chat.temperature = temperature
    return chat


def _message(role: str, content: str, cache: str = "") -> pb.Message:
    message = pb.Message(role=_ROLES[role], content=content)
    if cache:
        if cache not in _CACHE_BREAKPOINTS:
            raise ValueError(f"cache breakpoint {cache!r}: must be '5m' or '1h'")
        message.cache_breakpoint = _CACHE_BREAKPOINTS[cache]
    return message


def image_part(
    image: str | bytes | Path, *, detail: pb.ImageDetail.ValueType = pb.IMAGE_DETAIL_UNSPECIFIED
) -> pb.ContentPart:
    """An image for a ROLE_USER message's ``parts``: an https URL (a ``str``), an image file's
    bytes, or a file to read (a ``Path``); the media type of bytes is read from their first bytes.
    ``detail`` is OpenAI's (``pb.IMAGE_DETAIL_LOW``: a flat 85 tokens). Raises ``ConfigError``
    naming a file that cannot be read or is not a JPEG, PNG, GIF or WebP.

    ``pb.Message(role=pb.ROLE_USER, content="What is this?", parts=[image_part(Path("a.png"))])``
    """
    if isinstance(image, str):
        return pb.ContentPart(image=pb.Image(url=image, detail=detail))
    what = f"image file {image}" if isinstance(image, Path) else "image"
    if isinstance(image, Path):
        try:
            image = image.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read: {exc.strerror}") from exc
    media_type = sniff_media_type(image)
    if not media_type:
        raise ConfigError(f"{what}: not a JPEG, PNG, GIF or WebP file")
    return pb.ContentPart(image=pb.Image(data=image, media_type=media_type, detail=detail))


def tool_turns(completion: pb.Completion, text: str, results: Mapping[str, str]) -> list[pb.Message]:
    """The turns that continue a conversation after ``completion`` made tool calls: the assistant
    turn (``text``, the answer's text, and its calls), then one ROLE_TOOL turn per call with
    ``results[call id]``, in the calls' order."""
    calls = list(completion.tool_calls)
    if not calls:
        raise ValueError("the completion made no tool calls")
    missing = [call.id for call in calls if call.id not in results]
    if missing:
        raise ValueError(f"no result for tool call(s) {', '.join(missing)}")
    turns = [pb.Message(role=pb.ROLE_ASSISTANT, content=text, tool_calls=calls)]
    # A result must not be empty (a void function's result is best said in a word, "done").
    turns += [
        pb.Message(role=pb.ROLE_TOOL, tool_call_id=call.id, content=results[call.id] or "(no output)") for call in calls
    ]
    return turns


def checked_timeout(name: str, value: float | None) -> float | None:
    """``value``, a default deadline in seconds: above zero, or None for none (else ``ValueError``)."""
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be above zero (or None for none), not {value!r}")
    return value


def is_loopback_target(target: str) -> bool:
    """Whether a gRPC ``target`` names this host: a unix socket, a loopback address (127.0.0.0/8,
    ``::1``, ``::ffff:127.x.y.z``), or ``localhost`` when every address it resolves to is one
    (``host:port``, ``[v6]:port``, with or without a ``dns:``, ``ipv4:`` or ``ipv6:`` scheme; every
    address of an ``ipv4:a:1,b:2`` list). Other names are not trusted: what they resolve to is not
    this process's to pin (``dev.localhost`` may be any host's name)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target.removeprefix(scheme)
            if target.startswith("//"):  # dns://authority/host:port
                authority, _, target = target[2:].partition("/")
                if authority:  # names are resolved by that DNS server, not from this host's files
                    return all(is_loopback_ip(_host(address)) for address in target.split(","))
            break
    # gRPC tries every address of a list in turn, so each one must be this host.
    return all(is_loopback_host(_host(address)) for address in target.split(","))


def direct_channel_options(target: str) -> list[tuple[str, int]]:
    """The channel options that keep a call to this host off proxies: ``grpc.enable_http_proxy=0``
    when ``target`` is loopback (``is_loopback_target``), else none. gRPC tunnels every channel
    through a proxy named by ``grpc_proxy`` / ``https_proxy`` / ``http_proxy``, loopback targets
    included (Go exempts them; grpc-core does not): the proxy would see a plaintext call, an API key
    with it, and dial its own loopback rather than this host's. Other targets keep the
    environment's proxy, which may be the only way out of the network."""
    return [("grpc.enable_http_proxy", 0)] if is_loopback_target(target) else []


def _host(address: str) -> str:
    if address.startswith("["):
        return address[1 : address.find("]")].lower()
    if address.count(":") == 1:
        return address.partition(":")[0].lower()
    return address.lower()


class RouterClient:
    """``async with RouterClient("localhost:50051") as client``: Route, Complete, ListModels, GetStats,
    GetBatch, CancelBatch, Feedback.

    Plaintext unless ``credentials`` are given (``tls_credentials(...)``): the CLI's client, for a
    service on this host. ``api_key`` (sent as ``authorization: Bearer``) goes over plaintext only to
    this host (``is_loopback_target``), or where the caller says so with ``insecure=True``; to any
    other host without credentials it is a ``ConfigError``. A call to this host goes straight to it,
    never through a proxy the environment names (``direct_channel_options``); a call to another
    host, ``insecure=True`` with a key included, takes the environment's proxy as gRPC does: the
    caller chose plaintext across the network, and the proxy may be the only way to that host.
    (``routesvc_client``, the library for other programs, is TLS by default.)

    A call given no ``timeout`` gets ``default_timeout`` (``DEFAULT_TIMEOUT``, 30 s), a Complete
    stream ``default_stream_timeout`` (``DEFAULT_STREAM_TIMEOUT``, 5 minutes, for the whole
    answer); None turns a default off."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        insecure: bool = False,
        default_timeout: float | None = DEFAULT_TIMEOUT,
        default_stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT,
    ) -> None:
        self._timeout = checked_timeout("default_timeout", default_timeout)
        self._stream_timeout = checked_timeout("default_stream_timeout", default_stream_timeout)
        if api_key and channel is None and credentials is None and not insecure and not is_loopback_target(target):
            raise ConfigError(
                f"an API key would go in plaintext to {target}: connect over TLS (--tls, --tls-ca), "
                "or allow plaintext to that host explicitly (--insecure)"
            )
        if channel is None and credentials is not None:
            channel = grpc.aio.secure_channel(target, credentials, options=direct_channel_options(target))
        elif channel is None:
            # A key trusted to plaintext because the target is this host must not leave it, and no
            # call to this host goes through a proxy the environment names (direct_channel_options).
            channel = grpc.aio.insecure_channel(target, options=direct_channel_options(target))
        self._channel = channel
        self._stub = pb_grpc.RouterServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _call_metadata(self, extra: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
        return self._metadata + tuple((extra or {}).items())

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    async def route(
        self,
        chat: pb.ChatRequest,
        context: pb.RoutingContext | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> pb.RouteDecision:
        """The routing decision for ``chat``."""
        request = pb.RouteRequest(chat=chat, context=context or pb.RoutingContext())
        response: pb.RouteResponse = await self._stub.Route(
            request, timeout=self._deadline(timeout), metadata=self._call_metadata(metadata)
        )
        return response.decision

    def complete(
        self,
        chat: pb.ChatRequest,
        context: pb.RoutingContext | None = None,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> CompleteStream:
        """The Complete stream: the decision, text deltas, then the completion. ``async with`` it
        (or ``aclose()`` it) to cancel a call left early: see ``CompleteStream``. Without a
        ``timeout`` the whole stream has the client's ``default_stream_timeout``."""
        request = pb.CompleteRequest(chat=chat, context=context or pb.RoutingContext())
        deadline = self._stream_timeout if timeout is None else timeout
        return CompleteStream(
            lambda: self._stub.Complete(request, timeout=deadline, metadata=self._call_metadata(metadata))
        )

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """The model catalog."""
        response: pb.ListModelsResponse = await self._stub.ListModels(
            pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._call_metadata(None)
        )
        return list(response.models)

    async def get_stats(
        self, *, tenant: str = "", window_seconds: float = 0.0, timeout: float | None = None
    ) -> pb.GetStatsResponse:
        """Routing effectiveness over the last ``window_seconds`` (0: the server's whole window)."""
        request = pb.GetStatsRequest(tenant=tenant)
        if window_seconds:
            request.window.FromNanoseconds(round(window_seconds * 1e9))
        response: pb.GetStatsResponse = await self._stub.GetStats(
            request, timeout=self._deadline(timeout), metadata=self._call_metadata(None)
        )
        return response

    async def get_batch(self, batch_id: str, *, tenant: str = "", timeout: float | None = None) -> pb.GetBatchResponse:
        """A batch job's state and, once it succeeded, its result."""
        response: pb.GetBatchResponse = await self._stub.GetBatch(
            pb.GetBatchRequest(batch_id=batch_id, tenant=tenant),
            timeout=self._deadline(timeout),
            metadata=self._call_metadata(None),
        )
        return response

    async def cancel_batch(self, batch_id: str, *, tenant: str = "", timeout: float | None = None) -> pb.BatchJob:
        """Cancel a batch job that has not ended; the job as it is afterwards."""
        response: pb.CancelBatchResponse = await self._stub.CancelBatch(
            pb.CancelBatchRequest(batch_id=batch_id, tenant=tenant),
            timeout=self._deadline(timeout),
            metadata=self._call_metadata(None),
        )
        return response.job

    async def feedback(
        self,
        decision_id: str,
        *,
        score: float | None = None,
        thumbs_up: bool | None = None,
        timeout: float | None = None,
    ) -> pb.FeedbackResponse:
        """Record how good the answer of decision ``decision_id`` was: a ``score`` in [0, 1] or thumbs."""
        request = pb.FeedbackRequest(decision_id=decision_id)
        if score is not None:
            request.score = score
        if thumbs_up is not None:
            request.thumbs_up = thumbs_up
        response: pb.FeedbackResponse = await self._stub.Feedback(
            request, timeout=self._deadline(timeout), metadata=self._call_metadata(None)
        )
        return response

    async def aclose(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def tls_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials: trust ``ca_file`` (default: the system roots), and present a client
    certificate when ``cert_file`` and ``key_file`` are given (mutual TLS).

    Raises ``ConfigError`` naming the file when one cannot be read, and when only one of
    ``cert_file`` and ``key_file`` is given (grpc aborts the process on a certificate without a key).
    """

    if bool(cert_file) != bool(key_file):
        raise ConfigError("a TLS client certificate and its private key go together: give both or neither")

    def read(path: str | None, what: str) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{what} {path}: cannot read: {exc.strerror}") from exc

    return grpc.ssl_channel_credentials(
        read(ca_file, "TLS CA file"), read(key_file, "TLS client key"), read(cert_file, "TLS client certificate")
    )
