"""Import-path resolution shared by routing, schemas and components."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str) -> Any:
    """Return the object named by `path`.

    Accepts `pkg.mod:attr`, `pkg.mod/attr` and `pkg.mod.attr`. Raises
    `ImportError` (or `AttributeError`) with the path in the message.
    """
    for sep in (":", "/"):
        if sep in path:
            module_name, _, attr = path.partition(sep)
            break
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ImportError(f"{path!r} is not an import path like 'pkg.module:name'")
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def looks_like_import_path(text: str) -> bool:
    """Return True if `text` has the shape of an import path."""
    return ":" in text or "/" in text or "." in text
