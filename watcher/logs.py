"""Structured logs: JSON lines when not on a terminal (journald keeps them), pretty otherwise."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure_logging(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    stream = stream or sys.stdout
    if stream.isatty():
        renderers = [structlog.dev.ConsoleRenderer()]  # prints a traceback of its own
    else:
        # `exc_info` becomes the traceback's text under "exception"; without this the JSON
        # renderer writes `"exc_info": true` and the traceback is lost.
        renderers = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
