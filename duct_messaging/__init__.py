"""Integrant/Duct-style component systems for Python services, with messaging.

A system is declared in YAML; `init` starts its components in dependency
order and `halt` stops them in reverse. The messaging components (routing,
producers, consumers, dead letters, deferred delivery) are built on it.
"""

from __future__ import annotations

from duct_messaging._builtins import register_builtins as _register_builtins
from duct_messaging.errors import DuctMessagingError, MissingExtraError
from duct_messaging.runner import request_stop, run
from duct_messaging.system import (
    ConfigError,
    HaltError,
    InitError,
    System,
    ahalt,
    ainit,
    component,
    halt,
    init,
    load_config,
)

_register_builtins()

__all__ = [
    "ConfigError",
    "DuctMessagingError",
    "HaltError",
    "InitError",
    "MissingExtraError",
    "System",
    "ahalt",
    "ainit",
    "component",
    "halt",
    "init",
    "load_config",
    "request_stop",
    "run",
]
