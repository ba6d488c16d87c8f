"""Public test helpers: a fake OpenAI / Anthropic server on loopback, scriptable per request.

``FakeProvider`` is a real HTTP/1.1 server (``asyncio.start_server``, keep-alive, chunked
transfer encoding) that speaks what the official SDKs expect:

    POST /v1/chat/completions   OpenAI: JSON, or ``data: {chunk}`` lines, a usage chunk with empty
                                ``choices`` when ``stream_options.include_usage``, then ``data: [DONE]``
    POST /v1/messages           Anthropic: JSON, or ``event:``/``data:`` pairs from ``message_start``
                                to ``message_stop``, with cumulative output tokens in ``message_delta``
    /v1/files, /v1/batches     OpenAI Batch API (upload, create, retrieve, cancel, output files,
                               file delete) and
    /v1/messages/batches       Anthropic Message Batches (create, retrieve, results, cancel, delete);
                               batches end as ``FakeProvider.batch_outcome`` says (complete, expire,
                               fail); ``files``, ``deleted_files`` and ``batches`` (``deleted``) say
                               what the provider still holds
    POST /_fake/script          control: ``{"script": {...}, "model": "...", "mode": "enqueue" | "default"}``
    GET  /_fake/requests        control: every request received, with whether the client aborted
    POST /_fake/reset           control: forget scripts (queued, and defaults per model or for all:
                                the built-in default answers again), requests and batches

Each API request is answered by one ``Script`` (text, chunking, delays, usage, HTTP error,
``Fault``), taken from a FIFO queue or a default, per model name or for all models::

    async with FakeProvider() as fake:
        fake.enqueue(Script(chunk_count=60, fault=Fault.CUT, fault_after=40))
        client = AsyncOpenAI(base_url=fake.openai_base_url, api_key="k")
        ...
        assert fake.requests[-1].aborted is False

``FaultProxy`` sits between the service and the fake for faults in the network (reset or close
after N bytes, slow chunks, a black hole).
``LoopbackProxy`` is what it is made of: a proxy on a free loopback port serving each connection
with its subclass's ``_serve`` (the tests' recording CONNECT and forward proxies are others).

Run it as a separate process for other languages and CI: ``python -m routesvc.testing --port N``.
"""

from routesvc.testing._batches import BatchOutcome, FakeBatch
from routesvc.testing._fake import FakeProvider
from routesvc.testing._proxy import FaultProxy, LoopbackProxy, NetworkFault
from routesvc.testing._script import DEFAULT_TEXT, FakeToolCall, Fault, RecordedRequest, Script

__all__ = [
    "DEFAULT_TEXT",
    "BatchOutcome",
    "FakeBatch",
    "FakeProvider",
    "FakeToolCall",
    "Fault",
    "FaultProxy",
    "LoopbackProxy",
    "NetworkFault",
    "RecordedRequest",
    "Script",
]
