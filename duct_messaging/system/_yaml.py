"""Load YAML configs with the system's tags, safely.

Supported tags:

- `!ref KEY` / `!refset KEY`: become `Ref` / `RefSet` objects.
- `!env NAME` (a string, required) or `!env [NAME, TYPE, DEFAULT]` with
  TYPE one of str, int, float, bool; DEFAULT is optional (null allowed).
- `!include PATH`: the parsed content of another file, relative to the
  including file (or to `base_dir` for text). Includes nest.
- `!profile {dev: ..., test: ..., prod: ...}`: the entry of the selected
  profile (argument, else `DUCT_PROFILE`), else its `default` entry.

Loading never builds Python objects from YAML: it uses a `SafeLoader`
subclass. Env, include and profile problems do not raise one at a time;
they are collected in `Config.problems` with the config path where they
occur and the file and line, and `init` reports them with all others.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from duct_messaging.system._errors import ConfigError
from duct_messaging.system._keys import Ref, RefSet, format_path, normalize_key

PROFILE_ENV = "DUCT_PROFILE"

ConfigPath = tuple[str | int, ...]


class Config(Mapping[str, Any]):
    """A loaded config: a read-only mapping of component key -> value.

    Besides the data it carries `problems` found while loading (bad env
    values, missing includes...) with `problem_keys` (the top-level key of
    each problem, or None), `locations` (config path -> "file:line")
    used to point at problems, the selected `profile` and the `source` file.
    Plain dicts are accepted wherever a `Config` is.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        *,
        problems: tuple[str, ...] = (),
        problem_keys: tuple[str | None, ...] = (),
        locations: Mapping[ConfigPath, str] | None = None,
        profile: str | None = None,
        source: str | None = None,
    ) -> None:
        self._data = dict(data)
        self.problems = problems
        self.problem_keys = problem_keys or (None,) * len(problems)
        self.locations = dict(locations or {})
        self.profile = profile
        self.source = source

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Config({self._data!r}, profile={self.profile!r})"

    def locate(self, path: ConfigPath) -> str | None:
        """Return "file:line" of `path`, or of its closest located parent."""
        for end in range(len(path), 0, -1):
            where = self.locations.get(path[:end])
            if where is not None:
                return where
        return None


def load_config(path: str | os.PathLike[str], profile: str | None = None) -> Config:
    """Read the YAML config file at `path`.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or its top
            level is not a mapping. Other problems land in `Config.problems`.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read config file: {exc}"]) from exc
    return _load(
        text,
        source=str(file),
        base_dir=file.parent,
        profile=profile,
        stack=(file.resolve(),),
    )


def read_config(
    text: str,
    *,
    base_dir: str | os.PathLike[str] = ".",
    profile: str | None = None,
    source: str = "<string>",
) -> Config:
    """Parse a YAML config from `text`; includes are relative to `base_dir`.

    Raises the same way as `load_config`.
    """
    return _load(
        text, source=source, base_dir=Path(base_dir), profile=profile, stack=()
    )


def _load(
    text: str,
    *,
    source: str,
    base_dir: Path,
    profile: str | None,
    stack: tuple[Path, ...],
) -> Config:
    selected = profile if profile is not None else os.environ.get(PROFILE_ENV)
    try:
        data, loader = _parse(text, source)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from exc

    expander = _Expander(selected, stack)
    data = expander.walk(data, (), loader, base_dir)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of keys"])

    top: dict[str, Any] = {}
    for key, value in data.items():
        where = expander.locations.get((key,))
        if not isinstance(key, str):
            expander.problem((str(key),), "component keys must be strings", where)
            continue
        name = normalize_key(key)
        if name in top:
            expander.problem(
                (name,), "defined twice (keys differ only in spacing)", where
            )
        top[name] = value
        if where is not None:
            expander.locations[(name,)] = where
    return Config(
        top,
        problems=tuple(expander.problems),
        problem_keys=tuple(expander.problem_keys),
        locations=expander.locations,
        profile=selected,
        source=source,
    )


class _Loader(yaml.SafeLoader):
    """Safe loader that records where each mapping key was written."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.name = source
        self.key_marks: dict[int, dict[Any, str]] = {}


def _parse(text: str, source: str) -> tuple[Any, _Loader]:
    loader = _Loader(text, source)
    try:
        return loader.get_single_data(), loader
    finally:
        loader.dispose()


def _where(node: yaml.Node) -> str:
    mark = node.start_mark
    return f"{mark.name}:{mark.line + 1}"


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Iterator[dict[Any, Any]]:
    data: dict[Any, Any] = {}
    yield data
    data.update(loader.construct_mapping(node))
    marks = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, str | int | float | bool):
            marks[key] = _where(key_node)
    loader.key_marks[id(data)] = marks


@dataclass(frozen=True)
class _Env:
    spec: Any
    where: str


@dataclass(frozen=True)
class _Include:
    path: Any
    where: str


@dataclass(frozen=True)
class _Profile:
    options: Any
    where: str


@dataclass(frozen=True)
class _Bad:
    message: str
    where: str


def _scalar_tag(kind: type[Ref] | type[RefSet], tag: str) -> Any:
    def construct(loader: _Loader, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode) or not str(node.value).strip():
            return _Bad(f"{tag} expects a key name", _where(node))
        return kind(normalize_key(str(node.value)))

    return construct


def _construct_env(loader: _Loader, node: yaml.Node) -> _Env:
    if isinstance(node, yaml.SequenceNode):
        return _Env(loader.construct_sequence(node, deep=True), _where(node))
    if isinstance(node, yaml.ScalarNode):
        return _Env(str(node.value), _where(node))
    return _Env(None, _where(node))


def _construct_include(loader: _Loader, node: yaml.Node) -> _Include | _Bad:
    if not isinstance(node, yaml.ScalarNode):
        return _Bad("!include expects a file path", _where(node))
    return _Include(str(node.value), _where(node))


def _construct_profile(loader: _Loader, node: yaml.Node) -> _Profile | _Bad:
    if not isinstance(node, yaml.MappingNode):
        return _Bad("!profile expects a mapping of profile -> value", _where(node))
    return _Profile(loader.construct_mapping(node, deep=True), _where(node))


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("!ref", _scalar_tag(Ref, "!ref"))
_Loader.add_constructor("!refset", _scalar_tag(RefSet, "!refset"))
_Loader.add_constructor("!env", _construct_env)
_Loader.add_constructor("!include", _construct_include)
_Loader.add_constructor("!profile", _construct_profile)


def _to_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true/false, yes/no, 1/0)")


_ENV_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": _to_bool}


def _has_type(value: Any, type_name: str) -> bool:
    if type_name == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if type_name == "float":
        return isinstance(value, int | float)
    return isinstance(value, int if type_name == "int" else str)


class _Expander:
    """Replace env/include/profile markers, collecting problems and locations."""

    def __init__(self, profile: str | None, stack: tuple[Path, ...]) -> None:
        self.profile = profile
        self.stack = stack
        self.problems: list[str] = []
        self.problem_keys: list[str | None] = []
        self.locations: dict[ConfigPath, str] = {}

    def problem(self, path: ConfigPath, message: str, where: str | None) -> None:
        place = format_path(path) or "<top level>"
        suffix = f" [{where}]" if where else ""
        self.problems.append(f"{place}: {message}{suffix}")
        self.problem_keys.append(str(path[0]) if path else None)

    def walk(self, value: Any, path: ConfigPath, loader: _Loader, base: Path) -> Any:
        if isinstance(value, dict):
            marks = loader.key_marks.get(id(value), {})
            result = {}
            for key, item in value.items():
                sub = (*path, key if isinstance(key, str) else str(key))
                if key in marks:
                    self.locations[sub] = marks[key]
                result[key] = self.walk(item, sub, loader, base)
            return result
        if isinstance(value, list):
            return [
                self.walk(item, (*path, index), loader, base)
                for index, item in enumerate(value)
            ]
        if isinstance(value, _Env):
            return self.env(value, path)
        if isinstance(value, _Profile):
            return self.select(value, path, loader, base)
        if isinstance(value, _Include):
            return self.include(value, path, base)
        if isinstance(value, _Bad):
            self.problem(path, value.message, value.where)
            return None
        return value

    def env(self, tag: _Env, path: ConfigPath) -> Any:
        spec = tag.spec
        if isinstance(spec, str):
            spec = [spec]
        if (
            not isinstance(spec, list)
            or not 1 <= len(spec) <= 3
            or not isinstance(spec[0], str)
        ):
            self.problem(path, "!env expects NAME or [NAME, TYPE, DEFAULT]", tag.where)
            return None
        name = spec[0]
        type_name = spec[1] if len(spec) > 1 else "str"
        if type_name not in _ENV_TYPES:
            self.problem(
                path,
                f"!env {name}: unknown type {type_name!r}; use str, int, float or bool",
                tag.where,
            )
            return None

        raw = os.environ.get(name)
        source = f"environment variable {name}={raw!r}"
        if raw is None:
            if len(spec) < 3:
                self.problem(
                    path,
                    f"environment variable {name} is not set and has no default",
                    tag.where,
                )
                return None
            default = spec[2]
            if default is None or _has_type(default, type_name):
                return default
            if not isinstance(default, str):
                self.problem(
                    path,
                    f"!env {name}: default {default!r} is not a valid {type_name}",
                    tag.where,
                )
                return None
            raw = default
            source = f"!env {name}: default {default!r} (the variable is not set)"
        try:
            return _ENV_TYPES[type_name](raw)
        except ValueError:
            self.problem(
                path,
                f"{source} is not a valid {type_name}",
                tag.where,
            )
            return None

    def select(
        self, tag: _Profile, path: ConfigPath, loader: _Loader, base: Path
    ) -> Any:
        options = tag.options
        if self.profile is not None and self.profile in options:
            return self.walk(options[self.profile], path, loader, base)
        if "default" in options:
            return self.walk(options["default"], path, loader, base)
        names = ", ".join(str(name) for name in options)
        wanted = (
            f"profile {self.profile!r} is not one of: {names}"
            if self.profile is not None
            else f"no profile selected (pass profile= or set {PROFILE_ENV}); "
            f"choices: {names}"
        )
        self.problem(path, f"!profile: {wanted}", tag.where)
        return None

    def include(self, tag: _Include, path: ConfigPath, base: Path) -> Any:
        file = (base / str(tag.path)).resolve()
        including = tag.where.rsplit(":", 1)[0]
        if file in self.stack:
            chain = " -> ".join(str(step) for step in (*self.stack, file))
            self.problem(path, f"!include cycle from {including}: {chain}", tag.where)
            return None
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            reason = "file not found" if isinstance(exc, FileNotFoundError) else exc
            self.problem(
                path,
                f"!include {tag.path!r} in {including}: {reason} ({file})",
                tag.where,
            )
            return None
        try:
            data, loader = _parse(text, str(file))
        except yaml.YAMLError as exc:
            self.problem(
                path,
                f"!include {tag.path!r} in {including}: invalid YAML: {exc}",
                tag.where,
            )
            return None

        outer = self.stack
        self.stack = (*outer, file)
        try:
            return self.walk(data, path, loader, file.parent)
        finally:
            self.stack = outer
