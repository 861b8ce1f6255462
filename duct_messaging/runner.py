"""Run a system as a service: start it, wait for a stop, halt it.

`run` returns when the process gets SIGINT or SIGTERM, or when application
code calls `request_stop` (a batch job that finished, say). Either way the
system is halted cleanly before it returns.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Mapping
from types import FrameType
from typing import Any

import structlog

from duct_messaging.system import halt, init

log = structlog.get_logger(__name__)

_stop = threading.Event()
_exit_code = 0
_reason = ""


def request_stop(exit_code: int = 0, reason: str = "") -> None:
    """Ask a running `run` to halt the system and return `exit_code`.

    Safe to call from any thread, any number of times; the first call's
    code and reason win.
    """
    global _exit_code, _reason
    if not _stop.is_set():
        _exit_code, _reason = exit_code, reason
        _stop.set()


def run(config: Mapping[str, Any], *, timeout: float | None = None) -> int:
    """Start `config`, block until asked to stop (or `timeout`), halt, and return.

    Returns the exit code passed to `request_stop`, 0 after a signal, and 1
    when `timeout` ran out first.
    """
    global _exit_code, _reason
    _stop.clear()
    _exit_code, _reason = 0, ""
    previous = _install_signal_handlers()
    system = init(config)
    log.info("system_running", components=len(system.started_keys))
    try:
        if not _stop.wait(timeout):
            _exit_code, _reason = 1, f"timed out after {timeout} s"
    finally:
        halt(system)
        _restore_signal_handlers(previous)
    log.info("system_stopped", exit_code=_exit_code, reason=_reason)
    return _exit_code


def _on_signal(signum: int, frame: FrameType | None) -> None:
    request_stop(0, signal.Signals(signum).name)


def _install_signal_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, _on_signal)
    return previous


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
