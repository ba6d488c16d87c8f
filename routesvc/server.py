"""The grpc.aio server: RouterService, health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc
import structlog
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from routesvc.batches import BatchQueue
from routesvc.config import LoggingConfig, Settings, TlsConfig, changes_needing_restart
from routesvc.errors import ConfigError
from routesvc.health import HealthServicer
from routesvc.ledger import Ledger
from routesvc.providers.base import Provider
from routesvc.reload import ConfigWatcher
from routesvc.router import Router
from routesvc.rpc_tracing import traced_stream, traced_unary
from routesvc.service import RouterService
from routesvc.signals import STOP_SIGNALS, stop_signal_in
from routesvc.tasks import keep_until_done
from routesvc.telemetry import Telemetry, configure_logging
from routesvc.v1 import router_pb2

log = structlog.get_logger("routesvc.server")

# The most request metadata (headers) a call may carry, in bytes.
_MAX_METADATA_BYTES = 16 * 1024

# Streams a connection to the health port may open beside the capped Watch streams (its Checks).
_HEALTH_CHECK_STREAMS = 16
_INT32_MAX = 2**31 - 1

# Calls grpc holds arrived but not yet handed to the service, for each method, as a multiple of the
# streams one connection may open (``grpc.max_concurrent_streams``).
_PENDING_CALLS_PER_CONNECTION_WINDOW = 4
# grpc's own limits on those calls (soft, then hard), which the service never sets lower.
_GRPC_DEFAULT_PENDING_CALLS = 1000
_GRPC_DEFAULT_PENDING_CALLS_HARD_LIMIT = 3000


def _pending_calls_options(streams: int) -> list[tuple[str, int]]:
    """grpc's limits on calls that arrived and wait for the event loop to take them up: grpc
    CANCELs the calls past them (1,000 by default, at random from there to 3,000) before the
    service sees them, with no status of ours, no log line and no count. grpc counts them for
    each registered method apart (Route, Complete, GetStats, ... each its own queue, and the
    health and reflection methods theirs), over all connections together. Both are set to
    four times the ``streams`` one connection may open (8,096 by default; equal, as grpc
    CANCELs at random between them), so that bursts of one method from several connections at
    once up to four full windows (the calls the service caps, which it sheds itself with
    RESOURCE_EXHAUSTED OVERLOADED, and the health watchers) are not cut by grpc; but never
    lower than grpc's own 1,000 and 3,000: a small ``streams`` (8 + 8 gave 64) had grpc CANCEL
    190 of 256 calls at once that its defaults let through. Past them grpc still CANCELs,
    unseen. The limits count calls, not bytes: a call waiting there holds its call object,
    headers and whole request message, up to ``limits.max_request_bytes`` (4 MiB by default)
    and ~15 KB more (measured: ~15 KB a 1 KB Route, ~1 MB a 1 MB one, 3.9 MB a 4 MB one), so one
    method's full queue may hold up to ~8,096 x 4 MiB, ~32 GiB, by default, and each method its
    own: the bound is per method and count-based, not a memory bound of the process
    (docs/api.md)."""
    window = _PENDING_CALLS_PER_CONNECTION_WINDOW * streams
    return [
        ("grpc.server.max_pending_requests", min(max(window, _GRPC_DEFAULT_PENDING_CALLS), _INT32_MAX)),
        (
            "grpc.server.max_pending_requests_hard_limit",
            min(max(window, _GRPC_DEFAULT_PENDING_CALLS_HARD_LIMIT), _INT32_MAX),
        ),
    ]


SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


def build_providers(settings: Settings) -> dict[str, Provider]:
    """One adapter per configured provider that has credentials (or needs none)."""
    from routesvc.providers.anthropic import AnthropicProvider
    from routesvc.providers.openai import OpenAIProvider

    providers: dict[str, Provider] = {}
    max_event_bytes = settings.config.reliability.max_event_bytes
    for name, provider in settings.providers.items():
        if not provider.configured:
            continue
        if provider.kind == "anthropic":
            providers[name] = AnthropicProvider(
                name,
                provider.api_key,
                provider.base_url,
                http_client=provider.http_client,
                max_event_bytes=max_event_bytes,
            )
        else:
            providers[name] = OpenAIProvider(
                name,
                provider.api_key,
                provider.base_url,
                provider.kind,
                http_client=provider.http_client,
                stream_usage=provider.stream_usage,
                max_event_bytes=max_event_bytes,
            )
    return providers


class _EncryptedKey(Exception):
    """The key file asked for a passphrase (grpc has no way to give one)."""


def _refuse_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt for the passphrase on the terminal.
    raise _EncryptedKey


def _check_tls_files(tls: TlsConfig) -> None:
    """Refuse TLS files grpc cannot use, naming the field, never what the files hold: grpc checks
    them only as it binds the port, whose failure was reported as the port being in use."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # grpc (BoringSSL) has no security levels: a 1024-bit RSA key or a SHA-1-signed certificate,
    # which OpenSSL 3's default level refuses, binds and serves there, so it is not refused here.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    certificates = [("cert_file", tls.cert_file)]
    if tls.client_ca_file is not None:
        certificates.append(("client_ca_file", tls.client_ca_file))
    for field, path in certificates:
        try:
            context.load_verify_locations(cafile=path)
        except ssl.SSLError:
            # Not chained: the error is OpenSSL's, about bytes that may be a key.
            raise ConfigError(
                f"server.tls.{field}: {path} holds no PEM certificate (a key, or the files swapped?)"
            ) from None
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_refuse_passphrase)
    except _EncryptedKey:
        raise ConfigError(
            f"server.tls.key_file: {tls.key_file} is protected by a passphrase, which grpc cannot use"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = f"the key in {tls.key_file} does not match the certificate of server.tls.cert_file"
        elif exc.reason is None:
            problem = f"{tls.key_file} holds no PEM private key"
        else:  # OpenSSL's reason code (EE_KEY_TOO_SMALL...), never what the files hold
            problem = f"{tls.key_file} with server.tls.cert_file is refused by OpenSSL ({exc.reason})"
        raise ConfigError(f"server.tls.key_file: {problem}") from None


def _server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS credentials; with a client CA, clients must present a certificate it signed."""
    try:
        key, chain = tls.key_file.read_bytes(), tls.cert_file.read_bytes()
        client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    except OSError as exc:
        raise ConfigError(f"server.tls: cannot read {exc.filename}: {exc.strerror}") from exc
    _check_tls_files(tls)
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _lenient_parser(message_type: type[Message]) -> Callable[[bytes], Message | None]:
    """Parse a request, or give None for bytes that are not one (corrupt, invalid UTF-8), so
    the service answers INVALID_ARGUMENT instead of the transport's UNKNOWN."""

    def parse(data: bytes) -> Message | None:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return None

    return parse


def _service_handlers(service: RouterService, telemetry: Telemetry) -> dict[str, grpc.RpcMethodHandler]:
    """RouterService's handlers, built from the proto descriptor: lenient request parsing, and
    every call in its server span (``rpc_tracing``)."""
    descriptor = router_pb2.DESCRIPTOR.services_by_name["RouterService"]
    handlers = {}
    for method in descriptor.methods:
        request_type = getattr(router_pb2, method.input_type.name)
        response_type = getattr(router_pb2, method.output_type.name)
        streaming = method.server_streaming
        make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        behaviour = getattr(service, method.name)
        if streaming:
            traced = traced_stream(
                telemetry, SERVICE_NAME, method.name, behaviour, lambda: service.client_write_timeout
            )
        else:
            traced = traced_unary(telemetry, SERVICE_NAME, method.name, behaviour)
        handlers[method.name] = make(
            traced,
            request_deserializer=_lenient_parser(request_type),
            response_serializer=response_type.SerializeToString,
        )
    return handlers


def _freeze_heap() -> None:
    """Collect, then move every object alive now out of the cycle collector's reach (``gc.freeze``).

    About 240,000 objects are built at start (WordLlama, catalogs, protobuf descriptors, the SDKs);
    left in the collected generations, every full collection walks them all and holds the event
    loop ~170 ms, stalling every stream in flight (one such pause in 10 s of 32 streams, measured
    with ``gc.callbacks``); frozen, the same collection takes ~2 ms. Frozen objects are still freed
    by reference counting; only cycles among them wait for the next ``gc.unfreeze``.
    """
    gc.collect()
    gc.freeze()


class Server:
    """A running routesvc server. ``async with Server(settings) as server`` starts it on
    ``server.port``; leaving the block (or ``aclose``) drains and stops it. ``telemetry``
    (default: built from ``settings.telemetry``) is shut down with the server. ``reuse_port``
    lets several processes listen on one port (see ``routesvc.supervisor``). ``freeze_heap``
    (``routesvc serve`` sets it) freezes the heap built at start and again after a reload: a
    process-wide setting, so it is off for servers embedded in other programs and tests."""

    def __init__(
        self,
        settings: Settings,
        *,
        providers: Mapping[str, Provider] | None = None,
        port: int | None = None,
        telemetry: Telemetry | None = None,
        reuse_port: bool = False,
        freeze_heap: bool = False,
    ) -> None:
        self._settings = settings
        self._started_with = settings  # what is read only at start keeps these values
        self.telemetry = telemetry or Telemetry(settings)
        ledger = Ledger(settings.config.reliability.ledger_entries)
        # Batch jobs outlive routers (hot reload) and restarts: the queue belongs to the server,
        # and reads the models of whichever router is current.
        self.batches = BatchQueue(
            settings,
            ledger,
            catalog=lambda: self.router.settings.catalog,
            spend=lambda tenant, usd, at: self.router.admission.charge(tenant, usd, at=at),
            shared_budgets=settings.redis_url is not None,
            answered=self.telemetry.record_batch_answer,
        )
        self._router = Router(
            settings,
            build_providers(settings) if providers is None else providers,
            ledger=ledger,
            batches=self.batches,
        )
        options: list[tuple[str, int]] = [
            ("grpc.max_receive_message_length", settings.config.limits.max_request_bytes + 1024),
            # Request metadata: up to 16 KiB taken, more refused. grpc's soft limit (8 KiB by
            # default) refuses calls between the two limits at random; it is set to the hard one.
            ("grpc.max_metadata_size", _MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", _MAX_METADATA_BYTES),
            # Only a worker of ``server.workers`` shares its port; otherwise a second server
            # on the same port is an error, not a silent split of the traffic.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
        # Streams one connection may open at once (HTTP/2 SETTINGS; grpc's default is unbounded):
        # enough for the calls and health watchers the service itself caps, whose refusals
        # (OVERLOADED, RESOURCE_EXHAUSTED) then still come at once instead of the client queueing.
        watchers = settings.config.server.max_health_watch_streams
        streams = settings.config.reliability.max_concurrent_rpcs + watchers
        # gRPC takes it as a 32-bit count: an "unlimited" max_concurrent_rpcs must not stop the start.
        options.append(("grpc.max_concurrent_streams", min(streams, _INT32_MAX)))
        options.extend(_pending_calls_options(streams))
        max_age = settings.config.server.max_connection_age_seconds
        if max_age:
            # GOAWAY after this long; streams in flight finish (grpc's grace is unlimited by default).
            options.append(("grpc.max_connection_age_ms", int(max_age * 1000)))
        self._server = grpc.aio.server(options=options)
        self._health = HealthServicer(watchers, settings.config.server.max_health_watch_streams_per_peer)
        self._service = RouterService(self._router, self.telemetry, batches=self.batches)
        self._server.add_registered_method_handlers(SERVICE_NAME, _service_handlers(self._service, self.telemetry))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        if settings.config.server.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
            )
        host = settings.config.server.host
        serving_port = settings.config.server.port if port is None else port
        local = "127.0.0.1" if host in ("0.0.0.0", "[::]", "::") else host
        tls = settings.config.server.tls
        credentials = None if tls is None else _server_credentials(tls)  # unreadable files fail here
        # Health alone, in plaintext, for probes that cannot speak TLS: the same servicer, so a
        # drain turns both ports NOT_SERVING at once. Bound before the serving port, so that a
        # health port it cannot have leaves nothing bound (grpc cannot release a port of a server
        # that never started: a serving port that then fails to bind leaves this one bound until
        # the process ends, which for `routesvc serve` is at once).
        self._health_server: grpc.aio.Server | None = None
        self.health_target = ""
        health_port = settings.config.server.health_port
        if health_port is not None:
            if health_port and health_port == serving_port:
                raise ConfigError(f"server.health_port: {health_port} is the serving port too; choose another")
            health_options = [
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                ("grpc.max_concurrent_streams", min(watchers + _HEALTH_CHECK_STREAMS, _INT32_MAX)),
                *_pending_calls_options(watchers + _HEALTH_CHECK_STREAMS),
            ]
            self._health_server = grpc.aio.server(options=health_options)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            try:
                health_port = self._health_server.add_insecure_port(f"{host}:{health_port}")
            except RuntimeError as exc:
                raise ConfigError.port_in_use("server.health_port", host, health_port) from exc
            self.health_target = f"{local}:{health_port}"
        address = f"{host}:{serving_port}"
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        self.target = f"{local}:{self.port}"
        self._stopped = asyncio.Event()
        self._freeze_heap = freeze_heap
        # Routers a reload replaced, not yet closed: True when their providers are theirs to close,
        # False when the router after them kept the providers (then only their policy is theirs).
        self._retired: dict[Router, bool] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()

    @property
    def router(self) -> Router:
        """The router behind the service."""
        return self._router

    async def reload(self, settings: Settings) -> None:
        """Serve new calls with ``settings``; calls in flight finish on the old configuration.

        Providers are rebuilt only when their settings (or ``reliability.max_event_bytes``)
        changed; the old ones are closed once
        the calls running at the swap (the only ones that can still use them) have ended.
        What is read only at start (listening, TLS, logging, telemetry but its baseline model,
        batch, shared state) keeps its old value until a restart, and the reload logs which of
        those it changed; telemetry names and prices the calls the new router serves by
        ``settings``. The new policy is built in a worker thread (calls go on being served
        meanwhile); reloads run one at a time, so each replaces the router the one before
        swapped in.
        """
        async with self._reloading:
            await self._reload(settings)

    async def _reload(self, settings: Settings) -> None:
        old = self._router
        # The adapters' transports hold the event bound: a new one needs new adapters.
        same_providers = (
            settings.providers == old.settings.providers
            and settings.config.reliability.max_event_bytes == old.settings.config.reliability.max_event_bytes
        )
        providers = old.providers if same_providers else build_providers(settings)
        router: Router | None = None
        try:
            router = await old.reconfigured(settings, providers)
            # Reads the tenants' API keys files: one it cannot read rejects the reload here.
            self._service.swap_router(router)
        except BaseException:
            # Nothing was swapped in: close what this reload built (the policy's feedback stores,
            # new provider clients), never what the old router still serves with.
            if router is not None:
                await router.close_policy()
            if not same_providers:
                for provider in providers.values():
                    await provider.aclose()
            raise
        self._router = router
        # With no await since the swap: a call the new router serves is named and priced by its
        # settings (a call in flight by its old router's, as it was routed and charged).
        self.telemetry.reconfigure(settings)
        waiting = changes_needing_restart(self._started_with, settings)
        if waiting:
            log.warning("config_reload_needs_restart", fields=waiting)
        self._settings = settings
        # The batch queue outlives routers: it sends and polls with the new credentials too.
        self.batches.use_providers(settings.providers)
        # The old router is closed once the calls running at the swap have ended: its providers
        # when the new router has its own, else only its policy's feedback stores.
        self._retired[old] = not same_providers
        try:
            # Feedback calls teach the new policy from here on (those it missed while it was
            # built are read again into it); until then they teach the old one, whose stores
            # must stay open, so its retirement starts only now (also if a stop cuts this short).
            await router.take_over_feedback()
        finally:
            retiring = asyncio.get_running_loop().create_task(
                self._retire(old, self._service.calls_in_flight()),
                name="retire-router",
            )
            keep_until_done(retiring, self._retiring)
        if self._freeze_heap:
            # The new router's objects join the frozen ones; cycles the old one leaves are
            # collected once here (a single pause per reload) instead of never.
            gc.unfreeze()
            _freeze_heap()

    async def _retire(self, router: Router, calls: frozenset[asyncio.Task[object]]) -> None:
        """Close ``router`` once ``calls`` (those that may still use it) have ended."""
        if calls:
            await asyncio.wait(calls)
        await self._close_retired(router)

    async def _close_retired(self, router: Router) -> None:
        """Close a replaced router: its providers too when they are its own, else only its policy."""
        if self._retired[router]:
            await router.aclose()
        else:
            await router.close_policy()
        del self._retired[router]

    async def start(self) -> None:
        """Start serving, report SERVING, and watch the config file when there is one."""
        await self.batches.start()
        if self._freeze_heap:
            _freeze_heap()  # before the port accepts calls: the one full collection pauses nobody
        await self._server.start()
        if self._health_server is not None:
            try:
                await self._health_server.start()
            except BaseException:
                await self._server.stop(0)
                raise
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        interval = self._settings.config.server.reload_interval_seconds
        # Settings read from a file name it as their source; embedded or in-memory ones "<...>".
        # Only a regular file (a ConfigMap's symlinks lead to one) is watched: a pipe
        # (``--config <(envsubst ...)``) held the config once and reads empty after.
        source = self._settings.source
        if interval > 0 and not source.startswith("<") and await asyncio.to_thread(Path(source).is_file):
            reloads = self.telemetry.instruments.config_reloads
            # Started from what this server's settings were parsed from, not from the file now.
            watcher = ConfigWatcher(
                Path(self._settings.source),
                interval,
                self.reload,
                applied=self._settings,
                outcome=lambda o: reloads.add(1, {"outcome": o}),
            )
            self._watcher = asyncio.get_running_loop().create_task(watcher.run(), name="config-watcher")
        loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]  # "uvloop" or "asyncio"
        log.info(
            "server_started",
            target=self.target,
            service=SERVICE_NAME,
            event_loop=loop,
            **({"health_target": self.health_target} if self.health_target else {}),
        )
        # Route works without credentials, so health stays SERVING; but Complete cannot reach a
        # provider without its key, which an operator should see at start, not at the first call.
        providers = self._settings.providers
        for name, provider in providers.items():
            if not provider.configured:
                log.warning("provider_unconfigured", provider=name, reason=provider.missing_key_detail)
        if providers and not any(provider.configured for provider in providers.values()):
            log.error("no_provider_configured", detail="every Complete will fail until a provider key is set")

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def aclose(self) -> None:
        """Drain in order: health NOT_SERVING, wait the drain delay, end health Watch streams,
        stop(grace), close providers."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._watcher is not None:
            self._watcher.cancel()
            # The watcher logs and survives a bad reload; whatever else ended it must not stop the drain.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
        server_config = self._settings.config.server
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if server_config.drain_delay_seconds:
            await asyncio.sleep(server_config.drain_delay_seconds)
        grace = server_config.grace_seconds
        # Calls still running shortly before the grace ends are ended with a status (and the
        # committed trailers) rather than cut by the transport.
        margin = min(2.0, grace / 4)
        # Health Watch streams end here, having streamed NOT_SERVING: left open, each would hold
        # the stop below for the whole grace like a call in flight (both ports share the servicer).
        await self._health.close()
        async with asyncio.TaskGroup() as group:
            # grpc's stop cuts the calls still running once the grace has passed from now.
            cut_at = asyncio.get_running_loop().time() + grace
            interrupter = group.create_task(self._interrupt_after(grace - margin, margin, cut_at))
            await self._server.stop(grace)
            interrupter.cancel()
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self.batches.aclose()
        await self._router.aclose()
        await self._router.admission.aclose()
        for retiring in list(self._retiring):
            retiring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retiring
        for retired in list(self._retired):
            await self._close_retired(retired)
        await asyncio.to_thread(self.telemetry.shutdown)
        log.info("server_stopped", target=self.target)

    async def _interrupt_after(self, seconds: float, margin: float, cut_at: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
        interrupted = self._service.interrupt_in_flight(cut_at)
        if interrupted:
            log.info("server_interrupted_calls", calls=interrupted)
            # Streams end at their next message; those waiting on a slow provider are cancelled.
            await asyncio.sleep(margin / 2)
            self._service.cancel_in_flight()

    async def wait(self) -> None:
        """Wait until the server terminates."""
        await self._server.wait_for_termination()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def stopped_while_starting(error: BaseException, logging: LoggingConfig | None) -> bool:
    """Whether a stop signal is behind ``error``, raised while the process started
    (``routesvc.signals``): then start-up ended as the signal asked, and it is logged
    (``server_not_started``) with ``logging``, the config's (None before it was read: the
    default's); the caller exits 0. False: ``error`` is the caller's to raise."""
    stop = stop_signal_in(error)
    if stop is None:
        return False
    configure_logging(logging or LoggingConfig())
    log.info("server_not_started", reason="stopped by a signal while starting", signal=stop.name)
    return True


async def serve(settings: Settings, port: int | None = None, *, reuse_port: bool = False) -> None:
    """Run until SIGTERM, SIGINT or SIGHUP (the session went away), then drain gracefully
    (``reuse_port``: as one of several workers). Until the server is built, such a signal raises
    ``StopSignal`` in a process that took them at its start (``routesvc.signals``), and the server
    is not started at all; from then on it drains the server."""
    server = Server(settings, port=port, reuse_port=reuse_port, freeze_heap=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    await stop.wait()
    log.info("server_draining")
    await server.aclose()
