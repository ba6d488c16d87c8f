"""Logging set-up: structlog JSON lines on stdout (console rendering on a terminal).

Log events are snake_case verbs with key/value pairs and never carry prompt text or keys.
"""

from __future__ import annotations

import logging
import sys

import structlog

from routesvc.config import LoggingConfig

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(config: LoggingConfig) -> None:
    """Route structlog and stdlib logging through one renderer at ``config.level``."""
    console = config.format == "console" or (config.format == "auto" and sys.stdout.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    level = _LEVELS[config.level]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks if not console else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Third-party libraries (grpc, httpx, the SDKs) log through the standard library; keep them
    # at WARNING so request URLs and bodies of debug logging never reach the output.
    logging.basicConfig(
        level=max(level, logging.WARNING), stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
