"""Every mistake in a messaging config is reported at once, before any start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from duct_messaging import ConfigError, init, load_config

STARTED: list[str] = []


def record(value: Any) -> str:
    """An app component that notes it was started."""
    STARTED.append(str(value))
    return "started"


BAD_CONFIG = """
duct.memory/clients:
  main: {}
duct.memory/producers:
  clients: !ref duct.memory/clients
duct.messaging/producers: [!ref duct.memory/producers]
duct.messaging/routing:
  topics: {t: {}}
  publish: {t: {targets: [{client: nowhere}]}}
  subscriptions:
    s: {topic: t, source: memory, client: ghost, handler: nothing-here}
duct.messaging/producer:
  routing: !ref duct.messaging/routing
  producers: !ref duct.messaging/producers
duct.memory/consumers:
  clients: !ref duct.memory/clients
  routing: !ref duct.messaging/routing
duct.kafka/clientz: {}
tests.test_config_errors/record: first
app.a/one: {dep: !ref app.b/two, port: !env [DUCT_TEST_PORT, int, 80]}
app.b/two: {dep: !ref app.a/one}
app.c/three: {dep: !ref app.missing/key}
"""


def test_all_mistakes_are_reported_together_and_nothing_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ref, cycle, key, env and routing mistakes come in one ConfigError."""
    monkeypatch.setenv("DUCT_TEST_PORT", "eighty")
    path = tmp_path / "system.yaml"
    path.write_text(BAD_CONFIG)
    STARTED.clear()

    with pytest.raises(ConfigError) as caught:
        init(load_config(path))

    text = "\n".join(caught.value.problems)
    assert "DUCT_TEST_PORT='eighty' is not a valid int" in text
    assert "dependency cycle: app.a/one -> app.b/two -> app.a/one" in text
    assert "unknown component key 'duct.kafka/clientz'" in text
    assert "!ref 'app.missing/key' matches no key" in text
    assert "cannot resolve handler 'nothing-here'" in text
    assert "unknown client 'nowhere'; known clients: main" in text
    assert "unknown memory client 'ghost'; known: main" in text
    assert len(caught.value.problems) == 7
    assert STARTED == []
