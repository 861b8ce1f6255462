"""Handlers that YAML configs of the delivery suite name by import path."""

from __future__ import annotations

from typing import Any

from duct_messaging.messaging.consumer import MessageContext
from tests.delivery._support import Recorder


class OrdersApp:
    """A handler that fails while `failing` is set, recording every call."""

    def __init__(self) -> None:
        self.failing = True
        self.seen = Recorder()

    def reset(self) -> None:
        self.failing = True
        self.seen = Recorder()


APP = OrdersApp()


def orders(message: Any, ctx: MessageContext) -> None:
    """Record (n, replayed-from header); fail while the app is failing."""
    APP.seen.add((message["n"], ctx.headers.get("x-replayed-from")))
    if APP.failing:
        raise RuntimeError(f"order {message['n']} rejected")
