"""JSON Lines data files (routing outcomes, ``simulate``'s prompts), read line by line.

Each reader checks its own objects; what every line must be first (UTF-8, a byte order mark at
the start skipped, blank lines skipped, JSON) is checked here, once, and a line that is not
raises ``JsonLineError`` naming the file and line, which each reader raises as its own error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from routesvc.errors import RouteSvcError


class JsonLineError(RouteSvcError):
    """A line of a JSON Lines file is not UTF-8 or not JSON; names the file and line, never the
    line's text."""

    reason = "INVALID_JSON_LINE"


def json_lines(handle: Iterable[bytes], file: Path | str) -> Iterator[tuple[int, object]]:
    """Each non-blank line of ``handle`` (``file`` opened in binary) with its number, from 1, as
    the JSON value it holds.

    The lines are read as bytes and decoded one by one, so that a decoding error names its own
    line; a line ends at "\\n" only (JSON allows U+2028 raw inside a string).
    """
    for number, data in enumerate(handle, start=1):
        where = f"{file}:{number}"
        try:
            # A byte order mark (files some Windows tools write) is not part of the data.
            line = data.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise JsonLineError(f"{where}: not UTF-8") from exc
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            # exc.msg, not str(exc): never echo the line's text.
            raise JsonLineError(f"{where}: not JSON ({exc.msg})") from exc
        except ValueError:  # not a JSONDecodeError: an integer past Python's 4,300-digit limit
            raise JsonLineError(f"{where}: not JSON (a number too long)") from None
        except RecursionError:  # json's parser recurses once per nested array or object
            raise JsonLineError(f"{where}: not JSON (nested too deeply)") from None
        yield number, value
