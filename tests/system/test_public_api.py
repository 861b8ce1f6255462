"""The public surface of duct_messaging.system is deliberate."""

from __future__ import annotations

import duct_messaging.system as system

EXPECTED = [
    "CheckContext",
    "Component",
    "Config",
    "ConfigError",
    "HaltError",
    "InitError",
    "Plan",
    "Ref",
    "RefSet",
    "System",
    "SystemStateError",
    "ahalt",
    "ainit",
    "aresume",
    "asuspend",
    "attribute_name",
    "check_config",
    "component",
    "halt",
    "init",
    "load_config",
    "make_plan",
    "read_config",
    "register_lazy",
    "resume",
    "suspend",
]


def test_all_lists_exactly_the_public_names() -> None:
    """__all__ is sorted, complete, and every name in it exists."""
    public = sorted(name for name in vars(system) if not name.startswith("_"))

    assert system.__all__ == EXPECTED
    assert sorted(system.__all__) == system.__all__
    assert [name for name in public if name != "annotations"] == EXPECTED


def test_errors_share_the_library_root() -> None:
    """Every system error is a DuctMessagingError; config errors are ValueErrors."""
    from duct_messaging.errors import DuctMessagingError

    for error in (system.ConfigError, system.InitError, system.HaltError):
        assert issubclass(error, DuctMessagingError)
    assert issubclass(system.ConfigError, ValueError)
