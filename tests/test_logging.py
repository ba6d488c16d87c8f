"""JSON log lines: what `routesvc serve` writes to stdout, and what it never writes."""

from __future__ import annotations

import io
import json
from decimal import Decimal

import pytest
import structlog

from routesvc.config import LoggingConfig
from routesvc.telemetry import configure_logging

SECRET = "canary-prompt-in-a-local-41c7"


def _logged_lines(monkeypatch: pytest.MonkeyPatch, emit: object) -> list[dict[str, object]]:
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="utf-8")
    monkeypatch.setattr("sys.stdout", stdout)
    configure_logging(LoggingConfig(level="info", format="json"))
    assert callable(emit)
    emit()
    stdout.flush()
    return [json.loads(line) for line in raw.getvalue().decode("utf-8").splitlines()]


class TestJsonLines:
    def test_a_line_is_one_json_object_with_level_timestamp_and_fields(self, monkeypatch: pytest.MonkeyPatch) -> None:
        lines = _logged_lines(
            monkeypatch, lambda: structlog.get_logger("t").info("rpc_finished", method="Route", duration_ms=0.5)
        )
        assert len(lines) == 1
        line = lines[0]
        assert (line["event"], line["level"], line["method"], line["duration_ms"]) == (
            "rpc_finished",
            "info",
            "Route",
            0.5,
        )
        assert str(line["timestamp"]).endswith("Z")

    def test_a_traceback_carries_no_local_variables(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A handler's locals can hold the prompt or a key: tracebacks name frames, never values."""

        def handler(prompt: str) -> None:
            try:
                raise RuntimeError("a bug")
            except RuntimeError:
                structlog.get_logger("t").exception("rpc_internal_error", method="Route")

        lines = _logged_lines(monkeypatch, lambda: handler(SECRET))
        assert len(lines) == 1
        frames = lines[0]["exception"][0]["frames"]  # type: ignore[index]
        assert any(frame["name"] == "handler" for frame in frames)
        assert all("locals" not in frame for frame in frames)
        assert SECRET not in json.dumps(lines)

    def test_values_orjson_refuses_still_make_a_line(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Non-string keys, integers past 64 bits and unknown types never make a log call raise."""
        lines = _logged_lines(
            monkeypatch,
            lambda: structlog.get_logger("t").info("odd", counts={1: 2}, big=2**70, cost=Decimal("0.5")),
        )
        assert (lines[0]["counts"], lines[0]["big"], lines[0]["cost"]) == ({"1": 2}, 2**70, "Decimal('0.5')")
