"""Measure the component system's own overhead on a 1,000-component config.

The config mixes a 500-key chain (each key refers to the previous one)
with 499 leaves that all refer to the chain's head and one key that takes
every leaf through `!refset` (fan-in). Init functions do nothing, so the
times are the system's: YAML parsing, checking, ordering, ref resolution,
lifecycle calls and events. Run: `.venv/bin/python bench/system_lifecycle.py`.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import structlog

from duct_messaging.system import (
    ahalt,
    ainit,
    component,
    halt,
    init,
    make_plan,
    read_config,
)

CHAIN = 500
LEAVES = 499
ROUNDS = 5


def config_text() -> str:
    """Return the YAML of the benchmark config (1,000 keys)."""
    lines = ["bench/node c0: {index: 0}"]
    lines += [f"bench/node c{i}: {{prev: !ref c{i - 1}}}" for i in range(1, CHAIN)]
    lines += [f"bench/leaf l{i}: {{head: !ref c0}}" for i in range(LEAVES)]
    lines.append("bench/node sink: {leaves: !refset bench/leaf}")
    return "\n".join(lines) + "\n"


def register(is_async: bool) -> None:
    """Register trivial init/halt functions for the benchmark keys."""

    def start(value: Any) -> Any:
        return value

    async def astart(value: Any) -> Any:
        return value

    def stop(state: Any) -> None:
        return None

    for key in ("bench/node", "bench/leaf"):
        registered = component(key)(astart if is_async else start)
        registered.halt(stop)


def best_ms(run: Callable[[], Any]) -> float:
    """Return the median of ROUNDS runs of `run`, in milliseconds."""
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    """Print load, check, init and halt times and the per-component cost."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING)
    )
    text = config_text()
    register(is_async=False)
    config = read_config(text)
    count = len(config)

    load_ms = best_ms(lambda: read_config(text))
    plan_ms = best_ms(lambda: make_plan(config))

    def cycle_sync() -> None:
        halt(init(config))

    async def cycle_async() -> None:
        await ahalt(await ainit(config))

    async def cycle_waves() -> None:
        await ahalt(await ainit(config, concurrent=True))

    sync_ms = best_ms(cycle_sync)
    ainit_ms = best_ms(lambda: asyncio.run(cycle_async()))
    waves_ms = best_ms(lambda: asyncio.run(cycle_waves()))
    register(is_async=True)
    bridged_ms = best_ms(cycle_sync)

    print(f"components: {count} (chain {CHAIN}, leaves {LEAVES}, 1 refset sink)")
    print(f"median of {ROUNDS} runs")
    print(f"read_config (YAML + tags)          {load_ms:8.1f} ms")
    print(f"make_plan (check + order)          {plan_ms:8.1f} ms")
    rows = [
        ("init+halt, sync init fns", sync_ms),
        ("ainit+ahalt, sync init fns", ainit_ms),
        ("ainit(concurrent)+ahalt", waves_ms),
        ("init+halt, async init fns (loop)", bridged_ms),
    ]
    for label, total in rows:
        per = total * 1000 / count
        print(f"{label:<35}{total:8.1f} ms  {per:7.1f} us/component")


if __name__ == "__main__":
    main()
