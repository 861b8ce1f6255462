"""Test doubles for deferred delivery: recording producers and sinks.

In-process tests record into lists and wake waiters with events. The
multi-process tests record into PostgreSQL tables, so the test can count
deliveries made by every instance.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg

from duct_messaging.messaging.deadletter import DeadLetter
from duct_messaging.transports.base import OutgoingMessage, Receipt, Target

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
REPO_ROOT = str(Path(__file__).resolve().parents[2])
DUE_HEADER = "x-test-due"


def pg_url(database: str) -> str:
    """Return the SQLAlchemy URL of a database on the local server."""
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"


def pg_conninfo(database: str) -> str:
    """Return the libpq connection string of a database on the local server."""
    return f"host=127.0.0.1 port=5432 user=postgres dbname={database}"


def make_message(topic: str = "orders", due: float | None = None) -> OutgoingMessage:
    """Return an encoded message with a unique id (and its due time, if given)."""
    headers = {
        "x-message-id": uuid.uuid4().hex,
        "traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
        "content-type": "application/json",
    }
    if due is not None:
        headers[DUE_HEADER] = repr(due)
    return OutgoingMessage(topic, b'{"id": 1}', headers, b"key-1")


class _Waitable:
    """A list of things that tests can wait to reach a length."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    def _append(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()

    async def wait_for(self, count: int, within_s: float = 10.0) -> list[Any]:
        """Wait until at least `count` items arrived; return them."""
        async with asyncio.timeout(within_s):
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.items


class ListProducer(_Waitable):
    """A transport producer that records what it is asked to send.

    `fail_times` sends fail before the first succeeds; `fail_always` makes
    every send fail. `gate`, when set, makes each send wait for it.
    """

    transport = "test"

    def __init__(
        self,
        client: str = "rec",
        *,
        fail_times: int = 0,
        fail_always: bool = False,
        gate: asyncio.Event | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        self.fail_times = fail_times
        self.fail_always = fail_always
        self.gate = gate
        self.calls = 0
        self.started = asyncio.Event()

    async def send(self, target: Target, message: OutgoingMessage) -> Receipt:
        """Record `message` (or fail as configured) and return a receipt."""
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_always or self.calls <= self.fail_times:
            raise ConnectionError(f"broker {self.client} refused send {self.calls}")
        self._append((target, message, time.time()))
        return Receipt(
            self.client, self.transport, self.destination(target, message.topic)
        )

    def destination(self, target: Target, topic: str) -> str:
        """Return the `destination` option, or the topic."""
        return str(target.option("destination", topic))


class ListSink(_Waitable):
    """A dead-letter sink that keeps letters in a list; may fail first."""

    def __init__(self, fail_times: int = 0) -> None:
        super().__init__()
        self.fail_times = fail_times
        self.calls = 0

    async def write(self, dead_letter: DeadLetter) -> None:
        """Keep `dead_letter`, or fail as configured."""
        self.calls += 1
        if self.calls <= self.fail_times:
            raise OSError("dead-letter storage unavailable")
        self._append(dead_letter)


DELIVERIES_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    message_id text NOT NULL,
    instance text NOT NULL,
    delivered_at double precision NOT NULL,
    due double precision
)
"""
DEAD_LETTERS_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    message_id text,
    instance text NOT NULL,
    error_type text NOT NULL
)
"""


def create_tables(conninfo: str, deliveries: str, dead_letters: str) -> None:
    """Create the tables the multi-process tests record into."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(DELIVERIES_DDL.format(table=deliveries))
        conn.execute(DEAD_LETTERS_DDL.format(table=dead_letters))


class PgRecorder:
    """A transport producer that records each send as a row in PostgreSQL.

    `hold_s` makes each send take that long after its row is committed, as
    a slow broker acknowledgement would: an instance killed then has sent
    messages whose delivery it has not finished.
    """

    transport = "test"

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        table: str,
        instance: str,
        hold_s: float = 0.0,
    ) -> None:
        self.client = "rec"
        self.conn = conn
        self.table = table
        self.instance = instance
        self.hold_s = hold_s

    async def send(self, target: Target, message: OutgoingMessage) -> Receipt:
        """Insert one row for `message`; the row is committed on return."""
        due = message.headers.get(DUE_HEADER)
        await self.conn.execute(
            f"INSERT INTO {self.table} VALUES (%s, %s, %s, %s)",
            [
                message.headers["x-message-id"],
                self.instance,
                time.time(),
                None if due is None else float(due),
            ],
        )
        if self.hold_s:
            await asyncio.sleep(self.hold_s)
        return Receipt(self.client, self.transport, message.topic)

    def destination(self, target: Target, topic: str) -> str:
        """Return the topic."""
        return topic


class PgDeadLetterSink:
    """A dead-letter sink recording each letter as a row in PostgreSQL."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], table: str, instance: str):
        self.conn = conn
        self.table = table
        self.instance = instance

    async def write(self, dead_letter: DeadLetter) -> None:
        """Insert one row for `dead_letter`."""
        await self.conn.execute(
            f"INSERT INTO {self.table} VALUES (%s, %s, %s)",
            [dead_letter.message_id, self.instance, dead_letter.error_type],
        )


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    within_s: float,
    interval_s: float = 0.1,
) -> None:
    """Check `condition` every `interval_s` until it holds; fail after `within_s`.

    For state only visible in a database that other processes write; in
    process, wait on an event instead.
    """
    async with asyncio.timeout(within_s):
        while True:
            if await condition():
                return
            await asyncio.sleep(interval_s)


class AppProcess:
    """One `tests.deferred._app` instance running in a subprocess.

    Its stdout is read continuously into `lines`, so it never blocks on a
    full pipe; `expect` waits for a line starting with a word.
    """

    def __init__(self, name: str, args: list[str]) -> None:
        self.name = name
        self.args = ["--name", name, *args]
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> AppProcess:
        """Spawn the process."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.deferred._app",
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode().rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def expect(self, word: str, within_s: float = 30.0) -> list[str]:
        """Wait for a stdout line starting with `word`; return its words."""
        async with asyncio.timeout(within_s):
            while True:
                for line in self.lines:
                    if line.split(" ", 1)[0] == word:
                        return line.split()
                if self._reader is not None and self._reader.done():
                    raise AssertionError(f"{self.name} exited: {self.lines[-5:]}")
                self._changed.clear()
                await self._changed.wait()

    async def stop(self, within_s: float = 30.0) -> int:
        """Close stdin (the app halts cleanly) and wait for the exit code."""
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        async with asyncio.timeout(within_s):
            code = await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return code

    def kill(self) -> None:
        """Kill the process with SIGKILL: no halt, no clean-up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def reap(self) -> None:
        """Make sure the process is gone (kill it if it still runs)."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        if self._reader is not None:
            await self._reader
