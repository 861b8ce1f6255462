"""A dead-letter store in a directory of JSON lines, one file per topic.

Each file only grows: a dead letter is one line, a later status change
(replayed) is another line naming the dead letter's id. Appends are single
`write` calls on a file opened for appending, so several processes may
write one directory at once, and each write is fsynced before `write`
returns. Reading folds the lines: the first line of an id wins, status
lines apply in order. A torn last line (a crash mid-write) is skipped, and
the first append to a file that does not end with a newline starts with
one, so the torn fragment never swallows the next line.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from duct_messaging.messaging.deadletter import (
    DeadLetter,
    DeadLetterStatus,
    utcnow,
)

log = structlog.get_logger(__name__)

SUFFIX = ".jsonl"
# How many dead-letter ids a store remembers to skip re-appending a
# redelivered failure; beyond that a duplicate line may be written, which
# readers fold.
REMEMBER_IDS = 100_000
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def topic_file_name(topic: str) -> str:
    """Return the file name that holds `topic`'s dead letters."""
    return (_UNSAFE.sub("_", topic) or "_") + SUFFIX


class JsonLinesStore:
    """Dead letters as JSON lines under `directory`, one file per topic.

    The directory is created if missing. File I/O runs in a worker thread,
    so the event loop never blocks on the disk. The ids of the last
    `remember` dead letters written or found are kept in memory, so a
    redelivered failure is not appended twice.
    """

    def __init__(
        self, directory: str | Path, *, fsync: bool = True, remember: int = REMEMBER_IDS
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.remember = remember
        self._lock = threading.Lock()
        # (file, id) of recent dead letters, least recent first (readers fold
        # the duplicates of forgotten ids and of other processes).
        self._known: OrderedDict[tuple[Path, str], None] = OrderedDict()
        self._loaded: set[Path] = set()
        # Files whose last byte this store checked (or wrote): a newline.
        self._sealed: set[Path] = set()
        self.directory.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"<JsonLinesStore {self.directory}>"

    async def write(self, dead_letter: DeadLetter) -> None:
        """Append `dead_letter` to its topic's file and fsync it."""
        await asyncio.to_thread(self._write, dead_letter)

    async def read(
        self,
        *,
        topic: str | None = None,
        status: DeadLetterStatus | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[DeadLetter]:
        """Return the dead letters matching every given filter, oldest first."""
        letters = await asyncio.to_thread(self._read_all, topic)
        wanted = set(ids) if ids is not None else None
        return [
            dl
            for dl in letters
            if (topic is None or dl.topic == topic)
            and (status is None or dl.status == status)
            and (wanted is None or dl.id in wanted)
        ]

    async def mark(self, ids: Sequence[str], status: DeadLetterStatus) -> int:
        """Append a status line for each of `ids` that is stored; return how many."""
        return await asyncio.to_thread(self._mark, list(ids), status)

    def _write(self, dead_letter: DeadLetter) -> None:
        path = self.directory / topic_file_name(dead_letter.topic)
        with self._lock:
            self._load_ids(path)
            entry = (path, dead_letter.id)
            if entry in self._known:
                self._known.move_to_end(entry)
                return
            self._append(path, {"kind": "dead_letter", **dead_letter.to_record()})
            self._remember(entry)

    def _load_ids(self, path: Path) -> None:
        if path in self._loaded:
            return
        self._loaded.add(path)
        ids = [
            str(line["id"])
            for line in _lines(path)
            if line.get("kind") == "dead_letter"
        ]
        for dead_letter_id in ids[-self.remember :] if self.remember > 0 else []:
            self._remember((path, dead_letter_id))

    def _remember(self, entry: tuple[Path, str]) -> None:
        if self.remember <= 0:
            return
        self._known[entry] = None
        self._known.move_to_end(entry)
        while len(self._known) > self.remember:
            self._known.popitem(last=False)

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if path not in self._sealed:
                data = self._newline_after_torn_tail(fd, path) + data
            self._sealed.discard(path)  # until this write is known whole
            if os.write(fd, data) == len(data):
                self._sealed.add(path)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _newline_after_torn_tail(fd: int, path: Path) -> bytes:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return b""
        log.warning("dead_letter_file_torn_tail_closed", path=str(path))
        return b"\n"

    def _read_all(self, topic: str | None) -> list[DeadLetter]:
        if topic is not None:
            paths = [self.directory / topic_file_name(topic)]
        else:
            paths = sorted(self.directory.glob(f"*{SUFFIX}"))
        letters: list[DeadLetter] = []
        for path in paths:
            letters.extend(_fold(path))
        letters.sort(key=lambda dl: dl.last_failure_at)
        return letters

    def _mark(self, ids: list[str], status: DeadLetterStatus) -> int:
        wanted = set(ids)
        found = 0
        at = utcnow().isoformat()
        with self._lock:
            for path in sorted(self.directory.glob(f"*{SUFFIX}")):
                present = {dl.id for dl in _fold(path)} & wanted
                for dead_letter_id in sorted(present):
                    record = {
                        "kind": "status",
                        "id": dead_letter_id,
                        "status": str(status),
                        "at": at,
                    }
                    self._append(path, record)
                found += len(present)
                wanted -= present
        return found


def _lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            log.warning("dead_letter_line_unreadable", path=str(path), line=number)
    return out


def _fold(path: Path) -> list[DeadLetter]:
    letters: dict[str, DeadLetter] = {}
    for record in _lines(path):
        kind = record.get("kind")
        if kind == "dead_letter" and record.get("id") not in letters:
            try:
                letters[str(record["id"])] = DeadLetter.from_record(record)
            except (KeyError, TypeError, ValueError):
                log.warning("dead_letter_record_unreadable", path=str(path))
        elif kind == "status" and record.get("id") in letters:
            letters[str(record["id"])].status = DeadLetterStatus(record["status"])
    return list(letters.values())
