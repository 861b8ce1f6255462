"""Fixtures shared by the component system tests."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from duct_messaging.system._registry import isolated_registry


@pytest.fixture(autouse=True)
def _registry() -> Iterator[None]:
    """Drop every component a test registers when it ends."""
    with isolated_registry():
        yield


@pytest.fixture
def make_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], ModuleType]]:
    """Return a factory writing an importable module with a unique name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def make(source: str) -> ModuleType:
        name = f"dm_sys_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        created.append(name)
        return importlib.import_module(name)

    yield make
    for name in created:
        sys.modules.pop(name, None)


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """Return a helper writing a dedented text file under tmp_path."""

    def write_file(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    return write_file
