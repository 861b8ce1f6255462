"""Tests for `duct-messaging check` and `duct-messaging graph`."""

from __future__ import annotations

import socket
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from duct_messaging.cli import main

APP = """
import socket

from duct_messaging.system import component

calls = []

def server(value):
    calls.append("server")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock

@component("{name}/checked")
def checked(value):
    calls.append("checked")
    return value

@checked.check
def _check(value, ctx):
    calls.append("check")
    if value.get("size", 0) < 1:
        yield "size: must be at least 1"
"""


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures structlog for the process; undo it after each test."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Write an app module beside the config; return its module name."""
    name = f"dm_cli_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APP.replace("{name}", name))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.fixture
def sockets(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record every socket created while the test runs."""
    created: list[Any] = []
    original = socket.socket

    class Recording(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            created.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(socket, "socket", Recording)
    return created


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


class TestCheck:
    def test_good_config_exits_0_and_starts_nothing(
        self,
        app: str,
        tmp_path: Path,
        sockets: list[Any],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A good config prints a summary; no init runs and no socket opens."""
        config = write(
            tmp_path / "good.yaml",
            f"""
            {app}/server: {{port: 0}}
            {app}/checked: {{size: 2, server: !ref {app}/server}}
            app/settings: {{debug: !profile {{dev: true, default: false}}}}
            """,
        )

        code = main(["check", str(config), "--profile", "dev"])

        out = capsys.readouterr().out
        assert code == 0
        assert out == f"ok: {config}: 3 components, 1 refs, profile dev\n"
        assert sys.modules[app].calls == ["check"]
        assert sockets == []

    def test_five_mistakes_are_listed_with_locations(
        self,
        app: str,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Every mistake is printed with its file and line; the exit code is 1."""
        monkeypatch.delenv("DM_CLI_MISSING", raising=False)
        config = write(
            tmp_path / "bad.yaml",
            f"""\
            {app}/server:
              port: !env [DM_CLI_MISSING, int]
            {app}/checked: {{size: 0}}
            app/user: {{db: !ref app/dbb}}
            app/db: {{}}
            duct.nowhere/thing: {{}}
            app/extra: !include missing.yaml
            """,
        )

        code = main(["check", str(config)])

        err = capsys.readouterr().err.splitlines()
        assert code == 1
        assert err[0] == f"{config}: 5 problems"
        assert err[1:] == [
            f"  - {app}/server.port: environment variable DM_CLI_MISSING is not "
            f"set and has no default [{config}:2]",
            f"  - app/extra: !include 'missing.yaml' in {config}: file not found "
            f"({tmp_path.resolve() / 'missing.yaml'}) [{config}:7]",
            f"  - {app}/checked: size: must be at least 1 [{config}:3]",
            "  - app/user.db: !ref 'app/dbb' matches no key of the config. "
            f"Did you mean: app/db? [{config}:4]",
            "  - duct.nowhere/thing: unknown component key 'duct.nowhere/thing'. "
            f"[{config}:6]",
        ]
        assert "server" not in sys.modules[app].calls

    def test_unreadable_yaml_exits_1(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A syntax error is reported like any other problem."""
        config = write(tmp_path / "broken.yaml", "a: [1, 2\n")

        code = main(["check", str(config)])

        assert code == 1
        assert "invalid YAML" in capsys.readouterr().err


class TestGraph:
    CONFIG = """
    app/api: {repo: !ref app/repo, db: !ref app/db}
    app/db: {}
    app/repo: {db: !ref app/db}
    """

    def test_text_lists_start_order_with_refs(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The text format numbers the keys in start order with their refs."""
        config = write(tmp_path / "g.yaml", self.CONFIG)

        assert main(["graph", str(config)]) == 0

        assert capsys.readouterr().out.splitlines() == [
            "start order (each key after the keys it refers to):",
            "  1. app/db  (data)",
            "  2. app/repo  (data)  -> app/db",
            "  3. app/api  (data)  -> app/repo, app/db",
        ]

    def test_dot_and_mermaid(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """dot and mermaid formats hold one edge per ref."""
        config = write(tmp_path / "g.yaml", self.CONFIG)

        main(["graph", str(config), "--format", "dot"])
        dot = capsys.readouterr().out
        main(["graph", str(config), "--format", "mermaid"])
        mermaid = capsys.readouterr().out.splitlines()

        assert '  "app/api" -> "app/repo";' in dot
        assert dot.count(" -> ") == 3
        assert mermaid[:4] == [
            "flowchart LR",
            '  k0["app/db"]',
            '  k1["app/repo"]',
            '  k2["app/api"]',
        ]
        assert mermaid[4:] == ["  k1 --> k0", "  k2 --> k1", "  k2 --> k0"]

    def test_cycle_exits_1(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A graph that cannot be ordered is reported as a problem."""
        config = write(tmp_path / "c.yaml", "a/x: !ref a/y\na/y: !ref a/x\n")

        assert main(["graph", str(config)]) == 1

        assert "dependency cycle: a/x -> a/y -> a/x" in capsys.readouterr().err
