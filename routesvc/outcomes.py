"""Routing-outcome records: how several models did on the same prompts.

One JSON object per line with ``id``, ``prompt``, ``task``, ``outcomes`` (model -> score in
[0, 1]) and optionally ``cost_usd`` (model -> USD) and ``responses``. ``read_outcomes`` takes a
file or a folder of ``*.jsonl`` files; ``responses`` are not kept (nothing here needs them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from routesvc.errors import RouteSvcError


class OutcomeDataError(RouteSvcError):
    """A routing-outcomes file is missing or malformed; names the file and line."""

    reason = "INVALID_OUTCOME_DATA"


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    """One prompt and each evaluated model's score (and cost, when known) on it."""

    id: str
    prompt: str
    task: str
    outcomes: Mapping[str, float]
    cost_usd: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    source: str = ""

    def has_pair(self, strong: str, weak: str) -> bool:
        """Whether both ``strong`` and ``weak`` were evaluated on this prompt."""
        return strong in self.outcomes and weak in self.outcomes


def _numbers(value: object, where: str) -> Mapping[str, float]:
    if not isinstance(value, dict):
        raise OutcomeDataError(f"{where}: expected an object of model -> number")
    result: dict[str, float] = {}
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise OutcomeDataError(f"{where}: {key!r} is not a number")
        result[str(key)] = float(number)
    return MappingProxyType(result)


def parse_record(line: str, where: str, source: str = "") -> OutcomeRecord:
    """One JSONL line as an ``OutcomeRecord``; ``where`` names the file and line in errors."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise OutcomeDataError(f"{where}: not JSON ({exc.msg})") from exc
    if not isinstance(raw, dict):
        raise OutcomeDataError(f"{where}: expected a JSON object")
    for name in ("id", "prompt"):
        if not isinstance(raw.get(name), str):
            raise OutcomeDataError(f"{where}: field {name!r} must be a string")
    task = raw.get("task", "")
    return OutcomeRecord(
        id=raw["id"],
        prompt=raw["prompt"],
        task=task if isinstance(task, str) else str(task),
        outcomes=_numbers(raw.get("outcomes", {}), f"{where}: outcomes"),
        cost_usd=_numbers(raw.get("cost_usd", {}), f"{where}: cost_usd"),
        source=source,
    )


def outcome_files(path: Path) -> list[Path]:
    """The JSONL files at ``path``: the file itself, or a folder's ``*.jsonl`` sorted by name."""
    if path.is_dir():
        return sorted(p for p in path.glob("*.jsonl") if p.is_file())
    if path.is_file():
        return [path]
    raise OutcomeDataError(f"{path}: no such file or folder")


def iter_outcomes(path: Path) -> Iterator[OutcomeRecord]:
    """Every record under ``path`` (file or folder), tagged with its file's stem as ``source``."""
    for file in outcome_files(path):
        with file.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield parse_record(line, f"{file}:{number}", source=file.stem)


def read_outcomes(*paths: Path) -> list[OutcomeRecord]:
    """All records under ``paths``, in file then line order."""
    return [record for path in paths for record in iter_outcomes(path)]
