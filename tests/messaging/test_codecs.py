"""Tests for the message body codecs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import sys
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from duct_messaging.errors import DuctMessagingError, MissingExtraError
from duct_messaging.messaging import codecs
from duct_messaging.messaging.codecs import (
    JSON_CODEC,
    Codec,
    CodecError,
    DecodeError,
    EncodeError,
    UnknownCodecError,
    get_codec,
    known_codecs,
    register_codec,
)

CODEC_NAMES = ["json", "msgpack"]

UTC_INSTANT = dt.datetime(2025, 1, 1, 10, 0, 0, 123456, tzinfo=dt.UTC)
ORDER_ID = uuid.UUID("1b4e28ba-2fa1-11d2-883f-0016d3cca427")


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Line:
    sku: str
    qty: int


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


class TestLookup:
    def test_json_codec_by_name_and_content_type(self) -> None:
        """The JSON codec is found by its name, content type and parameters."""
        found = [
            get_codec("json"),
            get_codec("application/json"),
            get_codec("Application/JSON; charset=utf-8"),
        ]

        assert all(codec is JSON_CODEC for codec in found)
        assert JSON_CODEC.name == "json"
        assert JSON_CODEC.content_type == "application/json"

    def test_msgpack_codec_by_name_and_content_type(self) -> None:
        """The msgpack codec is built once and found by its aliases."""
        codec = get_codec("msgpack")

        assert get_codec("application/msgpack") is codec
        assert get_codec("application/x-msgpack") is codec
        assert codec.content_type == "application/msgpack"
        assert isinstance(codec, Codec)

    def test_unknown_codec_names_the_known_ones(self) -> None:
        """An unknown name raises an error listing every known codec."""
        with pytest.raises(UnknownCodecError, match=r"'xml'.*json, msgpack") as info:
            get_codec("xml")

        assert info.value.requested == "xml"
        assert info.value.known == ("json", "msgpack")
        assert isinstance(info.value, CodecError)
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, DuctMessagingError)

    def test_register_codec_adds_aliases(self) -> None:
        """A registered codec is found by name, content type and alias."""

        class Upper:
            name = "test-upper"
            content_type = "text/x-test-upper"

            def encode(self, message: Any) -> bytes:
                return str(message).upper().encode()

            def decode(self, data: bytes) -> Any:
                return data.decode()

        codec = Upper()
        register_codec(codec, "x-upper")

        assert get_codec("test-upper") is codec
        assert get_codec("text/x-test-upper") is codec
        assert get_codec("X-UPPER") is codec
        assert "test-upper" in known_codecs()


@pytest.mark.parametrize("name", CODEC_NAMES)
class TestRoundTrip:
    def test_plain_data_round_trips(self, name: str) -> None:
        """Maps, lists, strings and numbers come back equal."""
        codec = get_codec(name)
        message = {"id": "a", "amount": 12.5, "n": 3, "ok": True, "tags": ["x", None]}

        assert codec.decode(codec.encode(message)) == message

    def test_uuid_and_aware_datetime_become_strings(self, name: str) -> None:
        """UUIDs and aware datetimes are encoded as ISO strings."""
        codec = get_codec(name)
        message = {
            "id": ORDER_ID,
            "at": UTC_INSTANT,
            "local": dt.datetime(
                2025, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2))
            ),
            "day": dt.date(2025, 1, 2),
            "clock": dt.time(8, 30),
        }

        decoded = codec.decode(codec.encode(message))

        assert decoded == {
            "id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "at": "2025-01-01T10:00:00.123456+00:00",
            "local": "2025-01-01T12:00:00+02:00",
            "day": "2025-01-02",
            "clock": "08:30:00",
        }

    def test_enums_and_dataclasses_become_plain_data(self, name: str) -> None:
        """Enums encode as their value and dataclasses as a mapping."""
        codec = get_codec(name)

        decoded = codec.decode(codec.encode({"c": Colour.RED, "line": Line("a", 2)}))

        assert decoded == {"c": "red", "line": {"sku": "a", "qty": 2}}

    @given(message=json_values)
    def test_json_data_round_trips(self, name: str, message: Any) -> None:
        """Any JSON-shaped value survives encode then decode."""
        codec = get_codec(name)

        assert codec.decode(codec.encode(message)) == message


@pytest.mark.parametrize("name", CODEC_NAMES)
class TestEncodeErrors:
    def test_unsupported_type_names_type_and_path(self, name: str) -> None:
        """A value the codec cannot carry is named with its path; no str()."""
        codec = get_codec(name)
        message = {"items": [{"id": 1}, {"id": {1, 2}}]}

        with pytest.raises(EncodeError, match=r"at items\[1\]\.id: .*builtins\.set"):
            codec.encode(message)

    def test_error_attributes(self, name: str) -> None:
        """The error carries codec, path and reason, and is a TypeError."""
        codec = get_codec(name)

        with pytest.raises(EncodeError) as info:
            codec.encode({"a": [object()]})

        assert info.value.codec == name
        assert info.value.path == "a[0]"
        assert "builtins.object" in info.value.reason
        assert isinstance(info.value, TypeError)
        assert isinstance(info.value, CodecError)

    def test_naive_datetime_is_refused(self, name: str) -> None:
        """A naive datetime is refused rather than guessed into a zone."""
        codec = get_codec(name)

        with pytest.raises(EncodeError, match=r"at order\.at: naive datetime") as info:
            codec.encode({"order": {"at": dt.datetime(2025, 1, 1)}})

        assert info.value.path == "order.at"

    def test_top_level_value_path(self, name: str) -> None:
        """A bad top-level value is reported at the top level."""
        codec = get_codec(name)

        with pytest.raises(EncodeError, match="at the top level") as info:
            codec.encode(object())

        assert info.value.path == ""

    def test_integer_too_large(self, name: str) -> None:
        """An integer beyond 64 bits is named with its path."""
        codec = get_codec(name)

        with pytest.raises(EncodeError, match=r"at n\[0\]: integer .* 64 bits"):
            codec.encode({"n": [2**70]})

    def test_lone_surrogate(self, name: str) -> None:
        """A string that is not valid UTF-8 is named with its path."""
        codec = get_codec(name)

        with pytest.raises(EncodeError, match="at s: string is not valid UTF-8"):
            codec.encode({"s": "\ud800"})

    def test_odd_keys_are_quoted_in_path(self, name: str) -> None:
        """Keys that are not plain names are quoted in the path."""
        codec = get_codec(name)

        with pytest.raises(EncodeError) as info:
            codec.encode({"content type": {"x y": object()}})

        assert info.value.path == '["content type"]["x y"]'


class TestJsonSpecifics:
    def test_non_string_key_is_refused(self) -> None:
        """JSON refuses non-string mapping keys and says where."""
        with pytest.raises(EncodeError, match=r"at a\[0\]: mapping key 1 is not"):
            JSON_CODEC.encode({"a": [{1: "x"}]})

    def test_bytes_are_refused(self) -> None:
        """JSON has no binary type, so bytes are refused."""
        with pytest.raises(EncodeError, match=r"at blob: .*builtins\.bytes"):
            JSON_CODEC.encode({"blob": b"\x00"})

    def test_output_is_compact_json(self) -> None:
        """The body is plain compact JSON any client can read."""
        body = JSON_CODEC.encode({"id": ORDER_ID, "amount": 1.5})

        assert body == b'{"id":"1b4e28ba-2fa1-11d2-883f-0016d3cca427","amount":1.5}'
        assert orjson.loads(body)["amount"] == 1.5

    @pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b'{"a":1} trailing'])
    def test_bad_bytes_raise_decode_error(self, data: bytes) -> None:
        """Bytes that are not JSON raise DecodeError, a ValueError."""
        with pytest.raises(DecodeError, match="Cannot decode json") as info:
            JSON_CODEC.decode(data)

        assert info.value.codec == "json"
        assert isinstance(info.value, ValueError)


class TestMsgpackSpecifics:
    def test_bytes_and_int_keys_round_trip(self) -> None:
        """MessagePack carries bytes and non-string keys natively."""
        codec = get_codec("msgpack")
        message = {"blob": b"\x00\x01", "by_id": {1: "a"}}

        assert codec.decode(codec.encode(message)) == message

    @pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", b"\x01\x02"])
    def test_bad_bytes_raise_decode_error(self, data: bytes) -> None:
        """Bytes that are not one MessagePack value raise DecodeError."""
        codec = get_codec("msgpack")

        with pytest.raises(DecodeError, match="Cannot decode msgpack") as info:
            codec.decode(data)

        assert info.value.codec == "msgpack"
        assert info.value.reason


class TestMissingExtra:
    def test_msgpack_missing_names_the_extra(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without msgpack installed, building its codec names the extra."""
        monkeypatch.setitem(sys.modules, "msgpack", None)

        with pytest.raises(
            MissingExtraError, match=r"duct-messaging\[msgpack\]"
        ) as info:
            codecs._MsgpackCodec()

        assert info.value.extra == "msgpack"
