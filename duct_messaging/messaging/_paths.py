"""Readable paths to a value inside a message, shared by codecs and schemas.

A path reads like Python/JSONPath without the leading `$`: `items[2].id`.
The empty string is the message itself. Keys that are not plain names are
quoted (`headers["content type"]`) so a path never reads ambiguously.
"""

from __future__ import annotations

import re

import orjson

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def join_key(path: str, key: object) -> str:
    """Return the path of mapping entry `key` below `path`."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key

    quoted = orjson.dumps(key).decode() if isinstance(key, str) else repr(key)
    return f"{path}[{quoted}]"


def join_index(path: str, index: int) -> str:
    """Return the path of sequence item `index` below `path`."""
    return f"{path}[{index}]"


def describe(path: str) -> str:
    """Return `path` as a phrase for an error message."""
    return f"at {path}" if path else "at the top level"
