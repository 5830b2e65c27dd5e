"""Reads fields 1 and 2 (model name and version) of an OIP request off the protobuf wire.

`ModelInferRequest{model_name = 1, model_version = 2}`, `ModelReadyRequest{name = 1, version = 2}`
and `ModelMetadataRequest{name = 1, version = 2}` all keep the model there. Parsing the whole
message would copy every tensor (a 1 MiB `raw_input_contents` included) into Python objects,
and registering `inference.*` messages would clash with tritonclient's or MLServer's stubs; this
reader walks the top-level fields only, skipping the others by their length, without copying.

Every top-level field is visited, not just the first ones: protobuf says the last occurrence
of a string field wins, and a backend reads it that way, so a request that names an allowed
model first and another model later must be governed as the later one. A message with more
than `MAX_TOP_LEVEL_FIELDS` top-level fields is refused: walking is per field in Python, and a
hostile caller could pack millions of two-byte fields into one request.
"""
from __future__ import annotations

MAX_TOP_LEVEL_FIELDS = 65_536


class WireError(ValueError):
    """The bytes are not a valid protobuf message of the expected shape."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint too long")


def model_and_version(data: bytes) -> tuple[str, str]:
    """The last values of string fields 1 and 2 ("" when absent); raises `WireError`."""
    name = version = b""
    pos, end, fields = 0, len(data), 0
    while pos < end:
        fields += 1
        if fields > MAX_TOP_LEVEL_FIELDS:
            raise WireError(f"more than {MAX_TOP_LEVEL_FIELDS} top-level fields")
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == 2:  # length-delimited: strings, bytes, messages, packed
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise WireError("truncated field")
            if number == 1:
                name = data[pos:pos + length]
            elif number == 2:
                version = data[pos:pos + length]
            pos += length
        elif number in (1, 2):
            raise WireError(f"field {number} is not a string")
        elif wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:  # 3 and 4: groups, which proto3 messages never hold; 6, 7: invalid
            raise WireError(f"wire type {wire_type}")
        if pos > end:
            raise WireError("truncated field")
    try:
        return name.decode(), version.decode()
    except UnicodeDecodeError:
        raise WireError("a string field is not UTF-8") from None


def bool_value(data: bytes, number: int) -> bool:
    """The last value of bool field `number` of a small message (ModelReadyResponse.ready = 1,
    as a health check reads it); False when absent; raises `WireError`."""
    value = False
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        wire_type = key & 7
        if wire_type == 0:
            raw, pos = _varint(data, pos)
            if key >> 3 == number:
                value = raw != 0
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise WireError(f"wire type {wire_type}")
    if pos > end:
        raise WireError("truncated field")
    return value


def string_field(number: int, value: str) -> bytes:
    """One length-delimited string field, encoded (for the few small messages the sidecar writes)."""
    data = value.encode()
    return _encode_varint(number << 3 | 2) + _encode_varint(len(data)) + data


def bool_field(number: int, value: bool) -> bytes:
    return bytes((number << 3, 1)) if value else b""


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
