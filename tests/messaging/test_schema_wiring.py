"""Schemas wired into the system: checked before start, and on every produce."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from duct_messaging import ConfigError, halt, init, load_config
from duct_messaging.cli import main
from duct_messaging.messaging import SchemaValidationError

CONFIG = """
duct.memory/clients:
  primary: {}
  data: {}
duct.memory/producers:
  clients: !ref duct.memory/clients
duct.messaging/producers: [!ref duct.memory/producers]
duct.messaging/routing:
  topics:
    order-created:
      schema:
        canonical: [map, {closed: true}, [id, SCHEMA_ID_TYPE], [amount, double]]
  publish:
    order-created:
      targets:
        - {client: primary, kafka_topic: core.orders}
        - {client: data, kafka_topic: core.orders.data}
duct.messaging/producer:
  routing: !ref duct.messaging/routing
  producers: !ref duct.messaging/producers
"""


def write_config(tmp_path: Path, id_type: str) -> Path:
    path = tmp_path / "system.yaml"
    path.write_text(CONFIG.replace("SCHEMA_ID_TYPE", id_type))
    return path


def test_malformed_schema_stops_init_and_check_with_its_config_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown schema type is a config error naming where it is written."""
    path = write_config(tmp_path, "uuidd")

    with pytest.raises(ConfigError) as caught:
        init(load_config(path))
    code = main(["check", str(path)])
    printed = capsys.readouterr().err

    where = "duct.messaging/routing.topics.order-created.schema.canonical"
    assert any(where in p and "uuidd" in p for p in caught.value.problems)
    assert code == 1
    assert where in printed
    assert "unknown type 'uuidd'" in printed


def test_invalid_message_is_sent_to_no_target(tmp_path: Path) -> None:
    """A message failing the canonical schema raises before any target is sent."""
    system = init(load_config(write_config(tmp_path, "uuid")))
    try:
        producer = system["duct.messaging/producer"]
        brokers: Any = system["duct.memory/clients"]

        with pytest.raises(SchemaValidationError, match="amount") as caught:
            producer.produce(
                {"id": "not-a-uuid", "amount": "ten"}, topic="order-created"
            )

        assert {path for path, _ in caught.value.errors} == {"id", "amount"}
        assert brokers["primary"].messages("core.orders") == []
        assert brokers["data"].messages("core.orders.data") == []
    finally:
        halt(system)
