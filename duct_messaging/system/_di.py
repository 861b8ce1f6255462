"""Expose a started system to dependency-injector.

`System.container()` returns a `DynamicContainer` with one
`providers.Object` per key of the system, registered twice: under the key
itself (`container.providers["duct.kafka/clients"]`) and under its
attribute-safe name, where every character other than a letter, digit or
`_` becomes `_` (`container.duct_kafka_clients`,
`Provide["duct_kafka_clients"]`). Use the safe name with `Provide[...]`:
dependency-injector reads dots in a string as attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from duct_messaging.errors import MissingExtraError
from duct_messaging.system._errors import ConfigError
from duct_messaging.system._keys import attribute_name

try:
    from dependency_injector import containers, providers
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingExtraError("System.container()", "di", "dependency-injector") from exc

if TYPE_CHECKING:
    from duct_messaging.system._system import System


def build_container(system: System) -> containers.DynamicContainer:
    """Return a new `DynamicContainer` holding the system's values by key.

    Raises:
        ConfigError: two keys map to the same attribute-safe name.
    """
    container = containers.DynamicContainer()
    owners: dict[str, str] = {}
    clashes: list[str] = []
    for key, value in system.items():
        name = attribute_name(key)
        if name in owners and owners[name] != key:
            clashes.append(
                f"{key}: its attribute name {name!r} is also the name of "
                f"{owners[name]!r}; rename one of the keys"
            )
            continue
        owners[name] = key
        container.set_provider(name, providers.Object(value))
        if name != key:
            container.set_provider(key, providers.Object(value))
    if clashes:
        raise ConfigError(clashes)
    return container
