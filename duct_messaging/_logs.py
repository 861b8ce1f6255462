"""Logging set-up for the command line.

The library only emits structlog events; applications configure structlog
as they like. The `duct-messaging` command configures it once: human
readable lines on stderr at INFO (or `DUCT_LOG_LEVEL`, or `--log-level`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO, cast

import structlog

LEVEL_ENV = "DUCT_LOG_LEVEL"


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time of the write.

    Binding the stream object once would keep writing to a replaced (and
    perhaps closed) stream, as happens under test runners.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


_STDERR = cast(TextIO, _CurrentStderr())


def configure_logging(level: str | None = None) -> None:
    """Send structlog events at `level` and above to stderr."""
    name = (level or os.environ.get(LEVEL_ENV) or "INFO").upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        raise ValueError(
            f"Unknown log level {name!r}; use DEBUG, INFO, WARNING or ERROR"
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(
            file=cast(TextIO, _CurrentStderr())
        ),
        cache_logger_on_first_use=False,
    )
