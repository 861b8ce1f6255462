"""The background event loop a system uses to run async components.

Sync `init` may meet `async def` init functions. Their coroutines, and any
task they spawn, must keep running after `init` returns, so they run on a
loop in a thread the system owns until `halt`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

# How long stopping waits for tasks left on the loop to finish cancelling.
_CANCEL_GRACE_S = 5.0


async def as_coroutine(awaitable: Awaitable[T]) -> T:
    """Wrap any awaitable into a coroutine (as `run_coroutine_threadsafe` wants)."""
    return await awaitable


class LoopThread:
    """An asyncio loop running forever in a daemon thread until `stop`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, name="duct-system-loop", daemon=True
        )
        self._thread.start()
        log.debug("system_loop_started", thread=self._thread.name)

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run `awaitable` on the loop and block until it is done."""
        future = asyncio.run_coroutine_threadsafe(as_coroutine(awaitable), self.loop)
        return future.result()

    def in_loop_thread(self) -> bool:
        """Tell whether the caller runs on this loop's thread."""
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        """Cancel what still runs on the loop, close it and join the thread.

        Idempotent.
        """
        if not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        log.debug("system_loop_stopped", thread=self._thread.name)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            self.loop.run_until_complete(self._cancel_leftovers())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            self.loop.close()

    async def _cancel_leftovers(self) -> None:
        current = asyncio.current_task()
        tasks: list[asyncio.Task[Any]] = [
            task for task in asyncio.all_tasks() if task is not current
        ]
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=_CANCEL_GRACE_S)
        if pending:
            log.warning(
                "system_loop_tasks_ignored_cancel",
                count=len(pending),
                next="closing the loop anyway",
            )
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.warning(
                    "system_loop_task_failed",
                    task=task.get_name(),
                    error=repr(task.exception()),
                )
