"""The public names of the deferred-delivery module."""

from __future__ import annotations

import inspect

from duct_messaging.messaging import deferred


class TestUnit:
    def test_all_is_sorted_and_importable(self) -> None:
        """`__all__` is sorted and every name in it exists."""
        assert deferred.__all__ == sorted(deferred.__all__)
        assert all(hasattr(deferred, name) for name in deferred.__all__)

    def test_nothing_else_is_public(self) -> None:
        """Every public class or function defined here is listed in `__all__`."""
        defined_here = {
            name
            for name, value in vars(deferred).items()
            if not name.startswith("_")
            and (inspect.isclass(value) or inspect.isfunction(value))
            and value.__module__ == deferred.__name__
        }

        assert defined_here <= set(deferred.__all__)

    def test_exports_come_from_the_deferred_modules(self) -> None:
        """Re-exported names come from the private `_deferred_*` modules only."""
        owners = {
            getattr(deferred, name).__module__
            for name in deferred.__all__
            if inspect.isclass(getattr(deferred, name))
        }

        assert all(
            owner == deferred.__name__
            or owner.startswith("duct_messaging.messaging._deferred_")
            for owner in owners
        )
