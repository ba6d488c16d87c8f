"""Helpers for the observability tests: a live server whose spans and metrics land in memory.

Not a test module; ``test_tracing``, ``test_metrics``, ``test_stats`` and ``test_leaks`` import it.
The exporter and reader are the OpenTelemetry SDK's own in-memory ones, so what the tests read is
exactly what an OTLP exporter would have been handed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from routesvc.client import RouterClient
from routesvc.server import Server
from routesvc.telemetry import Telemetry
from routesvc.testing import FakeProvider
from tests.conftest import default_config, live_environ, settings_from


@dataclass
class Observed:
    """A running server with in-memory telemetry, and a client of it."""

    server: Server
    client: RouterClient
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def finished(self) -> list[ReadableSpan]:
        """Every span ended so far, in end order."""
        return list(self.spans.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        """The ended spans called ``name``."""
        return [span for span in self.finished() if span.name == name]

    def points(self, metric: str) -> list[Any]:
        """The data points of ``metric`` collected now (cumulative since start)."""
        data = self.metrics.get_metrics_data()
        found: list[Any] = []
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        found.extend(item.data.data_points)
        return found


@contextlib.asynccontextmanager
async def observed_server(
    fake: FakeProvider,
    *,
    telemetry: Mapping[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[Observed]:
    """The default policy against ``fake``, with ``telemetry`` merged into the config's section."""
    raw = config if config is not None else default_config()
    raw["telemetry"] = {**dict(raw.get("telemetry") or {}), **dict(telemetry or {})}  # type: ignore[call-overload]
    settings = settings_from(raw, {**live_environ(fake), **dict(environ or {})})
    spans = InMemorySpanExporter()
    metrics = InMemoryMetricReader()
    instrumentation = Telemetry(settings, span_exporter=spans, metric_readers=(metrics,))
    async with (
        Server(settings, port=0, telemetry=instrumentation) as server,
        RouterClient(server.target) as client,
    ):
        yield Observed(server, client, spans, metrics)
