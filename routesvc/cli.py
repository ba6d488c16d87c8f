"""The ``routesvc`` command: ``serve``, and client commands for people and scripts."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from google.protobuf import duration_pb2, json_format
from google.rpc import error_details_pb2, status_pb2
from pydantic import ValidationError

from routesvc import config as config_module
from routesvc import offline
from routesvc.client import RouterClient, build_chat, image_part, tls_credentials
from routesvc.errors import ConfigError, RouteSvcError
from routesvc.signals import stop_on_signals
from routesvc.v1 import router_pb2 as pb

_MODE_NAMES = {pb.MODE_UNSPECIFIED: "unspecified", pb.MODE_REALTIME: "realtime", pb.MODE_BATCH: "batch"}
_FINISH_NAMES = {
    pb.FINISH_REASON_UNSPECIFIED: "unspecified",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_CONTENT_FILTER: "content_filter",
    pb.FINISH_REASON_OTHER: "other",
}
_INT32_MAX = 2**31 - 1
_MAX_DURATION_SECONDS = 315_576_000_000


def _decision_json(decision: pb.RouteDecision) -> dict[str, object]:
    return {
        "decision_id": decision.decision_id,
        "model": decision.model,
        "provider": decision.provider,
        "strategy": decision.strategy,
        "rule": decision.rule,
        "reasons": list(decision.reasons),
        "task": decision.task,
        "estimated_input_tokens": decision.estimated_input_tokens,
        "estimated_output_tokens": decision.estimated_output_tokens,
        "estimated_cost_usd": decision.estimated_cost_usd,
        "routing_cost_usd": decision.routing_cost_usd,
        "mode": _MODE_NAMES.get(decision.mode, "unspecified"),
        "candidates": [
            {"model": c.model, "eligible": c.eligible, "excluded_reason": c.excluded_reason}
            for c in decision.candidates
        ],
    }


def _completion_json(completion: pb.Completion) -> dict[str, object]:
    return {
        "type": "completion",
        "model": completion.model,
        "provider": completion.provider,
        "provider_model": completion.provider_model,
        "input_tokens": completion.usage.input_tokens,
        "output_tokens": completion.usage.output_tokens,
        "cached_input_tokens": completion.usage.cached_input_tokens,
        "cost_usd": completion.cost_usd,
        "finish_reason": _FINISH_NAMES.get(completion.finish_reason, "other"),
        "total_input_tokens": completion.total_usage.input_tokens,
        "total_output_tokens": completion.total_usage.output_tokens,
        "attempts": [
            {"model": a.model, "outcome": pb.AttemptOutcome.Name(a.outcome), "cost_usd": a.cost_usd}
            for a in completion.attempts
        ],
        "quality": (
            {
                "score": completion.quality.score,
                "scorer": completion.quality.scorer,
                "reason": completion.quality.reason,
            }
            if completion.HasField("quality")
            else None
        ),
    }


_BATCH_STATES = {
    pb.BATCH_STATE_UNSPECIFIED: "unspecified",
    pb.BATCH_STATE_QUEUED: "queued",
    pb.BATCH_STATE_SUBMITTED: "submitted",
    pb.BATCH_STATE_SUCCEEDED: "succeeded",
    pb.BATCH_STATE_FAILED: "failed",
    pb.BATCH_STATE_EXPIRED: "expired",
    pb.BATCH_STATE_CANCELLED: "cancelled",
}


def _batch_json(job: pb.BatchJob) -> dict[str, object]:
    return {
        "batch_id": job.batch_id,
        "state": _BATCH_STATES.get(job.state, "unspecified"),
        "model": job.model,
        "provider": job.provider,
        "estimated_cost_usd": job.estimated_cost_usd,
        "decision_id": job.decision_id,
    }


def _escalation_json(escalation: pb.Escalation) -> dict[str, object]:
    return {
        "type": "escalation",
        "from_model": escalation.from_model,
        "to_model": escalation.to_model,
        "score": escalation.quality.score,
        "scorer": escalation.quality.scorer,
        "reason": escalation.quality.reason,
        "threshold": escalation.threshold,
        "cost_usd": escalation.cost_usd,
    }


class InputError(RouteSvcError):
    """What a command reads from standard input is not usable (never sent: nothing to map)."""

    reason = "INVALID_INPUT"


def _stdin_text() -> str:
    """Standard input as text, strictly UTF-8 whatever the locale: a prompt is sent as UTF-8, and
    text read in another encoding (or with surrogate escapes) cannot be."""
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("standard input is not UTF-8") from None


def _request_parts(args: argparse.Namespace) -> tuple[pb.ChatRequest, pb.RoutingContext]:
    prompt = _stdin_text() if args.prompt == "-" else args.prompt
    messages: list[tuple[str, str] | pb.Message] = [("system", args.system)] if args.system else []
    images = [image_part(image if image.startswith("https://") else Path(image)) for image in args.image]
    messages.append(pb.Message(role=pb.ROLE_USER, content=prompt, parts=images))
    tools = [
        pb.Tool(name=f"tool_{index}", description=f"placeholder tool {index}") for index in range(1, args.tools + 1)
    ]
    chat = build_chat(messages, tools=tools, max_output_tokens=args.max_output_tokens, stop=args.stop)
    context = pb.RoutingContext(
        tenant=args.tenant, user_tier=args.tier, task_hint=args.task, model=args.model, max_cost_usd=args.max_cost
    )
    if args.no_realtime:
        context.realtime = False
    if args.cascade is not None:
        context.cascade = args.cascade
    for key, value in args.metadata:
        context.metadata[key] = value
    return chat, context


async def _route(args: argparse.Namespace) -> int:
    chat, context = _request_parts(args)
    async with _client(args) as client:
        decision = await client.route(chat, context, timeout=args.timeout)
    if args.json:
        print(json.dumps(_decision_json(decision)))
    else:
        print(f"model:     {decision.model} ({decision.provider})")
        print(f"mode:      {_MODE_NAMES.get(decision.mode)}")
        print(f"strategy:  {decision.strategy} / {decision.rule}")
        print(f"estimate:  {decision.estimated_input_tokens} input tokens, {decision.estimated_cost_usd} USD")
        for reason in decision.reasons:
            print(f"  - {reason}")
    return 0


def _target_flag(args: argparse.Namespace) -> str:
    """`` --target HOST:PORT`` for a command to print when the target is not the default one."""
    return "" if args.target == config_module.client_target() else f" --target {args.target}"


async def _complete(args: argparse.Namespace) -> int:
    chat, context = _request_parts(args)
    async with _client(args) as client:
        async for message in client.complete(chat, context, timeout=args.timeout):
            kind = message.WhichOneof("event")
            if args.json:
                if kind == "decision":
                    print(json.dumps({"type": "decision", **_decision_json(message.decision)}), flush=True)
                elif kind == "delta":
                    print(json.dumps({"type": "delta", "text": message.delta.text}), flush=True)
                elif kind == "escalation":
                    print(json.dumps(_escalation_json(message.escalation)), flush=True)
                elif kind == "batch":
                    print(json.dumps({"type": "batch", **_batch_json(message.batch)}), flush=True)
                else:
                    print(json.dumps(_completion_json(message.completion)), flush=True)
            elif kind == "decision":
                print(f"[{message.decision.model} via {message.decision.rule}]", file=sys.stderr)
            elif kind == "delta":
                sys.stdout.write(message.delta.text)
                sys.stdout.flush()
            elif kind == "escalation":
                escalation = message.escalation
                print(
                    f"[escalated {escalation.from_model} -> {escalation.to_model}: score {escalation.quality.score:g} "
                    f"< {escalation.threshold:g} ({escalation.quality.scorer}: {escalation.quality.reason})]",
                    file=sys.stderr,
                )
            elif kind == "batch":
                job = message.batch
                print(job.batch_id)
                print(
                    f"[batch job {_BATCH_STATES.get(job.state)} on {job.model}, estimate {job.estimated_cost_usd} USD; "
                    f"'routesvc batch get{_target_flag(args)} {job.batch_id}' fetches the answer]",
                    file=sys.stderr,
                )
            else:
                completion = message.completion
                print()
                print(
                    f"[{completion.model}: {completion.usage.input_tokens} in / {completion.usage.output_tokens} out, "
                    f"{completion.cost_usd} USD, {_FINISH_NAMES.get(completion.finish_reason)}]",
                    file=sys.stderr,
                )
    return 0


async def _models(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        models = await client.list_models(timeout=args.timeout)
    if args.json:
        print(
            json.dumps(
                [json_format.MessageToDict(model, always_print_fields_with_no_presence=True) for model in models]
            )
        )
        return 0
    for model in models:
        state = "available" if model.available else f"unavailable: {model.unavailable_reason}"
        print(
            f"{model.id:<20} {model.provider:<12} "
            f"in ${model.input_price_per_mtok}/M out ${model.output_price_per_mtok}/M "
            f"ctx {model.context_window:<7} {','.join(model.capabilities):<16} {state}"
        )
    return 0


async def _batch(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if args.action == "cancel":
            job = await client.cancel_batch(args.batch_id, tenant=args.tenant, timeout=args.timeout)
            response = pb.GetBatchResponse(job=job)
        else:
            response = await client.get_batch(args.batch_id, tenant=args.tenant, timeout=args.timeout)
    job_json = _batch_json(response.job)
    result = response.result if response.HasField("result") else None
    if args.json:
        output: dict[str, object] = {**job_json, "error": response.error}
        if result is not None:
            output.update(
                text=result.text,
                input_tokens=result.usage.input_tokens,
                output_tokens=result.usage.output_tokens,
                cost_usd=result.cost_usd,
                finish_reason=_FINISH_NAMES.get(result.finish_reason, "other"),
            )
        print(json.dumps(output))
        return 0
    print(
        f"{job_json['batch_id']}: {job_json['state']} on {job_json['model']}"
        + (f" ({response.error})" if response.error else "")
    )
    if result is not None:
        print(result.text)
        print(
            f"[{result.usage.input_tokens} in / {result.usage.output_tokens} out, "
            f"{result.cost_usd} USD at the batch price]",
            file=sys.stderr,
        )
    return 0


def _ms(duration: duration_pb2.Duration) -> str:
    return f"{duration.ToNanoseconds() / 1e6:.1f} ms"


async def _stats(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        stats = await client.get_stats(tenant=args.tenant, window_seconds=args.window, timeout=args.timeout)
    if args.json:
        print(
            json.dumps(
                json_format.MessageToDict(
                    stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                )
            )
        )
        return 0
    totals = stats.totals
    print(f"window:         {stats.window.ToNanoseconds() / 1e9:g} s ({stats.tenant or 'all tenants'})")
    print(f"requests:       {totals.requests} ({totals.errors} errors, {stats.fallbacks} fallbacks)")
    print(f"cost:           {totals.cost_usd} USD")
    priced_on = (
        f"on {stats.baseline_model}: a reload changed the baseline in the window"
        if ", " in stats.baseline_model
        else f"all on {stats.baseline_model}"
    )
    print(f"baseline cost:  {totals.baseline_cost_usd} USD ({priced_on})")
    print(f"savings:        {totals.savings_usd} USD ({totals.savings_percent:.1f}%)")
    print(f"escalations:    {stats.escalations} (rate {stats.escalation_rate * 100:.1f}%)")
    if stats.cascade_decisions:
        print(f"cascade:        {stats.cascade_decisions} decisions, {stats.cascade_release_rate * 100:.1f}% released")
    for name, values in (("latency", stats.latency), ("first token", stats.time_to_first_token)):
        print(f"{name + ':':<15} p50 {_ms(values.p50)}, p95 {_ms(values.p95)}, p99 {_ms(values.p99)}")
    print("models:")
    for row in stats.models:
        print(
            f"  {row.model:<20} {row.totals.requests:>6} {row.share * 100:5.1f}%  cost {row.totals.cost_usd} USD, "
            f"saved {row.totals.savings_usd} USD"
            + (f", feedback {row.mean_feedback_score:.2f} ({row.feedback_count})" if row.feedback_count else "")
        )
    if len(stats.tenants) > 1 or stats.other_tenant_count:
        print("tenants:")
        for tenant in stats.tenants:
            print(f"  {tenant.tenant or '(none)':<20} {tenant.totals.requests:>6}  cost {tenant.totals.cost_usd} USD")
        if stats.other_tenant_count:
            others = stats.other_tenant_totals
            print(
                f"  ... and {stats.other_tenant_count} other tenants: {others.requests} requests, "
                f"cost {others.cost_usd} USD"
            )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from routesvc.errors import ModelNotFound
    from routesvc.simulate import SimulationDataError, parse_model_map, read_prompts, simulate

    settings = config_module.load_settings(args.config)
    try:
        report = asyncio.run(simulate(settings, read_prompts(Path(args.data)), parse_model_map(args.model_map)))
    except (SimulationDataError, ModelNotFound) as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_json()) if args.json else report.as_text())
    return 0


async def _feedback(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        response = await client.feedback(
            args.decision_id, score=args.score, thumbs_up=args.thumbs, timeout=args.timeout
        )
    if args.json:
        print(
            json.dumps(
                json_format.MessageToDict(
                    response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                )
            )
        )
    else:
        print(f"recorded {response.score:g} for {response.model} ({response.library_examples} examples in the library)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Serve until a stop signal, then drain; exits 0, also when the signal came while starting
    (``routesvc.signals``: the server is then not started)."""
    from routesvc.server import serve, stopped_while_starting
    from routesvc.supervisor import run_event_loop, serve_workers
    from routesvc.telemetry import configure_logging

    settings: config_module.Settings | None = None
    try:
        stop_on_signals()
        config_module.limit_native_threads()  # one BLAS thread here and in the spawned workers
        settings = config_module.load_settings(args.config)
        configure_logging(settings.config.logging)
        workers = settings.config.server.workers if args.workers is None else args.workers
        uvloop = settings.config.server.uvloop if args.uvloop is None else args.uvloop
        if workers > 1:
            return serve_workers(settings, args.config, workers=workers, port=args.port, uvloop=uvloop)
        try:
            run_event_loop(serve(settings, port=args.port), uvloop=uvloop)
        except RuntimeError as exc:
            # grpc reports a port it cannot listen on only as this RuntimeError, from add_*_port.
            if not str(exc).startswith("Failed to bind"):
                raise
            host = settings.config.server.host
            port = settings.config.server.port if args.port is None else args.port
            raise ConfigError.port_in_use("server", host, port) from exc
    except BaseException as error:
        if not stopped_while_starting(error, None if settings is None else settings.config.logging):
            raise
    return 0


def _client_error(error: grpc.aio.AioRpcError, target: str = "") -> int:
    reason = ""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason = f" [{info.reason}]"
    hint = _connect_hint(error.details() or "", target) if error.code() is grpc.StatusCode.UNAVAILABLE else ""
    print(f"error: {error.code().name}: {error.details()}{reason}{hint}", file=sys.stderr)
    return 1


def _connect_hint(details: str, target: str) -> str:
    """What to check when the channel itself failed, not routesvc: nothing listens at ``target`` (or
    its name does not resolve), the proxy the environment names does not resolve, or the server
    speaks TLS the client's settings do not match (a plaintext call or one without the client
    certificate mutual TLS requires: the server closes the socket; a certificate not verified: the
    handshake fails; a TLS call to a plaintext server: the answer is no TLS record at all).
    Anything else: no guess."""
    resolving = _UNRESOLVED.search(details)
    if resolving and not target.endswith(resolving.group(1)):
        return (
            f" (the proxy {resolving.group(1)} named by grpc_proxy, https_proxy or http_proxy does not"
            " resolve; fix it, or list the target in no_proxy)"
        )
    if resolving or "DNS resolution failed" in details or "Connection refused" in details:
        return f" (is routesvc serving at {target}? start it with `make run`, or pass --target HOST:PORT)"
    if "WRONG_VERSION_NUMBER" in details:
        return f" (does {target} serve plaintext? then leave out --tls, --tls-ca, --tls-cert and --tls-key)"
    if "failed to connect" in details and ("Socket closed" in details or "handshake" in details.lower()):
        return (
            f" (does {target} serve TLS? pass --tls-ca PEM for its CA (--tls for the system roots), and"
            " --tls-cert PEM --tls-key PEM if it requires a client certificate)"
        )
    return ""


_UNRESOLVED = re.compile(r"errors resolving (\S+?):? \[")


def _client(args: argparse.Namespace) -> RouterClient:
    """A client for the command's --target, --api-key and TLS flags."""
    credentials = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    return RouterClient(args.target, api_key=args.api_key, credentials=credentials, insecure=args.insecure)


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: the deadline must be a number of seconds above 0")
    return seconds


def _tool_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the number of tools cannot be negative")
    return count


def _max_output_tokens(text: str) -> int:
    try:
        tokens = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    # chat.max_output_tokens is an int32: a larger number cannot even be put in the request.
    if not 1 <= tokens <= _INT32_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: the number of output tokens must be from 1 to {_INT32_MAX}")
    return tokens


def _window_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    # The window is sent as a google.protobuf.Duration, which holds at most 10,000 years.
    if not (math.isfinite(seconds) and 0 <= seconds <= _MAX_DURATION_SECONDS):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the window must be a number of seconds from 0 to {_MAX_DURATION_SECONDS}"
        )
    return seconds


def _metadata_entry(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _server_override(field: str) -> Callable[[str], int]:
    """An argparse type for ``serve --<field>``: an int that passes ``server.<field>``'s own checks."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        try:
            config_module.ServerConfig.model_validate({field: value})
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise argparse.ArgumentTypeError(
                f"{value}: {problem[0].lower()}{problem[1:]} (as server.{field})"
            ) from None
        return value

    return parse


def _add_client_flags(parser: argparse.ArgumentParser, *, request: bool) -> None:
    parser.add_argument(
        "--target", default=config_module.client_target(), help="HOST:PORT of the service ($ROUTESVC_TARGET)"
    )
    parser.add_argument("--api-key", default=None, help="API key sent as 'authorization: Bearer' metadata")
    parser.add_argument("--tls", action="store_true", help="connect over TLS trusting the system roots")
    parser.add_argument("--tls-ca", default=None, metavar="PEM", help="connect over TLS trusting this CA")
    parser.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", default=None, metavar="PEM", help="client private key (mutual TLS)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="send --api-key over plaintext to a host other than this one (refused without it)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=None,
        help="deadline in seconds (above 0; default 30, for complete's whole stream 300)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    if not request:
        return
    parser.add_argument("--tier", default="", help="user tier, e.g. premium")
    parser.add_argument("--tenant", default="", help="tenant id")
    parser.add_argument("--task", default="", help="task hint, e.g. code_generation")
    parser.add_argument("--tools", type=_tool_count, default=0, help="send N placeholder tool definitions")
    parser.add_argument("--no-realtime", action="store_true", help="the answer is not needed now (batch allowed)")
    cascade = parser.add_mutually_exclusive_group()
    cascade.add_argument(
        "--cascade", dest="cascade", action="store_true", default=None, help="run the configured cascade"
    )
    cascade.add_argument("--no-cascade", dest="cascade", action="store_false", help="do not run the cascade")
    parser.add_argument("--model", default="", help="pin a catalog model instead of routing")
    parser.add_argument(
        "--max-output-tokens", type=_max_output_tokens, default=None, help="cap on the answer's tokens (at least 1)"
    )
    parser.add_argument("--max-cost", default="", help="maximum estimated cost in USD")
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="a stop sequence (repeat for more, up to 4)"
    )
    parser.add_argument("--system", default="", help="a system message")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image file (JPEG, PNG, GIF, WebP) or https URL sent with the prompt; repeatable",
    )
    parser.add_argument(
        "--metadata", type=_metadata_entry, action="append", default=[], metavar="KEY=VALUE", help="routing metadata"
    )
    parser.add_argument("prompt", help="the user prompt; '-' reads standard input")


def build_parser() -> argparse.ArgumentParser:
    """The ``routesvc`` argument parser."""
    parser = argparse.ArgumentParser(prog="routesvc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--config", default=None, help="YAML config (default: $ROUTESVC_CONFIG, else embedded)")
    serve.add_argument("--port", type=_server_override("port"), default=None, help="override server.port (0 to 65535)")
    serve.add_argument(
        "--workers",
        type=_server_override("workers"),
        default=None,
        help="override server.workers (processes on one port, 1 to 64)",
    )
    serve.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run on uvloop, or with --no-uvloop on asyncio's loop (default: server.uvloop, true)",
    )
    serve.set_defaults(func=_serve)
    for name, handler, helptext in (
        ("route", _route, "ask which model would serve a prompt"),
        ("complete", _complete, "route a prompt and stream the answer"),
    ):
        command = commands.add_parser(name, help=helptext)
        _add_client_flags(command, request=True)
        command.set_defaults(func=lambda args, handler=handler: asyncio.run(handler(args)))
    feedback = commands.add_parser("feedback", help="record how good a decision's answer was")
    _add_client_flags(feedback, request=False)
    feedback.add_argument("decision_id", help="decision_id from route or complete")
    outcome = feedback.add_mutually_exclusive_group(required=True)
    outcome.add_argument("--score", type=float, help="a score from 0 to 1")
    outcome.add_argument("--up", dest="thumbs", action="store_const", const=True, help="thumbs up")
    outcome.add_argument("--down", dest="thumbs", action="store_const", const=False, help="thumbs down")
    feedback.set_defaults(func=lambda args: asyncio.run(_feedback(args)))
    offline.register(commands)
    models = commands.add_parser("models", help="list the model catalog")
    _add_client_flags(models, request=False)
    models.set_defaults(func=lambda args: asyncio.run(_models(args)))
    batch = commands.add_parser("batch", help="a batch job from 'complete --no-realtime': get or cancel it")
    _add_client_flags(batch, request=False)
    batch.add_argument("action", choices=("get", "cancel"))
    batch.add_argument("batch_id", help="the job id printed by 'complete --no-realtime'")
    batch.add_argument("--tenant", default="", help="the tenant that owns the job (without API-key auth)")
    batch.set_defaults(func=lambda args: asyncio.run(_batch(args)))
    stats = commands.add_parser("stats", help="routing effectiveness: model mix, cost, savings, latency")
    _add_client_flags(stats, request=False)
    stats.add_argument("--tenant", default="", help="only this tenant's requests")
    stats.add_argument(
        "--window", type=_window_seconds, default=0.0, help="seconds to look back (default and 0: all kept)"
    )
    stats.set_defaults(func=lambda args: asyncio.run(_stats(args)))
    simulate = commands.add_parser("simulate", help="route a JSONL file of prompts offline: mix, cost, savings")
    simulate.add_argument("--data", required=True, help="JSONL file, one object with a 'prompt' per line")
    simulate.add_argument("--config", default=None, help="YAML config (default: $ROUTESVC_CONFIG, else embedded)")
    simulate.add_argument(
        "--model-map",
        action="append",
        default=[],
        metavar="CATALOG_ID=DATASET_ID",
        help="score a catalog model with the file's outcomes of another model name (repeatable)",
    )
    simulate.add_argument("--json", action="store_true", help="machine-readable JSON output")
    simulate.set_defaults(func=_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RouteSvcError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as error:
        return _client_error(error, getattr(args, "target", ""))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); nothing left to say.
        return 0


if __name__ == "__main__":
    sys.exit(main())
