"""Deferred delivery on PostgreSQL: scheduling rate, delivery rate, lateness.

Runs 10,000 messages (by default) through one and through three app
processes sharing one store, in two modes:

- burst: every message is due at the same instant, so the delivery rate
  is the most the instances can do; lateness is time spent queued.
- spread: due times are spread evenly over a window (80 s by default: 125
  messages per second, below what one instance sustains); lateness is how
  late each message went out.

The first due time leaves room for scheduling to finish, so the two phases
do not compete (the table flags a run where scheduling overran it). Each
worker records its deliveries in memory (send time and due time) and
reports them when it stops; duplicates are counted across workers. A
private database is created on 127.0.0.1:5432 and dropped afterwards.

    .venv/bin/python bench/deferred.py [--messages 10000] [--procs 1 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duct_messaging.messaging.deferred import DeferredScheduler  # noqa: E402
from duct_messaging.transports.base import (  # noqa: E402
    OutgoingMessage,
    Receipt,
    Target,
)

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
DUE = "x-bench-due"


class Recorder:
    """A transport producer that only notes when each message went out."""

    transport = "bench"
    client = "rec"

    def __init__(self) -> None:
        self.sent: list[tuple[str, float, float]] = []

    async def send(self, target: Target, message: OutgoingMessage) -> Receipt:
        self.sent.append(
            (message.headers["x-message-id"], time.time(), float(message.headers[DUE]))
        )
        return Receipt(self.client, self.transport, message.topic)

    def destination(self, target: Target, topic: str) -> str:
        return topic


async def worker(args: argparse.Namespace) -> None:
    """One app instance: start, schedule on GO, report progress, stop on EOF."""
    recorder = Recorder()
    scheduler = DeferredScheduler(
        {"rec": recorder},
        {"url": args.url, "schema": args.schema},
        concurrency=args.concurrency,
    )
    await scheduler.start()
    print("READY", flush=True)
    lines = _stdin_lines()

    go = (await lines.get()).split()
    first_due, window, count = float(go[1]), float(go[2]), int(go[3])
    started = time.perf_counter()
    limit = asyncio.Semaphore(args.in_flight)
    target = Target("rec")

    async def one(i: int) -> None:
        due = first_due + (window * i / max(count - 1, 1) if window else 0.0)
        headers = {"x-message-id": uuid.uuid4().hex, DUE: repr(due)}
        message = OutgoingMessage("bench", b'{"n": 1}', headers)
        async with limit:
            await scheduler.schedule(
                message, [target], datetime.fromtimestamp(due, UTC)
            )

    await asyncio.gather(*(one(i) for i in range(count)))
    print("SCHEDULED", f"{time.perf_counter() - started:.3f}", flush=True)

    reporter = asyncio.create_task(_report_progress(recorder))
    await lines.get()  # EOF: the parent saw every message delivered
    reporter.cancel()
    await scheduler.aclose()
    print("RESULT", json.dumps(recorder.sent), flush=True)


async def _report_progress(recorder: Recorder) -> None:
    while True:
        print("PROGRESS", len(recorder.sent), flush=True)
        await asyncio.sleep(0.25)


def _stdin_lines() -> asyncio.Queue[str]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, "EOF")

    loop.run_in_executor(None, read)
    return queue


@dataclass
class Worker:
    proc: asyncio.subprocess.Process
    progress: int = 0
    scheduled_s: float | None = None
    result: list[tuple[str, float, float]] | None = None
    ready: bool = False

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            word, _, rest = raw.decode().strip().partition(" ")
            if word == "READY":
                self.ready = True
            elif word == "SCHEDULED":
                self.scheduled_s = float(rest)
            elif word == "PROGRESS":
                self.progress = int(rest)
            elif word == "RESULT":
                self.result = [tuple(r) for r in json.loads(rest)]  # type: ignore[misc]


async def _until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step timed out")
        await asyncio.sleep(0.05)


async def run_case(
    url: str, procs: int, messages: int, window: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Run one case and return its measurements."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    workers = []
    for _ in range(procs):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "worker",
            "--url",
            url,
            "--schema",
            schema,
            "--concurrency",
            str(args.concurrency),
            "--in-flight",
            str(args.in_flight),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**26,  # the RESULT line carries every delivery
        )
        worker = Worker(proc)
        workers.append((worker, asyncio.create_task(worker.read())))
    await _until(lambda: all(w.ready for w, _ in workers), 60)

    # Due times start once scheduling is surely over (measured rate x 2).
    lead = 3.0 + messages / procs / args.expected_sched_rate
    first_due = time.time() + lead
    shares = [messages // procs + (i < messages % procs) for i in range(procs)]
    go = time.perf_counter()
    for (worker, _), share in zip(workers, shares, strict=True):
        assert worker.proc.stdin is not None
        worker.proc.stdin.write(f"GO {first_due} {window} {share}\n".encode())
        await worker.proc.stdin.drain()
    await _until(lambda: all(w.scheduled_s is not None for w, _ in workers), 600)
    scheduled_wall = time.perf_counter() - go
    late_start = time.time() > first_due

    await _until(lambda: sum(w.progress for w, _ in workers) >= messages, 900)
    for worker, reader in workers:
        assert worker.proc.stdin is not None
        worker.proc.stdin.close()
        await worker.proc.wait()
        await reader

    sent = [row for worker, _ in workers for row in (worker.result or [])]
    ids = [row[0] for row in sent]
    lateness = sorted(at - due for _, at, due in sent)
    last = max(at for _, at, _ in sent)
    delivery_s = last - first_due
    return {
        "procs": procs,
        "mode": "burst" if window == 0 else f"spread {window:g}s",
        "messages": len(set(ids)),
        "sched_rate": messages / scheduled_wall,
        "deliv_rate": len(sent) / delivery_s if window == 0 else None,
        "p50": statistics.median(lateness),
        "p95": lateness[int(0.95 * (len(lateness) - 1))],
        "p99": lateness[int(0.99 * (len(lateness) - 1))],
        "max": lateness[-1],
        "early": sum(1 for value in lateness if value < 0),
        "dups": len(ids) - len(set(ids)),
        "late_start": late_start,
    }


def render(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'procs':>5}  {'mode':<11} {'msgs':>6}  {'sched/s':>8}  {'deliv/s':>8}  "
        f"{'p50 ms':>7}  {'p95 ms':>7}  {'p99 ms':>7}  {'max ms':>7}  {'early':>5}  "
        f"{'dups':>4}"
    )
    lines = [head]
    for r in rows:
        deliv = f"{r['deliv_rate']:8.0f}" if r["deliv_rate"] else f"{'-':>8}"
        note = "  (scheduling overran the first due time)" if r["late_start"] else ""
        lines.append(
            f"{r['procs']:>5}  {r['mode']:<11} {r['messages']:>6}  "
            f"{r['sched_rate']:8.0f}  {deliv}  {r['p50'] * 1000:7.0f}  "
            f"{r['p95'] * 1000:7.0f}  {r['p99'] * 1000:7.0f}  {r['max'] * 1000:7.0f}  "
            f"{r['early']:>5}  {r['dups']:>4}{note}"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    database = f"duct_bench_deferred_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    rows = []
    try:
        for procs in args.procs:
            for window in (0.0, args.window):
                rows.append(await run_case(url, procs, args.messages, window, args))
                print(render(rows[-1:]).splitlines()[1], flush=True)
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    print()
    print(render(rows))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", default="bench", choices=["bench", "worker"])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--window", type=float, default=80.0)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--expected-sched-rate", type=float, default=150.0)
    parser.add_argument("--url")
    parser.add_argument("--schema")
    return parser.parse_args()


if __name__ == "__main__":
    options = _parse()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING)
    )
    asyncio.run(worker(options) if options.role == "worker" else main(options))
