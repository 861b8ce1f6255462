"""A consumer process for the crash test: records what it handled, blocks on cue.

Usage: python -m tests.delivery._killable_consumer BOOTSTRAP TOPIC GROUP RECORD N

Each handled message appends "partition offset n" to RECORD once its handler
finished. The N-th handler call prints "BLOCKED partition offset" and never
returns, so the process sits mid-batch until it is killed.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from duct_messaging import init
from duct_messaging.messaging.consumer import MessageContext
from tests.delivery._support import kafka_system, one_topic_routing

SETTINGS = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500}


def main(argv: list[str]) -> None:
    bootstrap, topic, group, record, block_at = argv
    calls = 0
    out = open(record, "a", buffering=1)  # noqa: SIM115 - lives until killed

    def handler(message: Any, ctx: MessageContext) -> None:
        nonlocal calls
        calls += 1
        if calls == int(block_at):
            print("BLOCKED", ctx.partition, ctx.position, flush=True)
            threading.Event().wait()
        out.write(f"{ctx.partition} {ctx.position} {message['n']}\n")

    routing = one_topic_routing(
        "orders", "main", handler, kafka_topic=topic, options={"group_id": group}
    )
    clients = {"main": {"bootstrap_servers": bootstrap, **SETTINGS}}
    init(kafka_system(clients, routing, commit_interval_s=0.1))
    print("READY", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
