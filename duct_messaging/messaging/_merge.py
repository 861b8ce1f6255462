"""Deep merge of routing maps: maps merge, other values replace, null removes."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from deepmerge import Merger


def _merge_maps(
    merger: Merger, path: list[Any], base: dict[Any, Any], nxt: dict[Any, Any]
) -> dict[Any, Any]:
    for key, value in nxt.items():
        if value is None:
            base.pop(key, None)
        elif key in base:
            base[key] = merger.value_strategy([*path, key], base[key], value)
        else:
            base[key] = _strip_nulls(value)
    return base


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    return value


_MERGER = Merger([(dict, [_merge_maps])], ["override"], ["override"])


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return `base` deep-merged with `override`; neither input is changed.

    Maps merge key by key, any other value in `override` (lists included)
    replaces the one in `base`, and an explicit `None` removes the key.
    """
    result: dict[str, Any] = _strip_nulls(copy.deepcopy(dict(base)))
    merged: dict[str, Any] = _MERGER.merge(result, copy.deepcopy(dict(override)))
    return merged
