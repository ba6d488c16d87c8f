"""Routing-outcome records: how several models did on the same prompts.

One UTF-8 JSON object per line with ``id`` (unique within the file), ``prompt``, ``task``,
``outcomes`` (model -> score in [0, 1]) and optionally ``cost_usd`` (model -> USD, 0 or more) and
``responses``. ``read_outcomes`` takes a file or a folder of ``*.jsonl`` files; ``responses`` are
not kept (nothing here needs them). Anything else is an ``OutcomeDataError`` naming file:line.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from routesvc.errors import RouteSvcError
from routesvc.jsonlines import JsonLineError, json_lines


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


def model_numbers(value: object, where: str, high: float = math.inf) -> Mapping[str, float]:
    """Model -> number, each finite and in [0, ``high``] (json.loads accepts NaN and Infinity)."""
    if not isinstance(value, dict):
        raise OutcomeDataError(f"{where}: expected an object of model -> number")
    result: dict[str, float] = {}
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise OutcomeDataError(f"{where}: {key!r} is not a number")
        try:
            amount = float(number)
        except OverflowError:  # an integer too large for a float
            amount = math.inf
        if not math.isfinite(amount) or not 0 <= amount <= high:
            bounds = "a finite number, 0 or more" if math.isinf(high) else f"a number in [0, {high:g}]"
            raise OutcomeDataError(f"{where}: {key!r} is {amount}, not {bounds}")
        result[str(key)] = amount
    return MappingProxyType(result)


def parse_record(raw: object, where: str, source: str = "") -> OutcomeRecord:
    """One JSONL line's value as an ``OutcomeRecord``; ``where`` names the file and line in errors."""
    if not isinstance(raw, dict):
        raise OutcomeDataError(f"{where}: expected a JSON object")
    for name in ("id", "prompt"):
        if not isinstance(raw.get(name), str):
            raise OutcomeDataError(f"{where}: field {name!r} must be a string")
    try:
        raw["prompt"].encode()
    except UnicodeEncodeError:  # a lone surrogate escape: JSON reads it, no encoder or model can take it
        raise OutcomeDataError(f"{where}: 'prompt' is not valid UTF-8 (a lone surrogate)") from None
    task = raw.get("task", "")
    return OutcomeRecord(
        id=raw["id"],
        prompt=raw["prompt"],
        task=task if isinstance(task, str) else str(task),
        outcomes=model_numbers(raw.get("outcomes", {}), f"{where}: outcomes", high=1.0),
        cost_usd=model_numbers(raw.get("cost_usd", {}), f"{where}: cost_usd"),
        source=source,
    )


def outcome_files(path: Path) -> list[Path]:
    """The JSONL files at ``path``: the file itself, or a folder's ``*.jsonl`` sorted by name (a
    folder with none is an error: a typo'd path must not read as no data)."""
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not files:
            raise OutcomeDataError(f"{path}: no *.jsonl files in this folder")
        return files
    if path.is_file():
        return [path]
    raise OutcomeDataError(f"{path}: no such file or folder")


def iter_outcomes(path: Path) -> Iterator[OutcomeRecord]:
    """Every record under ``path`` (file or folder), tagged with its file's stem as ``source``.

    Ids must be unique within a file (``score`` writes them back, ``eval`` reports by them); files
    of a folder are separate data sets, so the same id in two of them is fine.
    """
    for file in outcome_files(path):
        yield from _file_records(file)


def _file_records(file: Path) -> Iterator[OutcomeRecord]:
    """The records of one JSONL ``file``, tagged with its stem as ``source``."""
    first_line: dict[str, int] = {}
    with file.open("rb") as handle:
        try:
            for number, raw in json_lines(handle, file):
                record = parse_record(raw, f"{file}:{number}", source=file.stem)
                if record.id in first_line:
                    raise OutcomeDataError(
                        f"{file}:{number}: id {record.id!r} repeats line {first_line[record.id]} (ids must be"
                        " unique within a file)"
                    )
                first_line[record.id] = number
                yield record
        except JsonLineError as exc:
            raise OutcomeDataError(exc.message) from exc


def read_outcomes(*paths: Path) -> list[OutcomeRecord]:
    """All records under ``paths``, in file then line order. Each file is one data set, named by
    its stem (``source``): a file given twice, or two files of one name in different folders
    (which would be taken for one data set), is an error."""
    seen: dict[str, Path] = {}
    for path in paths:
        for file in outcome_files(path):
            other = seen.setdefault(file.stem, file)
            if other is file:
                continue
            if other.resolve() == file.resolve():
                raise OutcomeDataError(f"{file}: given twice (its records would count twice)")
            raise OutcomeDataError(
                f"{file}: another data file is named {file.name} ({other}); each file is a data set of its own, "
                "named by its file name: rename one"
            )
    return [record for file in seen.values() for record in _file_records(file)]
