"""Protobuf <-> domain conversion, with request validation. The only importer of ``v1`` besides
``service.py``.

Validation errors name the field path (``chat.messages[2].role``) and never echo its content.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from urllib.parse import urlsplit

import idna
from google.protobuf import duration_pb2, timestamp_pb2

from routesvc.catalog import ModelSpec
from routesvc.config import LimitsConfig
from routesvc.cost import format_usd
from routesvc.errors import InvalidRequest, RequestTooLarge
from routesvc.images import MEDIA_TYPES, dimensions, sniff_media_type
from routesvc.models import (
    AttemptResult,
    BatchJob,
    BatchState,
    BatchStatus,
    CacheTtl,
    ChatRequest,
    CompleteEvent,
    Completion,
    Escalation,
    FinishReason,
    Image,
    ImageDetail,
    Message,
    Mode,
    QualityScore,
    ResponseFormat,
    ResponseFormatType,
    Role,
    RouteDecision,
    RoutingContext,
    RoutingRequest,
    TextDelta,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
    Usage,
)
from routesvc.stats import ModelRow, Percentiles, StatsSummary, Totals
from routesvc.v1 import router_pb2 as pb

_ROLES = {
    pb.ROLE_SYSTEM: Role.SYSTEM,
    pb.ROLE_USER: Role.USER,
    pb.ROLE_ASSISTANT: Role.ASSISTANT,
    pb.ROLE_TOOL: Role.TOOL,
}
_TOOL_CHOICE_MODES = {
    pb.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO,
    pb.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
    pb.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
    pb.TOOL_CHOICE_MODE_TOOL: ToolChoiceMode.TOOL,
}
_CACHE_BREAKPOINTS = {
    pb.CACHE_BREAKPOINT_UNSPECIFIED: None,
    pb.CACHE_BREAKPOINT_FIVE_MINUTES: CacheTtl.FIVE_MINUTES,
    pb.CACHE_BREAKPOINT_ONE_HOUR: CacheTtl.ONE_HOUR,
}
_IMAGE_DETAILS = {
    pb.IMAGE_DETAIL_UNSPECIFIED: ImageDetail.AUTO,
    pb.IMAGE_DETAIL_LOW: ImageDetail.LOW,
    pb.IMAGE_DETAIL_HIGH: ImageDetail.HIGH,
}
_MODES = {Mode.REALTIME: pb.MODE_REALTIME, Mode.BATCH: pb.MODE_BATCH}
_FINISH = {
    FinishReason.UNSPECIFIED: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER,
    FinishReason.OTHER: pb.FINISH_REASON_OTHER,
}
_ATTEMPT_RESULTS = {
    AttemptResult.COMPLETED: pb.ATTEMPT_OUTCOME_COMPLETED,
    AttemptResult.ESCALATED: pb.ATTEMPT_OUTCOME_ESCALATED,
    AttemptResult.FAILED: pb.ATTEMPT_OUTCOME_FAILED,
    AttemptResult.JUDGE: pb.ATTEMPT_OUTCOME_JUDGE,
    AttemptResult.CLASSIFIER: pb.ATTEMPT_OUTCOME_CLASSIFIER,
}
_BATCH_STATES = {
    BatchState.QUEUED: pb.BATCH_STATE_QUEUED,
    BatchState.SUBMITTED: pb.BATCH_STATE_SUBMITTED,
    BatchState.SUCCEEDED: pb.BATCH_STATE_SUCCEEDED,
    BatchState.FAILED: pb.BATCH_STATE_FAILED,
    BatchState.EXPIRED: pb.BATCH_STATE_EXPIRED,
    BatchState.CANCELLED: pb.BATCH_STATE_CANCELLED,
}
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_MAX_METADATA_CHARS = 1024
# A tool's JSON Schema nests a few levels; the SDKs' encoders recurse, so a deeper one would fail
# upstream (or here: Python's parser recurses too) instead of being refused with its field's name.
_MAX_JSON_DEPTH = 64
# max_cost_usd: 12 decimal places is far below any price; a longer number is a mistake (or an
# attempt to blow up the error message that quotes it).
_MAX_COST_DIGITS = 24
_MIN_COST_EXPONENT = -12
_MAX_COST = Decimal("1e24")
# Providers' call ids are a few dozen characters ("call_...", "toolu_...").
_MAX_TOOL_CALL_ID_CHARS = 256
# A stop sequence is a marker ("\n\n", "</answer>", "Observation:"); neither provider documents a
# bound, and a longer one is a mistake (or an attempt to grow every request the router sends).
_MAX_STOP_CHARS = 256
# Every job's id: "batch_" and a uuid4's hex (documented on BatchJob.batch_id).
_BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
# google.protobuf.Duration holds at most 10,000 years.
_MAX_DURATION_SECONDS = 315_576_000_000
# Signed image URLs run to a few thousand characters; browsers and CDNs stop at about 8K.
_MAX_IMAGE_URL_CHARS = 8192
# Names no public host has: special-use (RFC 6761, 6762, 8375), cloud metadata
# (metadata.google.internal) and Kubernetes service names (name.namespace.svc).
_INTERNAL_NAME_SUFFIXES = (".localhost", ".internal", ".local", ".localdomain", ".home.arpa", ".svc")
# IPv6 prefixes that carry an IPv4 address in their last 32 bits, which a host reaches through
# them: NAT64's well-known prefix (RFC 6052), IPv4-translated (SIIT, RFC 2765) and the deprecated
# IPv4-compatible addresses (RFC 4291, ``::`` and ``::1`` among them). IPv4-mapped addresses and
# 6to4 (2002::/16, its IPv4 address in bits 16-47) are read by ``ipaddress`` itself.
_EMBEDDING_IPV4 = tuple(ipaddress.IPv6Network(prefix) for prefix in ("64:ff9b::/96", "::ffff:0:0:0/96", "::/96"))
# Ranges no image host is in that Python 3.11's ``is_global`` calls global: IANA's IETF protocol
# assignments (192.0.0.8 and its neighbours) and IPv6 documentation space (RFC 9637).
_NOT_GLOBAL = (ipaddress.IPv4Network("192.0.0.0/24"), ipaddress.IPv6Network("3fff::/20"))
# The only IPv6 block IANA gives out as global unicast: Python 3.11 calls some of what lies
# outside it global (fec0::/10, deprecated site-local, still routed inside some networks; RFC
# 8215's local-use NAT64 prefix 64:ff9b:1::/48, an operator's own translator whose IPv4 address
# may sit at any prefix length, so the whole prefix is refused).
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")


def _message(index: int, message: pb.Message, open_calls: Mapping[str, str], limits: LimitsConfig) -> Message:
    """One turn; ``open_calls`` holds the ids of the calls of the assistant turn before it that
    no ROLE_TOOL turn has answered yet."""
    field = f"chat.messages[{index}]"
    role = _ROLES.get(message.role)
    if role is None:
        raise InvalidRequest(f"{field}.role", "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL")
    if message.tool_calls and role is not Role.ASSISTANT:
        raise InvalidRequest(f"{field}.tool_calls", "are allowed only on ROLE_ASSISTANT messages")
    if message.tool_call_id and role is not Role.TOOL:
        raise InvalidRequest(f"{field}.tool_call_id", "is allowed only on ROLE_TOOL messages")
    if message.tool_error and role is not Role.TOOL:
        raise InvalidRequest(f"{field}.tool_error", "is allowed only on ROLE_TOOL messages")
    cache = _cache_breakpoint(f"{field}.cache_breakpoint", message.cache_breakpoint)
    if message.parts:
        if role is not Role.USER:
            raise InvalidRequest(f"{field}.parts", "are allowed only on ROLE_USER messages")
        return replace(_user_parts(field, message, limits), cache_breakpoint=cache)
    if role is Role.TOOL and message.tool_call_id not in open_calls:
        raise InvalidRequest(
            f"{field}.tool_call_id",
            "must be the id of an unanswered tool call of the ROLE_ASSISTANT message just before the results",
        )
    calls = tuple(_tool_call(f"{field}.tool_calls[{n}]", call) for n, call in enumerate(message.tool_calls))
    if not message.content.strip() and not calls:
        raise InvalidRequest(f"{field}.content", "must not be empty")
    return Message(
        role, message.content, calls, message.tool_call_id, cache_breakpoint=cache, tool_error=message.tool_error
    )


def _short_string(field: str, value: str) -> str:
    """A tenant, user tier, task hint or model id: at most ``_MAX_METADATA_CHARS`` characters,
    the one limit (and message) of every such field."""
    if len(value) > _MAX_METADATA_CHARS:
        raise InvalidRequest(field, f"must be at most {_MAX_METADATA_CHARS} characters")
    return value


def _cache_breakpoint(field: str, value: pb.CacheBreakpoint.ValueType) -> CacheTtl | None:
    """A message's or tool's cache breakpoint; None when unset. An unknown value (a newer
    client's) is refused rather than taken as none: the caller meant some breakpoint."""
    if value not in _CACHE_BREAKPOINTS:
        raise InvalidRequest(
            field, "must be CACHE_BREAKPOINT_UNSPECIFIED, CACHE_BREAKPOINT_FIVE_MINUTES or CACHE_BREAKPOINT_ONE_HOUR"
        )
    return _CACHE_BREAKPOINTS[value]


def _check_cache_breakpoints(chat: ChatRequest, limits: LimitsConfig) -> None:
    """At most ``limits.max_cache_breakpoints`` (Anthropic's 4), and no one-hour breakpoint after
    a five-minute one in the order Anthropic reads the prompt (tools, system messages, the other
    messages): Anthropic refuses both, and a refusal upstream would count against the model's
    breaker. The error names the breakpoint that breaks the rule."""
    indexed = list(enumerate(chat.messages))
    in_order = [(f"chat.tools[{n}]", tool.cache_breakpoint) for n, tool in enumerate(chat.tools)]
    in_order += [(f"chat.messages[{n}]", m.cache_breakpoint) for n, m in indexed if m.role is Role.SYSTEM]
    in_order += [(f"chat.messages[{n}]", m.cache_breakpoint) for n, m in indexed if m.role is not Role.SYSTEM]
    marked = [(f"{where}.cache_breakpoint", ttl) for where, ttl in in_order if ttl is not None]
    if len(marked) > limits.max_cache_breakpoints:
        raise InvalidRequest(
            marked[limits.max_cache_breakpoints][0],
            f"is one breakpoint too many: a request marks at most {limits.max_cache_breakpoints} "
            "(messages and tools together)",
        )
    short = False
    for field, ttl in marked:
        if ttl is CacheTtl.ONE_HOUR and short:
            raise InvalidRequest(
                field,
                "is CACHE_BREAKPOINT_ONE_HOUR after a CACHE_BREAKPOINT_FIVE_MINUTES breakpoint: one-hour "
                "breakpoints come first, in the order tools, system messages, other messages",
            )
        short = short or ttl is CacheTtl.FIVE_MINUTES


def _user_parts(field: str, message: pb.Message, limits: LimitsConfig) -> Message:
    """A ROLE_USER turn with parts: ``content`` (when not blank) then the parts, in order; a
    turn whose parts hold no image is plain text."""
    parts: list[str | Image] = [message.content] if message.content.strip() else []
    for number, part in enumerate(message.parts):
        where = f"{field}.parts[{number}]"
        kind = part.WhichOneof("part")
        if kind == "text":
            if not part.text.strip():
                raise InvalidRequest(f"{where}.text", "must not be empty")
            parts.append(part.text)
        elif kind == "image":
            parts.append(_image(f"{where}.image", part.image, limits))
        else:
            raise InvalidRequest(where, "must set text or image")
    text = "\n".join(part for part in parts if isinstance(part, str))
    images = any(isinstance(part, Image) for part in parts)
    return Message(Role.USER, text, parts=tuple(parts) if images else ())


def _image(field: str, image: pb.Image, limits: LimitsConfig) -> Image:
    """An image as both providers take it: an https URL, or bytes of a format they read that are
    what ``media_type`` says (a provider refusing garbage would count against its breaker).
    Problems are named, never the URL or the bytes."""
    media_type = image.media_type
    if media_type and media_type not in MEDIA_TYPES:
        raise InvalidRequest(f"{field}.media_type", f"must be one of {', '.join(MEDIA_TYPES)}")
    if image.detail not in _IMAGE_DETAILS:
        # A newer client's value is refused rather than taken as auto: the caller meant some detail.
        raise InvalidRequest(
            f"{field}.detail", "must be IMAGE_DETAIL_UNSPECIFIED, IMAGE_DETAIL_LOW or IMAGE_DETAIL_HIGH"
        )
    detail = _IMAGE_DETAILS[image.detail]
    source = image.WhichOneof("source")
    if source == "url":
        if len(image.url) > _MAX_IMAGE_URL_CHARS:
            raise InvalidRequest(f"{field}.url", f"must be at most {_MAX_IMAGE_URL_CHARS} characters")
        try:
            url = urlsplit(image.url)
            # Reading the port checks it (urlsplit alone lets "h:99999" and "h:abc" through).
            https = url.scheme.lower() == "https" and bool(url.hostname) and url.port != 0
        except ValueError:  # an invalid port or IPv6 address
            https = False
        if (
            not https
            or any(c.isspace() or unicodedata.category(c) == "Cc" for c in image.url)
            # A fetcher that parses URLs as browsers do reads "\" as "/", so for it the host of
            # https://10.0.0.1\@example.com is 10.0.0.1, where urlsplit reads example.com.
            or "\\" in image.url
        ):
            # Cc: the C0 controls, DEL and the C1 controls; a URL carries them percent-encoded.
            raise InvalidRequest(f"{field}.url", "must be an https URL (send an inline image as data)")
        if _internal_host(url.hostname or ""):
            raise InvalidRequest(
                f"{field}.url",
                "must name a public host, not a private, loopback, link-local or internal address "
                "(send such an image inline as data)",
            )
        return Image(media_type=media_type, url=image.url, detail=detail)
    if source != "data":
        raise InvalidRequest(field, "must set url or data")
    if not media_type:
        raise InvalidRequest(f"{field}.media_type", f"is required with data: one of {', '.join(MEDIA_TYPES)}")
    if len(image.data) > limits.max_image_bytes:
        raise RequestTooLarge(f"{field}.data: {len(image.data)} bytes; the limit is {limits.max_image_bytes}")
    found = sniff_media_type(image.data)
    if found != media_type:
        seen = f"they look like {found}" if found else "they are none of the formats taken"
        raise InvalidRequest(f"{field}.data", f"must be the bytes of a {media_type} file ({seen})")
    width, height = dimensions(image.data, media_type)
    if width <= 0 or height <= 0:
        # A signature and nothing behind it (or a 0 x 0 screen): no provider reads it, and a
        # refusal upstream would count against the model's breaker.
        raise InvalidRequest(f"{field}.data", f"must be a {media_type} file whose header gives its size (above 0 x 0)")
    return Image(media_type=media_type, data=image.data, width=width, height=height, detail=detail)


def _internal_host(hostname: str) -> bool:
    """Whether an image URL's host is one a provider inside the operator's network (vLLM,
    Ollama) would fetch from that network: an IP literal that is not a global unicast address
    (private, loopback, link-local, unique-local, reserved, unspecified, multicast, the ranges of
    ``_NOT_GLOBAL``; an IPv4 address mapped, translated or embedded into IPv6 (NAT64, 6to4) as
    itself), or a name no public host has. Names are not
    resolved: one that resolves to a private address passes."""
    host = hostname.lower()
    if "%" in host:  # a percent-encoded name, or an IPv6 zone (link-local)
        return True
    if not host.isascii():
        # The name a fetcher looks up: IDNA's mapping (UTS 46, as URL parsers apply it) turns
        # full-width digits and ideographic full stops into ASCII ones and drops soft hyphens
        # and zero-width spaces (127.0.0.\u00ad1 is 127.0.0.1 to it).
        try:
            host = idna.uts46_remap(host, std3_rules=False, transitional=False).lower()
        except (idna.IDNAError, UnicodeError):
            return True
    host = host.rstrip(".")  # the same name, rooted
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            as_url_reads = _url_ipv4(host)
        except ValueError:  # a host a URL parser refuses: no fetcher takes it
            return True
        if as_url_reads is None:
            return "." not in host or host == "localhost" or host.endswith(_INTERNAL_NAME_SUFFIXES)
        address = as_url_reads
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.sixtofour is not None:
            address = address.sixtofour
        elif any(address in prefix for prefix in _EMBEDDING_IPV4):
            address = ipaddress.IPv4Address(address.packed[-4:])
        if address.version == 6 and address not in _GLOBAL_UNICAST_V6:
            return True  # fec0::/10 site-local, and every other block outside 2000::/3
    return not address.is_global or address.is_multicast or any(address in network for network in _NOT_GLOBAL)


_IPV4_HEX = re.compile(r"0[xX][0-9a-fA-F]*")
_IPV4_PART = re.compile(rf"{_IPV4_HEX.pattern}|0[0-7]*|[1-9][0-9]*")


def _url_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a URL parser (the WHATWG URL standard's, which browsers and many HTTP
    clients follow) reads ``host`` as, or None when it reads it as a name: one whose last label is
    a number (digits, or ``0x`` and hex digits, even none) is an address, each part decimal,
    octal (a leading 0) or hex (``0x``, empty meaning 0), the last filling the remaining bytes:
    127.1, 2130706433, 0x7f.0.0.1, 0177.0.0.1 and 127.0x.0x.1 are all 127.0.0.1. Raises
    ``ValueError`` for such a host no parser takes (a part not a number, one out of range)."""
    parts = host.split(".")
    last = parts[-1]
    if not (last.isascii() and (last.isdigit() or _IPV4_HEX.fullmatch(last))):
        return None
    if len(parts) > 4 or not all(_IPV4_PART.fullmatch(part) for part in parts):
        raise ValueError(host)
    numbers = [
        int(part[2:] or "0", 16) if _IPV4_HEX.fullmatch(part) else int(part, 8 if part[0] == "0" else 10)
        for part in parts
    ]
    if any(number > 255 for number in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise ValueError(host)
    value = numbers[-1] + sum(number << (8 * (3 - index)) for index, number in enumerate(numbers[:-1]))
    return ipaddress.IPv4Address(value)


def _tool_call(field: str, call: pb.ToolCall) -> ToolCall:
    if not call.id or len(call.id) > _MAX_TOOL_CALL_ID_CHARS:
        raise InvalidRequest(f"{field}.id", f"must be 1-{_MAX_TOOL_CALL_ID_CHARS} characters (the call's id)")
    _tool_name(f"{field}.name", call.name)
    if call.arguments_json:
        _json_object(f"{field}.arguments_json", call.arguments_json)
    return ToolCall(call.id, call.name, call.arguments_json)


def _tool_name(field: str, name: str) -> None:
    """A tool's name, offered or called, as both providers take it (OpenAI's rule for a JSON
    schema's name too)."""
    if not _TOOL_NAME.fullmatch(name):
        raise InvalidRequest(field, "must be 1-64 characters of letters, digits, '_' or '-'")


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not standard JSON")


def _finite_float(text: str) -> float:
    """A JSON number as a float; a number too large for one (``1e400``) would be infinity, which
    the SDKs refuse to send, as they refuse the ``Infinity`` literal."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number out of range")
    return value


def _depth(value: object) -> int:
    """How deeply ``value`` (parsed JSON) nests objects and arrays, without recursion."""
    deepest = 0
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        pending.extend((child, level + 1) for child in children)
    return deepest


def _tool(index: int, tool: pb.Tool) -> ToolSpec:
    field = f"chat.tools[{index}]"
    _tool_name(f"{field}.name", tool.name)
    parameters = _schema(f"{field}.parameters_json", tool.parameters_json) if tool.parameters_json else {}
    cache = _cache_breakpoint(f"{field}.cache_breakpoint", tool.cache_breakpoint)
    return ToolSpec(tool.name, tool.description, MappingProxyType(parameters), cache)


def _json_object(field: str, text: str) -> dict[str, object]:
    """``text`` parsed as a JSON object; ``InvalidRequest`` naming ``field`` otherwise."""
    try:
        # Standard JSON only: Python reads NaN and Infinity, which the providers' SDKs refuse
        # to send (a request failing upstream would count against the model's breaker).
        parsed = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise InvalidRequest(field, "must be a JSON object (standard JSON)") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest(field, "must be a JSON object")
    if _depth(parsed) > _MAX_JSON_DEPTH:
        raise InvalidRequest(field, f"must nest at most {_MAX_JSON_DEPTH} levels deep")
    try:
        # Python reads a lone surrogate escape ("\ud800") into a string that has no UTF-8 form,
        # so the request could never be sent: it would fail at the provider and count against
        # the model's breaker. (The depth check above bounds this encoder's recursion.)
        json.dumps(parsed, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidRequest(field, "must not escape a lone surrogate (every string must be valid UTF-8)") from None
    return parsed


def _schema(field: str, text: str) -> dict[str, object]:
    """``text`` as ``_json_object`` reads it, a JSON Schema. A root ``"type": ["object"]`` is
    written ``"object"`` (the same schema, the one form OpenAI and Anthropic take). Another root
    is taken here: an ``openai_compatible`` server (vLLM, llama.cpp, Ollama) takes an array or
    a string answer; the kinds that refuse it are passed over at routing
    (``providers.base.refusal``), not sent a request that would fail upstream."""
    schema = _json_object(field, text)
    if schema.get("type") == ["object"]:
        schema["type"] = "object"
    return schema


def _stop(chat: pb.ChatRequest, limits: LimitsConfig) -> tuple[str, ...]:
    """The stop sequences. Not checked for lone surrogates: a protobuf string is valid UTF-8, and
    a request whose bytes are not is refused before it gets here (field ``request``)."""
    if len(chat.stop) > limits.max_stop_sequences:
        raise InvalidRequest("chat.stop", f"must hold at most {limits.max_stop_sequences} sequences")
    for index, sequence in enumerate(chat.stop):
        if not sequence or len(sequence) > _MAX_STOP_CHARS:
            raise InvalidRequest(f"chat.stop[{index}]", f"must be 1-{_MAX_STOP_CHARS} characters")
    return tuple(chat.stop)


def _tool_choice(chat: pb.ChatRequest, offered: set[str]) -> ToolChoice | None:
    """The tool choice; None when unset (the provider's default). Offered tools are required by
    any mode that may call one, as OpenAI requires them for any ``tool_choice``."""
    if not chat.HasField("tool_choice"):
        return None
    message = chat.tool_choice
    if message.mode == pb.TOOL_CHOICE_MODE_UNSPECIFIED and not message.name:
        return None
    mode = _TOOL_CHOICE_MODES.get(message.mode)
    if mode is None:
        raise InvalidRequest(
            "chat.tool_choice.mode",
            "must be TOOL_CHOICE_MODE_AUTO, TOOL_CHOICE_MODE_NONE, TOOL_CHOICE_MODE_REQUIRED or TOOL_CHOICE_MODE_TOOL",
        )
    if mode is not ToolChoiceMode.TOOL and message.name:
        raise InvalidRequest("chat.tool_choice.name", "is allowed only with TOOL_CHOICE_MODE_TOOL")
    if mode is not ToolChoiceMode.NONE and not offered:
        raise InvalidRequest("chat.tool_choice", "needs chat.tools (only TOOL_CHOICE_MODE_NONE is allowed without)")
    if mode is ToolChoiceMode.TOOL:
        _tool_name("chat.tool_choice.name", message.name)
        if message.name not in offered:
            raise InvalidRequest("chat.tool_choice.name", "must be the name of one of chat.tools")
    return ToolChoice(mode, message.name)


def _response_format(chat: pb.ChatRequest) -> ResponseFormat | None:
    """The JSON form the answer must take; None for text (unset or RESPONSE_FORMAT_TYPE_TEXT)."""
    if not chat.HasField("response_format"):
        return None
    message = chat.response_format
    field = "chat.response_format"
    if message.type not in (
        pb.RESPONSE_FORMAT_TYPE_UNSPECIFIED,
        pb.RESPONSE_FORMAT_TYPE_TEXT,
        pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
        pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
    ):
        raise InvalidRequest(
            f"{field}.type",
            "must be RESPONSE_FORMAT_TYPE_TEXT, RESPONSE_FORMAT_TYPE_JSON_OBJECT or RESPONSE_FORMAT_TYPE_JSON_SCHEMA",
        )
    if message.type != pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        for name in ("name", "schema_json", "strict"):
            if getattr(message, name):
                raise InvalidRequest(f"{field}.{name}", "is allowed only with RESPONSE_FORMAT_TYPE_JSON_SCHEMA")
        if message.type == pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
            return ResponseFormat(ResponseFormatType.JSON_OBJECT)
        return None
    _tool_name(f"{field}.name", message.name)
    if not message.schema_json:
        raise InvalidRequest(f"{field}.schema_json", "is required with RESPONSE_FORMAT_TYPE_JSON_SCHEMA")
    schema = _schema(f"{field}.schema_json", message.schema_json)
    return ResponseFormat(ResponseFormatType.JSON_SCHEMA, message.name, MappingProxyType(schema), message.strict)


def _chat(chat: pb.ChatRequest, limits: LimitsConfig) -> ChatRequest:
    if not chat.messages:
        raise InvalidRequest("chat.messages", "must contain at least one message")
    if len(chat.messages) > limits.max_messages:
        raise RequestTooLarge(f"chat.messages: more than {limits.max_messages} messages")
    if len(chat.tools) > limits.max_tools:
        raise RequestTooLarge(f"chat.tools: more than {limits.max_tools} tools")
    # Both providers take a tool call's result only in the turns right after the call's turn, and
    # need every call answered there: the calls still open (id -> field). Ids are unique within a
    # turn; some servers number each turn's calls from 0 again, which the providers take.
    open_calls: dict[str, str] = {}
    turns: list[Message] = []
    images = 0
    for index, message in enumerate(chat.messages):
        turn = _message(index, message, open_calls, limits)
        images += len(turn.images)
        if images > limits.max_images:
            raise RequestTooLarge(f"chat.messages[{index}].parts: more than {limits.max_images} images in the request")
        if turn.role is Role.TOOL:
            del open_calls[turn.tool_call_id]
        elif open_calls:
            raise InvalidRequest(
                next(iter(open_calls.values())), f"has no ROLE_TOOL result before chat.messages[{index}]"
            )
        for number, call in enumerate(turn.tool_calls):
            if call.id in open_calls:
                raise InvalidRequest(f"chat.messages[{index}].tool_calls[{number}].id", "repeats another call's id")
            open_calls[call.id] = f"chat.messages[{index}].tool_calls[{number}]"
        turns.append(turn)
    if open_calls:
        raise InvalidRequest(next(iter(open_calls.values())), "has no ROLE_TOOL result after it")
    messages = tuple(turns)
    if not any(message.role is Role.USER for message in messages):
        raise InvalidRequest("chat.messages", "must contain a ROLE_USER message")
    names = set()
    tools = []
    for index, tool in enumerate(chat.tools):
        spec = _tool(index, tool)
        if spec.name in names:
            raise InvalidRequest(f"chat.tools[{index}].name", "duplicates an earlier tool's name")
        names.add(spec.name)
        tools.append(spec)
    max_output_tokens: int | None = None
    if chat.HasField("max_output_tokens"):
        max_output_tokens = chat.max_output_tokens
        if max_output_tokens < 1:
            raise InvalidRequest("chat.max_output_tokens", "must be at least 1")
        if max_output_tokens > limits.max_output_tokens:
            raise InvalidRequest("chat.max_output_tokens", f"must be at most {limits.max_output_tokens}")
    temperature: float | None = None
    if chat.HasField("temperature"):
        temperature = chat.temperature
        if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
            raise InvalidRequest("chat.temperature", "must be between 0 and 2")
    parallel_tool_calls: bool | None = None
    if chat.HasField("parallel_tool_calls"):
        if not tools:
            raise InvalidRequest("chat.parallel_tool_calls", "needs chat.tools")
        parallel_tool_calls = chat.parallel_tool_calls
    request = ChatRequest(
        messages,
        tuple(tools),
        max_output_tokens,
        temperature,
        _stop(chat, limits),
        _tool_choice(chat, names),
        parallel_tool_calls,
        _response_format(chat),
    )
    _check_cache_breakpoints(request, limits)
    return request


def _context(context: pb.RoutingContext, limits: LimitsConfig) -> RoutingContext:
    if len(context.metadata) > limits.max_metadata_entries:
        raise RequestTooLarge(f"context.metadata: more than {limits.max_metadata_entries} entries")
    for key, value in context.metadata.items():
        if not key or len(key) > _MAX_METADATA_CHARS or len(value) > _MAX_METADATA_CHARS:
            raise InvalidRequest(
                "context.metadata", f"keys must be non-empty; keys and values at most {_MAX_METADATA_CHARS} characters"
            )
    # A model id is not held to a charset: the catalog's ids are the operator's (any non-empty
    # string); an unknown one is NOT_FOUND, and its error quotes only its start (``quoted_id``).
    for name in ("tenant", "user_tier", "task_hint", "model"):
        _short_string(f"context.{name}", getattr(context, name))
    max_cost: Decimal | None = None
    if context.max_cost_usd:
        text = context.max_cost_usd.strip()
        try:
            # ASCII only: Decimal also reads other scripts' digits ("١٢").
            plain = len(text) <= _MAX_COST_DIGITS and text.isascii() and "_" not in text
            max_cost = Decimal(text) if plain else None
        except InvalidOperation:
            max_cost = None
        if max_cost is None:
            raise InvalidRequest("context.max_cost_usd", 'must be a decimal number of USD, e.g. "0.01"')
        if not max_cost.is_finite() or max_cost <= 0:
            raise InvalidRequest("context.max_cost_usd", "must be a positive decimal number of USD")
        if max_cost.adjusted() < _MIN_COST_EXPONENT or max_cost > _MAX_COST:
            raise InvalidRequest("context.max_cost_usd", "must be between 1e-12 and 1e24 USD")
    return RoutingContext(
        tenant=context.tenant,
        user_tier=context.user_tier,
        task_hint=context.task_hint,
        realtime=context.realtime if context.HasField("realtime") else True,
        metadata=MappingProxyType(dict(context.metadata)),
        max_cost_usd=max_cost,
        model=context.model,
        cascade=context.cascade if context.HasField("cascade") else None,
    )


def routing_request(message: pb.RouteRequest | pb.CompleteRequest, limits: LimitsConfig) -> RoutingRequest:
    """The domain request of a Route or Complete message; raises ``InvalidRequest`` or
    ``RequestTooLarge`` naming the field."""
    size = message.ByteSize()
    if size > limits.max_request_bytes:
        raise RequestTooLarge(f"request is {size} bytes; the limit is {limits.max_request_bytes}")
    if not message.HasField("chat"):
        raise InvalidRequest("chat", "is required")
    return RoutingRequest(_chat(message.chat, limits), _context(message.context, limits))


def decision_message(decision: RouteDecision) -> pb.RouteDecision:
    """The protobuf form of ``decision``."""
    return pb.RouteDecision(
        decision_id=decision.decision_id,
        model=decision.model,
        provider=decision.provider,
        strategy=decision.strategy,
        rule=decision.rule,
        reasons=decision.reasons,
        estimated_input_tokens=decision.estimated_input_tokens,
        estimated_output_tokens=decision.estimated_output_tokens,
        estimated_cost_usd=format_usd(decision.estimated_cost_usd),
        routing_cost_usd=format_usd(decision.routing_cost_usd),
        mode=_MODES[decision.mode],
        candidates=[
            pb.Candidate(model=c.model, eligible=c.eligible, excluded_reason=c.excluded_reason)
            for c in decision.candidates
        ],
        task=decision.task,
        cascade_models=decision.cascade_models,
        cascade_thresholds=decision.cascade_thresholds,
        cascade_scorer=decision.cascade_scorer,
    )


def _usage(usage: Usage) -> pb.Usage:
    return pb.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_write_input_tokens=usage.cache_write_input_tokens,
        cache_write_1h_input_tokens=usage.cache_write_1h_input_tokens,
    )


def _quality(quality: QualityScore) -> pb.QualityScore:
    return pb.QualityScore(score=quality.score, scorer=quality.scorer, reason=quality.reason)


def _tool_calls(calls: tuple[ToolCall, ...]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=call.id, name=call.name, arguments_json=call.arguments_json) for call in calls]


def _completion(event: Completion) -> pb.Completion:
    message = pb.Completion(
        model=event.model,
        provider=event.provider,
        provider_model=event.provider_model,
        usage=_usage(event.usage),
        cost_usd=format_usd(event.cost_usd),
        finish_reason=_FINISH[event.finish_reason],
        attempts=[
            pb.Attempt(
                model=a.model,
                outcome=_ATTEMPT_RESULTS[a.result],
                usage=_usage(a.usage),
                cost_usd=format_usd(a.cost_usd),
            )
            for a in event.attempts
        ],
        total_usage=_usage(event.total_usage or event.usage),
        tool_calls=_tool_calls(event.tool_calls),
    )
    if event.quality is not None:
        message.quality.CopyFrom(_quality(event.quality))
    return message


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def batch_job_message(job: BatchJob) -> pb.BatchJob:
    """The protobuf form of a batch job reference."""
    return pb.BatchJob(
        batch_id=job.batch_id,
        state=_BATCH_STATES[job.state],
        model=job.model,
        provider=job.provider,
        estimated_cost_usd=format_usd(job.estimated_cost_usd),
        created_at=_timestamp(job.created_at),
        updated_at=_timestamp(job.updated_at),
        decision_id=job.decision_id,
    )


def batch_status_message(status: BatchStatus) -> pb.GetBatchResponse:
    """A GetBatch answer: the job, its result once succeeded, or why it failed."""
    response = pb.GetBatchResponse(job=batch_job_message(status.job), error=status.error)
    if status.result is not None:
        result = status.result
        response.result.CopyFrom(
            pb.BatchResult(
                text=result.text,
                usage=_usage(result.usage),
                cost_usd=format_usd(result.cost_usd),
                finish_reason=_FINISH[result.finish_reason],
                provider_model=result.provider_model,
                tool_calls=_tool_calls(result.tool_calls),
            )
        )
    return response


def batch_request(message: pb.GetBatchRequest | pb.CancelBatchRequest) -> tuple[str, str]:
    """The ``batch_id`` and ``tenant`` of a GetBatch or CancelBatch request; raises
    ``InvalidRequest`` for an id not of the form every job's id has (an unknown id of that form
    is the queue's ``BatchNotFound``)."""
    if not _BATCH_ID.fullmatch(message.batch_id):
        raise InvalidRequest("batch_id", 'must be the batch_id of a BatchJob ("batch_" and 32 lowercase hex digits)')
    return message.batch_id, _short_string("tenant", message.tenant)


def stats_request(message: pb.GetStatsRequest) -> tuple[str, float]:
    """The ``tenant`` and window in seconds (0: the whole window kept) of a GetStats request;
    raises ``InvalidRequest``."""
    window = 0.0
    if message.HasField("window"):
        seconds, nanos = message.window.seconds, message.window.nanos
        # google.protobuf.Duration's own rules: nanos below a second, of the seconds' sign.
        if abs(seconds) > _MAX_DURATION_SECONDS or abs(nanos) >= 1_000_000_000 or seconds * nanos < 0:
            raise InvalidRequest(
                "window",
                "must be a valid google.protobuf.Duration (nanos under 1e9 and of the seconds' sign;"
                " at most 10,000 years)",
            )
        window = seconds + nanos / 1e9
    if window < 0:
        raise InvalidRequest("window", "must not be negative")
    return _short_string("tenant", message.tenant), window


def complete_message(event: CompleteEvent) -> pb.CompleteResponse:
    """The stream message for one Complete event."""
    if isinstance(event, RouteDecision):
        return pb.CompleteResponse(decision=decision_message(event))
    if isinstance(event, TextDelta):
        return pb.CompleteResponse(delta=pb.TextDelta(text=event.text))
    if isinstance(event, Escalation):
        return pb.CompleteResponse(
            escalation=pb.Escalation(
                from_model=event.from_model,
                to_model=event.to_model,
                quality=_quality(event.quality),
                threshold=event.threshold,
                cost_usd=format_usd(event.cost_usd),
                usage=_usage(event.usage),
            )
        )
    if isinstance(event, BatchJob):
        return pb.CompleteResponse(batch=batch_job_message(event))
    return pb.CompleteResponse(completion=_completion(event))


def model_info(model: ModelSpec, unavailable_reason: str) -> pb.ModelInfo:
    """The protobuf form of a catalog model and its availability."""
    return pb.ModelInfo(
        id=model.id,
        provider=model.provider,
        provider_model=model.provider_model,
        input_price_per_mtok=format_usd(model.input_price_per_mtok),
        output_price_per_mtok=format_usd(model.output_price_per_mtok),
        cached_input_price_per_mtok=format_usd(model.cached_input_price_per_mtok),
        cache_write_price_per_mtok=format_usd(model.cache_write_price_per_mtok),
        cache_write_1h_price_per_mtok=format_usd(model.cache_write_1h_price_per_mtok),
        context_window=model.context_window,
        capabilities=sorted(model.capabilities),
        batch_discount=format_usd(model.batch_discount),
        available=not unavailable_reason,
        unavailable_reason=unavailable_reason,
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _cost_totals(totals: Totals) -> pb.CostTotals:
    return pb.CostTotals(
        requests=totals.requests,
        errors=totals.errors,
        cost_usd=format_usd(totals.cost_usd),
        baseline_cost_usd=format_usd(totals.baseline_cost_usd),
        savings_usd=format_usd(totals.savings_usd),
        savings_percent=totals.savings_percent,
        estimated_cost_usd=format_usd(totals.estimated_cost_usd),
        estimated_baseline_cost_usd=format_usd(totals.estimated_baseline_cost_usd),
    )


def _percentiles(values: Percentiles) -> pb.LatencyPercentiles:
    return pb.LatencyPercentiles(p50=_duration(values.p50), p95=_duration(values.p95), p99=_duration(values.p99))


def _model_stats(row: ModelRow) -> pb.ModelStats:
    message = pb.ModelStats(
        model=row.model, share=row.share, totals=_cost_totals(row.totals), feedback_count=row.feedback_count
    )
    if row.mean_feedback_score is not None:
        message.mean_feedback_score = row.mean_feedback_score
    return message


def stats_message(summary: StatsSummary) -> pb.GetStatsResponse:
    """The protobuf form of a routing-effectiveness summary."""
    response = pb.GetStatsResponse(
        window=_duration(summary.window_seconds),
        tenant=summary.tenant,
        baseline_model=summary.baseline_model,
        totals=_cost_totals(summary.totals),
        models=[_model_stats(row) for row in summary.models],
        tenants=[pb.TenantStats(tenant=row.tenant, totals=_cost_totals(row.totals)) for row in summary.tenants],
        escalations=summary.escalations,
        escalation_rate=summary.escalation_rate,
        fallbacks=summary.fallbacks,
        cascade_decisions=summary.cascade_decisions,
        cascade_release_rate=summary.cascade_release_rate,
        latency=_percentiles(summary.latency),
        time_to_first_token=_percentiles(summary.time_to_first_chunk),
        other_tenant_count=summary.other_tenants,
        other_tenant_totals=_cost_totals(summary.other_tenant_totals),
    )
    if summary.mean_released_score is not None:
        response.mean_released_score = summary.mean_released_score
    return response


def feedback(message: pb.FeedbackRequest) -> tuple[str, float]:
    """The decision id and score in [0, 1] of a Feedback request; raises ``InvalidRequest``."""
    if not message.decision_id:
        raise InvalidRequest("decision_id", "is required (the decision_id of a RouteDecision)")
    if len(message.decision_id) > _MAX_METADATA_CHARS:
        raise InvalidRequest("decision_id", f"must be at most {_MAX_METADATA_CHARS} characters")
    outcome = message.WhichOneof("outcome")
    if outcome is None:
        raise InvalidRequest("outcome", "set score (0 to 1) or thumbs_up")
    if outcome == "thumbs_up":
        return message.decision_id, 1.0 if message.thumbs_up else 0.0
    if not (math.isfinite(message.score) and 0.0 <= message.score <= 1.0):
        raise InvalidRequest("score", "must be between 0 and 1")
    return message.decision_id, message.score
