"""Errors a consumer raises when a subscription fails to start or stop."""

from __future__ import annotations

from duct_messaging.errors import DuctMessagingError
from duct_messaging.messaging.routing import Subscription


class ConsumerStartError(DuctMessagingError, RuntimeError):
    """Raised when a subscription's source failed to start, or not in time."""

    def __init__(
        self,
        subscription: str,
        source: str,
        client: str,
        reason: str,
        hint: str,
    ) -> None:
        self.subscription = subscription
        self.source = source
        self.client = client
        self.reason = reason
        super().__init__(
            f"Subscription {subscription!r} could not start its {source} consumer "
            f"on client {client!r}: {reason}. {hint}"
        )

    @classmethod
    def of(
        cls, subscription: Subscription, exc: BaseException, timeout_s: float
    ) -> ConsumerStartError:
        """Return the error for `subscription`'s source, which failed with `exc`."""
        if isinstance(exc, TimeoutError):
            reason = f"not started after {timeout_s:g} s"
            hint = (
                "Check that the broker is up and reachable from here, or raise "
                "start_timeout_s in the consumers' settings."
            )
        else:
            reason = f"{type(exc).__name__}: {describe(exc)}"
            hint = "Check the client's settings and that its broker is up."
        return cls(
            subscription.id, subscription.source, subscription.client, reason, hint
        )


class SubscriptionFailedError(DuctMessagingError, RuntimeError):
    """Raised by `SubscriptionWorker.stop` when its fetch loop had died."""

    def __init__(self, subscription: str, cause: BaseException) -> None:
        self.subscription = subscription
        self.cause = cause
        super().__init__(
            f"Subscription {subscription!r} stopped consuming for good: "
            f"{type(cause).__name__}: {describe(cause)}. What finished was "
            "acknowledged; fix the cause (see the traceback) and restart."
        )


class ConsumerStopError(DuctMessagingError, RuntimeError):
    """Raised by `ConsumerRuntime.stop` when some workers failed or died.

    Every worker was still stopped; `failures` maps each failed
    subscription to its error.
    """

    def __init__(self, transport: str, failures: dict[str, BaseException]) -> None:
        self.transport = transport
        self.failures = failures
        listed = "; ".join(
            f"{sub!r} ({type(exc).__name__}: {describe(exc)})"
            for sub, exc in failures.items()
        )
        super().__init__(
            f"{transport} consumers did not stop cleanly: {listed}. Every other "
            "subscription stopped; see the logged errors for the cause."
        )


def describe(exc: BaseException) -> str:
    """Return `str(exc)`, even for an exception that cannot render itself."""
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__} that cannot be printed>"
