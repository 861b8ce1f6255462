"""An Integrant-style component system configured with YAML.

A config maps component keys to data. Keys bind to init functions (by
`@component` registration or by import path), refs between keys define
the start order, and the whole config is checked before anything starts.
See `_registry` for how keys resolve and `_keys` for composite keys.
"""

from __future__ import annotations

from duct_messaging.system._errors import (
    ConfigError,
    HaltError,
    InitError,
    SystemStateError,
)
from duct_messaging.system._keys import Ref, RefSet, attribute_name
from duct_messaging.system._plan import Plan, check_config, make_plan
from duct_messaging.system._registry import Component, component, register_lazy
from duct_messaging.system._resume import aresume, asuspend, resume, suspend
from duct_messaging.system._system import System, ahalt, ainit, halt, init
from duct_messaging.system._validate import CheckContext
from duct_messaging.system._yaml import Config, load_config, read_config

__all__ = [
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
