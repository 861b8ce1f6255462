"""Codecs: how a message body becomes bytes on the wire and back.

The body is the codec's encoding of the message alone, so any plain client
can read it; metadata travels in transport headers. Two codecs ship:

- `json` (`application/json`, the default), backed by orjson.
- `msgpack` (`application/msgpack`), backed by the optional `msgpack` extra,
  imported the first time the codec is asked for.

Both are strict and agree on the awkward types:

- `uuid.UUID` becomes its canonical string.
- A timezone-aware `datetime` becomes an ISO-8601 string with its offset
  (`2025-01-01T10:00:00+00:00`); `date` and `time` become ISO-8601 strings.
- A naive `datetime` is refused with `EncodeError`: it names no instant, and
  guessing UTC or local time silently shifts it for some reader. Attach a
  timezone (`datetime.now(UTC)`) or send a string.
- Enums are encoded as their value, dataclasses as a mapping of their fields.
- Anything else the format cannot carry is an `EncodeError` naming its type
  and where it sits in the message. Nothing is ever turned into `str()`.

Decoding gives plain data back (strings stay strings; schemas parse UUIDs
and instants). Bytes that do not decode raise `DecodeError`, which a
consumer treats as poison.

MessagePack differs from JSON only where its format is richer: `bytes`
travel as binary and mapping keys need not be strings.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import threading
import uuid
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import orjson

from duct_messaging.errors import DuctMessagingError, MissingExtraError
from duct_messaging.messaging._paths import describe, join_index, join_key

__all__ = [
    "JSON_CODEC",
    "Codec",
    "CodecError",
    "DecodeError",
    "EncodeError",
    "UnknownCodecError",
    "get_codec",
    "known_codecs",
    "register_codec",
]


@runtime_checkable
class Codec(Protocol):
    """Turn a message into bytes and back.

    `name` is the short name used in config (`json`); `content_type` is the
    MIME type written to the `content-type` header. Both must be stable:
    consumers pick the codec by the header of each message.
    """

    name: str
    content_type: str

    def encode(self, message: Any) -> bytes:
        """Return the wire form of `message`; raise `EncodeError` if impossible."""
        ...

    def decode(self, data: bytes) -> Any:
        """Return the message encoded in `data`; raise `DecodeError` if impossible."""
        ...


class CodecError(DuctMessagingError):
    """Root of the errors raised while choosing, encoding or decoding a codec."""


class EncodeError(CodecError, TypeError):
    """Raised when a message holds a value the codec cannot carry.

    `path` locates the value (`items[2].when`, "" for the message itself),
    or is None when it could not be located; `reason` says what is wrong.
    """

    def __init__(self, codec: str, reason: str, path: str | None = None) -> None:
        self.codec = codec
        self.reason = reason
        self.path = path
        where = f" {describe(path)}" if path is not None else ""
        super().__init__(
            f"Cannot encode message as {codec}{where}: {reason}. "
            "Send only data the codec can carry (convert the value first)."
        )


class DecodeError(CodecError, ValueError):
    """Raised when bytes are not a valid encoding for the codec."""

    def __init__(self, codec: str, reason: str) -> None:
        self.codec = codec
        self.reason = reason
        super().__init__(
            f"Cannot decode {codec} message body: {reason}. "
            "The producer sent bytes in another format or a truncated body."
        )


class UnknownCodecError(CodecError, ValueError):
    """Raised when a codec name or content type matches no known codec."""

    def __init__(self, requested: str, known: list[str]) -> None:
        self.requested = requested
        self.known = tuple(known)
        super().__init__(
            f"Unknown codec: {requested!r}. "
            f"Use one of: {', '.join(self.known)} (a name or a content type)."
        )


class _Unencodable(Exception):
    """Carries the offending value out of an encoder's `default` hook."""

    def __init__(self, value: object, reason: str) -> None:
        self.value = value
        self.reason = reason
        super().__init__(reason)


def _naive_reason(value: dt.datetime) -> str:
    return (
        f"naive datetime {value.isoformat()} has no timezone; "
        "attach one, e.g. datetime.now(UTC)"
    )


def _type_reason(value: object) -> str:
    kind = type(value)
    return f"values of type {kind.__module__}.{kind.__qualname__} are not supported"


def _json_default(value: object) -> Any:
    """Encode what orjson hands back to us: datetimes, or unsupported values."""
    if isinstance(value, dt.datetime):
        if value.utcoffset() is None:
            raise _Unencodable(value, _naive_reason(value))
        return value.isoformat()

    if isinstance(value, dt.date | dt.time):
        return value.isoformat()

    raise _Unencodable(value, _type_reason(value))


_JSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME


class _JsonCodec:
    """JSON through orjson; see the module docstring for the type rules."""

    name = "json"
    content_type = "application/json"

    def encode(self, message: Any) -> bytes:
        """Return `message` as UTF-8 JSON bytes."""
        try:
            return orjson.dumps(message, default=_json_default, option=_JSON_OPTIONS)
        except orjson.JSONEncodeError as exc:
            raise _encode_error(self.name, message, exc, _json_problem) from exc

    def decode(self, data: bytes) -> Any:
        """Return the message held in JSON `data`."""
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(self.name, str(exc)) from exc

    def __repr__(self) -> str:
        return "<codec json application/json>"


def _msgpack_default(value: object) -> Any:
    """Map the types msgpack lacks onto the JSON codec's choices."""
    if isinstance(value, uuid.UUID):
        return str(value)

    if isinstance(value, dt.datetime | dt.date | dt.time):
        return _json_default(value)

    if isinstance(value, enum.Enum):
        return value.value

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}

    raise _Unencodable(value, _msgpack_problem(value) or _type_reason(value))


class _MsgpackCodec:
    """MessagePack through the `msgpack` package (optional extra)."""

    name = "msgpack"
    content_type = "application/msgpack"

    def __init__(self) -> None:
        try:
            import msgpack
        except ImportError as exc:
            raise MissingExtraError("The msgpack codec", "msgpack", "msgpack") from exc

        self._packb: Callable[..., bytes] = msgpack.packb
        self._unpackb: Callable[..., Any] = msgpack.unpackb

    def encode(self, message: Any) -> bytes:
        """Return `message` as MessagePack bytes."""
        try:
            return self._packb(
                message, default=_msgpack_default, use_bin_type=True, datetime=False
            )
        except (_Unencodable, TypeError, ValueError, OverflowError) as exc:
            raise _encode_error(self.name, message, exc, _msgpack_problem) from exc

    def decode(self, data: bytes) -> Any:
        """Return the message held in MessagePack `data`."""
        try:
            return self._unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:
            # msgpack raises a mix of ValueError subclasses, TypeError and its
            # own errors for malformed input; every one of them means poison.
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise DecodeError(self.name, reason) from exc

    def __repr__(self) -> str:
        return "<codec msgpack application/msgpack>"


_Problem = Callable[[object], str | None]


def _encode_error(
    codec: str, message: Any, exc: BaseException, problem: _Problem
) -> EncodeError:
    """Build an `EncodeError`, locating the bad value by walking the message.

    Only runs on failure, so the fast path pays nothing for good messages.
    """
    cause = exc if isinstance(exc, _Unencodable) else exc.__cause__
    if isinstance(cause, _Unencodable):
        culprit = cause.value
        path = _locate(message, lambda v: cause.reason if v is culprit else None)
        return EncodeError(codec, cause.reason, path)

    found = _locate_problem(message, problem)
    if found is not None:
        return EncodeError(codec, found[1], found[0])
    return EncodeError(codec, str(exc))


def _msgpack_problem(value: object) -> str | None:
    """Say why msgpack rejects `value` itself (not its children), if it does."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return f"integer {value} does not fit in 64 bits"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "string is not valid UTF-8 (it holds a lone surrogate)"
    return None


def _json_problem(value: object) -> str | None:
    """Say why orjson rejects `value` itself (not its children), if it does."""
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                return f"mapping key {key!r} is not a string"
    return _msgpack_problem(value)


def _locate(message: Any, problem: _Problem) -> str | None:
    found = _locate_problem(message, problem)
    return None if found is None else found[0]


def _locate_problem(message: Any, problem: _Problem) -> tuple[str, str] | None:
    """Return (path, reason) of the first value `problem` objects to."""
    stack: list[tuple[str, object]] = [("", message)]
    seen: set[int] = set()
    while stack:
        path, value = stack.pop()
        reason = problem(value)
        if reason is not None:
            return path, reason

        if id(value) in seen:
            continue
        children = _children(path, value)
        if children:
            seen.add(id(value))
            stack.extend(reversed(children))
    return None


def _children(path: str, value: object) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [(join_key(path, k), v) for k, v in value.items()]
    if isinstance(value, list | tuple):
        return [(join_index(path, i), v) for i, v in enumerate(value)]
    if isinstance(value, enum.Enum):
        return [(path, value.value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return [(join_key(path, f.name), getattr(value, f.name)) for f in fields]
    return []


JSON_CODEC: Codec = _JsonCodec()
"""The default codec: JSON via orjson."""

_codecs_lock = threading.Lock()
_codecs: dict[str, Codec] = {}
_factories: dict[str, Callable[[], Codec]] = {"msgpack": _MsgpackCodec}
_aliases: dict[str, str] = {
    "json": "json",
    "application/json": "json",
    "msgpack": "msgpack",
    "application/msgpack": "msgpack",
    "application/x-msgpack": "msgpack",
    "application/vnd.msgpack": "msgpack",
}
_codecs["json"] = JSON_CODEC


def _normalise(name_or_content_type: str) -> str:
    # "application/json; charset=utf-8" names the JSON codec too.
    return name_or_content_type.split(";", 1)[0].strip().lower()


def get_codec(name_or_content_type: str) -> Codec:
    """Return the codec for a short name (`json`) or a content type.

    Lookup ignores case and content-type parameters (`; charset=utf-8`).
    Optional codecs are built on first use.

    Raises:
        UnknownCodecError: nothing matches; the error lists the known names.
        MissingExtraError: the codec's optional package is not installed.
    """
    name = _aliases.get(_normalise(name_or_content_type))
    if name is None:
        raise UnknownCodecError(name_or_content_type, known_codecs())

    codec = _codecs.get(name)
    if codec is not None:
        return codec

    with _codecs_lock:
        codec = _codecs.get(name)
        if codec is None:
            codec = _factories[name]()
            _codecs[name] = codec
    return codec


def register_codec(codec: Codec, *aliases: str) -> None:
    """Make `codec` available by its name, content type and `aliases`.

    A later registration under the same name replaces the earlier one.
    """
    name = _normalise(codec.name)
    with _codecs_lock:
        _codecs[name] = codec
        for alias in (codec.name, codec.content_type, *aliases):
            _aliases[_normalise(alias)] = name


def known_codecs() -> list[str]:
    """Return the sorted short names `get_codec` accepts."""
    return sorted(set(_aliases.values()))
