"""The orders example runs end to end, on the embedded default and on Kafka."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from duct_messaging.testing.tansu import TansuBroker

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ROOT / "examples" / "orders"


def run_orders(
    config: str, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "duct_messaging.cli", "run", str(ORDERS / config)],
        cwd=cwd,
        env={**os.environ, "ORDERS_COUNT": "4", "REMINDER_DELAY_MS": "1500", **env},
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


def assert_each_order_seen_once_per_subscription(stdout: str) -> None:
    published = re.findall(r"published order (\S+) to", stdout)
    worker = re.findall(r"\[orders-worker\] order (\S+) .*client kafka-primary", stdout)
    data = re.findall(r"\[orders-data-worker\] order (\S+) .*client kafka-data", stdout)
    reminders = re.findall(
        r"\[payment-reminders\] reminder for order (\S+) arrived", stdout
    )
    assert len(published) == 4
    assert sorted(worker) == sorted(published)
    assert sorted(data) == sorted(published)
    assert sorted(reminders) == sorted(published)


def test_orders_example_on_the_embedded_default(tmp_path: Path) -> None:
    """`make run`'s job: orders reach both subscriptions, reminders arrive later."""
    result = run_orders("config.yaml", {}, tmp_path)

    assert result.returncode == 0, result.stderr
    assert_each_order_seen_once_per_subscription(result.stdout)


@pytest.mark.kafka
def test_orders_example_on_two_kafka_clusters(tmp_path: Path) -> None:
    """`make run-kafka`'s job: each subscription reads its own real cluster."""
    with TansuBroker() as primary, TansuBroker() as data:
        result = run_orders(
            "config.kafka.yaml",
            {
                "KAFKA_BOOTSTRAP_1": primary.bootstrap_servers,
                "KAFKA_BOOTSTRAP_2": data.bootstrap_servers,
            },
            tmp_path,
        )

    assert result.returncode == 0, result.stderr
    assert_each_order_seen_once_per_subscription(result.stdout)
