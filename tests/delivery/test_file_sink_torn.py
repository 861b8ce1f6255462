"""The JSON-lines dead-letter store after a torn write, and its bounded memory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from duct_messaging.messaging._deadletter_files import JsonLinesStore
from duct_messaging.messaging.deadletter import DeadLetter, DeadLetterStatus

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def letter(dead_letter_id: str, topic: str = "orders") -> DeadLetter:
    return DeadLetter(
        body=b'{"n": 1}',
        headers={"x-message-id": dead_letter_id},
        topic=topic,
        subscription="orders-worker",
        client="memory",
        source="memory",
        destination=topic,
        attempts=1,
        status=DeadLetterStatus.ELIGIBLE,
        error_type="builtins.RuntimeError",
        error_message="boom",
        error_traceback="",
        first_failure_at=T0,
        last_failure_at=T0 + timedelta(seconds=1),
        id=dead_letter_id,
    )


async def test_a_write_after_a_torn_line_starts_a_line_of_its_own(
    tmp_path: Path,
) -> None:
    """A crash left half a line: the next process's dead letter stays readable."""
    await JsonLinesStore(tmp_path).write(letter("before"))
    path = tmp_path / "orders.jsonl"
    with path.open("a") as file:
        file.write('{"kind": "dead_letter", "id": "torn", "bo')

    restarted = JsonLinesStore(tmp_path)
    await restarted.write(letter("after"))
    await restarted.mark(["after"], DeadLetterStatus.REPLAYED)

    read = {dl.id: dl.status for dl in await JsonLinesStore(tmp_path).read()}
    assert read == {
        "before": DeadLetterStatus.ELIGIBLE,
        "after": DeadLetterStatus.REPLAYED,
    }
    assert path.read_bytes().endswith(b"\n")


async def test_a_mark_after_a_torn_line_starts_a_line_of_its_own(
    tmp_path: Path,
) -> None:
    await JsonLinesStore(tmp_path).write(letter("kept"))
    path = tmp_path / "orders.jsonl"
    with path.open("a") as file:
        file.write('{"kind": "status", "id": "ke')

    restarted = JsonLinesStore(tmp_path)
    assert await restarted.mark(["kept"], DeadLetterStatus.REPLAYED) == 1
    [kept] = await restarted.read()
    assert kept.status is DeadLetterStatus.REPLAYED


async def test_remembered_ids_are_bounded_and_readers_fold_duplicates(
    tmp_path: Path,
) -> None:
    store = JsonLinesStore(tmp_path, remember=3)
    for number in range(6):
        await store.write(letter(f"dl-{number}", topic=f"t{number % 2}"))
    assert len(store._known) == 3

    await store.write(letter("dl-5", topic="t1"))  # remembered: not appended
    await store.write(letter("dl-0", topic="t0"))  # forgotten: appended again
    lines = (tmp_path / "t0.jsonl").read_text().splitlines()
    assert len(lines) == 4
    ids = sorted(dl.id for dl in await store.read())
    assert ids == [f"dl-{number}" for number in range(6)]


async def test_ids_already_in_a_file_are_remembered_up_to_the_bound(
    tmp_path: Path,
) -> None:
    first = JsonLinesStore(tmp_path)
    for number in range(5):
        await first.write(letter(f"dl-{number}"))

    again = JsonLinesStore(tmp_path, remember=2)
    await again.write(letter("dl-4"))  # the newest ids are the ones kept
    assert len((tmp_path / "orders.jsonl").read_text().splitlines()) == 5
    assert len(again._known) <= 2
