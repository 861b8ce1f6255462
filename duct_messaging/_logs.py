"""Logging set-up for the command line.

The library only emits structlog events; applications configure structlog
as they like. The `duct-messaging` command configures it once: human
readable lines on stderr at INFO (or `DUCT_LOG_LEVEL`, or `--log-level`).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

LEVEL_ENV = "DUCT_LOG_LEVEL"


def configure_logging(level: str | None = None) -> None:
    """Send structlog events at `level` and above to stderr."""
    name = (level or os.environ.get(LEVEL_ENV) or "INFO").upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        raise ValueError(f"Unknown log level {name!r}; use DEBUG, INFO, WARNING or ERROR")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
