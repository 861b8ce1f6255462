"""Publish and consume rates per transport, duct_messaging next to the raw client.

For Kafka (a tansu broker started here), Redis Streams, NATS JetStream and
RabbitMQ (the local servers), on the same server in the same run:

- publish, raw: the client's own fastest accepted-by-the-broker path
  (confluent-kafka produce + flush; redis-py XADD pipelines of 1,000;
  nats-py JetStream `publish_async` then awaiting every ack; aio-pika
  publishes with confirms, 1,000 in flight);
- publish, duct: `aproduce` calls with `--window` in flight, each returning
  once its target accepted the message, and `aproduce_many` in batches of
  `--window`;
- consume, raw: batches of up to 500 with a JSON decode per message and one
  acknowledgement per batch (Kafka: async commit; Redis: one XACK; NATS:
  an ack per message, which is fire-and-forget; RabbitMQ: one `multiple`
  ack);
- consume, duct: a consumers component with a trivial sync handler, timed
  from the first handled message to the last (group joins not counted).

Messages are ~100-byte JSON bodies. The duct and raw consumers read the same
messages (published once by duct, so they carry the usual headers) through
separate consumer groups / queues.

Usage: python bench/transports.py [--messages 20000] [--window 1000]
       [--only redis,nats,rabbitmq,kafka]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from duct_messaging import halt, init
from duct_messaging._logs import configure_logging
from duct_messaging.system import Ref, System
from duct_messaging.testing.tansu import TansuBroker

BODY = {
    "id": "7f9c1a52-3d2e-4c51-9a0b-2f8e6b1d4c3a",
    "amount": 123.45,
    "note": "x" * 38,
}
RAW_BODY = json.dumps(BODY, separators=(",", ":")).encode()
REDIS_URL = "redis://127.0.0.1:6379/5"
NATS_URL = "nats://127.0.0.1:4222"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
BATCH = 500


@dataclass
class Row:
    transport: str
    what: str
    raw: float
    duct: float


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


class Setup:
    """One transport: its duct config pieces and its raw-client measurements."""

    name = ""

    def __init__(self, ns: str) -> None:
        self.ns = ns

    def clients(self) -> dict[str, Any]:
        raise NotImplementedError

    def target(self, dest: str) -> dict[str, Any]:
        raise NotImplementedError

    def subscription_options(self) -> dict[str, Any]:
        return {}

    async def prepare(self) -> None:
        """Create what must exist before publishing (RabbitMQ queues)."""

    async def raw_publish(self, dest: str, count: int) -> float:
        raise NotImplementedError

    async def raw_consume(self, dest: str, count: int) -> float:
        raise NotImplementedError

    async def cleanup(self) -> None:
        """Remove what this run created."""


class KafkaSetup(Setup):
    name = "kafka"

    def __init__(self, ns: str, broker: TansuBroker) -> None:
        super().__init__(ns)
        self.bootstrap = broker.bootstrap_servers

    def clients(self) -> dict[str, Any]:
        return {
            "main": {
                "bootstrap_servers": self.bootstrap,
                "producer": {"linger_ms": 5},
                "consumer": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500},
            }
        }

    def target(self, dest: str) -> dict[str, Any]:
        return {"kafka_topic": f"{self.ns}.{dest}"}

    def subscription_options(self) -> dict[str, Any]:
        return {"group_id": f"{self.ns}.duct"}

    async def raw_publish(self, dest: str, count: int) -> float:
        return await asyncio.to_thread(self._produce, f"{self.ns}.{dest}", count)

    def _produce(self, topic: str, count: int) -> float:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        started = time.perf_counter()
        for i in range(count):
            while True:
                try:
                    producer.produce(topic, RAW_BODY, str(i).encode())
                    break
                except BufferError:
                    producer.poll(0.005)
            producer.poll(0)
        producer.flush(60)
        return _rate(count, time.perf_counter() - started)

    async def raw_consume(self, dest: str, count: int) -> float:
        return await asyncio.to_thread(self._consume, f"{self.ns}.{dest}", count)

    def _consume(self, topic: str, count: int) -> float:
        from confluent_kafka import Consumer

        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"{self.ns}.raw",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 5,
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 500,
            },
            logger=None,
        )
        consumer.subscribe([topic])
        seen, first = 0, 0.0
        try:
            while seen < count:
                batch = consumer.consume(BATCH, 0.5)
                if batch and not first:
                    first = time.perf_counter()
                for msg in batch:
                    if msg.error() is None:
                        json.loads(msg.value())
                        seen += 1
                if batch:
                    consumer.commit(asynchronous=True)
            return _rate(count, time.perf_counter() - first)
        finally:
            consumer.close()


class RedisSetup(Setup):
    name = "redis"

    def clients(self) -> dict[str, Any]:
        return {"main": {"url": REDIS_URL}}

    def target(self, dest: str) -> dict[str, Any]:
        return {"stream": f"{self.ns}.{dest}"}

    async def raw_publish(self, dest: str, count: int) -> float:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        stream = f"{self.ns}.{dest}"
        try:
            started = time.perf_counter()
            for start in range(0, count, 1000):
                pipe = client.pipeline(transaction=False)
                for _ in range(start, min(start + 1000, count)):
                    pipe.xadd(stream, {"body": RAW_BODY})
                await pipe.execute()
            return _rate(count, time.perf_counter() - started)
        finally:
            await client.aclose()

    async def raw_consume(self, dest: str, count: int) -> float:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        stream, group = f"{self.ns}.{dest}", "raw"
        try:
            await client.xgroup_create(stream, group, id="0", mkstream=True)
            seen, first = 0, 0.0
            while seen < count:
                reply = await client.xreadgroup(
                    group, "raw-1", {stream: ">"}, count=BATCH, block=100
                )
                if not reply:
                    continue
                if not first:
                    first = time.perf_counter()
                [(_, entries)] = reply
                for _, fields in entries:
                    json.loads(fields[b"body"])
                seen += len(entries)
                await client.xack(stream, group, *[e[0] for e in entries])
            return _rate(count, time.perf_counter() - first)
        finally:
            await client.aclose()

    async def cleanup(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [k async for k in client.scan_iter(match=f"{self.ns}.*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


class NatsSetup(Setup):
    name = "nats"

    @property
    def stream(self) -> str:
        return f"BENCH_{self.ns}".upper()

    def clients(self) -> dict[str, Any]:
        return {
            "main": {
                "servers": NATS_URL,
                "streams": {
                    self.stream: {"subjects": [f"{self.ns}.>"], "storage": "memory"}
                },
            }
        }

    def target(self, dest: str) -> dict[str, Any]:
        return {"subject": f"{self.ns}.{dest}"}

    async def prepare(self) -> None:
        import nats
        from nats.js import api

        connection = await nats.connect(NATS_URL)
        try:
            await connection.jetstream().add_stream(
                api.StreamConfig(
                    name=self.stream,
                    subjects=[f"{self.ns}.>"],
                    storage=api.StorageType.MEMORY,
                )
            )
        finally:
            await connection.close()

    async def raw_publish(self, dest: str, count: int) -> float:
        import nats

        connection = await nats.connect(NATS_URL)
        try:
            js = connection.jetstream()
            subject = f"{self.ns}.{dest}"
            started = time.perf_counter()
            futures = []
            for i in range(count):
                futures.append(
                    await js.publish_async(
                        subject, RAW_BODY, headers={"Nats-Msg-Id": f"{dest}-{i}"}
                    )
                )
            await asyncio.gather(*futures)
            return _rate(count, time.perf_counter() - started)
        finally:
            await connection.close()

    async def raw_consume(self, dest: str, count: int) -> float:
        import nats
        import nats.errors
        from nats.js import api

        connection = await nats.connect(NATS_URL)
        try:
            js = connection.jetstream()
            sub = await js.pull_subscribe(
                f"{self.ns}.{dest}",
                durable="raw",
                stream=self.stream,
                config=api.ConsumerConfig(max_ack_pending=2000),
            )
            seen, first = 0, 0.0
            while seen < count:
                try:
                    msgs = await sub.fetch(BATCH, timeout=0.5)
                except nats.errors.TimeoutError:
                    continue
                if not first:
                    first = time.perf_counter()
                for msg in msgs:
                    json.loads(msg.data)
                    await msg.ack()
                seen += len(msgs)
            return _rate(count, time.perf_counter() - first)
        finally:
            await connection.close()

    async def cleanup(self) -> None:
        import nats

        connection = await nats.connect(NATS_URL)
        try:
            await connection.jetstream().delete_stream(self.stream)
        finally:
            await connection.close()


class RabbitSetup(Setup):
    name = "rabbitmq"

    def clients(self) -> dict[str, Any]:
        return {"main": {"url": RABBITMQ_URL, "prefetch": 1000}}

    def target(self, dest: str) -> dict[str, Any]:
        # A queue on the target exists before any consumer, so nothing
        # published is unroutable.
        return {
            "exchange": f"{self.ns}.{dest}",
            "routing_key": dest,
            "queue": f"{self.ns}.{dest}.raw",
        }

    def subscription_options(self) -> dict[str, Any]:
        return {"queue": f"{self.ns}.consume.duct"}

    async def prepare(self) -> None:
        import aio_pika

        connection = await aio_pika.connect(RABBITMQ_URL)
        try:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                f"{self.ns}.consume", "topic", durable=True
            )
            for name in ("raw", "duct"):
                queue = await channel.declare_queue(
                    f"{self.ns}.consume.{name}", durable=True
                )
                await queue.bind(exchange, routing_key="consume")
        finally:
            await connection.close()

    async def raw_publish(self, dest: str, count: int) -> float:
        import aio_pika

        connection = await aio_pika.connect(RABBITMQ_URL)
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.declare_exchange(
                f"{self.ns}.{dest}", "topic", durable=True
            )
            queue = await channel.declare_queue(f"{self.ns}.{dest}.raw", durable=True)
            await queue.bind(exchange, routing_key=dest)
            started = time.perf_counter()
            window = asyncio.Semaphore(1000)

            async def one() -> None:
                async with window:
                    await exchange.publish(
                        aio_pika.Message(
                            RAW_BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                        ),
                        routing_key=dest,
                    )

            await asyncio.gather(*(one() for _ in range(count)))
            return _rate(count, time.perf_counter() - started)
        finally:
            await connection.close()

    async def raw_consume(self, dest: str, count: int) -> float:
        import aio_pika

        connection = await aio_pika.connect(RABBITMQ_URL)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1000)
            queue = await channel.get_queue(f"{self.ns}.{dest}.raw", ensure=False)
            done = asyncio.Event()
            state = {"seen": 0, "first": 0.0}

            async def on_message(message: Any) -> None:
                if not state["first"]:
                    state["first"] = time.perf_counter()
                json.loads(message.body)
                state["seen"] += 1
                if state["seen"] % BATCH == 0 or state["seen"] >= count:
                    await message.ack(multiple=True)
                if state["seen"] >= count:
                    done.set()

            await queue.consume(on_message)
            await done.wait()
            return _rate(count, time.perf_counter() - state["first"])
        finally:
            await connection.close()

    async def cleanup(self) -> None:
        import aio_pika

        connection = await aio_pika.connect(RABBITMQ_URL)
        try:
            channel = await connection.channel()
            for dest in ("consume", "raw_pub", "duct_pub", "duct_many"):
                await channel.queue_delete(f"{self.ns}.{dest}.raw")
                await channel.exchange_delete(f"{self.ns}.{dest}")
            await channel.queue_delete(f"{self.ns}.consume.duct")
        finally:
            await connection.close()


def duct_config(setup: Setup, handler: Any = None) -> dict[str, Any]:
    t = setup.name
    topics = {name: {} for name in ("consume", "duct_pub", "duct_many")}
    publish = {
        name: {"targets": [{"client": "main", **setup.target(name)}]} for name in topics
    }
    subscriptions = {}
    if handler is not None:
        subscriptions["bench"] = {
            "topic": "consume",
            "source": t,
            "client": "main",
            "handler": handler,
            "options": setup.subscription_options(),
        }
    config: dict[str, Any] = {
        f"duct.{t}/clients": setup.clients(),
        f"duct.{t}/producers": {"clients": Ref(f"duct.{t}/clients")},
        "duct.messaging/producers": [Ref(f"duct.{t}/producers")],
        "duct.messaging/routing": {
            "topics": topics,
            "publish": publish,
            "subscriptions": subscriptions,
        },
        "duct.messaging/producer": {
            "routing": Ref("duct.messaging/routing"),
            "producers": Ref("duct.messaging/producers"),
        },
    }
    if handler is not None:
        config[f"duct.{t}/consumers"] = {
            "clients": Ref(f"duct.{t}/clients"),
            "routing": Ref("duct.messaging/routing"),
        }
    return config


def on_loop(system: System, coro: Awaitable[Any]) -> Any:
    assert system.loop is not None
    return asyncio.run_coroutine_threadsafe(coro, system.loop).result()  # type: ignore[arg-type]


def duct_publish(setup: Setup, count: int, window: int) -> tuple[float, float]:
    """Return (aproduce rate, aproduce_many rate); fills topic `consume` too."""
    system = init(duct_config(setup))
    producer = system["duct.messaging/producer"]

    async def each(topic: str) -> float:
        started = time.perf_counter()
        for start in range(0, count, window):
            await asyncio.gather(
                *(
                    producer.aproduce(BODY, topic=topic, key=str(i))
                    for i in range(start, min(start + window, count))
                )
            )
        return _rate(count, time.perf_counter() - started)

    async def many(topic: str) -> float:
        started = time.perf_counter()
        for start in range(0, count, window):
            stop = min(start + window, count)
            await producer.aproduce_many(
                [BODY] * (stop - start),
                topic=topic,
                keys=[str(i) for i in range(start, stop)],
            )
        return _rate(count, time.perf_counter() - started)

    try:
        one_by_one = on_loop(system, each("duct_pub"))
        batched = on_loop(system, many("duct_many"))
        on_loop(system, many("consume"))
        return one_by_one, batched
    finally:
        halt(system)


def duct_consume(setup: Setup, count: int) -> float:
    done = threading.Event()
    state = {"seen": 0, "first": 0.0, "last": 0.0}

    def handler(message: Any) -> None:
        if not state["seen"]:
            state["first"] = time.perf_counter()
        state["seen"] += 1
        if state["seen"] >= count:
            state["last"] = time.perf_counter()
            done.set()

    system = init(duct_config(setup, handler))
    try:
        if not done.wait(300):
            raise SystemExit(
                f"{setup.name}: duct consumer saw {state['seen']} of {count}"
            )
    finally:
        halt(system)
    return _rate(count, state["last"] - state["first"])


def measure(setup: Setup, count: int, window: int) -> list[Row]:
    run: Callable[[Awaitable[Any]], Any] = asyncio.run
    run(setup.prepare())
    try:
        raw_publish = run(setup.raw_publish("raw_pub", count))
        duct_each, duct_many = duct_publish(setup, count, window)
        raw_consume = run(setup.raw_consume("consume", count))
        duct_read = duct_consume(setup, count)
    finally:
        run(setup.cleanup())
    return [
        Row(setup.name, "publish (aproduce)", raw_publish, duct_each),
        Row(setup.name, "publish (aproduce_many)", raw_publish, duct_many),
        Row(setup.name, "consume", raw_consume, duct_read),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=1_000, help="calls in flight")
    parser.add_argument("--only", default="kafka,redis,nats,rabbitmq")
    args = parser.parse_args()
    configure_logging("WARNING")
    wanted = args.only.split(",")
    ns = "bench" + uuid.uuid4().hex[:6]
    rows: list[Row] = []
    with TansuBroker() as broker:
        setups: list[Setup] = [
            KafkaSetup(ns, broker),
            RedisSetup(ns),
            NatsSetup(ns),
            RabbitSetup(ns),
        ]
        for setup in setups:
            if setup.name in wanted:
                rows.extend(measure(setup, args.messages, args.window))

    print(f"\n{args.messages} messages of {len(RAW_BODY)} bytes, window {args.window}")
    columns = f"{'transport':<10} {'what':<24} {'raw msg/s':>11}"
    print(f"{columns} {'duct msg/s':>11} {'duct/raw':>9}")
    for row in rows:
        print(
            f"{row.transport:<10} {row.what:<24} {row.raw:>11,.0f} "
            f"{row.duct:>11,.0f} {row.duct / row.raw:>9.2f}"
        )


if __name__ == "__main__":
    main()
