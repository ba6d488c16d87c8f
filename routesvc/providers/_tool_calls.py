"""Tool calls as they stream in pieces, assembled: what both streaming adapters share.

OpenAI streams each call's ``id`` and name in its first ``delta.tool_calls`` piece and the
arguments in the pieces that follow, keyed by ``index`` (parallel calls have several); Anthropic
streams a ``tool_use`` content block's id and name in ``content_block_start`` and its arguments as
``input_json_delta`` pieces, keyed by the block's ``index``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from routesvc.models import ToolCall


@dataclass
class _Parts:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallParts:
    """The pieces received so far, by stream index; ``calls`` assembles them in index order."""

    def __init__(self) -> None:
        self._parts: dict[int, _Parts] = {}

    def add(self, index: int, *, call_id: str = "", name: str = "", arguments: str = "") -> None:
        """Fold in one piece: the first id and name given win, arguments are appended."""
        parts = self._parts.setdefault(index, _Parts())
        parts.id = parts.id or call_id
        parts.name = parts.name or name
        if arguments:
            parts.arguments.append(arguments)

    def calls(self) -> tuple[ToolCall, ...]:
        """The assembled calls, in index order."""
        return tuple(
            ToolCall(parts.id, parts.name, "".join(parts.arguments)) for _, parts in sorted(self._parts.items())
        )
