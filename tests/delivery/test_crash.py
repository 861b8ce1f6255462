"""A consumer killed with SIGKILL mid-batch, then restarted."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from duct_messaging import halt, init
from duct_messaging.messaging.consumer import MessageContext
from duct_messaging.testing.tansu import TansuBroker
from duct_messaging.transports.kafka import KafkaClient
from tests.conftest import kafka_client
from tests.delivery._support import (
    WAIT_S,
    Recorder,
    committed,
    kafka_system,
    one_topic_routing,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
COUNT = 300
BLOCK_AT = 150


def records(path: Path) -> list[tuple[int, int, int]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        partition, offset, n = line.split()
        out.append((int(partition), int(offset), int(n)))
    return out


def wait_for_line(proc: subprocess.Popen[str], prefix: str) -> str | None:
    """Return the first stdout line starting with `prefix` (None at EOF/timeout)."""
    found: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(prefix):
                found.append(line.strip())
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(WAIT_S * 2)
    return found[0] if found else None


def test_killed_consumer_resumes_from_its_commits(
    kafka_brokers: list[TansuBroker], unique: Callable[[str], str], tmp_path: Path
) -> None:
    """After SIGKILL everything is handled; nothing committed is handled again."""
    broker = kafka_brokers[0]
    topic, group = unique("orders"), unique("orders-group")
    KafkaClient.from_config(
        "main", {"bootstrap_servers": broker.bootstrap_servers}
    ).ensure_topic(topic, 2)
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    for n in range(COUNT):
        producer.produce(topic, f'{{"n": {n}}}'.encode(), key=str(n).encode())
    assert producer.flush(10) == 0
    record = tmp_path / "handled.txt"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.delivery._killable_consumer",
            broker.bootstrap_servers,
            topic,
            group,
            str(record),
            str(BLOCK_AT),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        blocked = wait_for_line(proc, "BLOCKED")
        assert blocked is not None
        first = records(record)
        assert len(first) == BLOCK_AT - 1
        deadline = threading.Event()
        timer = threading.Timer(WAIT_S, deadline.set)
        timer.start()
        while sum(o or 0 for o in committed(broker, topic, group, 2).values()) < len(
            first
        ):
            assert not deadline.wait(0.1), "finished offsets were not committed"
        timer.cancel()
    finally:
        proc.kill()
        proc.wait(WAIT_S)
        assert proc.stdout is not None
        proc.stdout.close()
    marks = committed(broker, topic, group, 2)
    _, blocked_partition, blocked_offset = blocked.split()

    again = Recorder()

    def handler(message: Any, ctx: MessageContext) -> None:
        again.add((ctx.partition, ctx.position, message["n"]))

    routing = one_topic_routing(
        "orders", "main", handler, kafka_topic=topic, options={"group_id": group}
    )
    system = init(kafka_system({"main": kafka_client(broker)}, routing))
    try:
        done_before = {n for _, _, n in first}
        assert again.wait_until(
            lambda items: done_before | {n for _, _, n in items} == set(range(COUNT)),
            timeout=60,
        )
    finally:
        halt(system)

    second = again.snapshot()
    assert sum(o or 0 for o in marks.values()) == len(first)
    assert all(offset >= (marks[p] or 0) for p, offset, _ in second)
    assert (int(blocked_partition), int(blocked_offset)) in {
        (p, o) for p, o, _ in second
    }
    assert committed(broker, topic, group, 2) == {
        p: max(o for q, o, _ in first + second if q == p) + 1 for p in (0, 1)
    }
