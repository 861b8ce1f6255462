"""`duct-messaging dlq list|replay` against Kafka and a PostgreSQL store."""

from __future__ import annotations

import json
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from duct_messaging import halt, init, load_config
from duct_messaging.cli import main
from duct_messaging.testing.tansu import TansuBroker
from tests.delivery._apps import APP
from tests.delivery._support import on_event, produce_raw

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def write_config(
    path: Path, broker: TansuBroker, pg_conninfo: str, names: dict[str, str]
) -> Path:
    path.write_text(
        textwrap.dedent(
            f"""\
            duct.kafka/clients:
              main:
                bootstrap_servers: "{broker.bootstrap_servers}"
                consumer: {{session_timeout_ms: 6000, heartbeat_interval_ms: 500}}
            duct.kafka/producers: {{clients: !ref duct.kafka/clients}}
            duct.messaging/producers: [!ref duct.kafka/producers]
            duct.messaging/routing:
              topics: {{{names["topic"]}: {{}}}}
              publish:
                {names["topic"]}:
                  targets: [{{client: main, kafka_topic: {names["kafka_topic"]}}}]
              subscriptions:
                orders-worker:
                  topic: {names["topic"]}
                  source: kafka
                  client: main
                  handler: "tests.delivery._apps:orders"
                  options: {{group_id: {names["group"]}}}
                  retry: {{max_attempts: 2, backoff: {{initial_ms: 5}}}}
            duct.messaging/producer:
              routing: !ref duct.messaging/routing
              producers: !ref duct.messaging/producers
            duct.deadletter/postgres:
              conninfo: "{pg_conninfo}"
              table: {names["table"]}
            duct.kafka/consumers:
              clients: !ref duct.kafka/clients
              routing: !ref duct.messaging/routing
              deadletter: !ref duct.deadletter/postgres
            """
        )
    )
    return path


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_replay_sends_eligible_dead_letters_back_and_skips_poison(
    kafka_brokers: list[TansuBroker],
    unique: Callable[[str], str],
    pg_conninfo: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Replayed messages reach the handler again; poison stays, and is named."""
    broker = kafka_brokers[0]
    names = {
        "topic": unique("orders"),
        "kafka_topic": unique("core.orders"),
        "group": unique("orders-group"),
        "table": f"dl_{uuid.uuid4().hex[:8]}",
    }
    path = write_config(tmp_path / "system.yaml", broker, pg_conninfo, names)
    APP.reset()
    with on_event("message_dead_lettered") as dead:
        system = init(load_config(path))
        try:
            producer = system["duct.messaging/producer"]
            producer.produce({"n": 1}, topic=names["topic"])
            producer.produce({"n": 2}, topic=names["topic"])
            produce_raw(broker, names["kafka_topic"], [(b"\x00garbage", {})])
            assert dead.wait_for(3)
            APP.failing = False
            capsys.readouterr()

            assert main(["dlq", "list", str(path)]) == 0
            listed = lines(capsys.readouterr().out)
            assert main(["dlq", "list", str(path), "--status", "poison", "--json"]) == 0
            [poison] = [json.loads(line) for line in lines(capsys.readouterr().out)]
            code = main(
                ["dlq", "replay", str(path), "--topic", names["topic"], "--all"]
            )
            replayed = lines(capsys.readouterr().out)

            assert APP.seen.wait_until(
                lambda items: sum(1 for _, origin in items if origin) == 2
            )
            again = main(
                ["dlq", "replay", str(path), "--topic", names["topic"], "--id", "nope"]
            )
            missing = lines(capsys.readouterr().out)
            assert main(["dlq", "list", str(path), "--json"]) == 0
            final = [json.loads(line) for line in lines(capsys.readouterr().out)]
        finally:
            halt(system)

    assert listed[0].split()[:3] == ["ID", "STATUS", "TOPIC"]
    assert listed[-1] == "3 dead letters"
    assert sorted(line.split()[1] for line in listed[1:-1]) == [
        "eligible",
        "eligible",
        "poison",
    ]
    assert poison["body"] == "\x00garbage"
    assert code == 0
    assert replayed[-1] == "replayed 2, skipped 1 (poison 1), failed 0"
    assert f"skipped {poison['id']}: poison, never replayed" in replayed
    assert (
        sum(1 for line in replayed if line.endswith(f"-> main:{names['kafka_topic']}"))
        == 2
    )
    origins = {n: origin for n, origin in APP.seen.snapshot() if origin}
    assert sorted(origins) == [1, 2]
    statuses = {dl["id"]: dl["status"] for dl in final}
    assert statuses[poison["id"]] == "poison"
    assert sorted(statuses.values()) == ["poison", "replayed", "replayed"]
    assert set(origins.values()) == {i for i, s in statuses.items() if s == "replayed"}
    assert again == 1
    assert missing == ["not found nope", "replayed 0, skipped 0 (poison 0), failed 0"]
