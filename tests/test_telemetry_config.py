"""The telemetry section and the standard OTEL_* variables: off by default, the file wins, the
environment fills in, bad values fail at start naming the field or variable."""

from __future__ import annotations

import pytest

from routesvc.config import TelemetrySettings
from routesvc.errors import ConfigError
from tests.conftest import default_config, settings_from


def _telemetry(section: dict[str, object] | None = None, environ: dict[str, str] | None = None) -> TelemetrySettings:
    config = default_config()
    if section is not None:
        config["telemetry"] = section
    return settings_from(config, environ).telemetry


class TestDefaults:
    def test_everything_is_off_by_default(self) -> None:
        """No exporter, no Prometheus port, no content capture, service name routesvc."""
        telemetry = _telemetry()
        assert (telemetry.traces_exporter, telemetry.metrics_exporter) == ("none", "none")
        assert (telemetry.prometheus_port, telemetry.capture_content) == (None, False)
        assert telemetry.service_name == "routesvc"

    def test_the_baseline_is_the_most_expensive_model(self) -> None:
        """claude-sonnet ($3 + $15 per 1M) is the default baseline of the embedded catalog."""
        assert _telemetry().baseline_model == "claude-sonnet"


class TestEnvironment:
    def test_an_otlp_endpoint_variable_switches_otlp_on(self) -> None:
        """OTEL_EXPORTER_OTLP_ENDPOINT alone exports traces and metrics there."""
        telemetry = _telemetry(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
        assert (telemetry.traces_exporter, telemetry.traces_endpoint) == ("otlp", "http://collector:4317")
        assert (telemetry.metrics_exporter, telemetry.metrics_endpoint) == ("otlp", "http://collector:4317")
        assert (telemetry.traces_insecure, telemetry.metrics_insecure) == (True, True)

    def test_each_exporter_is_plaintext_by_its_own_endpoint(self) -> None:
        """Traces to an https:// collector, metrics to an http:// one: TLS for the traces only (the
        metrics exporter took the traces' flag and spoke TLS to a plaintext collector)."""
        telemetry = _telemetry(
            environ={
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example:4317",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://metrics.local:4317",
            }
        )
        assert (telemetry.traces_insecure, telemetry.metrics_insecure) == (False, True)

    def test_signal_specific_variables_win_over_the_shared_one(self) -> None:
        """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT and OTEL_METRICS_EXPORTER override per signal."""
        telemetry = _telemetry(
            environ={
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://jaeger:4317",
                "OTEL_METRICS_EXPORTER": "none",
            }
        )
        assert (telemetry.traces_endpoint, telemetry.metrics_exporter) == ("http://jaeger:4317", "none")

    def test_service_name_sampler_resource_and_headers(self) -> None:
        """OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER_ARG, OTEL_RESOURCE_ATTRIBUTES and headers are read."""
        telemetry = _telemetry(
            environ={
                "OTEL_SERVICE_NAME": "router-eu",
                "OTEL_TRACES_SAMPLER_ARG": "0.25",
                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=ml%20infra",
                "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=secret-telemetry-key,Authorization=Bearer%20t",
            }
        )
        assert (telemetry.service_name, telemetry.sample_ratio) == ("router-eu", 0.25)
        assert dict(telemetry.resource_attributes) == {"deployment.environment": "prod", "team": "ml infra"}
        # Header keys in lower case (gRPC refuses "Authorization"; every export failed), values as they are.
        assert dict(telemetry.otlp_headers) == {"x-api-key": "secret-telemetry-key", "authorization": "Bearer t"}
        assert "secret-telemetry-key" not in repr(telemetry)

    def test_the_file_wins_over_the_environment(self) -> None:
        """A field set in the file is kept whatever the variables say."""
        telemetry = _telemetry(
            {"service_name": "from-file", "tracing": {"exporter": "console"}},
            {"OTEL_SERVICE_NAME": "from-env", "OTEL_TRACES_EXPORTER": "otlp"},
        )
        assert (telemetry.service_name, telemetry.traces_exporter) == ("from-file", "console")

    def test_the_protocol_variables_may_say_grpc_and_matter_only_to_an_otlp_exporter(self) -> None:
        """grpc is what the exporters speak; another protocol is refused only where OTLP is used."""
        telemetry = _telemetry(
            environ={
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_METRICS_EXPORTER": "none",
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
            }
        )
        assert (telemetry.traces_exporter, telemetry.metrics_exporter) == ("otlp", "none")

    def test_sdk_disabled_turns_off_what_the_file_does_not_ask_for(self) -> None:
        """OTEL_SDK_DISABLED=true switches off exporters chosen by the environment."""
        telemetry = _telemetry(environ={"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
        assert (telemetry.traces_exporter, telemetry.metrics_exporter) == ("none", "none")


class TestInvalid:
    @pytest.mark.parametrize(
        ("section", "environ", "message"),
        [
            ({}, {"OTEL_TRACES_EXPORTER": "zipkin"}, "$OTEL_TRACES_EXPORTER: unsupported exporter 'zipkin'"),
            ({}, {"OTEL_TRACES_SAMPLER_ARG": "half"}, "$OTEL_TRACES_SAMPLER_ARG: not a number"),
            ({}, {"OTEL_TRACES_SAMPLER_ARG": "nan"}, "$OTEL_TRACES_SAMPLER_ARG: not a number"),
            ({}, {"OTEL_TRACES_SAMPLER_ARG": "-inf"}, "$OTEL_TRACES_SAMPLER_ARG: not a number"),
            (
                {},
                {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
                "$OTEL_EXPORTER_OTLP_PROTOCOL: routesvc exports OTLP over grpc only, not 'http/protobuf'",
            ),
            (
                {},
                {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json"},
                "$OTEL_EXPORTER_OTLP_METRICS_PROTOCOL: routesvc exports OTLP over grpc only",
            ),
            ({"baseline_model": "gpt-5"}, {}, "telemetry.baseline_model: unknown model 'gpt-5'"),
            ({"tracing": {"exporter": "jaeger"}}, {}, "telemetry.tracing.exporter"),
            ({"metrics": {"prometheus_port": 70000}}, {}, "telemetry.metrics.prometheus_port"),
        ],
    )
    def test_a_bad_value_fails_at_start_naming_it(
        self, section: dict[str, object], environ: dict[str, str], message: str
    ) -> None:
        """Unknown exporters, samplers, baseline models and ports, and a sampler ratio that is no
        finite number ("nan" passed: the sampler failed to build, a traceback at start), are
        refused with the source named."""
        with pytest.raises(ConfigError, match="<test>: ") as caught:
            _telemetry(section, environ)
        assert message in caught.value.message

    @pytest.mark.parametrize(
        ("headers", "message"),
        [
            ("authorization=Bearer%20canary-otlp-key%0A", "the value of header 'authorization' holds a character"),
            ("x api key=canary-otlp-key", "the name of header 1 is not one gRPC takes"),
            ("x-team=ml,canary-otlp-key:x=1", "the name of header 2 is not one gRPC takes"),
        ],
        ids=["value-ending-in-a-newline", "name-with-spaces", "name-with-a-colon"],
    )
    def test_an_otlp_header_grpc_refuses_fails_at_start_without_its_value(self, headers: str, message: str) -> None:
        """A header in $OTEL_EXPORTER_OTLP_HEADERS that gRPC refuses (a key file's trailing newline
        in the value, a name with spaces) fails at start naming the variable and the header, never
        showing a value or a name that may be one (every export failed, the key logged by gRPC)."""
        with pytest.raises(ConfigError, match="<test>: ") as caught:
            _telemetry(environ={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_HEADERS": headers})
        assert f"$OTEL_EXPORTER_OTLP_HEADERS: {message}" in caught.value.message
        assert "canary-otlp-key" not in caught.value.message

    @pytest.mark.parametrize(
        ("section", "environ", "where"),
        [
            (
                {"tracing": {"exporter": "otlp", "otlp_endpoint": "http://u:canary-otlp-pw@collector:4317"}},
                {},
                "telemetry.tracing.otlp_endpoint",
            ),
            (
                {"metrics": {"otlp_endpoint": "https://canary-otlp-pw@collector:4317"}},
                {},
                "telemetry.metrics.otlp_endpoint",
            ),
            (
                {},
                {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://u:canary-otlp-pw@collector:4317"},
                "$OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                {},
                {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://u:canary-otlp-pw@collector:4317"},
                "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            ),
            (
                {},
                {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "u:canary-otlp-pw@collector:4317"},
                "$OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            ),
        ],
    )
    def test_credentials_in_an_otlp_endpoint_fail_at_start_without_the_url(
        self, section: dict[str, object], environ: dict[str, str], where: str
    ) -> None:
        """An OTLP endpoint with user:password@ (in the file or a variable) fails at start naming
        the setting, never the URL: it started, exported nothing (the exporter cannot resolve such
        a host) and logged the URL, password included, at every failed export."""
        with pytest.raises(ConfigError, match="<test>: ") as caught:
            _telemetry(section, environ)
        assert f"{where}: credentials in the URL (user:password@) are not supported" in caught.value.message
        assert "canary-otlp-pw" not in caught.value.message

    @pytest.mark.parametrize(
        ("environ", "message"),
        [
            ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://:4317"}, "an http(s) URL without a host or with a bad port"),
            (
                {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:99999"},
                "an http(s) URL without a host or with a bad port",
            ),
            ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317\n"}, "whitespace, a control or an invisible"),
        ],
        ids=["no-host", "bad-port", "trailing-newline"],
    )
    def test_an_otlp_endpoint_the_exporter_cannot_use_fails_at_start(
        self, environ: dict[str, str], message: str
    ) -> None:
        """An http(s) endpoint must have a host and a port from 1 to 65535."""
        with pytest.raises(ConfigError) as caught:
            _telemetry(environ=environ)
        assert f"$OTEL_EXPORTER_OTLP_ENDPOINT: {message}" in caught.value.message
        assert "collector" not in caught.value.message

    @pytest.mark.parametrize(
        ("endpoint", "insecure"),
        [
            ("collector:4317", False),
            ("collector", False),
            ("unix:///run/otel/collector.sock", False),
            ("dns:///collector:4317", False),
            ("HTTP://collector:4317", True),
        ],
    )
    def test_grpc_targets_stay_otlp_endpoints(self, endpoint: str, insecure: bool) -> None:
        """Endpoints that are gRPC targets, which the exporters hand to grpc as they are (TLS unless
        $OTEL_EXPORTER_OTLP_INSECURE is true), start as they did before endpoints were checked;
        an upper-case ``HTTP://`` is plaintext as ``http://`` is (it was dialled over TLS)."""
        settings = _telemetry(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
        assert (settings.traces_exporter, settings.traces_endpoint, settings.traces_insecure) == (
            "otlp",
            endpoint,
            insecure,
        )

    @pytest.mark.parametrize(
        "environ",
        [{"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}],
        ids=["sdk-disabled", "exporters-none"],
    )
    def test_an_endpoint_no_exporter_uses_is_not_checked(self, environ: dict[str, str]) -> None:
        """An endpoint set for every pod, in a process whose telemetry is off, is never used nor
        logged, so even one with credentials does not stop the start."""
        settings = _telemetry(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://u:pw@collector:4317", **environ})
        assert (settings.traces_exporter, settings.metrics_exporter) == ("none", "none")


class TestPublicSurface:
    def test_the_telemetry_package_exports_exactly_its_api(self) -> None:
        """routesvc.telemetry's public names are the set-up, the hooks and nothing private."""
        import routesvc.telemetry as telemetry

        public = {name for name in dir(telemetry) if not name.startswith("_")} - {"annotations"}
        assert public == set(telemetry.__all__)
        assert set(telemetry.__all__) == {
            "CAPTURE_MAX_CHARS", "RequestTelemetry", "Telemetry", "add_trace_context", "close_routing",
            "configure_logging", "current_request", "observed_stream", "record_answer", "record_cascade",
            "record_client_stalled", "record_decision", "record_escalation", "record_fallback", "record_feedback",
            "record_first_chunk_sent", "record_late_charge", "record_operator_failure", "record_retry",
            "record_stage_latency", "start_routing",
        }  # fmt: skip


class TestSampler:
    @pytest.mark.parametrize(
        ("sampler", "recorded"),
        [("always_off", 0), ("parentbased_always_off", 0), ("always_on", 1), ("", 1)],
        ids=["always_off", "parentbased_always_off", "always_on", "default"],
    )
    def test_otel_traces_sampler_chooses_the_sampler(self, sampler: str, recorded: int) -> None:
        """OTEL_TRACES_SAMPLER picks the SDK's sampler (it was ignored: always_off still traced
        every call); unset, parent-based with the ratio, 1 by default."""
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from routesvc.telemetry import Telemetry

        exporter = InMemorySpanExporter()
        settings = settings_from(default_config(), {"OTEL_TRACES_SAMPLER": sampler} if sampler else {})
        telemetry = Telemetry(settings, span_exporter=exporter)
        try:
            with telemetry.server_rpc("routesvc.v1.RouterService", "Route", ()) as rpc:
                rpc.finish("OK", 0)
        finally:
            telemetry.shutdown()
        assert len(exporter.get_finished_spans()) == recorded

    def test_a_ratio_in_the_file_wins_over_the_variables_sampler(self) -> None:
        """The file wins when both say: sample_ratio set there samples by ratio (parent-based)
        even when OTEL_TRACES_SAMPLER names always_on; a ratio sampler from the variable stays."""
        on = _telemetry({"tracing": {"sample_ratio": 0.25}}, {"OTEL_TRACES_SAMPLER": "always_on"})
        ratio = _telemetry({"tracing": {"sample_ratio": 0.25}}, {"OTEL_TRACES_SAMPLER": "traceidratio"})
        assert (on.sampler, on.sample_ratio) == ("parentbased_traceidratio", 0.25)
        assert ratio.sampler == "traceidratio"

    def test_an_unknown_sampler_is_a_config_error_naming_the_variable(self) -> None:
        """A sampler the SDK does not build here fails at start, listing the ones it takes."""
        with pytest.raises(ConfigError, match=r"\$OTEL_TRACES_SAMPLER: unsupported sampler 'jaeger_remote'"):
            _telemetry(environ={"OTEL_TRACES_SAMPLER": "jaeger_remote"})
