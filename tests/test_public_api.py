"""The top-level package exports exactly its documented names."""

from __future__ import annotations

import duct_messaging


def test_all_is_sorted_and_every_name_exists() -> None:
    """`__all__` is sorted, and each name in it is importable from the package."""
    names = duct_messaging.__all__

    assert list(names) == sorted(names)
    assert [n for n in names if not hasattr(duct_messaging, n)] == []


def test_nothing_public_by_accident() -> None:
    """Public attributes that are not modules are exactly those in `__all__`."""
    public = {
        name
        for name, value in vars(duct_messaging).items()
        if not name.startswith("_") and type(value).__name__ != "module"
    }

    assert public - {"annotations"} == set(duct_messaging.__all__)


def test_messaging_exports_are_sorted_and_importable() -> None:
    """`duct_messaging.messaging.__all__` is sorted and every name resolves."""
    import duct_messaging.messaging as messaging

    names = messaging.__all__

    assert list(names) == sorted(names)
    assert [n for n in names if not hasattr(messaging, n)] == []
