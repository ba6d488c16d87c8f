"""structlog set-up: JSON lines or console, with the current span's ids on every line."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from opentelemetry import trace

from routesvc.config import LoggingConfig

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# Tracebacks as JSON, without local variables: a frame's locals can hold a prompt or a key.
_TRACEBACKS = structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
# The handler ``configure_logging`` put on the root logger (replaced, not added to, when called again).
_stdlib_handler: logging.Handler | None = None


def add_trace_context(
    logger: structlog.typing.WrappedLogger, method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """A structlog processor: ``trace_id`` and ``span_id`` of the current span, when there is one."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event


def _json_line(event: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """orjson, or the standard library for what orjson refuses (non-string keys, integers past 64
    bits): a log call must never fail the request that makes it."""
    try:
        return orjson.dumps(event, default=default)
    except TypeError:
        return json.dumps(event, default=default).encode("utf-8")


def _warnings_and_above(record: logging.LogRecord) -> bool:
    """Whether a standard-library record prints: only a warning or worse (routesvc's own lines
    go through structlog, not through this handler)."""
    return record.levelno >= logging.WARNING


def configure_logging(config: LoggingConfig) -> None:
    """Route structlog and stdlib logging through one renderer at ``config.level``.

    JSON lines on stdout, or console rendering on a terminal (``format: auto``); every line
    logged inside an RPC carries its ``trace_id`` and ``span_id``.
    """
    console = config.format == "console" or (config.format == "auto" and sys.stdout.isatty())
    renderer: structlog.typing.Processor
    factory: Callable[..., Any]
    binary = getattr(sys.stdout, "buffer", None)
    if console:
        # Plain tracebacks even where rich is installed: rich's show local variables.
        console_renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        renderer, factory = console_renderer, structlog.PrintLoggerFactory(sys.stdout)
    elif binary is not None:
        # One line per RPC: orjson straight to the byte stream is the cheapest JSON line.
        renderer, factory = structlog.processors.JSONRenderer(_json_line), structlog.BytesLoggerFactory(binary)
    else:
        renderer, factory = structlog.processors.JSONRenderer(), structlog.PrintLoggerFactory(sys.stdout)
    level = _LEVELS[config.level]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_trace_context,
            _TRACEBACKS if not console else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Third-party libraries (grpc, httpx, the SDKs, the OTel exporters) log through the standard
    # library; keep them at WARNING so request URLs and bodies of debug logging never reach the
    # output: the root's level, and the handler's own filter for a library that sets its loggers'
    # levels itself (ANTHROPIC_LOG / OPENAI_LOG=debug). On stderr, as JSON lines too unless the
    # console renders: their warnings are the failures a log pipeline must be able to read (an
    # exporter that cannot reach its collector).
    global _stdlib_handler
    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    _stdlib_handler = logging.StreamHandler(sys.stderr)
    _stdlib_handler.addFilter(_warnings_and_above)
    if console:
        _stdlib_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    else:
        _stdlib_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=[
                    # A library's line inside an RPC names it, as routesvc's own lines do.
                    structlog.contextvars.merge_contextvars,
                    structlog.stdlib.add_log_level,
                    structlog.stdlib.add_logger_name,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    add_trace_context,
                    _TRACEBACKS,
                ],
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer(),
                ],
            )
        )
    root.addHandler(_stdlib_handler)
    root.setLevel(max(level, logging.WARNING))
