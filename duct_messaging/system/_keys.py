"""Component keys, references between them, and key derivation.

A key is a string. A plain key names one component (`app.db/pool`). A
composite key names several parts separated by whitespace
(`"duct.kafka/producer kafka-primary"`): the key *derives from* each part,
and from every type a part derives from through `component(...,
derives_from=...)`. That is how several instances of one component type
live side by side under distinct keys, and how a ref can name a type or an
instance name instead of the full key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ref:
    """A reference to the resolved value of another component.

    `key` may be a full key, a type it derives from, or a part of a
    composite key; it must select exactly one key of the config.
    """

    key: str

    def __repr__(self) -> str:
        return f"Ref({self.key!r})"


@dataclass(frozen=True)
class RefSet:
    """A reference to every key that is or derives from `key`.

    The init function receives a dict mapping each such key to its resolved
    value, in start order; the dict is empty when no key matches. A key's
    own refset never contains the key itself.
    """

    key: str

    def __repr__(self) -> str:
        return f"RefSet({self.key!r})"


def key_parts(key: str) -> tuple[str, ...]:
    """Return the parts of a (possibly composite) key."""
    return tuple(key.split())


def normalize_key(key: str) -> str:
    """Return `key` with its parts separated by single spaces."""
    return " ".join(key.split())


def derived_closure(key: str, ancestors: Callable[[str], Iterable[str]]) -> set[str]:
    """Return every name `key` derives from, itself and its parts included."""
    closure = {normalize_key(key)}
    for part in key_parts(key):
        closure.add(part)
        closure.update(ancestors(part))
    return closure


def find_derived(
    keys: Iterable[str],
    target: str,
    ancestors: Callable[[str], Iterable[str]],
) -> list[str]:
    """Return the keys (in the given order) that are or derive from `target`.

    An exact match wins over derivation: if `target` itself is one of the
    keys, only that key is returned. A composite target matches keys that
    derive from all of its parts.
    """
    target = normalize_key(target)
    key_list = list(keys)
    if target in key_list:
        return [target]

    wanted = set(key_parts(target))
    return [key for key in key_list if wanted <= derived_closure(key, ancestors)]


def iter_refs(
    value: Any, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[Ref | RefSet, tuple[str | int, ...]]]:
    """Yield every `Ref`/`RefSet` inside `value` with its path."""
    if isinstance(value, Ref | RefSet):
        yield value, path
    elif isinstance(value, dict):
        for sub_key, item in value.items():
            yield from iter_refs(item, (*path, str(sub_key)))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from iter_refs(item, (*path, index))


def format_path(path: Iterable[str | int]) -> str:
    """Return a readable config path: `key.sub.list[0].field`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def attribute_name(key: str) -> str:
    """Return an identifier for `key`: every non-word character becomes `_`.

    `"duct.kafka/producer kafka-primary"` -> `"duct_kafka_producer_kafka_primary"`.
    A leading digit gets a `_` prefix.
    """
    name = "".join(char if char.isalnum() or char == "_" else "_" for char in key)
    if not name or name[0].isdigit():
        name = "_" + name
    return name
