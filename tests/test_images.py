"""Images in user turns: validated with the field named (never echoed), sent in each API's format,
served only by models with the vision capability, counted in the token estimate, kept out of
telemetry and logs, and carried through the batch store."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from routesvc import cli
from routesvc.batches._store import QueuedRequest, decode_request, encode_request
from routesvc.client import RouterClient, build_chat, image_part
from routesvc.images import dimensions, image_estimate, sniff_media_type
from routesvc.models import Image, ImageDetail, ImageEstimate, Message, Role
from routesvc.server import Server
from routesvc.testing import FakeProvider, Fault, Script
from routesvc.v1 import router_pb2 as pb
from routesvc.wire import routing_request
from tests.conftest import add_local_model, default_config, live_environ, settings_from, user_chat
from tests.observability import observed_server
from tests.test_batches import batch_config, wait_state
from tests.test_validation import error_info

CANARY = "canary-prompt-7f3a9"
SECRET_URL = "https://canary-user:canary-pass@images.example.com/cat.png?signature=canary-sig-51c2"


def png(width: int, height: int, marker: bytes = b"") -> bytes:
    """A real grayscale PNG of ``width`` x ``height`` (all black), with ``marker`` in a text chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + bytes(width) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    text = chunk(b"tEXt", b"Comment\x00" + marker) if marker else b""
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + text + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def jpeg_header(width: int, height: int) -> bytes:
    """A JPEG's first segments: SOI, an APP0 (JFIF), a DQT, then a baseline frame header (SOF0)."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + bytes(65)
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + bytes(9)
    return b"\xff\xd8" + app0 + dqt + sof


def gif_header(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00"


def webp_header(chunk: bytes, width: int, height: int) -> bytes:
    """The first bytes of a WebP file whose first chunk is ``chunk`` (VP8X, VP8L or "VP8 ")."""
    if chunk == b"VP8X":
        body = bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    elif chunk == b"VP8L":
        body = b"\x2f" + ((width - 1) | (height - 1) << 14).to_bytes(4, "little")
    else:
        body = bytes(3) + b"\x9d\x01\x2a" + struct.pack("<HH", width, height)
    return b"RIFF" + struct.pack("<I", 4 + 8 + len(body)) + b"WEBP" + chunk + struct.pack("<I", len(body)) + body


def data_part(
    data: bytes, media_type: str = "image/png", detail: pb.ImageDetail.ValueType = pb.IMAGE_DETAIL_UNSPECIFIED
) -> pb.ContentPart:
    return pb.ContentPart(image=pb.Image(data=data, media_type=media_type, detail=detail))


def url_part(
    url: str, media_type: str = "", detail: pb.ImageDetail.ValueType = pb.IMAGE_DETAIL_UNSPECIFIED
) -> pb.ContentPart:
    return pb.ContentPart(image=pb.Image(url=url, media_type=media_type, detail=detail))


def text_part(text: str) -> pb.ContentPart:
    return pb.ContentPart(text=text)


def image_chat(*parts: pb.ContentPart, content: str = "What is in these?") -> pb.ChatRequest:
    """One user turn of ``content`` and ``parts``."""
    return build_chat([pb.Message(role=pb.ROLE_USER, content=content, parts=parts)])


PIXEL = png(2, 1)
PIXEL_URL = f"data:image/png;base64,{base64.b64encode(PIXEL).decode()}"
ANTHROPIC_PIXEL = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PIXEL).decode()}

# What each API gets for: content, a URL image, a text part, an inline image.
SENT_PARTS = {
    "gpt-4o-mini": [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": "https://images.example.com/cat.png"}},
        {"type": "text", "text": "and this one"},
        {"type": "image_url", "image_url": {"url": PIXEL_URL}},
    ],
    "claude-sonnet": [
        {"type": "text", "text": "What is in these?"},
        {"type": "image", "source": {"type": "url", "url": "https://images.example.com/cat.png"}},
        {"type": "text", "text": "and this one"},
        {"type": "image", "source": ANTHROPIC_PIXEL},
    ],
}
MIXED = (url_part("https://images.example.com/cat.png"), text_part("and this one"), data_part(PIXEL))


async def _complete(client: RouterClient, chat: pb.ChatRequest, **context: object) -> list[pb.CompleteResponse]:
    return [m async for m in client.complete(chat, pb.RoutingContext(**context))]  # type: ignore[arg-type]


class TestImagesReachEachProvider:
    @pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-sonnet"], ids=["openai", "anthropic"])
    async def test_url_and_inline_images_are_sent_in_each_apis_format(
        self, live_client: RouterClient, fake: FakeProvider, model: str
    ) -> None:
        """The turn's content then its parts, in order: OpenAI gets text and ``image_url`` parts (an
        inline image as a base64 data URL), Anthropic text and ``image`` blocks (url or base64)."""
        messages = await _complete(live_client, image_chat(*MIXED), model=model)
        assert messages[-1].completion.model == model
        assert fake.requests[-1].body["messages"] == [{"role": "user", "content": SENT_PARTS[model]}]

    async def test_a_user_turn_after_tool_results_joins_them_with_its_images_on_anthropic(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """Anthropic takes the results and the next user turn as one user turn: its image joins too."""
        call = pb.ToolCall(id="call_1", name="lookup", arguments_json="{}")
        chat = build_chat(
            [
                ("user", "Look it up"),
                pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="found"),
                pb.Message(role=pb.ROLE_USER, parts=[data_part(PIXEL)]),
            ],
            tools=[pb.Tool(name="lookup")],
        )
        await _complete(live_client, chat, model="claude-sonnet")
        assert fake.requests[-1].body["messages"][2] == {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "found"},
                {"type": "image", "source": ANTHROPIC_PIXEL},
            ],
        }


class TestImageDetail:
    @pytest.mark.parametrize(
        ("detail", "sent"),
        [
            (pb.IMAGE_DETAIL_UNSPECIFIED, {"url": "https://images.example.com/cat.png"}),
            (pb.IMAGE_DETAIL_LOW, {"url": "https://images.example.com/cat.png", "detail": "low"}),
            (pb.IMAGE_DETAIL_HIGH, {"url": "https://images.example.com/cat.png", "detail": "high"}),
        ],
        ids=["unspecified", "low", "high"],
    )
    async def test_openai_gets_the_detail_only_when_it_is_set(
        self, live_client: RouterClient, fake: FakeProvider, detail: pb.ImageDetail.ValueType, sent: object
    ) -> None:
        """LOW and HIGH go as ``image_url.detail``; unset sends no ``detail`` (OpenAI's auto)."""
        chat = image_chat(url_part("https://images.example.com/cat.png", detail=detail), content="")
        await _complete(live_client, chat, model="gpt-4o-mini")
        assert fake.requests[-1].body["messages"] == [
            {"role": "user", "content": [{"type": "image_url", "image_url": sent}]}
        ]

    async def test_an_inline_image_carries_its_detail_too(self, live_client: RouterClient, fake: FakeProvider) -> None:
        """The ``data:`` URL of an inline image goes with its detail, as a URL image's does."""
        await _complete(live_client, image_chat(data_part(PIXEL, detail=pb.IMAGE_DETAIL_LOW), content=""))
        assert fake.requests[-1].body["messages"][0]["content"] == [
            {"type": "image_url", "image_url": {"url": PIXEL_URL, "detail": "low"}}
        ]

    async def test_anthropic_gets_the_image_as_it_is(self, live_client: RouterClient, fake: FakeProvider) -> None:
        """Anthropic has no detail: the blocks are those of an image without one."""
        parts = (url_part("https://images.example.com/cat.png", detail=pb.IMAGE_DETAIL_LOW), text_part("and this one"))
        await _complete(
            live_client, image_chat(*parts, data_part(PIXEL, detail=pb.IMAGE_DETAIL_HIGH)), model="claude-sonnet"
        )
        assert fake.requests[-1].body["messages"] == [{"role": "user", "content": SENT_PARTS["claude-sonnet"]}]

    async def test_an_openai_compatible_server_gets_the_detail_as_openai_does(self, fake: FakeProvider) -> None:
        """vLLM takes ``image_url.detail`` (and ignores a value it does not use): it is sent when set."""
        config = default_config()
        add_local_model(config, fake.openai_base_url, "llava", capabilities=["vision"])
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            chat = image_chat(url_part("https://images.example.com/cat.png", detail=pb.IMAGE_DETAIL_HIGH), content="")
            await _complete(client, chat, model="llava")
        assert fake.requests[-1].body["messages"][0]["content"] == [
            {"type": "image_url", "image_url": {"url": "https://images.example.com/cat.png", "detail": "high"}}
        ]


# Hosts an in-network provider (vLLM, Ollama) would fetch from the operator's network.
INTERNAL_HOSTS = [
    "169.254.169.254",  # cloud metadata (link-local)
    "127.0.0.1:6443",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "100.64.0.1",  # shared address space (carrier-grade NAT, some clusters' pods)
    "0.0.0.0",
    "127.1",  # the short and numeric forms URL fetchers read as 127.0.0.1
    "2130706433",
    "0x7f.0.0.1",
    "[::1]",
    "[::]",
    "[fe80::1]",
    "[fd00::1]",
    "[::ffff:10.0.0.1]",  # IPv4-mapped
    "[64:ff9b::a9fe:a9fe]",  # NAT64 of 169.254.169.254
    "[ff02::1]",
    "224.0.0.1",
    "localhost",
    "LOCALHOST.",
    "api.localhost",
    "metadata.google.internal",
    "metadata.google.internal.",
    "printer.local",
    "kubernetes.default.svc",
    "kubernetes",  # one label: a search-domain name
    "%31%32%37.0.0.1",
    "\uff11\uff12\uff17.0.0.1",  # full-width digits, which IDNA maps to 127.0.0.1
    "127.0.0.\u00ad1",  # a soft hyphen, which IDNA drops
    "169.254.169.254\u200b",  # a zero-width space, which IDNA drops
    "metadata.google.internal\u200b",
    "169.254.169.254\\@example.com",  # a browser-like parser reads "\\" as "/": host 169.254.169.254
    "127.0x.0x.1",  # to a WHATWG URL parser "0x" alone is 0: 127.0.0.1
    "0x.0x.0x.0x",
    "169.254.0x.0x",
]


class TestInternalImageHosts:
    async def test_an_url_naming_an_internal_host_is_refused_before_any_provider_sees_it(
        self, fake: FakeProvider
    ) -> None:
        """An ``openai_compatible`` server inside the operator's network fetches image URLs from
        there: an IP literal outside the global unicast range, or a name no public host has, is
        INVALID_ARGUMENT naming ``...image.url``, and neither the host nor the URL is echoed."""
        config = default_config()
        add_local_model(config, fake.openai_base_url, "llava", capabilities=["vision"])
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            for host in INTERNAL_HOSTS:
                url = f"https://{host}/canary-path-3c1e/cat.png"
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _complete(client, image_chat(text_part("a"), url_part(url)), model="llava")
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, host
                assert error_info(caught.value).metadata["field"] == "chat.messages[0].parts[1].image.url"
                assert "canary-path" not in str(caught.value.details())
                assert host.strip("[]").lower() not in str(caught.value.details())
        assert fake.requests == []

    @pytest.mark.parametrize(
        "host",
        [
            "[64:ff9b:1::a9fe:a9fe]",  # RFC 8215's local-use NAT64 prefix, of 169.254.169.254
            "[64:ff9b:1:ffff::7f00:1]",
            "[64:ff9b:1::808:808]",  # the whole local-use prefix: its IPv4 address may sit anywhere
            "192.0.0.8",  # IETF protocol assignments, which Python 3.11 calls global
            "[2002:a9fe:a9fe::]",  # 6to4 of 169.254.169.254
            "[::ffff:0:7f00:1]",  # IPv4-translated 127.0.0.1
            "[::a9fe:a9fe]",  # IPv4-compatible 169.254.169.254
            "[fec0::1]",  # site-local (deprecated), outside 2000::/3, global to Python 3.11
            "[fec0::a9fe:a9fe]",
            "[feff::1]",
            "[5f00::1]",  # SRv6 SIDs
            "[0:0:1::1]",
            "[3fff::1]",  # documentation (RFC 9637), inside 2000::/3
        ],
    )
    async def test_non_global_ranges_pythons_tables_call_global_are_refused_at_route(
        self, client: RouterClient, host: str
    ) -> None:
        """Ranges the service refuses itself rather than by ``ipaddress.is_global`` (which in Python
        3.11 calls them global), and IPv4 addresses embedded in IPv6, are INVALID_ARGUMENT naming
        the field at Route, the host not echoed."""
        chat = image_chat(text_part("a"), url_part(f"https://{host}/cat.png"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.route(chat)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["field"] == "chat.messages[0].parts[1].image.url"
        assert host.strip("[]") not in str(caught.value.details())

    async def test_public_hosts_reach_an_openai_compatible_server_unchanged(self, fake: FakeProvider) -> None:
        """Global addresses, literal or named, pass as they are."""
        urls = [
            "https://93.184.215.14/cat.png",
            "https://[2606:4700:4700::1111]:8443/cat.png",
            "https://[64:ff9b::5db8:d70e]/cat.png",  # NAT64 and 6to4 of 93.184.215.14
            "https://[2002:5db8:d70e::1]/cat.png",
            "https://images.example.com/cat.png",
            "https://b\u00fccher.example/cat.png",  # an internationalised name
            "https://1e100.net/cat.png",
            "https://old_bucket.example.com/cat.png",  # an underscore, as some older names have
            "https://i\u2764.ws/cat.png",  # a name browsers take and IDNA 2008's strict rules refuse
        ]
        config = default_config()
        add_local_model(config, fake.openai_base_url, "llava", capabilities=["vision"])
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            await _complete(client, image_chat(*[url_part(url) for url in urls], content="a"), model="llava")
        sent = fake.requests[-1].body["messages"][0]["content"]
        assert [part["image_url"]["url"] for part in sent[1:]] == urls


def _vision_config(fake: FakeProvider | None = None) -> dict[str, object]:
    """The default policy with a cheap local model without the vision capability as its default."""
    config = default_config()
    add_local_model(config, fake.openai_base_url if fake else "http://127.0.0.1:9/v1", "llama", capabilities=["tools"])
    config["routing"]["default_model"] = "llama"  # type: ignore[index]
    return config


class TestVisionRouting:
    async def test_a_model_without_vision_is_excluded_and_says_why(self) -> None:
        """An image request skips the default model when it lacks vision, and the decision's
        candidates say why; the same request without the image is served by it."""
        async with (
            Server(settings_from(_vision_config()), port=0) as server,
            RouterClient(server.target) as client,
        ):
            text = await client.route(user_chat("What is in this picture?"))
            image = await client.route(image_chat(data_part(PIXEL), content="What is in this picture?"))
        assert text.model == "llama"
        candidates = {c.model: c.excluded_reason for c in image.candidates}
        assert candidates["llama"] == "does not support images (no vision capability)"
        assert image.model == "gpt-4o-mini"
        assert "llama excluded: does not support images (no vision capability)" in image.reasons

    async def test_an_image_over_8000_px_on_a_side_is_not_routed_to_anthropic(self, client: RouterClient) -> None:
        """Anthropic refuses images over 8000 px on a side: creative writing, which goes to
        claude-sonnet, goes to an OpenAI model with such an image (it failed upstream as
        PROVIDER_REJECTED), and stays with claude-sonnet at 8000 px."""
        context = pb.RoutingContext(task_hint="creative_writing")
        wide = await client.route(image_chat(data_part(png(8001, 1)), content="A poem on this"), context)
        fits = await client.route(image_chat(data_part(png(8000, 1)), content="A poem on this"), context)
        assert (wide.model, fits.model) == ("gpt-4o-mini", "claude-sonnet")
        excluded = {c.model: c.excluded_reason for c in wide.candidates if c.excluded_reason}
        assert excluded == {"claude-sonnet": "provider kind anthropic refuses images over 8000 px on a side"}

    async def test_a_turn_of_images_alone_is_routed(self, client: RouterClient) -> None:
        """A user turn without any text still gets a decision: the classifier reads empty text."""
        decision = await client.route(image_chat(data_part(PIXEL), content=""))
        assert (decision.model, decision.estimated_input_tokens > 255) == ("gpt-4o-mini", True)

    async def test_a_pinned_model_without_vision_is_refused_as_no_eligible_model(self, fake: FakeProvider) -> None:
        """Pinning a model without vision for an image request is FAILED_PRECONDITION
        NO_ELIGIBLE_MODEL, as pinning one without tools for a tool request is; nothing is called."""
        async with (
            Server(settings_from(_vision_config(fake), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _complete(client, image_chat(data_part(PIXEL)), model="llama")
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(caught.value).reason == "NO_ELIGIBLE_MODEL"
        assert "llama: does not support images" in str(caught.value.details())
        assert fake.requests == []

    async def test_an_image_request_cascades_and_the_judge_is_told_of_the_images(
        self, live_client: RouterClient, fake: FakeProvider
    ) -> None:
        """The cascade runs on vision models; the judge reads the question's text with a note that
        images came with it (never the images)."""
        fake.enqueue(Script(text="A black square."), Script(text='{"score": 0.9}'))
        chat = image_chat(data_part(PIXEL), content="What colour is it?")
        messages = await _complete(live_client, chat, cascade=True, task_hint="simple_qa")
        assert list(messages[0].decision.cascade_models) == ["gpt-4o-mini", "gpt-4o"]
        judge = fake.requests[1].body["messages"]
        assert "<request>\nWhat colour is it?\n[1 image(s) sent with the request, not shown here]\n</request>" in str(
            judge[-1]["content"]
        )
        assert "base64" not in json.dumps(judge)


TALL_URL = "https://images.example.com/" + "a" * 8200
# (case, the parts of a user turn, the field named)
BAD_PARTS: list[tuple[str, tuple[pb.ContentPart, ...], str]] = [
    ("empty part", (pb.ContentPart(),), "chat.messages[0].parts[0]"),
    ("blank text", (text_part(" \n"),), "chat.messages[0].parts[0].text"),
    ("image without a source", (text_part("x"), pb.ContentPart(image=pb.Image())), "chat.messages[0].parts[1].image"),
    ("http url", (url_part(SECRET_URL.replace("https", "http")),), "chat.messages[0].parts[0].image.url"),
    ("data url", (url_part(PIXEL_URL),), "chat.messages[0].parts[0].image.url"),
    ("url with a space", (url_part(f"https://x.example/{CANARY} a.png"),), "chat.messages[0].parts[0].image.url"),
    ("url too long", (url_part(TALL_URL),), "chat.messages[0].parts[0].image.url"),
    (
        "url with a port out of range",
        (url_part("https://images.example.com:99999/a.png"),),
        "chat.messages[0].parts[0].image.url",
    ),
    (
        "url with a port not a number",
        (url_part("https://images.example.com:abc/a.png"),),
        "chat.messages[0].parts[0].image.url",
    ),
    ("unknown media type", (url_part(SECRET_URL, "image/bmp"),), "chat.messages[0].parts[0].image.media_type"),
    ("data without media type", (data_part(PIXEL, ""),), "chat.messages[0].parts[0].image.media_type"),
    (
        "png sent as jpeg",
        (data_part(png(1, 1, CANARY.encode()), "image/jpeg"),),
        "chat.messages[0].parts[0].image.data",
    ),
    ("not an image", (data_part(CANARY.encode()),), "chat.messages[0].parts[0].image.data"),
    # A signature with no size behind it, or a size of 0: no provider reads it (they went upstream).
    ("png signature alone", (data_part(b"\x89PNG\r\n\x1a\n"),), "chat.messages[0].parts[0].image.data"),
    ("png cut inside its IHDR", (data_part(png(300, 200)[:22]),), "chat.messages[0].parts[0].image.data"),
    ("png of 0 x 0", (data_part(png(0, 0)),), "chat.messages[0].parts[0].image.data"),
    ("gif of 0 x 0", (data_part(gif_header(0, 0), "image/gif"),), "chat.messages[0].parts[0].image.data"),
    ("gif 0 px high", (data_part(gif_header(32, 0), "image/gif"),), "chat.messages[0].parts[0].image.data"),
    (
        "jpeg start and junk",
        (data_part(b"\xff\xd8\xff" + CANARY.encode(), "image/jpeg"),),
        "chat.messages[0].parts[0].image.data",
    ),
    ("jpeg cut short", (data_part(jpeg_header(640, 480)[:30], "image/jpeg"),), "chat.messages[0].parts[0].image.data"),
    ("jpeg 0 px wide", (data_part(jpeg_header(0, 480), "image/jpeg"),), "chat.messages[0].parts[0].image.data"),
    (
        "webp VP8 of 0 x 0",
        (data_part(webp_header(b"VP8 ", 0, 0), "image/webp"),),
        "chat.messages[0].parts[0].image.data",
    ),
    (
        "webp chunk unknown",
        (data_part(b"RIFF\x04\x00\x00\x00WEBPJUNK", "image/webp"),),
        "chat.messages[0].parts[0].image.data",
    ),
    ("url with DEL", (url_part("https://images.example.com/a\x7fb.png"),), "chat.messages[0].parts[0].image.url"),
    (
        "url with a C1 control",
        (url_part("https://images.example.com/a\x9bb.png"),),
        "chat.messages[0].parts[0].image.url",
    ),
    (
        "url with a no-break space",
        (url_part("https://images.example.com/a\xa0b.png"),),
        "chat.messages[0].parts[0].image.url",
    ),
    ("empty data", (data_part(b""),), "chat.messages[0].parts[0].image.data"),
    (
        "unknown detail",
        (url_part(SECRET_URL, detail=7),),  # type: ignore[arg-type]
        "chat.messages[0].parts[0].image.detail",
    ),
]


class TestImageValidation:
    @pytest.mark.parametrize(("parts", "field"), [c[1:] for c in BAD_PARTS], ids=[c[0] for c in BAD_PARTS])
    async def test_each_rule_names_the_field_and_echoes_nothing(
        self, client: RouterClient, parts: tuple[pb.ContentPart, ...], field: str
    ) -> None:
        """INVALID_ARGUMENT, reason INVALID_REQUEST naming the field; neither the URL, the bytes
        nor the prompt is in the message."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.route(image_chat(*parts, content=CANARY))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["field"] == field
        details = str(caught.value.details())
        assert CANARY not in details
        assert "canary-sig" not in details
        assert "images.example.com" not in details

    @pytest.mark.parametrize("role", [pb.ROLE_SYSTEM, pb.ROLE_ASSISTANT])
    async def test_only_user_turns_carry_parts(self, client: RouterClient, role: int) -> None:
        """Both providers take images only from the user: parts on another turn are refused."""
        chat = build_chat([("user", CANARY), pb.Message(role=role, parts=[data_part(PIXEL)]), ("user", "and?")])  # type: ignore[arg-type]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.route(chat)
        assert error_info(caught.value).metadata["field"] == "chat.messages[1].parts"

    async def test_an_image_over_max_image_bytes_or_too_many_images_is_too_large(self) -> None:
        """``limits.max_image_bytes`` and ``limits.max_images`` refuse with RESOURCE_EXHAUSTED
        REQUEST_TOO_LARGE naming where, like the other size limits."""
        config = default_config()
        config["limits"] = {"max_image_bytes": 1000, "max_images": 2}
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as big:
                await client.route(image_chat(data_part(png(64, 64, CANARY.encode() * 80))))
            with pytest.raises(grpc.aio.AioRpcError) as many:
                await client.route(image_chat(*[url_part(SECRET_URL)] * 3))
            allowed = await client.route(image_chat(*[url_part(SECRET_URL)] * 2))
        assert (big.value.code(), error_info(big.value).reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "REQUEST_TOO_LARGE",
        )
        assert str(big.value.details()).startswith("chat.messages[0].parts[0].image.data: ")
        assert CANARY not in str(big.value.details())
        assert (many.value.code(), error_info(many.value).reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "REQUEST_TOO_LARGE",
        )
        assert "more than 2 images" in str(many.value.details())
        assert allowed.model

    def test_the_domain_turn_has_its_text_as_content_and_its_parts_in_order(self) -> None:
        """Every reader of text (classifier, features, token counter, judge) reads ``content``: the
        turn's texts alone, joined by newlines; the parts keep the images in place."""
        request = routing_request(
            pb.RouteRequest(chat=image_chat(*MIXED, content="first")), settings_from(default_config()).config.limits
        )
        (turn,) = request.chat.messages
        assert turn.content == "first\nand this one"
        assert request.chat.last_user_message == "first\nand this one"
        assert turn.parts == (
            "first",
            Image(url="https://images.example.com/cat.png"),
            "and this one",
            Image("image/png", data=PIXEL, width=2, height=1),
        )
        assert request.chat.uses_images

    def test_text_parts_without_images_make_a_plain_text_turn(self) -> None:
        """A turn of text parts only is plain text: any model serves it."""
        request = routing_request(
            pb.RouteRequest(chat=image_chat(text_part("b"), content="a")), settings_from(default_config()).config.limits
        )
        assert request.chat.messages == (Message(Role.USER, "a\nb"),)
        assert not request.chat.uses_images


class TestImageHeaders:
    @pytest.mark.parametrize(
        ("data", "media_type", "size"),
        [
            (png(300, 200), "image/png", (300, 200)),
            (jpeg_header(640, 480), "image/jpeg", (640, 480)),
            (gif_header(32, 16), "image/gif", (32, 16)),
            (webp_header(b"VP8X", 1920, 1080), "image/webp", (1920, 1080)),
            (webp_header(b"VP8L", 800, 600), "image/webp", (800, 600)),
            (webp_header(b"VP8 ", 100, 50), "image/webp", (100, 50)),
        ],
        ids=["png", "jpeg", "gif", "webp-vp8x", "webp-vp8l", "webp-vp8"],
    )
    def test_format_and_size_are_read_from_the_header(
        self, data: bytes, media_type: str, size: tuple[int, int]
    ) -> None:
        """Each format's signature is recognised and its size read without decoding the image."""
        assert (sniff_media_type(data), dimensions(data, media_type)) == (media_type, size)

    def test_a_truncated_header_has_no_size(self) -> None:
        """A header cut short says nothing, (0, 0), which request validation refuses."""
        assert dimensions(jpeg_header(640, 480)[:30], "image/jpeg") == (0, 0)
        assert dimensions(png(300, 200)[:22], "image/png") == (0, 0)

    async def test_files_an_encoder_wrote_are_read_and_taken(self, client: RouterClient) -> None:
        """Whole files as Pillow writes them (PNG of each colour type, baseline, progressive and
        Exif JPEG, animated GIF, lossy, lossless, alpha and animated WebP): their sizes are read
        from their headers and Route takes each one."""
        pil = pytest.importorskip("PIL.Image")

        def encoded(image: object, kind: str, **options: object) -> bytes:
            out = io.BytesIO()
            image.save(out, kind, **options)  # type: ignore[attr-defined]
            return out.getvalue()

        files: list[tuple[str, bytes]] = []
        for size in ((1, 1), (3, 7), (640, 480)):
            rgb, rgba = pil.new("RGB", size, (10, 200, 30)), pil.new("RGBA", size, (1, 2, 3, 100))
            second = pil.new("RGB", size)
            files += [
                ("image/png", encoded(rgb, "PNG")),
                ("image/png", encoded(rgba, "PNG")),
                ("image/png", encoded(rgb.convert("P"), "PNG")),
                ("image/png", encoded(rgb.convert("L"), "PNG")),
                ("image/jpeg", encoded(rgb, "JPEG")),
                ("image/jpeg", encoded(rgb, "JPEG", progressive=True)),
                ("image/jpeg", encoded(rgb, "JPEG", exif=pil.Exif().tobytes(), icc_profile=bytes(4000))),
                ("image/gif", encoded(rgb, "GIF")),
                ("image/gif", encoded(rgb, "GIF", save_all=True, append_images=[second])),
                ("image/webp", encoded(rgb, "WEBP")),
                ("image/webp", encoded(rgb, "WEBP", lossless=True)),
                ("image/webp", encoded(rgba, "WEBP")),
                ("image/webp", encoded(rgb, "WEBP", save_all=True, append_images=[second])),
            ]
            assert [(kind, dimensions(data, kind)) for kind, data in files[-13:]] == [
                (kind, size) for kind, _ in files[-13:]
            ]
        for kind, data in files:
            assert (await client.route(image_chat(data_part(data, kind)))).model


def _sized(width: int, height: int, detail: ImageDetail = ImageDetail.AUTO) -> Image:
    return Image("image/png", data=b"...", width=width, height=height, detail=detail)


class TestImageFormulas:
    @pytest.mark.parametrize(
        ("image", "openai", "anthropic", "larger"),
        [
            # OpenAI: one tile (85 + 170); Anthropic: 200 * 100 / 750 = 26.7.
            (_sized(200, 100), 255, 27, 255),
            # OpenAI: down to 768 x 768, 2 x 2 tiles (85 + 680); Anthropic: 1024 * 1024 / 750 = 1398.1.
            (_sized(1024, 1024), 765, 1399, 1399),
            # OpenAI: to 2048 x 1536, then 1024 x 768: 2 x 2 tiles; Anthropic: scaled to ~1,600.
            (_sized(4000, 3000), 765, 1600, 1600),
            # OpenAI: 4 x 2 tiles (85 + 1360); Anthropic: 1568 x 588 = 921,984 / 750 = 1229.3.
            (_sized(2048, 768), 1445, 1230, 1445),
            # Low detail: OpenAI's flat 85 whatever the size; Anthropic has no detail.
            (_sized(2048, 768, ImageDetail.LOW), 85, 1230, 1230),
            (_sized(200, 100, ImageDetail.HIGH), 255, 27, 255),
            # A URL image, of unknown size: the most each formula gives (OpenAI's 2048 x 768 above).
            (Image(url=SECRET_URL), 1445, 1600, 1600),
            (Image(url=SECRET_URL, detail=ImageDetail.LOW), 85, 1600, 1600),
        ],
        ids=["200x100", "1024x1024", "4000x3000", "2048x768", "low", "high", "url", "url-low"],
    )
    def test_each_provider_kind_has_its_formula(self, image: Image, openai: int, anthropic: int, larger: int) -> None:
        """OpenAI's 85 + 170 per 512-px tile (within 2048 px, shortest side 768; a flat 85 at low
        detail), Anthropic's width * height / 750 (within 1568 px and ~1,600 tokens), and for an
        OpenAI-compatible server, whose formula is unknown, the larger of the two."""
        assert image_estimate(image) == ImageEstimate(openai=openai, anthropic=anthropic, larger=larger)


_QUESTION = "What is it?"
# The default config's prices (USD per 1M tokens: input, output) and gpt-4o-mini's image_token_scale.
_PRICES = {"gpt-4o-mini": ("0.15", "0.60"), "gpt-4o": ("2.50", "10.00"), "claude-sonnet": ("3.00", "15.00")}


def _cost(decision: pb.RouteDecision, input_tokens: int) -> Decimal:
    """What ``input_tokens`` and the decision's output tokens cost on its model."""
    price_in, price_out = _PRICES[decision.model]
    return (input_tokens * Decimal(price_in) + decision.estimated_output_tokens * Decimal(price_out)) / 10**6


class TestImageTokens:
    async def test_each_models_estimate_counts_the_image_by_its_providers_formula(self, fake: FakeProvider) -> None:
        """The decision's estimated input tokens count each image by the formula of the chosen
        model's provider kind: OpenAI's tiles (a square image no longer at Anthropic's larger
        count; a URL image at the most OpenAI's formula gives, 85 at low detail), Anthropic's
        (unchanged), and the larger of the two for an OpenAI-compatible server."""
        config = default_config()
        add_local_model(config, fake.openai_base_url, "llava", capabilities=["vision"])
        square = data_part(png(1024, 1024))
        cases = [
            ("gpt-4o-mini", data_part(png(200, 100)), 255),
            ("gpt-4o-mini", square, 765),
            ("gpt-4o-mini", url_part(SECRET_URL), 1445),
            ("gpt-4o-mini", url_part(SECRET_URL, detail=pb.IMAGE_DETAIL_LOW), 85),
            ("gpt-4o", square, 765),
            ("claude-sonnet", square, 1399),
            ("claude-sonnet", url_part(SECRET_URL), 1600),
            ("claude-sonnet", data_part(png(1024, 1024), detail=pb.IMAGE_DETAIL_LOW), 1399),
            ("llava", square, 1399),
            ("llava", data_part(png(2048, 768)), 1445),
        ]
        async with Server(settings_from(config), port=0) as server, RouterClient(server.target) as client:
            base = (await client.route(user_chat(_QUESTION))).estimated_input_tokens
            found = []
            for model, part, _ in cases:
                decision = await client.route(image_chat(part, content=_QUESTION), pb.RoutingContext(model=model))
                found.append((model, decision.estimated_input_tokens - base))
        assert found == [(model, tokens) for model, _, tokens in cases]

    async def test_the_default_route_counts_the_image_by_the_chosen_models_formula(self, client: RouterClient) -> None:
        """Routed, not pinned: the default policy picks gpt-4o-mini, and the decision counts a
        square image by OpenAI's formula (765), not by the larger Anthropic one (1,399)."""
        text = await client.route(user_chat(_QUESTION))
        square = await client.route(image_chat(data_part(png(1024, 1024)), content=_QUESTION))
        assert (square.model, square.estimated_input_tokens - text.estimated_input_tokens) == ("gpt-4o-mini", 765)

    async def test_each_model_prices_the_images_by_its_formula_and_scale(self, client: RouterClient) -> None:
        """A square image: gpt-4o-mini bills OpenAI's 765 tokens ~33.3x (``image_token_scale:
        33.33``: 765 * 33.33 = 25,497.45, rounded up), gpt-4o 765, claude-sonnet Anthropic's 1,399;
        at low detail gpt-4o-mini bills 85 * 33.33 = 2,833.05, rounded up. The text is priced as
        it was."""
        chat = image_chat(data_part(png(1024, 1024)), content=_QUESTION)
        low = image_chat(data_part(png(1024, 1024), detail=pb.IMAGE_DETAIL_LOW), content=_QUESTION)
        text_tokens = (await client.route(user_chat(_QUESTION))).estimated_input_tokens
        mini = await client.route(chat)
        strong = await client.route(chat, pb.RoutingContext(model="gpt-4o"))
        claude = await client.route(chat, pb.RoutingContext(model="claude-sonnet"))
        mini_low = await client.route(low)
        assert [mini.model, mini_low.model] == ["gpt-4o-mini", "gpt-4o-mini"]
        assert Decimal(mini.estimated_cost_usd) == _cost(mini, text_tokens + 25498)
        assert Decimal(strong.estimated_cost_usd) == _cost(strong, text_tokens + 765)
        assert Decimal(claude.estimated_cost_usd) == _cost(claude, text_tokens + 1399)
        assert Decimal(mini_low.estimated_cost_usd) == _cost(mini_low, text_tokens + 2834)

    async def test_a_cost_cap_weighs_the_image_at_each_models_formula_and_scale(self, client: RouterClient) -> None:
        """A 2048 x 768 image with a short answer costs more on gpt-4o-mini than on gpt-4o (1,445
        OpenAI tokens, 48,162 once scaled, at $0.15/M against 1,445 at $2.50/M): under a cap
        between the two, the request moves to gpt-4o, and the decision says so. At low detail the
        image is 2,834 tokens on gpt-4o-mini, and the request stays there."""
        capped = pb.RoutingContext(max_cost_usd="0.005")
        chat = image_chat(data_part(png(2048, 768)), content=_QUESTION)
        chat.max_output_tokens = 16
        low = image_chat(data_part(png(2048, 768), detail=pb.IMAGE_DETAIL_LOW), content=_QUESTION)
        low.max_output_tokens = 16
        moved = await client.route(chat, capped)
        stayed = await client.route(low, capped)
        assert (moved.model, stayed.model) == ("gpt-4o", "gpt-4o-mini")
        assert Decimal(moved.estimated_cost_usd) < Decimal("0.005")
        assert any(
            reason.startswith("estimated cost 0.007") and "downgraded to gpt-4o" in reason for reason in moved.reasons
        )

    async def test_an_attempt_cut_short_is_charged_the_image_by_its_models_formula(self, fake: FakeProvider) -> None:
        """An attempt on gpt-4o-mini cut after its first chunk: the ledger and the span charge its
        input with a square image at OpenAI's 765 tokens, scaled (25,498), as the decision's
        estimate does, not at Anthropic's 1,399."""
        fake.enqueue(Script(fault=Fault.CUT, fault_after=1))
        chat = image_chat(data_part(png(1024, 1024)), content=_QUESTION)
        config = default_config()
        config["reliability"] = {"retries_per_model": 0, "max_attempts": 1}
        pinned = pb.RoutingContext(model="gpt-4o-mini")
        async with observed_server(fake, config=config) as observed:
            decision = await observed.client.route(chat, pinned)
            with pytest.raises(grpc.aio.AioRpcError):
                [m async for m in observed.client.complete(chat, pinned)]
            (entry,) = observed.server.router.ledger.entries()
            (span,) = observed.named("chat gpt-4o-mini")
        assert entry.usage.input_tokens == decision.estimated_input_tokens - 765 + 25498
        assert dict(span.attributes or {})["gen_ai.usage.input_tokens"] == entry.usage.input_tokens

    @pytest.mark.parametrize(
        ("model", "image_tokens", "billed"),
        [("gpt-4o-mini", 765, 25498), ("claude-sonnet", 1399, 2798)],
        ids=["openai", "anthropic"],
    )
    async def test_a_stream_without_usage_is_charged_the_image_as_its_model_bills_it(
        self, fake: FakeProvider, model: str, image_tokens: int, billed: int
    ) -> None:
        """A stream that reports no usage is charged its input estimated as the decision's
        estimate counts it: a square image at the model's formula times its ``image_token_scale``
        (gpt-4o-mini's 33.33; claude-sonnet given 2 here), not the formula's tokens alone."""
        fake.enqueue(Script(text="A dark square.", omit_usage=True))
        config = default_config()
        (claude,) = [m for m in config["models"] if m["id"] == "claude-sonnet"]  # type: ignore[attr-defined]
        claude["image_token_scale"] = "2"
        chat = image_chat(data_part(png(1024, 1024)), content=_QUESTION)
        pinned = pb.RoutingContext(model=model)
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            messages = [m async for m in client.complete(chat, pinned)]
            (entry,) = server.router.ledger.entries()
        decision, completion = messages[0].decision, messages[-1].completion
        assert completion.usage.input_tokens == decision.estimated_input_tokens - image_tokens + billed
        assert (entry.usage.input_tokens, entry.estimated) == (completion.usage.input_tokens, True)


class TestImageTokenLimits:
    """A tenant's ``tokens_per_minute`` counts a request's estimate as its model bills it: the
    images at the model's ``image_token_scale``, as ``estimated_cost_usd`` prices them."""

    async def test_an_image_request_whose_billed_estimate_is_over_the_tenants_tokens_per_minute_is_too_large(
        self, fake: FakeProvider
    ) -> None:
        """A URL image on gpt-4o-mini, the one model the tenant may use: 1,445 tokens by OpenAI's
        formula, 48,162 as the model bills it (x 33.33). Under a 3,000 tokens-per-minute limit the
        Complete is REQUEST_TOO_LARGE before any provider call (it was admitted on the unscaled
        ~2,000 and billed 48,180, locking the tenant out for the minute)."""
        config = default_config()
        config["tenants"] = {"t": {"tokens_per_minute": 3000, "allowed_models": ["gpt-4o-mini"]}}
        chat = image_chat(url_part("https://example.com/a.png"), content=_QUESTION)
        context = pb.RoutingContext(tenant="t")
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            decision = await client.route(chat, context)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [m async for m in client.complete(chat, context)]
        assert decision.model == "gpt-4o-mini"
        assert decision.estimated_input_tokens + decision.estimated_output_tokens < 3000
        assert (refused.value.code(), error_info(refused.value).reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "REQUEST_TOO_LARGE",
        )
        assert "more than tenant 't''s 3000 tokens per minute" in (refused.value.details() or "")
        assert fake.requests == []

    async def test_an_image_request_goes_to_a_model_it_fits_the_tenants_tokens_per_minute_on(
        self, fake: FakeProvider
    ) -> None:
        """The same request from a tenant that may use every model, with the LLM classifier as the
        policy's first stage: gpt-4o-mini (48,674 tokens as it bills the image) is left out for the
        tenant's 3,000 tokens per minute, saying so, and the request is routed and answered on a
        model it fits (gpt-4o, the image at scale 1). (The classifier was paid, the policy then
        picked gpt-4o-mini and admission refused it REQUEST_TOO_LARGE, at every retry.)"""
        config = default_config()
        config["routing"]["stages"][0] = {  # type: ignore[index]
            "kind": "classifier",
            "method": "llm",
            "model": "gpt-4o-mini",
            "timeout_s": 2,
        }
        config["tenants"] = {"t": {"tokens_per_minute": 3000}}
        chat = image_chat(url_part("https://example.com/a.png"), content=_QUESTION)
        fake.enqueue(Script(text='{"task": "chat", "complexity": "low"}'), model="gpt-4o-mini")
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            messages = [m async for m in client.complete(chat, pb.RoutingContext(tenant="t"))]
        decision, completion = messages[0].decision, messages[-1].completion
        assert (decision.model, completion.model) == ("gpt-4o", "gpt-4o")
        assert any(
            "gpt-4o-mini" in reason and "more than tenant 't''s 3000 tokens per minute" in reason
            for reason in decision.reasons
        )
        assert [request.model for request in fake.requests] == ["gpt-4o-mini", "gpt-4o"]

    async def test_a_pinned_model_an_image_request_is_over_the_limit_on_is_too_large_whatever_fits_else(
        self, fake: FakeProvider
    ) -> None:
        """Pinned to gpt-4o-mini, the same request is REQUEST_TOO_LARGE, as when no model fits,
        though gpt-4o would fit (it was FAILED_PRECONDITION NO_ELIGIBLE_MODEL then)."""
        config = default_config()
        config["tenants"] = {"t": {"tokens_per_minute": 3000}}
        chat = image_chat(url_part("https://example.com/a.png"), content=_QUESTION)
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [m async for m in client.complete(chat, pb.RoutingContext(tenant="t", model="gpt-4o-mini"))]
        assert error_info(refused.value).reason == "REQUEST_TOO_LARGE"
        assert fake.requests == []

    async def test_a_batch_image_request_is_admitted_on_its_billed_estimate(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """The first test's request with realtime false is refused REQUEST_TOO_LARGE too, and no
        job is queued (a job was queued, admitted on the unscaled estimate)."""
        config = batch_config(tmp_path)
        config["tenants"] = {"t": {"tokens_per_minute": 3000, "allowed_models": ["gpt-4o-mini"]}}
        chat = image_chat(url_part("https://example.com/a.png"), content=_QUESTION)
        context = pb.RoutingContext(tenant="t", realtime=False)
        async with (
            Server(settings_from(config, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [m async for m in client.complete(chat, context)]
        assert error_info(refused.value).reason == "REQUEST_TOO_LARGE"
        assert fake.batches == []


class TestImagesStayOutOfTelemetry:
    async def test_captured_messages_and_logs_hold_no_image_data(self, fake: FakeProvider) -> None:
        """With content capture on, an inline image is a ``blob`` part with its type and size but no
        bytes, a URL image a ``uri`` part without the URL's query; no log line holds either."""
        data = png(16, 16, b"canary-bytes-0d9e" * 8)
        chat = image_chat(data_part(data), url_part(SECRET_URL))
        async with observed_server(fake, telemetry={"capture_content": True}) as observed:
            with capture_logs() as logs:
                [m async for m in observed.client.complete(chat, pb.RoutingContext(model="gpt-4o-mini"))]
            (span,) = observed.named("chat gpt-4o-mini")
            dumped = json.dumps([s.to_json() for s in observed.finished()])
        assert "rpc_finished" in [entry["event"] for entry in logs]
        assert json.loads(str(dict(span.attributes or {})["gen_ai.input.messages"])) == [
            {
                "role": "user",
                "parts": [
                    {"type": "text", "content": "What is in these?"},
                    {"type": "blob", "modality": "image", "mime_type": "image/png", "size_bytes": len(data)},
                    {"type": "uri", "modality": "image", "mime_type": "", "uri": "https://images.example.com/cat.png"},
                ],
            }
        ]
        encoded = base64.b64encode(data).decode()
        for text in (dumped, repr(logs)):
            assert encoded not in text
            assert encoded[:40] not in text
            assert "canary-sig" not in text
            assert "canary-pass" not in text
            assert "canary-bytes" not in text


class TestBatchImages:
    @pytest.mark.parametrize(
        ("task", "content"),
        [("", SENT_PARTS["gpt-4o-mini"]), ("creative_writing", SENT_PARTS["claude-sonnet"])],
        ids=["openai", "anthropic"],
    )
    async def test_images_survive_a_restart_in_the_store_and_reach_the_provider_batch(
        self, tmp_path: Path, fake: FakeProvider, task: str, content: list[dict[str, object]]
    ) -> None:
        """A queued image request is stored with its images (base64 in the job's JSON); after a
        restart the next server sends it, and the provider batch gets what a realtime call sends."""
        waiting = batch_config(tmp_path)
        waiting["batch"]["group_window_seconds"] = 60  # type: ignore[index]
        context = pb.RoutingContext(realtime=False, tenant="acme", task_hint=task)
        async with (
            Server(settings_from(waiting, live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            job = [m async for m in client.complete(image_chat(*MIXED), context)][1].batch
        assert fake.batches == []
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        request = fake.batches[0].requests[0]
        assert (request.get("body") or request["params"])["messages"] == [{"role": "user", "content": content}]

    async def test_a_result_without_usage_is_charged_the_image_as_its_model_bills_it(
        self, tmp_path: Path, fake: FakeProvider
    ) -> None:
        """A batch result that reports no usage is charged the input the submit's estimate (the
        budget's reservation) counted: gpt-4o-mini's square image at 765 x 33.33 = 25,498 tokens,
        not the decision's 765 unscaled."""
        answer = "A dark square."
        fake.enqueue(Script(text=answer, omit_usage=True))
        chat = image_chat(data_part(png(1024, 1024)), content=_QUESTION)
        context = pb.RoutingContext(realtime=False, tenant="acme", model="gpt-4o-mini")
        async with (
            Server(settings_from(batch_config(tmp_path), live_environ(fake)), port=0) as server,
            RouterClient(server.target) as client,
        ):
            messages = [m async for m in client.complete(chat, context)]
            decision, job = messages[0].decision, messages[1].batch
            done = await wait_state(client, job.batch_id, pb.BATCH_STATE_SUCCEEDED)
        assert done.result.usage.input_tokens == decision.estimated_input_tokens - 765 + 25498

    def test_the_stored_request_decodes_to_the_same_turns(self) -> None:
        """encode_request / decode_request keep every part, bytes, size and detail included."""
        inline = Image("image/png", data=PIXEL, width=2, height=1, detail=ImageDetail.HIGH)
        turn = Message(Role.USER, "a", parts=("a", inline, Image(url=SECRET_URL, detail=ImageDetail.LOW)))
        request = QueuedRequest((turn,), 16)
        assert decode_request(encode_request(request)) == request

    def test_an_image_stored_before_details_decodes_as_auto(self) -> None:
        """A job stored before images had a detail (no ``detail`` key) is sent as it was: auto."""
        stored = json.loads(
            encode_request(QueuedRequest((Message(Role.USER, "a", parts=(Image(url=SECRET_URL),)),), 16))
        )
        del stored["messages"][0]["parts"][0]["image"]["detail"]
        (turn,) = decode_request(json.dumps(stored)).messages
        assert turn.parts == (Image(url=SECRET_URL),)


class TestClientHelper:
    def test_image_part_reads_a_file_and_its_type(self, tmp_path: Path) -> None:
        """``image_part`` takes an https URL, bytes or a file, names the media type of bytes, and
        passes a detail on."""
        path = tmp_path / "a.gif"
        path.write_bytes(gif_header(1, 1))
        assert image_part(path) == data_part(gif_header(1, 1), "image/gif")
        assert image_part(PIXEL) == data_part(PIXEL)
        assert image_part(SECRET_URL) == url_part(SECRET_URL)
        assert image_part(PIXEL, detail=pb.IMAGE_DETAIL_LOW) == data_part(PIXEL, detail=pb.IMAGE_DETAIL_LOW)


class TestCommandLine:
    async def test_route_image_sends_the_file_with_the_prompt(
        self, server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``--image PATH`` adds the file to the user turn: the estimate counts it."""
        path = tmp_path / "shot.png"
        path.write_bytes(png(1024, 1024))
        plain = ["route", "--target", server.target, "--json", "What is it?"]
        assert await asyncio.to_thread(cli.main, plain) == 0  # the command runs its own event loop
        assert await asyncio.to_thread(cli.main, [*plain[:-1], "--image", str(path), "What is it?"]) == 0
        without, with_image = [
            json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
        ]
        # gpt-4o-mini's estimate: a square image at OpenAI's 2 x 2 tiles.
        assert int(with_image["estimated_input_tokens"]) - int(without["estimated_input_tokens"]) == 765

    def test_a_file_that_is_no_image_is_one_line_and_exit_2(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A file that is not a JPEG, PNG, GIF or WebP is named before any call."""
        path = tmp_path / "notes.txt"
        path.write_text(CANARY)
        assert cli.main(["route", "--target", "127.0.0.1:9", "--image", str(path), "hello"]) == 2
        assert capsys.readouterr().err.strip() == f"error: image file {path}: not a JPEG, PNG, GIF or WebP file"
