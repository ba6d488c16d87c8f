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

A piece without an id has only its name to say where it belongs when the server gives no index
or every call's at 0 (some number every call 0 and send no id): while no index above 0 has come,
one that names a tool while the call at its index (the latest call, without an index) has a name
starts a new call, unless it names the same tool and that call's arguments are not yet a whole
JSON object, since some servers repeat the name on every piece of one call (MiniMax on NVIDIA
NIM). A piece that names the same tool after the arguments are whole but brings no arguments, or
only white space (a closing piece, or the name-only first piece of a second call of that tool),
starts no call: the next piece with arguments does. The limit: two calls of one tool whose first has arguments that
are not a JSON object are read as one. A server that sends ids, or numbers its calls, is never
read so.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from routesvc.models import ToolCall

_SIGNIFICANT = re.compile(r'[{}\[\]"\\]')  # what can open or close a JSON object, array or string


@dataclass
class _Parts:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    whole: str = ""  # arguments given whole with the call's start, used when no pieces follow
    named_again: bool = False  # its name came again with no arguments after they were whole
    # Where the argument pieces are in their JSON: each piece is scanned once, as it comes.
    depth: int = 0  # of objects and arrays open
    in_string: bool = False
    escaped: bool = False  # the next piece's first character is escaped
    closed: bool | None = None  # None until the first object closes; then whether it is whole JSON

    def append(self, piece: str) -> None:
        """Add an argument piece and follow where it leaves the JSON text."""
        self.arguments.append(piece)
        if self.closed is not None:
            # Anything but white space after a whole value makes it no longer one.
            self.closed = self.closed and not piece.strip()
            return
        skip = 1 if self.escaped else 0
        self.escaped = False
        for match in _SIGNIFICANT.finditer(piece, skip):
            char, at = match.group(), match.start()
            if at < skip:
                continue
            if self.in_string:
                if char == "\\":
                    skip = at + 2
                    self.escaped = skip > len(piece)
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth <= 0:
                    # Parsed once, when the outer object closes: never again as pieces come.
                    whole = self.depth == 0 and not piece[at + 1 :].strip()
                    self.closed = whole and _whole_json("".join(self.arguments))
                    return

    def arguments_whole(self) -> bool:
        """Whether the arguments so far are one whole JSON object (or array)."""
        return bool(self.closed) if self.arguments else bool(self.whole)


class ToolCallParts:
    """The pieces received so far; ``calls`` assembles them in the order the calls started."""

    def __init__(self) -> None:
        self._calls: list[_Parts] = []
        self._at: dict[int, _Parts] = {}  # the latest call started at each stream index
        self._response = ""  # the token of the ids made up for calls that came without one
        self._by_name = True  # no index above 0 yet: id-less calls are told apart by their names

    def add(
        self, index: int | None, *, call_id: str = "", name: str = "", arguments: str = "", whole_arguments: str = ""
    ) -> None:
        """Fold in one piece: the first id and name given win, arguments are appended;
        ``whole_arguments`` (an Anthropic ``tool_use`` block's ``input`` given at its start) are
        the call's only when no argument piece follows, which replaces them (as the SDK's
        accumulator does)."""
        if index:
            self._by_name = False
        parts = self._at.get(index) if index is not None else (self._calls[-1] if self._calls else None)
        # White space alone is no arguments: after a whole value, it is still that value.
        given = bool(arguments.strip() or whole_arguments.strip())
        if parts is None or self._starts_call(parts, call_id, name, given):
            # A call named again with no arguments is started by the next piece that has some.
            parts = _Parts(name=parts.name if parts is not None and parts.named_again and not name else "")
            self._calls.append(parts)
            if index is not None:
                self._at[index] = parts
        elif name and name == parts.name and not call_id and self._by_name and parts.arguments_whole():
            parts.named_again = True
        parts.id = parts.id or call_id
        parts.name = parts.name or name
        parts.whole = parts.whole or whole_arguments
        if arguments:
            parts.append(arguments)

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

    def _starts_call(self, parts: _Parts, call_id: str, name: str, given: bool) -> bool:
        """Whether a piece naming ``name`` (or no tool) under ``call_id``, with arguments if
        ``given``, starts a new call rather than continue ``parts``, the call at its index (the
        latest one without an index): under another id, or, without an id while the calls are
        told apart by their names, naming another tool after a named call, or bringing arguments
        to a call whose arguments were whole (the module docstring says when)."""
        if call_id:
            return bool(name) and bool(parts.id) and parts.id != call_id
        if not self._by_name or not parts.name:
            return False
        if name and name != parts.name:
            return True
        if parts.named_again:
            return given
        return bool(name) and given and parts.arguments_whole()


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
