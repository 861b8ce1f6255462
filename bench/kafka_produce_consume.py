"""Kafka throughput: raw confluent-kafka next to duct_messaging, same broker, same run.

Starts one tansu broker on a free loopback port, then measures:
- produce: raw `Producer.produce` with asynchronous delivery reports, against
  `Producer.aproduce` (each call awaits its delivery report) with many calls
  in flight;
- consume: a raw consumer (batches of 1,000, trivial JSON handler, async
  commit per batch) against a `duct.kafka/consumers` runtime with a trivial
  sync handler. Consume time runs from the first message to the last, so the
  group join is not counted.

Usage: python bench/kafka_produce_consume.py [--messages 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, Producer

from duct_messaging import halt, init
from duct_messaging._logs import configure_logging
from duct_messaging.system import Ref
from duct_messaging.testing.tansu import TansuBroker

CONSUMER = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
BODY = {
    "id": "7f9c1a52-3d2e-4c51-9a0b-2f8e6b1d4c3a",
    "amount": 123.45,
    "note": "x" * 40,
}


def raw_produce(bootstrap: str, topic: str, count: int) -> float:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    body = json.dumps(BODY).encode()
    started = time.perf_counter()
    for i in range(count):
        while True:
            try:
                producer.produce(topic, body, key=str(i).encode())
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(60)
    return count / (time.perf_counter() - started)


def raw_consume(bootstrap: str, topic: str, count: int) -> float:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"raw-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
            **CONSUMER,
        }
    )
    consumer.subscribe([topic])
    seen, first = 0, 0.0
    while seen < count:
        batch = consumer.consume(1000, 0.5)
        if batch and not first:
            first = time.perf_counter()
        for msg in batch:
            if msg.error() is None:
                json.loads(msg.value())
                seen += 1
        if batch:
            consumer.commit(asynchronous=True)
    elapsed = time.perf_counter() - first
    consumer.close()
    return count / elapsed


def duct_config(bootstrap: str, topic: str, handler: Any) -> dict[str, Any]:
    return {
        "duct.kafka/clients": {
            "main": {
                "bootstrap_servers": bootstrap,
                "producer": {"linger_ms": 5},
                "consumer": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500},
            }
        },
        "duct.kafka/producers": {"clients": Ref("duct.kafka/clients")},
        "duct.messaging/producers": [Ref("duct.kafka/producers")],
        "duct.messaging/routing": {
            "topics": {"bench": {}},
            "publish": {
                "bench": {"targets": [{"client": "main", "kafka_topic": topic}]}
            },
            "subscriptions": {}
            if handler is None
            else {
                "bench": {
                    "topic": "bench",
                    "source": "kafka",
                    "client": "main",
                    "handler": handler,
                    "options": {"group_id": f"duct-{uuid.uuid4().hex[:6]}"},
                }
            },
        },
        "duct.messaging/producer": {
            "routing": Ref("duct.messaging/routing"),
            "producers": Ref("duct.messaging/producers"),
        },
        "duct.kafka/consumers": {
            "clients": Ref("duct.kafka/clients"),
            "routing": Ref("duct.messaging/routing"),
        },
    }


def duct_produce(
    bootstrap: str, topic: str, count: int, window: int, *, batch: bool = False
) -> float:
    system = init(duct_config(bootstrap, topic, None))
    producer = system["duct.messaging/producer"]

    async def run() -> float:
        started = time.perf_counter()
        for start in range(0, count, window):
            if batch:
                stop = min(start + window, count)
                await producer.aproduce_many(
                    [BODY] * (stop - start),
                    topic="bench",
                    keys=[str(i) for i in range(start, stop)],
                )
                continue
            await asyncio.gather(
                *(
                    producer.aproduce(BODY, topic="bench", key=str(i))
                    for i in range(start, min(start + window, count))
                )
            )
        return count / (time.perf_counter() - started)

    try:
        assert system.loop is not None
        return asyncio.run_coroutine_threadsafe(run(), system.loop).result()
    finally:
        halt(system)


def duct_consume(bootstrap: str, topic: str, count: int) -> float:
    done = threading.Event()
    state = {"seen": 0, "first": 0.0, "last": 0.0}

    def handler(message: Any) -> None:
        if not state["seen"]:
            state["first"] = time.perf_counter()
        state["seen"] += 1
        if state["seen"] >= count:
            state["last"] = time.perf_counter()
            done.set()

    system = init(duct_config(bootstrap, topic, handler))
    try:
        if not done.wait(300):
            raise SystemExit(f"duct consumer saw only {state['seen']} of {count}")
    finally:
        halt(system)
    return count / (state["last"] - state["first"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument(
        "--window", type=int, default=2_000, help="aproduce calls in flight"
    )
    args = parser.parse_args()
    configure_logging("WARNING")
    n = args.messages
    with TansuBroker() as broker:
        bootstrap = broker.bootstrap_servers
        raw_topic, duct_topic = (
            f"raw-{uuid.uuid4().hex[:6]}",
            f"duct-{uuid.uuid4().hex[:6]}",
        )
        raw = raw_produce(bootstrap, raw_topic, n)
        rows = [
            (
                "produce (aproduce)",
                raw,
                duct_produce(bootstrap, duct_topic, n, args.window),
            ),
            (
                "produce (aproduce_many)",
                raw,
                duct_produce(bootstrap, duct_topic, n, args.window, batch=True),
            ),
            (
                "consume",
                raw_consume(bootstrap, raw_topic, n),
                duct_consume(bootstrap, duct_topic, 2 * n),
            ),
        ]
    print(
        f"Kafka (tansu on {bootstrap}), {n} messages of {len(json.dumps(BODY))} bytes"
    )
    print(f"{'':24}{'raw msg/s':>12}{'duct msg/s':>12}{'duct/raw':>10}")
    for name, raw_rate, duct_rate in rows:
        print(
            f"{name:24}{raw_rate:12,.0f}{duct_rate:12,.0f}{duct_rate / raw_rate:10.2f}"
        )


if __name__ == "__main__":
    main()
