"""The typed settings tree, read once at start and passed down.

This is the only module that reads environment variables. A configuration is one YAML file
(``default_config.yaml`` in this package when none is given); an invalid file fails at start
with ``ConfigError`` naming the file and the field. Provider keys are never written in the
file: each provider names the environment variable or file that holds its key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import unicodedata
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from routesvc.catalog import Catalog, ModelSpec
from routesvc.errors import ConfigError
from routesvc.models import Capability, ProviderKind, RequestParameter
from routesvc.providers.base import HttpClientKind
from routesvc.strategies.classifier import ClassifierStageConfig
from routesvc.strategies.embedding import EmbeddingStageConfig

DEFAULT_CONFIG_NAME = "default_config.yaml"
# How long a provider's wait may hold a breaker open where breaker.max_open_seconds is not set
# (unless open_seconds is longer).
_DEFAULT_MAX_OPEN_SECONDS = 60.0
CONFIG_PATH_ENV = "ROUTESVC_CONFIG"
DATA_DIR_ENV = "ROUTESVC_DATA_DIR"
TARGET_ENV = "ROUTESVC_TARGET"
REDIS_URL_ENV = "ROUTESVC_REDIS_URL"
DEFAULT_TARGET = "localhost:50051"

# Per-request numpy work (prompt embeddings, ridge and neighbour scores) is a few small matrix
# products: BLAS threads only fight the event loop and the other workers for the cores. An
# embedding decision took 3-7 ms with OpenBLAS's default threads and 0.15 ms with one, on two
# busy cores (docs/performance.md).
NATIVE_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# Provider kinds whose API has a batch endpoint (``routesvc.batches`` has an adapter for each).
BATCH_API_KINDS = frozenset({"openai", "anthropic"})
# The standard variables of each SDK, honoured so the service can be pointed at any
# compatible endpoint without editing the file.
_DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY", "openai_compatible": ""}
_DEFAULT_BASE_URL_ENV = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL", "openai_compatible": ""}

# gRPC takes its channel options as 32-bit integers: a larger one failed the server's start with
# an OverflowError. The connection age goes in milliseconds; the transport's message limit is 1 KiB
# above the request limit (``Server``).
_GRPC_INT_MAX = 2**31 - 1
MAX_CONNECTION_AGE_SECONDS = _GRPC_INT_MAX // 1000
MAX_REQUEST_BYTES = _GRPC_INT_MAX - 1024

# The name of an environment variable, as a POSIX shell takes it.
_ENVIRONMENT_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# How the keys of common model APIs begin (OpenAI and Anthropic "sk-", Google "AIza", Groq "gsk_",
# Hugging Face "hf_", xAI "xai-"): a long value that begins so is a key pasted in place of a name.
_API_KEY_PREFIXES = ("sk-", "sk_", "AIza", "gsk_", "hf_", "xai-")
_SHORTEST_PASTED_KEY = 20


def limit_native_threads(environ: MutableMapping[str, str] | None = None) -> None:
    """One BLAS / OpenMP thread per process unless the environment already sets a number.

    The variables reach processes started later (the workers); for this process, where numpy is
    already loaded (this module imports the learned stages) and read them too early, the running
    thread pools are limited as well. ``routesvc serve`` calls it first thing.
    """
    env = os.environ if environ is None else environ
    explicit = any(name in env for name in NATIVE_THREAD_VARIABLES)
    for name in NATIVE_THREAD_VARIABLES:
        env.setdefault(name, "1")
    if environ is None and not explicit:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # ships no type hints

        threadpool_limits(limits=1)


def _environment_variable_name(value: str) -> str:
    """``value`` if it is the name of an environment variable; the ``ValueError`` never quotes it,
    since what stands in a name's place is most often the secret itself (the name then reached the
    logs, ListModels and every FAILED_PRECONDITION message)."""
    if value.startswith(_API_KEY_PREFIXES) and len(value) >= _SHORTEST_PASTED_KEY:
        raise ValueError(
            "this looks like an API key pasted in place of a variable name (not shown): put the key in an "
            "environment variable, or a file named by api_key_file, and write the variable's name here"
        )
    if not _ENVIRONMENT_VARIABLE_NAME.fullmatch(value):
        raise ValueError(
            "must be the name of an environment variable (letters, digits and _, not starting with a digit); "
            "the value is not shown, in case it is a key"
        )
    return value


MAX_DURATION_SECONDS = 315_576_000_000
"""The longest a ``google.protobuf.Duration`` holds (10,000 years)."""


class _Strict(BaseModel):
    # No .inf or .nan anywhere: a float setting is a finite number (an infinite stats window
    # made every GetStats fail INTERNAL). The values refused are left out of pydantic's message
    # (the ``ConfigError``'s cause): one may be a key pasted where a variable's name belongs.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, hide_input_in_errors=True)


class TlsConfig(_Strict):
    """Serve over TLS; with ``client_ca_file``, require client certificates (mutual TLS)."""

    cert_file: Path = Field(description="PEM certificate chain of the server.")
    key_file: Path = Field(description="PEM private key of the server.")
    client_ca_file: Path | None = Field(None, description="PEM CA bundle; when set, clients must present a cert.")
    client_tenants: dict[str, str] = Field(
        default_factory=dict, description="Client certificate common name -> tenant (with auth.enabled)."
    )


class ServerConfig(_Strict):
    """Where and how the gRPC server listens."""

    host: str = Field("127.0.0.1", description="Interface to bind; '0.0.0.0' or '[::]' for all.")
    port: int = Field(50051, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    grace_seconds: float = Field(10.0, ge=0, description="How long in-flight RPCs may finish on shutdown.")
    drain_delay_seconds: float = Field(
        0.0, ge=0, description="After SIGTERM, how long to keep serving with health NOT_SERVING."
    )
    reflection: bool = Field(True, description="Serve gRPC server reflection.")
    tls: TlsConfig | None = Field(None, description="TLS / mutual TLS; plaintext when unset.")
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="A second, plaintext port on the same host serving grpc.health.v1 alone, for probes that "
        "cannot speak TLS (Kubernetes' gRPC probes, Docker's HEALTHCHECK); 0 picks a free one; unset: none.",
    )
    reload_interval_seconds: float = Field(
        2.0, ge=0, description="How often a config file is checked for changes (hot reload); 0: never."
    )
    workers: int = Field(
        1, ge=1, le=64, description="Server processes sharing the port with SO_REUSEPORT; more than 1 uses more cores."
    )
    uvloop: bool = Field(
        True,
        description="Run the event loop on uvloop where it is installed (not on Windows); false: asyncio's loop.",
    )
    max_connection_age_seconds: float = Field(
        0.0,
        ge=0,
        le=MAX_CONNECTION_AGE_SECONDS,
        description="Ask clients to reconnect after this long (GOAWAY; calls in flight finish), so new "
        "replicas behind a load balancer get traffic; 0: connections live as long as clients keep them. "
        "At most 2147483 (24.8 days: gRPC takes it in milliseconds, as a 32-bit integer).",
    )

    max_health_watch_streams: int = Field(
        1000,
        ge=1,
        description="grpc.health.v1 Watch streams open at once (both ports together; health needs no "
        "key): more are refused RESOURCE_EXHAUSTED.",
    )
    max_health_watch_streams_per_peer: int = Field(
        100,
        ge=1,
        description="grpc.health.v1 Watch streams one client address (its IP, any port) may hold open at "
        "once: more are refused RESOURCE_EXHAUSTED, so one unauthenticated peer cannot take every Watch "
        "place and make the replica look unhealthy to the clients that watch it.",
    )

    @model_validator(mode="after")
    def _health_port_is_another_port(self) -> ServerConfig:
        if self.health_port and self.health_port == self.port:
            raise ValueError("health_port must differ from port (it serves health alone, in plaintext)")
        return self


class LimitsConfig(_Strict):
    """Limits on what one request may ask for; checked before any work."""

    max_request_bytes: int = Field(
        4 * 1024 * 1024,
        gt=0,
        le=MAX_REQUEST_BYTES,
        description="Largest serialized request; at most 2 GiB less 1 KiB and one byte (gRPC's message limit "
        "is a 32-bit integer).",
    )
    max_messages: int = Field(1000, gt=0, description="Most messages in one request.")
    max_tools: int = Field(128, gt=0, description="Most tool definitions in one request.")
    max_metadata_entries: int = Field(64, gt=0, description="Most routing metadata entries.")
    max_images: int = Field(20, gt=0, description="Most images in one request (in all its messages).")
    max_image_bytes: int = Field(
        3 * 1024 * 1024 + 768 * 1024,
        gt=0,
        description="Largest inline image (Image.data), in bytes: 3.75 MiB is 5 MiB once base64-encoded, "
        "Anthropic's per-image limit. The request's max_request_bytes bounds it too.",
    )
    max_output_tokens: int = Field(65536, gt=0, description="Largest max_output_tokens a request may ask.")
    max_stop_sequences: int = Field(
        4, gt=0, description="Most stop sequences in one request (OpenAI refuses more than 4; Anthropic takes more)."
    )
    max_cache_breakpoints: int = Field(
        4,
        gt=0,
        le=4,
        description="Most prompt-cache breakpoints (Message.cache_breakpoint, Tool.cache_breakpoint) in one "
        "request; Anthropic refuses more than 4.",
    )
    default_output_tokens: int = Field(
        512,
        gt=0,
        description="Output tokens assumed for estimates and sent when a request sets none; at most every "
        "model's max_output_tokens.",
    )


class ProviderConfig(_Strict):
    """One model API endpoint and where its key comes from (never the key itself)."""

    kind: ProviderKind
    base_url: str | None = Field(
        None,
        description="Endpoint: an absolute http:// or https:// URL with a host and no user:password@; default: "
        "the SDK's variable (same rule), then its default.",
    )
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the key (never the key: refused unshown)."
    )
    api_key_file: Path | None = Field(None, description="File holding the key (for mounted secrets).")
    requires_key: bool | None = Field(None, description="Whether a key is needed; default: not for compatible.")
    http_client: HttpClientKind = Field(
        "aiohttp",
        description="The SDK's HTTP transport: aiohttp (the SDKs' DefaultAioHttpClient, 25-35% less CPU "
        "per stream than httpx; the default) or httpx (the SDKs' own default client); docs/performance.md. "
        "Streamed and unary calls; batch calls keep the SDKs' default client.",
    )
    stream_usage: bool = Field(
        True,
        description="Ask an OpenAI-style API for the stream's usage (stream_options.include_usage). false for an "
        "OpenAI-compatible server that refuses the field (HTTP 400 on every call): usage is then estimated "
        "and flagged, unless the server reports it anyway. Not read for kind anthropic.",
    )

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_name(cls, value: str | None) -> str | None:
        return None if value is None else _environment_variable_name(value)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError("inline api_key is not allowed; use api_key_env or api_key_file")
        return data

    @model_validator(mode="after")
    def _compatible_needs_url(self) -> ProviderConfig:
        if self.kind == "openai_compatible" and not self.base_url:
            raise ValueError("base_url is required for kind openai_compatible")
        return self


class ModelConfig(_Strict):
    """One catalog model; prices in USD per 1M tokens."""

    id: str = Field(min_length=1)
    provider: str
    provider_model: str | None = Field(None, description="Name sent to the provider; default: id.")
    input_price_per_mtok: Decimal = Field(ge=0)
    output_price_per_mtok: Decimal = Field(ge=0)
    cached_input_price_per_mtok: Decimal | None = Field(None, ge=0, description="Default: the input price.")
    cache_write_price_per_mtok: Decimal | None = Field(
        None,
        ge=0,
        description="Input tokens written to the prompt cache (Anthropic's 5-minute cache). "
        "Default: 1.25x the input price for a provider of kind anthropic, else the input price.",
    )
    cache_write_1h_price_per_mtok: Decimal | None = Field(
        None,
        ge=0,
        description="Input tokens written to Anthropic's 1-hour prompt cache. "
        "Default: 2x the input price for a provider of kind anthropic, else the cache write price.",
    )
    context_window: int = Field(gt=0)
    max_output_tokens: int = Field(16384, gt=0)
    capabilities: tuple[Capability, ...] = Field(
        (),
        description="tools, vision, json: a request with tools needs tools, one with images vision, one with "
        "a JSON response_format json.",
    )
    unsupported_parameters: tuple[RequestParameter, ...] = Field(
        (),
        description="Request parameters the model refuses (OpenAI's reasoning models refuse "
        "temperature and stop; Claude 4.6 models a prefill, a conversation that ends in an assistant "
        "turn): a request that sets one is not routed to it.",
    )
    image_token_scale: Decimal = Field(
        Decimal(1),
        gt=0,
        description="Input tokens the model bills per token of its image estimate (routesvc.images: "
        "the formula of its provider's kind): gpt-4o-mini counts ~33.3x gpt-4o's tokens for an image.",
    )
    batch_discount: Decimal = Field(Decimal(0), ge=0, le=1, description="Fraction off in batch mode.")


class RuleCondition(_Strict):
    """Tests on a request; a rule matches when every test given holds."""

    # A bound below these would test nothing: more than -1 tokens or tools is every request, fewer
    # than 0 tokens none.
    input_tokens_gt: int | None = Field(None, ge=0)
    input_tokens_lt: int | None = Field(None, gt=0)
    tools_gt: int | None = Field(None, ge=0)
    user_tier_in: tuple[str, ...] | None = None
    tenant_in: tuple[str, ...] | None = None
    task_in: tuple[str, ...] | None = None
    complexity_in: tuple[Literal["low", "medium", "high"], ...] | None = Field(
        None,
        description="How hard the llm classifier judged the request; a request whose complexity is "
        "unknown (no llm classifier answer) never matches.",
    )
    realtime: bool | None = None
    metadata: dict[str, str] | None = None
    last_user_message_matches: str | None = Field(None, description="Python regex, searched, case-sensitive.")

    @field_validator("user_tier_in", "tenant_in", "task_in", "complexity_in", "metadata")
    @classmethod
    def _not_an_empty_container(
        cls, value: tuple[str, ...] | dict[str, str] | None
    ) -> tuple[str, ...] | dict[str, str] | None:
        # Given empty, a condition would test nothing: an empty list matches no request, an empty
        # map every one (it counted as "a condition" and made a rule match everything).
        if value is not None and not value:
            matches = "every request" if isinstance(value, dict) else "no request"
            raise ValueError(f"must not be empty (it would match {matches}); leave the condition out instead")
        return value

    @field_validator("metadata")
    @classmethod
    def _no_empty_key(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and "" in value:
            raise ValueError("a key must not be empty (no request carries an empty key, so it would match no request)")
        return value

    @field_validator("last_user_message_matches")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value == "":
            # Found in every message: the rule would match every request.
            raise ValueError("must not be empty (it would match every request); leave the condition out instead")
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regex: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> RuleCondition:
        if not self.model_dump(exclude_none=True):
            raise ValueError("a rule needs at least one condition")
        return self


class RuleConfig(_Strict):
    """One rule: when it matches, it picks ``model`` and/or sets ``mode``."""

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    when: RuleCondition
    model: str | None = None
    mode: Literal["realtime", "batch"] | None = None
    description: str = ""

    @model_validator(mode="after")
    def _does_something(self) -> RuleConfig:
        if self.model is None and self.mode is None:
            raise ValueError("a rule must set model, mode, or both")
        return self


class RulesStageConfig(_Strict):
    """Ordered rules: the first matching rule with a model wins; precedence is list order."""

    kind: Literal["rules"]
    rules: tuple[RuleConfig, ...]


StageConfig = Annotated[RulesStageConfig | ClassifierStageConfig | EmbeddingStageConfig, Field(discriminator="kind")]


class RoutingConfig(_Strict):
    """The policy: stages in order, then the default model."""

    default_model: str
    on_unconfigured_provider: Literal["fail", "fallthrough"] = Field(
        "fail",
        description="fail: Complete fails FAILED_PRECONDITION naming the missing key; "
        "fallthrough: models without credentials are skipped like ineligible ones.",
    )
    stages: tuple[StageConfig, ...] = ()
    fallbacks: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="Models to try, in order, when a model fails before its first chunk (5xx, 429, "
        "timeout, open breaker).",
    )


class BreakerConfig(_Strict):
    """A circuit breaker per model: opens after consecutive failures, probes when half-open."""

    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open the breaker.")
    open_seconds: float = Field(30.0, gt=0, description="How long it stays open at least (longer on Retry-After).")
    max_open_seconds: float | None = Field(
        None,
        gt=0,
        description="How long a provider's Retry-After (or rate-limit reset) may hold it open at most, "
        "so one answer saying a day cannot take the model out for a day; at least open_seconds. "
        "Default: the larger of 60 and open_seconds.",
    )

    @model_validator(mode="after")
    def _max_open_is_not_below_open(self) -> BreakerConfig:
        if self.max_open_seconds is not None and self.max_open_seconds < self.open_seconds:
            raise ValueError(
                f"max_open_seconds ({self.max_open_seconds:g}) must be at least open_seconds ({self.open_seconds:g})"
            )
        return self

    @property
    def longest_open_seconds(self) -> float:
        """``max_open_seconds``, or its default: 60, or ``open_seconds`` if longer (a config that
        sets only a longer ``open_seconds`` keeps to it)."""
        if self.max_open_seconds is not None:
            return self.max_open_seconds
        return max(_DEFAULT_MAX_OPEN_SECONDS, self.open_seconds)


class ReliabilityConfig(_Strict):
    """Retries, fallbacks, breakers and stream timers. Retries happen only before the first
    content chunk reached the client (the commit rule)."""

    max_attempts: int = Field(3, ge=1, le=10, description="Upstream attempts per request, fallbacks included.")
    retries_per_model: int = Field(1, ge=0, description="Extra attempts on the same model before falling back.")
    backoff_seconds: float = Field(0.1, ge=0, description="First backoff between attempts on one model; doubles.")
    max_backoff_seconds: float = Field(2.0, ge=0)
    max_retry_after_seconds: float = Field(
        10.0, ge=0, description="Wait for a provider's Retry-After up to this; longer moves to the next model."
    )
    min_attempt_seconds: float = Field(
        0.2, ge=0, description="An attempt starts only with at least this much of the deadline left."
    )
    retry_budget_ratio: float = Field(
        0.1, gt=0, le=1, description="Retry tokens earned per success (gRPC-style throttling)."
    )
    retry_budget_tokens: float = Field(
        10.0, gt=0, description="Retry token bucket size; retries stop below half of it."
    )
    first_token_timeout_seconds: float = Field(120.0, gt=0, description="Longest wait for a provider's first chunk.")
    stream_idle_timeout_seconds: float = Field(60.0, gt=0, description="Longest gap between two chunks.")
    client_write_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Longest wait for one message's write to a stream's caller (one that stops reading).",
    )
    max_event_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Most bytes of one server-sent event of a provider's stream; a longer one fails the "
        "attempt UNAVAILABLE (as a broken stream: retried before the first chunk), so that a broken or "
        "hostile server cannot make the process hold an event of any size. An Anthropic event also fails "
        "past 1000 lines (its SDK's decoder costs time quadratic in an event's lines).",
    )
    max_concurrent_rpcs: int = Field(1024, ge=1, description="RPCs served at once; more are shed.")
    ledger_entries: int = Field(20_000, ge=1, description="Upstream attempts the in-memory ledger keeps.")
    breaker: BreakerConfig = BreakerConfig()


class TenantConfig(_Strict):
    """One tenant: its API keys (hashed), allowed models, defaults and limits."""

    api_key_sha256: tuple[str, ...] = Field(
        (), description="Hex SHA-256 digests of the tenant's API keys (never the keys)."
    )
    api_keys_file: Path | None = Field(None, description="File of hex SHA-256 digests, one per line.")
    allowed_models: tuple[str, ...] | None = Field(None, description="Models it may use; default: all.")
    user_tier: str | None = Field(None, description="Tier used when a request names none.")
    requests_per_minute: int | None = Field(None, gt=0, description="Complete calls (batch jobs included).")
    route_requests_per_minute: int | None = Field(
        None, gt=0, description="Route calls, counted apart from requests_per_minute."
    )
    tokens_per_minute: int | None = Field(
        None,
        gt=0,
        description="Estimated at admission, settled on usage; more than limits.default_output_tokens.",
    )
    max_concurrent: int | None = Field(None, gt=0, description="RPCs in flight at once.")
    daily_budget_usd: Decimal | None = Field(None, gt=0, description="UTC day.")
    monthly_budget_usd: Decimal | None = Field(None, gt=0, description="UTC calendar month.")

    @field_validator("api_key_sha256")
    @classmethod
    def _hex_digests(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            if not re.fullmatch(r"[0-9a-f]{64}", value):
                raise ValueError("each entry must be a lowercase hex SHA-256 digest (64 characters)")
        return values


class CascadeStepConfig(_Strict):
    """One step of a cascade: a model, and the score its answer must reach to be released."""

    model: str
    threshold: float | None = Field(
        None, ge=0, le=1, description="Release the answer when its score is at least this; required but on the last."
    )


class CascadeChainConfig(_Strict):
    """An ordered chain cheap -> strong; it applies when the routing decision picks its first model."""

    steps: tuple[CascadeStepConfig, ...] = Field(min_length=2)

    @model_validator(mode="after")
    def _thresholds(self) -> CascadeChainConfig:
        for index, step in enumerate(self.steps[:-1]):
            if step.threshold is None:
                raise ValueError(f"steps[{index}].threshold: required on every step but the last")
        if self.steps[-1].threshold is not None:
            raise ValueError(
                f"steps[{len(self.steps) - 1}].threshold: the last step's answer is always released (there is"
                " no step to escalate to), so a threshold there would be ignored; remove it"
            )
        models = [step.model for step in self.steps]
        if len(set(models)) != len(models):
            raise ValueError("steps: a model appears twice")
        return self


class JudgeConfig(_Strict):
    """The LLM judge: a cheap model asked for a 0-1 score of an answer in JSON."""

    model: str = Field(description="Catalog id of the judge model.")
    timeout_seconds: float = Field(10.0, gt=0, description="Longest wait for the judge's verdict.")
    max_output_tokens: int = Field(64, gt=0, description="Output tokens the judge may use.")
    on_failure: Literal["release", "escalate"] = Field(
        "release",
        description="When the judge times out, fails or answers garbage: release the answer (score 1) or "
        "escalate it (score 0).",
    )


class CascadeConfig(_Strict):
    """Cascading escalation: score a cheap model's answer and escalate it when the score is too low."""

    apply: Literal["always", "on_request", "never"] = Field(
        "on_request",
        description="always: every request whose decision starts a chain; on_request: only requests with "
        "context.cascade true (a request may also say false under always); never: off.",
    )
    chains: tuple[CascadeChainConfig, ...] = ()
    scorers: tuple[Literal["local", "llm_judge"], ...] = Field(
        ("local",), min_length=1, description="Scorers in order; combined by ``combine``."
    )
    combine: Literal["min", "mean"] = Field(
        "min", description="min: the lowest score, later scorers skipped once one is below the threshold; mean."
    )
    judge: JudgeConfig | None = Field(None, description="Required when scorers include llm_judge.")
    max_cost_usd: Decimal | None = Field(
        None, gt=0, description="Stop escalating when the request would cost more than this (USD)."
    )

    @model_validator(mode="after")
    def _judge_configured(self) -> CascadeConfig:
        if "llm_judge" in self.scorers and self.judge is None:
            raise ValueError("judge: required when scorers include llm_judge")
        for index, name in enumerate(self.scorers):
            if name in self.scorers[:index]:
                # The same scorer twice scores the same answer twice: a judge twice is two paid
                # calls, at temperature 0, for one verdict.
                raise ValueError(f"scorers[{index}]: {name} is listed twice")
        firsts = [chain.steps[0].model for chain in self.chains]
        if len(set(firsts)) != len(firsts):
            raise ValueError("chains: two chains start with the same model")
        return self


class BatchConfig(_Strict):
    """Batch mode: requests not needed in real time go to the providers' batch APIs."""

    enabled: bool = Field(True, description="false: batch-mode decisions are served in realtime instead.")
    store_path: Path | None = Field(
        None,
        description="SQLite file of batch jobs; default: $ROUTESVC_DATA_DIR/batches.db, else "
        "$XDG_DATA_HOME/routesvc/batches.db, else ~/.local/share/routesvc/batches.db.",
    )
    group_window_seconds: float = Field(
        5.0, ge=0, description="How long a job may wait to be grouped with others into one provider batch."
    )
    max_group_size: int = Field(
        1000,
        ge=1,
        le=50_000,
        description="Most requests in one provider batch (OpenAI takes at most 50,000, Anthropic 100,000).",
    )
    poll_interval_seconds: float = Field(30.0, gt=0, description="How often provider batches are polled.")
    max_queued_seconds: float = Field(
        86400.0,
        gt=0,
        description="How long a job may wait, queued, to be sent (a spent quota, a provider down): then it ends "
        "EXPIRED queued_too_long, uncharged (FAILED token_limit_exceeded when OpenAI refused its batches for "
        "the enqueued token limit). The provider's own 24 h window starts once it is sent.",
    )
    max_stored_request_bytes: int = Field(
        268_435_456,
        gt=0,
        le=2**40,
        description="The most bytes of requests (prompts, inline images) the store keeps for jobs no provider "
        "has taken yet: a job that would pass it is refused RESOURCE_EXHAUSTED BATCH_STORE_FULL (retry later) "
        "rather than growing the file without bound while a provider is down. The file on disk can reach about "
        "twice this (its write-ahead log).",
    )
    max_tenant_share_of_stored_requests: float = Field(
        0.25,
        gt=0,
        le=1,
        description="The share of max_stored_request_bytes one tenant's requests not yet taken by a provider may "
        "hold: a job that would pass it is refused RESOURCE_EXHAUSTED BATCH_STORE_FULL naming this setting and "
        "the tenant, while other tenants are still queued (one tenant could otherwise fill the store for all). "
        "1 lets one tenant fill it (a deployment of one tenant).",
    )
    retention_seconds: float = Field(
        604800.0,
        gt=0,
        description="How long an ended job (its answer) is kept for GetBatch: then it is deleted from the store, "
        "and GetBatch answers NOT_FOUND.",
    )


class SharedStateConfig(_Strict):
    """State shared by replicas. Without a Redis URL, limits and budgets are counted per process."""

    redis_url: str | None = Field(
        None, description="redis://HOST:PORT/DB for limits and budgets shared by every replica ($ROUTESVC_REDIS_URL)."
    )
    key_prefix: str = Field("routesvc:", description="Prefix of every Redis key.")
    lease_seconds: float = Field(
        3600.0,
        gt=0,
        description="How long a reservation whose settle never reaches Redis (its replica died, or Redis stayed"
        " unreachable that long) holds its tenant's in-flight slot and reserved USD; above the longest request.",
    )


class AuthConfig(_Strict):
    """Who may call the service. Health and reflection never need a key."""

    enabled: bool = Field(False, description="Require 'authorization: Bearer KEY' on RouterService calls.")


class LoggingConfig(_Strict):
    """Log level and rendering."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field("auto", description="auto: console on a TTY, else JSON.")


class TracingConfig(_Strict):
    """Where spans go. Unset fields fall back to the standard ``OTEL_*`` variables."""

    exporter: Literal["none", "console", "otlp"] | None = Field(
        None,
        description="none, console (stdout) or otlp (gRPC); default: $OTEL_TRACES_EXPORTER, else otlp when an "
        "OTLP endpoint variable is set, else none.",
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/gRPC endpoint; default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "
        "then $OTEL_EXPORTER_OTLP_ENDPOINT, then http://localhost:4317.",
    )
    sample_ratio: float | None = Field(
        None, ge=0, le=1, description="Fraction of new traces kept (parent-based); default 1, $OTEL_TRACES_SAMPLER_ARG"
    )


class MetricsConfig(_Strict):
    """Where metrics go: OTLP push and/or a Prometheus scrape endpoint."""

    exporter: Literal["none", "console", "otlp"] | None = Field(
        None,
        description="none, console or otlp (gRPC); default: $OTEL_METRICS_EXPORTER, else otlp when an "
        "OTLP endpoint variable is set, else none.",
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/gRPC endpoint; default: $OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, "
        "then $OTEL_EXPORTER_OTLP_ENDPOINT, then http://localhost:4317.",
    )
    export_interval_seconds: float = Field(60.0, gt=0, description="How often metrics are pushed over OTLP.")
    prometheus_port: int | None = Field(
        None, ge=0, le=65535, description="Serve /metrics for Prometheus on this port; unset: off; 0 picks one."
    )
    prometheus_host: str = Field("127.0.0.1", description="Interface of the Prometheus endpoint.")


class TelemetryConfig(_Strict):
    """Traces, metrics, and the routing-effectiveness window behind GetStats."""

    service_name: str | None = Field(None, description="service.name; default: $OTEL_SERVICE_NAME, else routesvc.")
    tracing: TracingConfig = TracingConfig()
    metrics: MetricsConfig = MetricsConfig()
    capture_content: bool = Field(
        False, description="Record prompt and completion text on spans. Off by default: content is never recorded."
    )
    baseline_model: str | None = Field(
        None, description="Model savings are measured against; default: the most expensive catalog model."
    )
    stats_window_seconds: float = Field(
        3600.0,
        gt=0,
        # GetStats answers its window as a google.protobuf.Duration, which holds at most 10,000
        # years: a longer one (1e20 passed) made every GetStats fail INTERNAL.
        le=MAX_DURATION_SECONDS,
        description="How far back GetStats can look, at most 315576000000 (a protobuf Duration's 10,000 years).",
    )
    stats_max_requests: int = Field(100_000, gt=0, description="Most requests kept in the GetStats window.")


class Config(_Strict):
    """The whole file."""

    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    logging: LoggingConfig = LoggingConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    providers: dict[str, ProviderConfig]
    models: tuple[ModelConfig, ...] = Field(min_length=1)
    routing: RoutingConfig
    reliability: ReliabilityConfig = ReliabilityConfig()
    auth: AuthConfig = AuthConfig()
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    shared_state: SharedStateConfig = SharedStateConfig()
    cascade: CascadeConfig = CascadeConfig()
    batch: BatchConfig = BatchConfig()

    @model_validator(mode="after")
    def _references_resolve(self) -> Config:
        ids = [model.id for model in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate model ids: {', '.join(duplicates)}")
        for index, model in enumerate(self.models):
            if model.provider not in self.providers:
                raise ValueError(f"models[{index}].provider: unknown provider {model.provider!r}")
        if self.routing.default_model not in ids:
            raise ValueError(f"routing.default_model: unknown model {self.routing.default_model!r}")
        for source, targets in self.routing.fallbacks.items():
            for name in (source, *targets):
                if name not in ids:
                    raise ValueError(f"routing.fallbacks.{source}: unknown model {name!r}")
        # A request that sets no max_output_tokens asks every model for this many.
        default_output = self.limits.default_output_tokens
        smallest = min(self.models, key=lambda model: model.max_output_tokens)
        if default_output > smallest.max_output_tokens:
            raise ValueError(
                f"limits.default_output_tokens: {default_output} is more than the max_output_tokens of model"
                f" {smallest.id!r} ({smallest.max_output_tokens}): a request that sets no max_output_tokens would"
                " ask it for more output than it gives"
            )
        key_owners: dict[str, tuple[str, int]] = {}  # digest -> the tenant it authenticates, and its index there
        for tenant_name, tenant in self.tenants.items():
            for name in tenant.allowed_models or ():
                if name not in ids:
                    raise ValueError(f"tenants.{tenant_name}.allowed_models: unknown model {name!r}")
            for index, digest in enumerate(tenant.api_key_sha256):
                owner, first = key_owners.setdefault(digest, (tenant_name, index))
                if owner != tenant_name:
                    raise ValueError(
                        f"tenants.{tenant_name}.api_key_sha256[{index}]: the same key digest as"
                        f" tenants.{owner}.api_key_sha256[{first}], a key of tenant {owner!r};"
                        " a key belongs to one tenant"
                    )
            tokens_per_minute = tenant.tokens_per_minute
            if tokens_per_minute is not None and tokens_per_minute <= default_output:
                raise ValueError(
                    f"tenants.{tenant_name}.tokens_per_minute: {tokens_per_minute} is not more than"
                    f" limits.default_output_tokens ({default_output}): a request that sets no max_output_tokens"
                    f" is estimated at its input plus {default_output} tokens, so every such request would be"
                    " refused"
                )
        for chain_index, chain in enumerate(self.cascade.chains):
            for step_index, step in enumerate(chain.steps):
                if step.model not in ids:
                    where = f"cascade.chains[{chain_index}].steps[{step_index}].model"
                    raise ValueError(f"{where}: unknown model {step.model!r}")
        judge = self.cascade.judge
        if judge is not None and judge.model not in ids:
            raise ValueError(f"cascade.judge.model: unknown model {judge.model!r}")
        if judge is not None:
            judge_model = next(model for model in self.models if model.id == judge.model)
            if judge.max_output_tokens > judge_model.max_output_tokens:
                raise ValueError(
                    f"cascade.judge.max_output_tokens: {judge.max_output_tokens} is more than the max_output_tokens"
                    f" of the judge model {judge_model.id!r} ({judge_model.max_output_tokens}): every judge call"
                    " would be refused"
                )
        tls = self.server.tls
        for common_name, tenant_name in (tls.client_tenants if tls else {}).items():
            if tenant_name not in self.tenants:
                raise ValueError(f"server.tls.client_tenants.{common_name}: unknown tenant {tenant_name!r}")
        if self.auth.enabled and not self.tenants:
            raise ValueError("auth.enabled: no tenants are configured, so no key could ever be accepted")
        judged_complexity = False  # whether an llm classifier stage has run before this stage
        feedback_files: dict[str, str] = {}  # each stage's feedback_db, normalised: where it is set
        for stage_index, stage in enumerate(self.routing.stages):
            where = f"routing.stages[{stage_index}]"
            if isinstance(stage, EmbeddingStageConfig) and stage.feedback_db is not None:
                # Two stores on one file both remember each decision and record each outcome:
                # ratings counted twice, or refused as repeats by the second and lost to it.
                same = feedback_files.setdefault(os.path.normpath(stage.feedback_db), where)
                if same != where:
                    raise ValueError(
                        f"{where}.feedback_db: {str(stage.feedback_db)!r} is {same}'s feedback_db too;"
                        " each embedding stage needs its own file"
                    )
            if isinstance(stage, RulesStageConfig):
                for rule_index, rule in enumerate(stage.rules):
                    if rule.model is not None and rule.model not in ids:
                        raise ValueError(f"{where}.rules[{rule_index}].model: unknown model {rule.model!r}")
                    unknown_tenants = [name for name in rule.when.tenant_in or () if name not in self.tenants]
                    if self.auth.enabled and unknown_tenants:
                        raise ValueError(
                            f"{where}.rules[{rule_index}].when.tenant_in: unknown tenant {unknown_tenants[0]!r};"
                            " with auth.enabled a request's tenant is a configured one, so it could never match"
                        )
                    if rule.when.complexity_in is not None and not judged_complexity:
                        raise ValueError(
                            f"{where}.rules[{rule_index}].when.complexity_in: only a classifier stage with"
                            " method llm judges complexity, and none comes before this rules stage,"
                            " so the rule could never match"
                        )
            elif isinstance(stage, ClassifierStageConfig) and stage.method == "llm":
                judged_complexity = True
                if not stage.model:
                    raise ValueError(f"{where}.model: the llm method needs a catalog model id")
                if stage.model not in ids:
                    raise ValueError(f"{where}.model: unknown model {stage.model!r}")
            elif isinstance(stage, EmbeddingStageConfig):
                for name in ("strong_model", "weak_model"):
                    value = getattr(stage, name)
                    if value and value not in ids:
                        raise ValueError(f"{where}.{name}: unknown model {value!r}")
        return self


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """A provider with its credentials resolved from the environment.

    ``api_key`` is None when no key is configured. ``missing_key_reason`` then says why to
    callers (ListModels, a decision's reasons, errors): it names the environment variable to set
    but never a file's path, which tells where the operator keeps secrets;
    ``missing_key_detail``, logged at start, names the file too.
    """

    name: str
    kind: str
    base_url: str | None
    api_key: str | None
    missing_key_reason: str
    missing_key_detail: str
    http_client: HttpClientKind = "aiohttp"
    stream_usage: bool = True

    @property
    def configured(self) -> bool:
        """Whether calls to this provider can be made."""
        return not self.missing_key_reason

    def __repr__(self) -> str:
        # Never show the key, even in debug output.
        return f"ProviderSettings(name={self.name!r}, kind={self.kind!r}, configured={self.configured})"


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated configuration plus everything resolved from the environment."""

    source: str
    config: Config
    catalog: Catalog
    providers: Mapping[str, ProviderSettings]
    telemetry: TelemetrySettings
    batch_store_path: Path = Path("batches.db")
    redis_url: str | None = None
    # What these settings were parsed from, for the hot-reload watcher to start from, so that a
    # change made while the server starts (after the parse, before the watcher's first look) is
    # applied at its first poll: the SHA-256 of the config file's bytes (None: not parsed from a
    # file), and of each file of ``files_reread`` as read while parsing (None: not readable).
    text_sha256: str | None = None
    files_sha256: tuple[tuple[Path, str | None], ...] = ()


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """``telemetry`` with the standard ``OTEL_*`` variables applied (the file wins when both say)."""

    service_name: str
    resource_attributes: Mapping[str, str]
    traces_exporter: str
    traces_endpoint: str
    sample_ratio: float
    sampler: str
    metrics_exporter: str
    metrics_endpoint: str
    metrics_interval_seconds: float
    otlp_headers: Mapping[str, str]
    traces_insecure: bool
    metrics_insecure: bool
    prometheus_host: str
    prometheus_port: int | None
    capture_content: bool
    baseline_model: str
    stats_window_seconds: float
    stats_max_requests: int
    # Which RPC conventions server spans carry ($OTEL_SEMCONV_STABILITY_OPT_IN): "old" (v1.37 and
    # before: rpc.system, rpc.service, rpc.method, rpc.grpc.status_code), "stable", or both.
    rpc_conventions: frozenset[str] = frozenset({"old"})

    def __repr__(self) -> str:
        # OTLP headers often carry an API key of the telemetry backend.
        return f"TelemetrySettings(traces={self.traces_exporter}, metrics={self.metrics_exporter})"


# Read once when the server starts (listening, logging, telemetry, the batch queue, where limits
# are counted, and the few ``reliability`` and ``limits`` fields below): a hot reload that changes
# them applies everything else and says which of these wait for a restart. Of ``server``, only the
# drain settings are read again (at shutdown), and ``tls.client_tenants``, which the
# authenticator a reload builds reads (so that a mapping removed stops authenticating at once).
_READ_AT_START = ("server", "logging", "telemetry", "batch", "shared_state")
_SERVER_READ_AT_SHUTDOWN = frozenset({"grace_seconds", "drain_delay_seconds"})
_TLS_RELOADED = frozenset({"client_tenants"})
# The baseline is a catalog model: calls routed after a reload are compared with the reloaded one.
_TELEMETRY_RELOADED = frozenset({"baseline_model"})
_RELIABILITY_KEPT = ("ledger_entries", "retry_budget_tokens", "retry_budget_ratio", "breaker")


def changes_needing_restart(old: Settings, new: Settings) -> list[str]:
    """The settings ``new`` changes that a hot reload from ``old`` cannot apply, as field paths
    ("server.port", "shared_state.redis_url"); the Redis URL compared as resolved (the file, else
    ``$ROUTESVC_REDIS_URL``)."""
    changed: list[str] = []
    for section in _READ_AT_START:
        before, after = getattr(old.config, section), getattr(new.config, section)
        for name in type(before).model_fields:
            if section == "server" and name in _SERVER_READ_AT_SHUTDOWN:
                continue
            if section == "telemetry" and name in _TELEMETRY_RELOADED:
                continue
            if section == "shared_state" and name == "redis_url":
                if old.redis_url != new.redis_url:
                    changed.append("shared_state.redis_url")
                continue
            if section == "server" and name == "tls":
                changed.extend(_tls_changes(before.tls, after.tls))
                continue
            if getattr(before, name) != getattr(after, name):
                changed.append(f"{section}.{name}")
    # Kept across reloads with the settings they were built with: the ledger, the retry budget
    # and the breakers.
    for name in _RELIABILITY_KEPT:
        if getattr(old.config.reliability, name) != getattr(new.config.reliability, name):
            changed.append(f"reliability.{name}")
    # The service applies a lower limit at once; the transport's, set at start, caps a higher one.
    if new.config.limits.max_request_bytes > old.config.limits.max_request_bytes:
        changed.append("limits.max_request_bytes")
    # Likewise the streams one connection may open (``grpc.max_concurrent_streams``, from this).
    if new.config.reliability.max_concurrent_rpcs > old.config.reliability.max_concurrent_rpcs:
        changed.append("reliability.max_concurrent_rpcs")
    return changed


def _tls_changes(before: TlsConfig | None, after: TlsConfig | None) -> list[str]:
    """The TLS settings that wait for a restart: all but ``client_tenants`` (the server's
    credentials are built at start)."""
    if before is None or after is None:
        return [] if before is after else ["server.tls"]
    names = [name for name in TlsConfig.model_fields if name not in _TLS_RELOADED]
    return [f"server.tls.{name}" for name in names if getattr(before, name) != getattr(after, name)]


def _otel_pairs(text: str) -> dict[str, str]:
    """``key1=value1,key2=value2`` (the OTEL_* list format), percent-decoded."""
    from urllib.parse import unquote

    pairs: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            pairs[unquote(key.strip())] = unquote(value.strip())
    return pairs


# What gRPC takes as metadata (its core's validate_metadata): a key of lower-case letters, digits,
# '-', '_' and '.'; the value of a key not ending in "-bin" printable ASCII. Anything else fails
# every export, so it is refused at start.
_GRPC_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_GRPC_METADATA_VALUE = re.compile(r"[\x20-\x7e]*")


def _otlp_headers(text: str, source: str) -> dict[str, str]:
    """``$OTEL_EXPORTER_OTLP_HEADERS``, keys in lower case, as the SDK reads it (gRPC refuses
    "Authorization"); a header gRPC would refuse is a config error naming the variable, never
    showing a value (they hold the telemetry backend's keys), nor a name that is not one."""
    headers: dict[str, str] = {}
    for number, (key, value) in enumerate(_otel_pairs(text).items(), start=1):
        name = key.lower()
        if not _GRPC_METADATA_KEY.fullmatch(name):
            raise ConfigError(
                f"{source}: $OTEL_EXPORTER_OTLP_HEADERS: the name of header {number} is not one gRPC takes "
                "(letters, digits, '-', '_' and '.')"
            )
        if not name.endswith("-bin") and not _GRPC_METADATA_VALUE.fullmatch(value):
            raise ConfigError(
                f"{source}: $OTEL_EXPORTER_OTLP_HEADERS: the value of header {name!r} holds a character gRPC "
                "refuses (a line break, another control character or non-ASCII; the value is not shown)"
            )
        headers[name] = value
    return headers


TRACE_SAMPLERS = (
    "parentbased_traceidratio",
    "traceidratio",
    "parentbased_always_on",
    "always_on",
    "parentbased_always_off",
    "always_off",
)
"""The ``OTEL_TRACES_SAMPLER`` values routesvc takes (the SDK's built-in samplers); the ratio ones
sample ``sample_ratio`` of traces."""


def _http_url(url: str) -> SplitResult | None:
    """``url``'s parts when it is an absolute http(s) URL with a host and, if any, a port from 1 to
    65535; else None."""
    try:
        parts = urlsplit(url)
        usable = parts.scheme.lower() in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number from 0 to 65535, an unclosed [IPv6 address
        return None
    return parts if usable else None


def _checked_otlp_endpoint(url: str, where: str, source: str) -> None:
    """Refuse an OTLP endpoint with credentials (``user:password@``), whitespace or an invisible
    character, or an http(s) URL without a host or with a bad port. With credentials the exporter
    could not resolve the host, exported nothing, and logged the endpoint, password included, at
    every failed export. Other forms are gRPC targets the exporters pass to grpc as they are
    (``HOST:PORT``, ``unix:///PATH``, ``dns:///HOST:PORT``). The error names the setting or
    variable, never the URL."""

    if any(unicodedata.category(character)[0] in "CZ" for character in url):
        raise ConfigError(
            f"{source}: {where}: whitespace, a control or an invisible character in the URL (a trailing"
            " newline from a file?) (the URL is not shown)"
        )
    # The authority as written, with or without a scheme (``user:pw@host:4317`` too).
    if "@" in url.partition("://")[2 if "://" in url else 0].partition("/")[0]:
        raise ConfigError(
            f"{source}: {where}: credentials in the URL (user:password@) are not supported: the OTLP"
            " exporter cannot use them, and would log them; send them as headers with"
            " $OTEL_EXPORTER_OTLP_HEADERS (the URL is not shown)"
        )
    if url.partition("://")[0].lower() not in ("http", "https") or "://" not in url:
        return
    if _http_url(url) is None:
        raise ConfigError(
            f"{source}: {where}: an http(s) URL without a host or with a bad port; use http://HOST:4317"
            " (the URL is not shown)"
        )


def _resolve_telemetry(config: Config, catalog: Catalog, source: str, env: Mapping[str, str]) -> TelemetrySettings:
    telemetry = config.telemetry

    def endpoint_of(configured: str | None, field: str, variable: str) -> tuple[str, str]:
        """The signal's endpoint ("" when none is set), and where it was set."""
        for value, where in (
            (configured, f"telemetry.{field}.otlp_endpoint"),
            (env.get(variable), f"${variable}"),
            (env.get("OTEL_EXPORTER_OTLP_ENDPOINT"), "$OTEL_EXPORTER_OTLP_ENDPOINT"),
        ):
            if value:
                return value, where
        return "", ""

    traces_endpoint, traces_where = endpoint_of(
        telemetry.tracing.otlp_endpoint, "tracing", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    metrics_endpoint, metrics_where = endpoint_of(
        telemetry.metrics.otlp_endpoint, "metrics", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
    )
    disabled = env.get("OTEL_SDK_DISABLED", "").lower() == "true"

    def exporter(configured: str | None, variable: str, endpoint: str, where: str) -> str:
        chosen = configured or env.get(variable, "").split(",")[0].strip().lower() or ("otlp" if endpoint else "none")
        if chosen not in ("none", "console", "otlp"):
            raise ConfigError(f"{source}: ${variable}: unsupported exporter {chosen!r} (none, console, otlp)")
        chosen = "none" if disabled and configured is None else chosen
        if chosen == "otlp":
            if endpoint:
                # Only an endpoint exported to: one set for every pod, in a process whose telemetry
                # is off, is never used (nor logged).
                _checked_otlp_endpoint(endpoint, where, source)
            # The exporters speak OTLP over gRPC only: one told to use http/protobuf (port 4318)
            # would send gRPC to an HTTP endpoint and export nothing, failing quietly forever.
            signal = variable.removeprefix("OTEL_").removesuffix("_EXPORTER")
            for protocol_variable in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
                protocol = env.get(protocol_variable, "").strip().lower()
                if protocol:
                    if protocol != "grpc":
                        raise ConfigError(
                            f"{source}: ${protocol_variable}: routesvc exports OTLP over grpc only, "
                            f"not {protocol[:32]!r}"
                        )
                    break
        return chosen

    ratio = telemetry.tracing.sample_ratio
    if ratio is None:
        try:
            arg = float(env.get("OTEL_TRACES_SAMPLER_ARG", "1"))
        except ValueError as exc:
            raise ConfigError(f"{source}: $OTEL_TRACES_SAMPLER_ARG: not a number") from exc
        # float() reads "nan" and "inf" too: nan is no ratio (the sampler failed to build, a
        # traceback at start), nor is an infinity.
        if not math.isfinite(arg):
            raise ConfigError(f"{source}: $OTEL_TRACES_SAMPLER_ARG: not a number")
        ratio = min(max(arg, 0.0), 1.0)
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_traceidratio"
    if sampler not in TRACE_SAMPLERS:
        known = ", ".join(TRACE_SAMPLERS)
        raise ConfigError(f"{source}: $OTEL_TRACES_SAMPLER: unsupported sampler {sampler!r} ({known})")
    if telemetry.tracing.sample_ratio is not None and not sampler.endswith("traceidratio"):
        # The file wins: a ratio set there samples by ratio, whatever sampler the variable names.
        sampler = "parentbased_traceidratio"
    baseline = telemetry.baseline_model
    if baseline is None:
        baseline = max(catalog, key=lambda m: m.input_price_per_mtok + m.output_price_per_mtok).id
    elif baseline not in catalog:
        raise ConfigError(f"{source}: telemetry.baseline_model: unknown model {baseline!r}")
    resource = _otel_pairs(env.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    insecure = env.get("OTEL_EXPORTER_OTLP_INSECURE", "").lower() == "true"
    return TelemetrySettings(
        service_name=telemetry.service_name or env.get("OTEL_SERVICE_NAME") or resource.get("service.name", "routesvc"),
        resource_attributes=resource,
        traces_exporter=exporter(telemetry.tracing.exporter, "OTEL_TRACES_EXPORTER", traces_endpoint, traces_where),
        traces_endpoint=traces_endpoint or "http://localhost:4317",
        sample_ratio=ratio,
        sampler=sampler,
        metrics_exporter=exporter(telemetry.metrics.exporter, "OTEL_METRICS_EXPORTER", metrics_endpoint, metrics_where),
        metrics_endpoint=metrics_endpoint or "http://localhost:4317",
        metrics_interval_seconds=telemetry.metrics.export_interval_seconds,
        otlp_headers=_otlp_headers(env.get("OTEL_EXPORTER_OTLP_HEADERS", ""), source),
        # Each exporter by its own endpoint's scheme: http:// is plaintext (unless the variable
        # says every endpoint is).
        traces_insecure=insecure or (traces_endpoint or "http://").lower().startswith("http://"),
        metrics_insecure=insecure or (metrics_endpoint or "http://").lower().startswith("http://"),
        prometheus_host=telemetry.metrics.prometheus_host,
        prometheus_port=telemetry.metrics.prometheus_port,
        capture_content=telemetry.capture_content,
        baseline_model=baseline,
        stats_window_seconds=telemetry.stats_window_seconds,
        stats_max_requests=telemetry.stats_max_requests,
        rpc_conventions=_rpc_conventions(env.get("OTEL_SEMCONV_STABILITY_OPT_IN", "")),
    )


def _rpc_conventions(opt_in: str) -> frozenset[str]:
    """The RPC conventions ``$OTEL_SEMCONV_STABILITY_OPT_IN`` asks for, as OpenTelemetry's
    migration plan defines it: ``rpc/dup`` both (it wins over ``rpc``), ``rpc`` the stable ones
    alone, else the old ones; other categories in the list are not ours."""
    categories = {category.strip().lower() for category in opt_in.split(",")}
    if "rpc/dup" in categories:
        return frozenset({"old", "stable"})
    return frozenset({"stable"}) if "rpc" in categories else frozenset({"old"})


_HEADER_SAFE_KEY = re.compile(r"[\x21-\x7e]+")
"""An API key goes out in an HTTP header: visible ASCII only."""

_URL_BLANK_OR_CONTROL = re.compile(r"[\x00-\x20\x7f-\x9f\s]")
"""What a ``base_url`` may not hold anywhere: ``urlsplit`` strips it or deletes it (leading
blanks and controls, tabs and newlines) and checks what is left, while the HTTP clients refuse it
or send it on."""


def _checked_base_url(url: str, where: str, source: str) -> str:
    """A provider's ``base_url`` as the SDKs' HTTP clients can use it: an absolute http(s) URL with
    a host (and a valid port) and no credentials. Without a scheme (``127.0.0.1:8089``) every call
    failed as "connection failed"; with ``user:password@`` aiohttp refused every request beside the
    API key header, reported as a malformed stream; each counted against the breaker as an outage.
    The error names the field or variable, never the URL (it may hold a password).

    Whitespace or a control character anywhere (a trailing newline from a mounted secret's file)
    is refused, not stripped: ``urlsplit`` drops it and checked a URL other than the one used,
    which then failed the start with httpx's traceback (a newline), or every call as "connection
    failed" (a leading space) or HTTP 404 (a trailing one). So is any other invisible character
    (Unicode's control, format and separator categories: a zero-width space, a soft hyphen), and a
    host the SDKs' URL parser (httpx's, IDNA 2008) refuses: both passed ``urlsplit`` and failed the
    start with httpx's traceback, which printed the host."""

    import httpx2

    if _URL_BLANK_OR_CONTROL.search(url):
        raise ConfigError(
            f"{source}: {where}: whitespace or a control character in the URL (a trailing newline"
            " from a file?), which the HTTP client cannot use (the URL is not shown)"
        )
    if any(unicodedata.category(character)[0] in "CZ" for character in url):
        raise ConfigError(
            f"{source}: {where}: an invisible character in the URL (a zero-width space, soft hyphen,"
            " word joiner or byte order mark, pasted with it?), which the HTTP client cannot use"
            " (the URL is not shown)"
        )
    parts = _http_url(url)
    if parts is None:
        raise ConfigError(
            f"{source}: {where}: not an absolute http(s) URL with a host, such as http://HOST:PORT/v1"
            " (the URL is not shown)"
        )
    if "@" in parts.netloc:
        raise ConfigError(
            f"{source}: {where}: credentials in the URL (user:password@) are not supported: the HTTP client"
            " refuses them beside the API key's header (the URL is not shown)"
        )
    try:
        httpx2.URL(url)  # the SDKs' own parser, at their client's build (a host IDNA refuses)
        parsed = True
    except httpx2.InvalidURL:
        parsed = False  # raised below, outside this block: its message shows the host
    if not parsed:
        raise ConfigError(
            f"{source}: {where}: a host the HTTP client refuses (not a valid internationalized domain"
            " name: IDNA) (the URL is not shown)"
        )
    return url


def files_reread(config: Config) -> tuple[Path, ...]:
    """The files other than the config file that a hot reload reads again: the tenants' API keys
    files and the providers' key files (TLS files are read only at start)."""
    tenants = [tenant.api_keys_file for tenant in config.tenants.values() if tenant.api_keys_file is not None]
    providers = [provider.api_key_file for provider in config.providers.values() if provider.api_key_file is not None]
    return tuple(dict.fromkeys([*tenants, *providers]))


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def sha256_of(content: bytes | None) -> str | None:
    """The hex SHA-256 of ``content``; None for a file that could not be read."""
    return None if content is None else hashlib.sha256(content).hexdigest()


def _resolve_provider(
    name: str, provider: ProviderConfig, environ: Mapping[str, str], source: str, key_file: bytes | None
) -> ProviderSettings:
    """``key_file``: what ``provider.api_key_file`` held when read (None: not readable)."""
    key_env = provider.api_key_env if provider.api_key_env is not None else _DEFAULT_KEY_ENV[provider.kind]
    url_env = _DEFAULT_BASE_URL_ENV[provider.kind]
    base_url = provider.base_url or (environ.get(url_env) if url_env else None) or None
    if base_url is not None:
        where = f"providers.{name}.base_url" if provider.base_url else f"${url_env}"
        base_url = _checked_base_url(base_url, where, source)
    api_key: str | None = None
    from_file = not_text = False
    if key_file is not None:
        # Bytes that are not UTF-8 become U+FFFD, which no header carries: the key is unusable
        # (it raised UnicodeDecodeError, a traceback at start).
        api_key = key_file.decode("utf-8", errors="replace").strip() or None
        from_file = api_key is not None
        not_text = from_file and "\ufffd" in (api_key or "") and "\ufffd".encode() not in key_file
    if api_key is None and key_env:
        # Stripped as the file is: a secret made with `kubectl create secret --from-file` ends in
        # a newline, which no HTTP header can carry.
        api_key = environ.get(key_env, "").strip() or None
    requires_key = provider.requires_key if provider.requires_key is not None else provider.kind != "openai_compatible"
    unusable = api_key is not None and not _HEADER_SAFE_KEY.fullmatch(api_key)
    if unusable:
        # Sent as a header, such a key fails every call as a broken connection or stream, which
        # points nowhere near the key; the provider is unconfigured instead, and says why.
        api_key = None
    reason = detail = ""
    if unusable or (api_key is None and requires_key):
        reason = _missing_key(
            name, provider, key_env, unusable=unusable, from_file=from_file, not_text=not_text, shown="its api_key_file"
        )
        detail = _missing_key(
            name,
            provider,
            key_env,
            unusable=unusable,
            from_file=from_file,
            not_text=not_text,
            shown=f"file {provider.api_key_file}",
        )
    return ProviderSettings(
        name, provider.kind, base_url, api_key, reason, detail, provider.http_client, provider.stream_usage
    )


def _missing_key(
    name: str,
    provider: ProviderConfig,
    key_env: str,
    *,
    unusable: bool,
    from_file: bool,
    not_text: bool = False,
    shown: str,
) -> str:
    """Why a provider has no key, naming where it came from or where to set it, never the key;
    ``shown``: how the key file is named (its path for the operator's log, not for callers);
    ``not_text``: the file's bytes are not UTF-8 text."""
    if unusable:
        source = shown if from_file else f"environment variable {key_env}"
        what = "is not UTF-8 text" if not_text else "has spaces or control characters"
        return f"provider {name!r}: the API key in {source} {what}, which an HTTP header cannot carry"
    sources = [f"environment variable {key_env}"] if key_env else []
    if provider.api_key_file is not None:
        sources.append(shown)
    return f"provider {name!r} has no API key configured: set {' or '.join(sources) or 'api_key_env in the config'}"


# What Anthropic bills for prompt-cache writes, as multiples of the input price: 5-minute and 1-hour cache.
_ANTHROPIC_CACHE_WRITE = Decimal("1.25")
_ANTHROPIC_CACHE_WRITE_1H = Decimal(2)


def _cache_write_prices(model: ModelConfig, provider_kind: str) -> tuple[Decimal, Decimal]:
    """The model's cache write prices (5-minute, 1-hour): as configured, else the default for its provider's kind."""
    anthropic = provider_kind == "anthropic"
    write = model.cache_write_price_per_mtok
    if write is None:
        write = model.input_price_per_mtok * (_ANTHROPIC_CACHE_WRITE if anthropic else 1)
    write_1h = model.cache_write_1h_price_per_mtok
    if write_1h is None:
        write_1h = model.input_price_per_mtok * _ANTHROPIC_CACHE_WRITE_1H if anthropic else write
    return write, write_1h


def _catalog(config: Config) -> Catalog:
    return Catalog([_model_spec(model, config.providers[model.provider].kind) for model in config.models])


def _model_spec(model: ModelConfig, provider_kind: ProviderKind) -> ModelSpec:
    """A catalog model from its config, with every price a default stands in for resolved."""
    cache_write, cache_write_1h = _cache_write_prices(model, provider_kind)
    return ModelSpec(
        id=model.id,
        provider=model.provider,
        provider_model=model.provider_model or model.id,
        input_price_per_mtok=model.input_price_per_mtok,
        output_price_per_mtok=model.output_price_per_mtok,
        cached_input_price_per_mtok=(
            model.cached_input_price_per_mtok
            if model.cached_input_price_per_mtok is not None
            else model.input_price_per_mtok
        ),
        cache_write_price_per_mtok=cache_write,
        cache_write_1h_price_per_mtok=cache_write_1h,
        context_window=model.context_window,
        max_output_tokens=model.max_output_tokens,
        capabilities=frozenset(model.capabilities),
        batch_discount=model.batch_discount,
        unsupported_parameters=frozenset(model.unsupported_parameters),
        image_token_scale=model.image_token_scale,
        provider_kind=provider_kind,
    )


def _field_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong with a YAML text, and where, without the text itself: PyYAML's message quotes
    the line, which may hold a secret (a password in a Redis URL) and is logged on a reload."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return type(exc).__name__
    parts = [
        f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else text
        for text, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark))
        if text
    ]
    return "; ".join(parts) or "syntax error"


class _RepeatedKey(yaml.YAMLError):
    """A mapping key written twice, at ``path``, on lines ``first`` and ``second``."""

    def __init__(self, path: str, first: int, second: int) -> None:
        super().__init__(path)
        self.path = path
        self.first = first
        self.second = second


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _refuse_repeated_keys(node: yaml.Node, path: str, seen: set[int]) -> None:
    """Raise ``_RepeatedKey`` for the first mapping under ``node`` that has a key twice."""
    if id(node) in seen:  # an alias of a node already checked (or of one that holds it)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            child = f"{path}.{name}" if path else name
            # A merge key (<<) brings keys that the mapping's own may override, as YAML means.
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                tag_and_name = (key.tag, key.value)
                if tag_and_name in lines:
                    raise _RepeatedKey(child, lines[tag_and_name], key.start_mark.line + 1)
                lines[tag_and_name] = key.start_mark.line + 1
            _refuse_repeated_keys(value, child, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_repeated_keys(item, f"{path}[{index}]", seen)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping key written twice: PyYAML keeps the last one
    silently, so a tenant written again further down a long file lost its budget and allow-list."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _refuse_repeated_keys(node, "", set())
        return self.construct_document(node)


def _unquoted_name(path: tuple[int | str, ...], name: object) -> str:
    """The problem with a mapping key YAML did not read as a string (``123:``, ``no:``)."""
    shown = "null" if name is None else str(name).lower() if isinstance(name, bool) else str(name)
    example = shown  # as written
    if isinstance(name, bool):
        kind, example = "a boolean (unquoted yes, no, on, off, true and false are)", "yes" if name else "no"
    elif name is None:
        kind = "null (an unquoted ~ or null is)"
    else:
        kind = "a number" if isinstance(name, int | float) else f"a {type(name).__name__}"
    return f'{_field_path(path)}: YAML reads the name {shown} as {kind}: quote it as written, e.g. "{example}":'


def _checked_redis_url(config: Config, env: Mapping[str, str], source: str) -> str | None:
    """The Redis URL limits are counted at (the file's, else ``$ROUTESVC_REDIS_URL``), parsed as
    redis-py will parse it when the server starts: a bad one failed the start with a traceback
    that printed its password. The error names the field or variable, never the URL."""
    url = config.shared_state.redis_url or env.get(REDIS_URL_ENV) or None
    if url is None:
        return None
    where = "shared_state.redis_url" if config.shared_state.redis_url else f"${REDIS_URL_ENV}"
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{source}: {where}: must start with redis://, rediss:// or unix:// (the URL is not shown)")
    from redis.asyncio.connection import parse_url

    try:
        parse_url(url)
    except ValueError:
        # Not chained: the parser's message may quote the password (taken for a port).
        raise ConfigError(
            f"{source}: {where}: not a valid Redis URL (the URL is not shown): the form is"
            " redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], with a port from 0 to 65535 and a password's"
            " reserved characters percent-encoded"
        ) from None
    return url


def parse_config(text: str, source: str, environ: Mapping[str, str] | None = None) -> Settings:
    """Validate YAML ``text`` (from ``source``, for messages) and resolve it against ``environ``."""
    env = os.environ if environ is None else environ
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  # _UniqueKeyLoader is a SafeLoader
    except _RepeatedKey as exc:
        raise ConfigError(
            f"{source}: {exc.path}: written twice (lines {exc.first} and {exc.second}); YAML would keep the last"
            " one only"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(exc)}") from exc
    except RecursionError:
        # PyYAML composes (and the repeated-key check walks) nodes recursively.
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    except ValueError:
        # Python's own conversions in PyYAML's constructor, unmarked; their message may quote
        # the value (float() does), so it is not shown.
        raise ConfigError(
            f"{source}: not valid YAML: a value that cannot be read as its type (an integer of more than"
            " 4,300 digits, a date that does not exist?)"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = tuple(error["loc"])
            if location[-1:] == ("[key]",) and error["type"] == "string_type":
                problems.append(_unquoted_name(location[:-2], error["input"]))
                continue
            message = error["msg"].removeprefix("Value error, ")
            # Whole-config checks (references between sections) name their own field path.
            problems.append(f"{_field_path(_without_union_tags(location))}: {message}" if location else message)
        raise ConfigError(f"{source}: " + "; ".join(problems)) from exc
    # Each provider's key file is read once here, and fingerprinted as read (see Settings.files_sha256).
    key_files = {
        provider.api_key_file: _read_bytes(provider.api_key_file)
        for provider in config.providers.values()
        if provider.api_key_file is not None
    }
    providers = {
        name: _resolve_provider(
            name, provider, env, source, None if provider.api_key_file is None else key_files[provider.api_key_file]
        )
        for name, provider in config.providers.items()
    }
    # The tenants' keys files are read when the router is built, after this: one changed in
    # between differs from its digest here, so the watcher's first poll reads it again.
    files_sha256 = tuple(
        (path, sha256_of(key_files[path] if path in key_files else _read_bytes(path))) for path in files_reread(config)
    )
    catalog = _catalog(config)
    telemetry = _resolve_telemetry(config, catalog, source, env)
    return Settings(
        source=source,
        config=config,
        catalog=catalog,
        providers=providers,
        telemetry=telemetry,
        batch_store_path=config.batch.store_path or _data_dir(env) / "batches.db",
        redis_url=_checked_redis_url(config, env, source),
        files_sha256=files_sha256,
    )


def parse_config_file(data: bytes, source: str, environ: Mapping[str, str] | None = None) -> Settings:
    """``parse_config`` for a config file's bytes as read (from ``source``), noting their digest."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text") from exc
    return dataclasses.replace(parse_config(text, source, environ), text_sha256=sha256_of(data))


def _data_dir(env: Mapping[str, str]) -> Path:
    """Where routesvc keeps state: $ROUTESVC_DATA_DIR, else $XDG_DATA_HOME/routesvc, else ~/.local/share/routesvc."""
    if env.get(DATA_DIR_ENV):
        return Path(env[DATA_DIR_ENV])
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]) / "routesvc"
    return Path.home() / ".local" / "share" / "routesvc"


def _without_union_tags(location: tuple[int | str, ...]) -> tuple[int | str, ...]:
    # pydantic inserts the discriminator value ("rules") into locations inside tagged unions.
    kinds = {"rules", "classifier", "embedding", "cascade"}
    cleaned: list[int | str] = []
    for index, part in enumerate(location):
        if part in kinds and index > 0 and isinstance(location[index - 1], int) and "stages" in location[:index]:
            continue
        cleaned.append(part)
    return tuple(cleaned)


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the config at ``path``, else ``$ROUTESVC_CONFIG``, else the embedded default."""
    env = os.environ if environ is None else environ
    chosen = path or env.get(CONFIG_PATH_ENV)
    if chosen:
        try:
            data = Path(chosen).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{chosen}: cannot read: {exc.strerror}") from exc
        return parse_config_file(data, str(chosen), env)
    text = resources.files("routesvc").joinpath(DEFAULT_CONFIG_NAME).read_text(encoding="utf-8")
    return parse_config(text, f"<embedded {DEFAULT_CONFIG_NAME}>", env)


def client_target(environ: Mapping[str, str] | None = None) -> str:
    """Where client commands connect by default: ``$ROUTESVC_TARGET``, else localhost:50051."""
    env = os.environ if environ is None else environ
    return env.get(TARGET_ENV) or DEFAULT_TARGET
