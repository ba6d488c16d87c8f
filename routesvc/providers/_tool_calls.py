"""Tool calls as they stream in pieces, assembled: what both streaming adapters share.

OpenAI streams each call's ``id`` and name in its first ``delta.tool_calls`` piece and the
arguments in the pieces that follow, keyed by ``index`` (parallel calls have several); Anthropic
streams a ``tool_use`` content block's id and name in ``content_block_start`` and its arguments as
``input_json_delta`` pieces, keyed by the block's ``index``.

OpenAI-compatible servers bend the index rule: Ollama sends every parallel call at ``index`` 0,
told apart by their ids, and older versions send no ``index`` at all. So a piece that names a
tool under an id other than that of the call at its index starts a new call, and a piece without
an index belongs to the latest call unless it starts a new one so. (A call's first piece always
names its tool; some servers change the id on later pieces of the same call, which therefore
stay with it.) Calls are kept in the order they started. Some send no id at all (vLLM, NVIDIA
NIM, LM Studio): such a call gets one made up, ``call_`` and a token of its response and its
place in it, so that the caller can send it back with its result, and two responses' calls in
one conversation stay apart. Pieces that never name a tool make no call.

A piece without an id has only its name to say where it belongs, whether it has no index or
every call's (some servers number every call 0 and send no id): one that names a tool while the
call at its index (the latest call, without an index) has a name starts a new call, unless it
names the same tool and that call's arguments are not yet a whole JSON value, since some servers
repeat the name on every piece of one call (MiniMax on NVIDIA NIM). The limit: such a server's
pieces of one call that come after its arguments are whole (an empty closing piece that names
the tool again) are read as a second call of that tool, and two calls of one tool whose first
has arguments that are not JSON are read as one; a server that sends ids is never read so.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from routesvc.models import ToolCall


@dataclass
class _Parts:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    whole: str = ""  # arguments given whole with the call's start, used when no pieces follow


class ToolCallParts:
    """The pieces received so far; ``calls`` assembles them in the order the calls started."""

    def __init__(self) -> None:
        self._calls: list[_Parts] = []
        self._at: dict[int, _Parts] = {}  # the latest call started at each stream index
        self._response = ""  # the token of the ids made up for calls that came without one

    def add(
        self, index: int | None, *, call_id: str = "", name: str = "", arguments: str = "", whole_arguments: str = ""
    ) -> None:
        """Fold in one piece: the first id and name given win, arguments are appended;
        ``whole_arguments`` (an Anthropic ``tool_use`` block's ``input`` given at its start) are
        the call's only when no argument piece follows, which replaces them (as the SDK's
        accumulator does)."""
        parts = self._at.get(index) if index is not None else (self._calls[-1] if self._calls else None)
        if parts is None or _starts_call(parts, call_id, name):
            parts = _Parts()
            self._calls.append(parts)
            if index is not None:
                self._at[index] = parts
        parts.id = parts.id or call_id
        parts.name = parts.name or name
        parts.whole = parts.whole or whole_arguments
        if arguments:
            parts.arguments.append(arguments)

    def calls(self) -> tuple[ToolCall, ...]:
        """The assembled calls, in the order they started; a call that came without an id gets
        one made up (the same each time this is asked). Pieces that never named a tool (an empty
        placeholder some servers send beside a text answer) are no call: nothing could run them."""
        named = [parts for parts in self._calls if parts.name]
        return tuple(
            ToolCall(parts.id or self._made_up_id(position), parts.name, "".join(parts.arguments) or parts.whole)
            for position, parts in enumerate(named)
        )

    def _made_up_id(self, position: int) -> str:
        self._response = self._response or uuid.uuid4().hex[:16]
        return f"call_{self._response}_{position}"


def _starts_call(parts: _Parts, call_id: str, name: str) -> bool:
    """Whether a piece naming ``name`` under ``call_id`` starts a new call rather
    than continue ``parts``, the call at its index (the latest one without an index): under
    another id, or, without an id, naming a tool after a named call (the module docstring says
    when the same name continues it), whatever the index: a server that numbers every call 0
    and sends no id has only the names to tell them apart."""
    if not name:
        return False
    if call_id:
        return bool(parts.id) and parts.id != call_id
    if not parts.name:
        return False
    return name != parts.name or _whole_json("".join(parts.arguments))


def _whole_json(text: str) -> bool:
    """Whether ``text`` is one whole JSON value (a call's arguments all received)."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# What each API takes as a call id in a request: Anthropic ``^[a-zA-Z0-9_-]+$``, OpenAI at most 40
# characters. A conversation may carry another provider's ids (a fallback, a model switched
# mid-conversation, an OpenAI-compatible server's "functions.lookup:0").
_ANTHROPIC_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_OPENAI_ID_CHARS = 40


def _digest(call_id: str) -> str:
    return hashlib.sha256(call_id.encode()).hexdigest()[:10]


def anthropic_call_id(call_id: str) -> str:
    """``call_id`` as Anthropic takes it: itself when it fits, else its allowed characters and a
    digest of the whole (so a call and its result still match, and two ids stay apart)."""
    if _ANTHROPIC_ID.fullmatch(call_id):
        return call_id
    return f"{re.sub(r'[^a-zA-Z0-9_-]', '_', call_id)[:40]}_{_digest(call_id)}"


def openai_call_id(call_id: str) -> str:
    """``call_id`` as OpenAI takes it: itself when short enough, else shortened with a digest."""
    if len(call_id) <= _OPENAI_ID_CHARS:
        return call_id
    return f"{call_id[: _OPENAI_ID_CHARS - 11]}_{_digest(call_id)}"


class SentCallIds:
    """The ids one request sends for its calls and results: each call's id in the API's form
    (``anthropic_call_id`` or ``openai_call_id``), made unique across the request (a server that
    numbers each turn's calls from 0 again repeats ids across turns, which Anthropic refuses); a
    result gets the id sent for its call, which is in the assistant turn just before it."""

    def __init__(self, form: Callable[[str], str]) -> None:
        self._form = form
        self._sent: set[str] = set()
        self._latest: dict[str, str] = {}  # a call's id -> the id sent for it, in its latest turn

    def call(self, call_id: str) -> str:
        """The id to send for a call of an assistant turn."""
        sent = self._form(call_id)
        turn = 1
        while sent in self._sent:
            turn += 1
            sent = self._form(f"{call_id}_{turn}")
        self._sent.add(sent)
        self._latest[call_id] = sent
        return sent

    def result(self, call_id: str) -> str:
        """The id to send for the result of the call ``call_id``."""
        return self._latest.get(call_id) or self._form(call_id)
