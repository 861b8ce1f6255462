"""The Kafka transport module without a broker: its extra and its public names."""

from __future__ import annotations

import importlib
import sys

import pytest

from duct_messaging.errors import DuctMessagingError, MissingExtraError
from duct_messaging.transports import _kafka_producer, _kafka_source, kafka

# The public module and the private ones it imports; a fresh import of the
# transport has to load them all again.
KAFKA_MODULES = (
    "duct_messaging.transports.kafka",
    "duct_messaging.transports._kafka_producer",
    "duct_messaging.transports._kafka_source",
)


class TestUnit:
    def test_import_without_confluent_kafka_names_the_extra(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Importing the transport without confluent-kafka asks for the extra."""
        monkeypatch.setitem(sys.modules, "confluent_kafka", None)
        monkeypatch.setitem(sys.modules, "confluent_kafka.admin", None)
        for name in KAFKA_MODULES:
            monkeypatch.delitem(sys.modules, name)

        with pytest.raises(MissingExtraError, match=r"duct-messaging\[kafka\]") as info:
            importlib.import_module("duct_messaging.transports.kafka")

        assert info.value.extra == "kafka"
        assert info.value.module == "confluent-kafka"
        assert isinstance(info.value.__cause__, ImportError)

    def test_public_module_reexports_producer_source_and_error(self) -> None:
        """The producer, the source and the error import from the public module."""
        names = {name: getattr(kafka, name) for name in kafka.__all__}

        assert names["KafkaProducer"] is _kafka_producer.KafkaProducer
        assert names["KafkaSource"] is _kafka_source.KafkaSource
        assert names["KafkaTransportError"] is _kafka_producer.KafkaTransportError
        assert issubclass(kafka.KafkaTransportError, DuctMessagingError)
