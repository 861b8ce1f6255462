"""The exception hierarchy shared by every layer of duct-messaging.

Every error the library raises derives from `DuctMessagingError`, so callers
can catch the whole family at once. Layers add their own subclasses next to
the code that raises them and re-export them from their public modules.
"""

from __future__ import annotations


class DuctMessagingError(Exception):
    """Root of every error raised by duct-messaging."""


class MissingExtraError(DuctMessagingError, ImportError):
    """Raised when a transport or feature needs an optional extra that is absent."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        self.feature = feature
        self.extra = extra
        self.module = module
        super().__init__(
            f"{feature} needs the Python package {module!r}, which is not installed. "
            f"Install it with: pip install 'duct-messaging[{extra}]'"
        )
