"""`duct-messaging dlq` on a file store: listing, filters and refusals."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from duct_messaging.cli import main
from duct_messaging.messaging._deadletter_files import JsonLinesStore
from duct_messaging.messaging.deadletter import DeadLetter, DeadLetterStatus

NOW = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)


def store_letters(directory: Path) -> None:
    store = JsonLinesStore(directory)
    for dl_id, status in (
        ("a1", DeadLetterStatus.ELIGIBLE),
        ("p1", DeadLetterStatus.POISON),
    ):
        letter = DeadLetter(
            body=b"{}",
            headers={},
            topic="orders",
            subscription="orders-worker",
            client="main",
            source="kafka",
            destination="core.orders",
            attempts=3,
            status=status,
            error_type="builtins.RuntimeError",
            error_message="boom",
            error_traceback="tb",
            first_failure_at=NOW,
            last_failure_at=NOW,
            id=dl_id,
        )
        asyncio.run(store.write(letter))


def test_list_prints_a_table_and_filters_by_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table lists every dead letter; `--status` and `--json` narrow and reshape."""
    store_letters(tmp_path / "dl")
    path = tmp_path / "system.yaml"
    path.write_text(f"duct.deadletter/storage: {{directory: '{tmp_path / 'dl'}'}}\n")

    code = main(["dlq", "list", str(path)])
    table = capsys.readouterr().out.splitlines()
    poison_code = main(["dlq", "list", str(path), "--status", "poison", "--json"])
    poison = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert code == poison_code == 0
    assert table[0].split()[:2] == ["ID", "STATUS"]
    assert [line.split()[:2] for line in table[1:-1]] == [
        ["a1", "eligible"],
        ["p1", "poison"],
    ]
    assert table[-1] == "2 dead letters"
    assert [(d["id"], d["status"]) for d in poison] == [("p1", "poison")]


def test_refusals_name_what_the_config_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No store, or no producer for replay: exit 2 and say what to add."""
    no_store = tmp_path / "no-store.yaml"
    no_store.write_text("duct.deadletter/logger: {}\n")
    no_producer = tmp_path / "no-producer.yaml"
    no_producer.write_text(
        f"duct.deadletter/storage: {{directory: '{tmp_path / 'dl'}'}}\n"
    )

    list_code = main(["dlq", "list", str(no_store)])
    list_err = capsys.readouterr().err
    replay_code = main(["dlq", "replay", str(no_producer), "--topic", "t", "--all"])
    replay_err = capsys.readouterr().err

    assert (list_code, replay_code) == (2, 2)
    assert "has no dead-letter store" in list_err
    assert "has no duct.messaging/producer" in replay_err
