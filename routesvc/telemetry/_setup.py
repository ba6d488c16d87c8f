"""``Telemetry``: one server's tracer and meter providers, exporters, instruments and stats window."""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from decimal import Decimal

import structlog
from opentelemetry import trace
from opentelemetry.metrics import Meter, NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from routesvc.catalog import ModelSpec
from routesvc.config import Settings
from routesvc.cost import cost_of_usage
from routesvc.errors import ConfigError
from routesvc.models import Mode, Usage
from routesvc.stats import RoutingStats
from routesvc.telemetry._request import (
    _CURRENT,
    _PROPAGATOR,
    RequestTelemetry,
    baseline_model,
    gen_ai_labels,
    record_usage,
)

_SCOPE = "routesvc"
_TRACE_HEADERS = ("traceparent", "tracestate")
_EXPORT_TIMEOUT_MS = 3_000
# A shutdown flushes for at most this long in all: one export attempt's timeout, and a second for
# a collector that is up to take what is left.
_FLUSH_SECONDS = 4.0
# Once the flush is cut short, how long its threads may take to see their exporters shut.
_CUT_SECONDS = 1.0
# How many names one catalog model's answers are put under in the metrics' gen_ai.response.model
# (the provider says which model answered: a dated version of the one asked for, or whatever an
# OpenAI-compatible server says); later new ones are "_OTHER", so the label stays bounded.
RESPONSE_MODELS_PER_MODEL = 4
# Bucket boundaries the GenAI conventions recommend.
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
# A policy stage takes microseconds (rules) to a few hundred milliseconds (an LLM classifier).
_STAGE_SECONDS_BUCKETS = tuple(base * 10.0**power for power in range(-5, 1) for base in (1, 2.5, 5))
_SECONDS_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
# An RPC takes from half a millisecond (a Route: its target is p99 <= 5 ms, docs/performance.md) to
# minutes (a Complete streaming a long answer): the RPC conventions' boundaries (5 ms to 10 s),
# with finer ones below 5 ms and longer ones up to 10 minutes. The GenAI ones start at 10 ms,
# which put every Route in the first bucket.
_RPC_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

log = structlog.get_logger("routesvc.telemetry")


class _Instruments:
    """Every metric instrument routesvc records (names follow the OTel GenAI and RPC conventions)."""

    def __init__(self, meter: Meter) -> None:
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens used per upstream attempt"
        )
        self.operation_duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Duration of upstream attempts"
        )
        self.time_to_first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s", description="Upstream time to first chunk"
        )
        self.rpc_duration = meter.create_histogram(
            "rpc.server.call.duration", unit="s", description="Duration of routesvc RPCs"
        )
        self.stage_duration = meter.create_histogram(
            "routesvc.routing.stage.duration", unit="s", description="Time each policy stage took on its own"
        )
        self.requests = meter.create_counter(
            "routesvc.requests",
            unit="{request}",
            description="Routing decisions by selected model, strategy and method",
        )
        self.escalations = meter.create_counter(
            "routesvc.escalations", unit="{escalation}", description="Escalations to a stronger model"
        )
        self.fallbacks = meter.create_counter(
            "routesvc.fallbacks", unit="{fallback}", description="Fallbacks to another model after a failure"
        )
        self.config_reloads = meter.create_counter(
            "routesvc.config.reloads",
            unit="{reload}",
            description="Changes of the configuration file seen by the watcher, by outcome (applied, rejected)",
        )
        self.client_stalls = meter.create_counter(
            "routesvc.client_stalls",
            unit="{call}",
            description="Streams ended because their caller read nothing for client_write_timeout_seconds",
        )
        self.cost = meter.create_counter("routesvc.cost", unit="USD", description="Cost of upstream attempts")
        self.baseline_cost = meter.create_counter(
            "routesvc.baseline_cost", unit="USD", description="What the same requests would cost on the baseline model"
        )
        self.savings = meter.create_up_down_counter(
            "routesvc.savings", unit="USD", description="Baseline cost minus actual cost"
        )


def _sampler(name: str, ratio: float) -> Sampler:
    """The sampler ``OTEL_TRACES_SAMPLER`` names (``routesvc.config.TRACE_SAMPLERS``); ``ratio``
    is read only by a ratio sampler."""
    kind = name.removeprefix("parentbased_")
    root: Sampler = (
        ALWAYS_ON if kind == "always_on" else ALWAYS_OFF if kind == "always_off" else TraceIdRatioBased(ratio)
    )
    return ParentBased(root) if name.startswith("parentbased_") else root


def _views() -> list[View]:
    tokens = ExplicitBucketHistogramAggregation(_TOKEN_BUCKETS)
    seconds = ExplicitBucketHistogramAggregation(_SECONDS_BUCKETS)
    return [
        View(instrument_name="gen_ai.client.token.usage", aggregation=tokens),
        View(instrument_name="gen_ai.client.operation.duration", aggregation=seconds),
        View(instrument_name="gen_ai.client.operation.time_to_first_chunk", aggregation=seconds),
        View(
            instrument_name="rpc.server.call.duration",
            aggregation=ExplicitBucketHistogramAggregation(_RPC_SECONDS_BUCKETS),
        ),
        View(
            instrument_name="routesvc.routing.stage.duration",
            aggregation=ExplicitBucketHistogramAggregation(_STAGE_SECONDS_BUCKETS),
        ),
    ]


class _PrometheusEndpoint:
    """``/metrics`` for Prometheus over the OTel metrics, on its own registry (not the global one)."""

    def __init__(self, host: str, port: int) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry(auto_describe=True)
        self.reader = PrometheusMetricReader(registry=self.registry)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            # Like the gRPC ports: a port in use (or a host that is not this machine's) is a
            # one-line config error at start, not a traceback.
            raise ConfigError(
                f"telemetry.metrics.prometheus_port: cannot listen on {host}:{port} ({exc.strerror or exc})"
            ) from exc
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class Telemetry:
    """One server's tracing, metrics and routing-effectiveness window.

    Built from ``settings.telemetry``; tests may pass a ``span_exporter`` (for example the SDK's
    ``InMemorySpanExporter``, then exported synchronously) and extra ``metric_readers``.
    ``shutdown`` flushes and stops every exporter and the Prometheus endpoint.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        span_exporter: SpanExporter | None = None,
        metric_readers: tuple[MetricReader, ...] = (),
    ) -> None:
        config = settings.telemetry
        # First, so that a port it cannot have fails before any exporter's thread has started.
        self.prometheus: _PrometheusEndpoint | None = None
        if config.prometheus_port is not None:
            self.prometheus = _PrometheusEndpoint(config.prometheus_host, config.prometheus_port)
            log.info(
                "prometheus_endpoint_started", url=f"http://{config.prometheus_host}:{self.prometheus.port}/metrics"
            )
        # The telemetry section as read at start (exporters, conventions: a reload does not
        # change them); ``settings`` is the configuration served now (``reconfigure``).
        self.config = config
        self.settings = settings
        self.capture_content = config.capture_content
        self.stats = RoutingStats(config.stats_window_seconds, config.stats_max_requests, config.baseline_model)
        resource = Resource(
            {**config.resource_attributes, "service.name": config.service_name, "service.version": _version()}
        )
        processors: list[SpanProcessor] = []
        # What a shutdown cuts short when a collector does not answer in time.
        self._otlp_exporters: list[SpanExporter | MetricExporter] = []
        if span_exporter is not None:
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor

            processors.append(SimpleSpanProcessor(span_exporter))
        if config.traces_exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(
                endpoint=config.traces_endpoint,
                insecure=config.traces_insecure,
                headers=dict(config.otlp_headers),
                timeout=_EXPORT_TIMEOUT_MS // 1000,
            )
            self._otlp_exporters.append(exporter)
            processors.append(BatchSpanProcessor(exporter, export_timeout_millis=_EXPORT_TIMEOUT_MS))
        elif config.traces_exporter == "console":
            processors.append(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        self._tracer_provider: TracerProvider | None = None
        if processors:
            self._tracer_provider = TracerProvider(
                resource=resource, sampler=_sampler(config.sampler, config.sample_ratio)
            )
            for processor in processors:
                self._tracer_provider.add_span_processor(processor)
            self.tracer: trace.Tracer = self._tracer_provider.get_tracer(_SCOPE, _version())
        else:
            # Not recording, but spans still carry the caller's context, so an incoming
            # traceparent is passed on upstream unchanged.
            self.tracer = trace.NoOpTracer()
        readers = list(metric_readers)
        if config.metrics_exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            metric_exporter = OTLPMetricExporter(
                endpoint=config.metrics_endpoint,
                insecure=config.metrics_insecure,
                headers=dict(config.otlp_headers),
                timeout=_EXPORT_TIMEOUT_MS // 1000,
            )
            self._otlp_exporters.append(metric_exporter)
            readers.append(
                PeriodicExportingMetricReader(
                    metric_exporter, int(config.metrics_interval_seconds * 1000), _EXPORT_TIMEOUT_MS
                )
            )
        elif config.metrics_exporter == "console":
            readers.append(
                PeriodicExportingMetricReader(
                    ConsoleMetricExporter(out=sys.stderr), int(config.metrics_interval_seconds * 1000)
                )
            )
        if self.prometheus is not None:
            readers.append(self.prometheus.reader)
        self._meter_provider: MeterProvider | None = None
        if readers:
            self._meter_provider = MeterProvider(metric_readers=readers, resource=resource, views=_views())
            meter = self._meter_provider.get_meter(_SCOPE, _version())
        else:
            meter = NoOpMeterProvider().get_meter(_SCOPE)
        self.instruments = _Instruments(meter)
        self._response_models: dict[str, set[str]] = {}

    @property
    def tracing(self) -> bool:
        """Whether spans are recorded and exported."""
        return self._tracer_provider is not None

    def shutdown(self) -> None:
        """Flush and stop the exporters (blocking; call it from a worker thread in async code).

        Traces and metrics flush side by side for ``_FLUSH_SECONDS`` in all. A collector that is
        down makes each export attempt wait out its timeout, and the span queue (up to 2048 spans)
        goes in batches of 512: what is still unsent by then is dropped, the OTLP exporters shut
        (which ends the attempt in flight and fails the rest at once), so a shutdown is held up
        by a few seconds at most.
        """
        deadline = time.monotonic() + _FLUSH_SECONDS
        flushing: list[threading.Thread] = []
        if self._tracer_provider is not None:
            flushing.append(
                threading.Thread(target=self._tracer_provider.shutdown, name="routesvc-telemetry-traces", daemon=True)
            )
        if self._meter_provider is not None:
            flush_metrics = functools.partial(self._meter_provider.shutdown, timeout_millis=_FLUSH_SECONDS * 1000)
            flushing.append(threading.Thread(target=flush_metrics, name="routesvc-telemetry-metrics", daemon=True))
        for thread in flushing:
            thread.start()
        for thread in flushing:
            thread.join(max(0.0, deadline - time.monotonic()))
        late = [thread.name for thread in flushing if thread.is_alive()]
        if late:
            log.warning("telemetry_flush_cut_short", after_seconds=_FLUSH_SECONDS, unfinished=late)
            for exporter in self._otlp_exporters:
                exporter.shutdown()
            for thread in flushing:
                thread.join(_CUT_SECONDS)
        if self.prometheus is not None:
            self.prometheus.close()

    def response_model(self, model: ModelSpec, provider_model: str) -> str:
        """The ``gen_ai.response.model`` metric label of an answer of ``model`` the provider says
        ``provider_model`` gave: that name for the first ``RESPONSE_MODELS_PER_MODEL`` it names
        (the catalog's provider model when it names none), ``_OTHER`` for any later new one."""
        if not provider_model or provider_model == model.provider_model:
            return model.provider_model
        seen = self._response_models.setdefault(model.id, set())
        if provider_model in seen:
            return provider_model
        if len(seen) < RESPONSE_MODELS_PER_MODEL:
            seen.add(provider_model)
            return provider_model
        return "_OTHER"

    def reconfigure(self, settings: Settings) -> None:
        """A config reload: calls routed from now on (and batch answers) name their providers and
        price their baseline by ``settings``; a call in flight keeps its router's configuration."""
        self.settings = settings
        self.stats.baseline_model = settings.telemetry.baseline_model

    def record_batch_answer(
        self, model: ModelSpec, provider_model: str, usage: Usage, cost: Decimal, delivered: bool
    ) -> None:
        """A batch job's answer, billed when its provider batch ends (outside any RPC): its cost
        and tokens in the metrics every realtime attempt goes to, its baseline cost and savings
        as a Complete's. The baseline cost of a ``delivered`` answer is its usage priced on the
        baseline model's batch price (sent to batch, the baseline would have been batched too;
        the decision's estimate prices it so as well); the bill of a job cancelled after it was
        sent, whose caller never sees it, has none (as a realtime attempt cut before any text),
        so that savings stays baseline minus cost."""
        labels = {
            **gen_ai_labels(self.settings, model),
            "gen_ai.response.model": self.response_model(model, provider_model),
        }
        record_usage(self, labels, model.id, usage, cost)
        baseline = cost_of_usage(baseline_model(self.settings), usage, Mode.BATCH) if delivered else Decimal(0)
        self.instruments.baseline_cost.add(float(baseline), {"routesvc.model": model.id})
        self.instruments.savings.add(float(baseline - cost), {"routesvc.model": model.id})

    @contextlib.contextmanager
    def server_rpc(
        self, service: str, method: str, metadata: Iterable[tuple[str, str | bytes]]
    ) -> Iterator[RequestTelemetry]:
        """The server span of one RPC, continuing the caller's ``traceparent`` (from the call's
        ``metadata``); current inside the block.

        The caller reports the status with ``RequestTelemetry.finish`` before leaving the block.
        """
        carrier = {key: value for key, value in metadata if key in _TRACE_HEADERS and isinstance(value, str)}
        full_method = f"{service}/{method}"
        if not carrier and self._tracer_provider is None:
            # Nothing to record and no caller's context to pass on: no span to open.
            yield from self._in_request(RequestTelemetry(self, trace.INVALID_SPAN, method, full_method))
            return
        attributes: dict[str, str] = {}
        conventions = self.config.rpc_conventions
        if "old" in conventions:
            attributes.update({"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
        if "stable" in conventions:
            # The stable conventions' rpc.method is fully qualified (it wins when both are asked for).
            attributes.update({"rpc.system.name": "grpc", "rpc.method": full_method})
        with self.tracer.start_as_current_span(
            full_method,
            context=_PROPAGATOR.extract(carrier),
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
            end_on_exit=True,
        ) as span:
            yield from self._in_request(RequestTelemetry(self, span, method, full_method))

    @staticmethod
    def _in_request(request: RequestTelemetry) -> Iterator[RequestTelemetry]:
        token = _CURRENT.set(request)
        try:
            yield request
        finally:
            request.close()
            _CURRENT.reset(token)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("routesvc")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0"
