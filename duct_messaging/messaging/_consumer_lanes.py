"""Ordered lanes of deliveries, and what became of each delivery.

With `concurrency: 1` a worker keeps one lane per partition (one for a
source without partitions). A head waiting out its back-off holds only its
lane; the others go on. A lane of a source that can pause is paused while
its head waits, so fetching does not pile up behind it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from duct_messaging.messaging._consumer_pipeline import Job
from duct_messaging.messaging.deadletter import DeadLetter
from duct_messaging.transports.base import Delivery


class Status(Enum):
    """What became of one delivery."""

    DONE = "done"
    DEAD = "dead"
    RELEASED = "released"
    DROPPED = "dropped"


@dataclass(slots=True)
class Outcome:
    """The result of the pipeline for one delivery.

    `DROPPED` means the source withdrew the delivery (its Kafka partition
    was revoked): it is neither acknowledged nor released.
    """

    delivery: Delivery
    status: Status
    dead_letter: DeadLetter | None = None


@dataclass(slots=True)
class Lane:
    """Deliveries handled in order: one partition, or a whole subscription."""

    key: int | None
    queue: deque[Delivery] = field(default_factory=deque)
    job: Job | None = None
    ready_at: float = 0.0
    paused: bool = False

    def waiting(self, now: float) -> bool:
        return bool(self.queue) and self.ready_at > now

    def pop(self) -> Delivery:
        self.job = None
        self.ready_at = 0.0
        return self.queue.popleft()

    def clear(self) -> list[Delivery]:
        self.job = None
        self.ready_at = 0.0
        out = list(self.queue)
        self.queue.clear()
        return out


class Lanes:
    """The ordered lanes of one worker, keyed by partition."""

    def __init__(self) -> None:
        self._lanes: dict[int | None, Lane] = {}

    def add(self, deliveries: Iterable[Delivery]) -> None:
        for delivery in deliveries:
            lane = self._lanes.get(delivery.partition)
            if lane is None:
                lane = self._lanes[delivery.partition] = Lane(delivery.partition)
            lane.queue.append(delivery)

    def next_ready(self) -> Lane | None:
        """Return the first lane whose head may run now, if any."""
        now = 0.0
        for lane in self._lanes.values():
            if not lane.queue:
                continue
            if lane.ready_at == 0.0:
                return lane
            now = now or time.monotonic()
            if lane.ready_at <= now:
                lane.ready_at = 0.0
                return lane
        return None

    def until_ready(self, now: float) -> float | None:
        """Return seconds until some lane can go on (0: now; None: all empty)."""
        waits = [
            max(lane.ready_at - now, 0.0) for lane in self._lanes.values() if lane.queue
        ]
        return min(waits) if waits else None

    def room(self, limit: int, now: float, can_pause: bool) -> int:
        """Return how many more deliveries may be fetched."""
        queued = 0
        for lane in self._lanes.values():
            if lane.paused:
                continue
            if not can_pause and lane.waiting(now):
                return 0  # fetching more would only pile up behind the back-off
            queued += len(lane.queue)
        return max(limit - queued, 0)

    def pause_changes(self, now: float, can_pause: bool) -> tuple[list[int], list[int]]:
        """Return (partitions to pause, partitions to resume); drop idle lanes."""
        to_pause: list[int] = []
        to_resume: list[int] = []
        for key, lane in list(self._lanes.items()):
            waiting = lane.waiting(now)
            if key is not None and lane.paused and not waiting:
                lane.paused = False
                to_resume.append(key)
            elif key is not None and can_pause and waiting and not lane.paused:
                lane.paused = True
                to_pause.append(key)
            if not lane.queue and not lane.paused:
                del self._lanes[key]
        return to_pause, to_resume

    def drain(self) -> list[Delivery]:
        out: list[Delivery] = []
        for lane in self._lanes.values():
            out.extend(lane.clear())
        self._lanes.clear()
        return out
