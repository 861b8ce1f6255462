"""One app instance for the multi-process deferred-delivery tests and bench.

Starts a `DeferredScheduler` on a shared PostgreSQL store, whose deliveries
are recorded as rows in a table, optionally schedules messages spread over
a time window, and runs until its stdin closes. It reports on stdout, one
line each, for the parent to wait on:

    STARTED <epoch>                 the scheduler is delivering
    SCHEDULED <count> <seconds>     its messages are stored
    STOPPED <epoch>                 the scheduler halted cleanly

Run as `python -m tests.deferred._app --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from datetime import UTC, datetime

import psycopg
import structlog

from duct_messaging.messaging.deferred import DeferredScheduler, DeliveryPolicy
from duct_messaging.transports.base import Target
from tests.deferred._support import (
    PgDeadLetterSink,
    PgRecorder,
    make_message,
    pg_conninfo,
    pg_url,
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deferred-test-app")
    parser.add_argument("--database", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--deliveries", required=True, help="table to record into")
    parser.add_argument("--dead-letters", required=True, help="table for dead letters")
    parser.add_argument("--name", required=True, help="this instance's name")
    parser.add_argument("--count", type=int, default=0, help="messages to schedule")
    parser.add_argument("--first-due", type=float, help="epoch of the first due time")
    parser.add_argument("--spread", type=float, default=0.0, help="due times span (s)")
    parser.add_argument("--lease", type=float, default=15.0)
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--grace", type=float)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--in-flight", type=int, default=32, help="parallel schedules")
    parser.add_argument(
        "--hold", type=float, default=0.0, help="each send lasts this long (s)"
    )
    return parser.parse_args(argv)


def _say(*words: object) -> None:
    print(*words, flush=True)


async def _schedule_all(scheduler: DeferredScheduler, args: argparse.Namespace) -> None:
    first_due = args.first_due if args.first_due is not None else time.time()
    limit = asyncio.Semaphore(args.in_flight)
    target = Target("rec")

    async def one() -> None:
        due = first_due + random.random() * args.spread
        async with limit:
            await scheduler.schedule(
                make_message(due=due), [target], datetime.fromtimestamp(due, UTC)
            )

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(args.count)))
    _say("SCHEDULED", args.count, f"{time.perf_counter() - started:.3f}")


async def _main(args: argparse.Namespace) -> None:
    conninfo = pg_conninfo(args.database)
    async with (
        await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as rec_conn,
        await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as dl_conn,
    ):
        scheduler = DeferredScheduler(
            {"rec": PgRecorder(rec_conn, args.deliveries, args.name, args.hold)},
            {"url": pg_url(args.database), "schema": args.schema},
            deadletter=PgDeadLetterSink(dl_conn, args.dead_letters, args.name),
            delivery=DeliveryPolicy(max_attempts=3, backoff_s=0.1, backoff_max_s=1.0),
            grace_s=args.grace,
            concurrency=args.concurrency,
            lease_s=args.lease,
            poll_interval_s=args.poll,
        )
        await scheduler.start()
        _say("STARTED", f"{time.time():.6f}")
        try:
            if args.count:
                await _schedule_all(scheduler, args)
            # Run until the parent closes our stdin.
            await asyncio.to_thread(sys.stdin.read)
        finally:
            await scheduler.aclose()
        _say("STOPPED", f"{time.time():.6f}")


if __name__ == "__main__":
    # Per-message events are DEBUG; keep stdout for the lines above.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
    )
    asyncio.run(_main(_parse(sys.argv[1:])))
