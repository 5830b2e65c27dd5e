"""The value types the config's sections share (addresses, names, digests, paths), the upper
bounds of its numbers, and `Section`, the base of every section: unknown keys refused,
immutable, floats finite, no `true` for a number, no control characters in text.
config_sections.py builds the sections from these.
"""
from __future__ import annotations

import math
import re
from functools import cache
from types import NoneType, UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationInfo, field_validator

from sidecar.redis_client import cluster_seeds, is_cluster

# Upper bounds of numbers (docs/configuration.md, "Limits of a config file"). Past them a value is
# a mistake, and some would break the sidecar: 10^29 ms overflows every deadline, a weight of
# .inf takes all the traffic. Every float must be finite as well.
MAX_MS = 7 * 24 * 3_600_000      # durations in milliseconds: a week
MAX_SECONDS = 366 * 24 * 3_600   # audit.ttl_seconds: a year
MAX_WEIGHT = 1_000_000
MAX_AMOUNT = 10**15              # rates, bursts, tokens, costs, prices: exact in a double (Redis Lua)
MAX_COUNT = 1_000_000            # other counts: priorities, thresholds, attempts, records kept
MAX_INT32 = 2**31 - 1            # gRPC's message size options are C ints
MAX_DISK_BYTES = 2**50           # usage file and spool sizes (1 PiB)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is fine

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SHA256 = re.compile(r"^(sha256:)?([0-9a-fA-F]{64})$")


def _address(value: str) -> str:
    """`host:port` (IPv6 hosts in brackets); port 0 asks the OS for a free one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit() and len(port) <= 5) or int(port) > 65535:
        raise ValueError("must be host:port with a port from 0 to 65535")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError("an IPv6 host must be in brackets, e.g. [::1]:50051")
    return value


def _path(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("must start with a letter or digit and use only letters, digits, '_', '.', '-'")
    return value


def _sha256(value: str) -> str:
    """`sha256:<hex>` (as `sidecar hash-key` prints it) or bare hex -> lower-case hex."""
    match = _SHA256.match(value.strip())
    if match is None:
        raise ValueError("must be a SHA-256 hex digest (64 hex digits, optionally prefixed 'sha256:'); "
                         "make one with `sidecar hash-key KEY`")
    return match.group(2).lower()


def _redis_url(value: str) -> str:
    if not value.startswith(("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")):
        raise ValueError("must start with redis://, rediss://, unix:// (one server) "
                         "or redis+cluster://, rediss+cluster:// (a Redis Cluster)")
    if is_cluster(value):
        cluster_seeds(value)  # ValueError naming the seed that is not host:port
    return value


Address = Annotated[str, AfterValidator(_address)]
RedisUrl = Annotated[str, AfterValidator(_redis_url)]
Sha256 = Annotated[str, AfterValidator(_sha256)]
Name = Annotated[str, AfterValidator(_name)]
PathText = Annotated[str, AfterValidator(_path)]


def _kinds(annotation: Any) -> set[Any]:
    """int | None -> {int, NoneType}; dict[str, str] -> {dict}."""
    if get_origin(annotation) in (Union, UnionType):
        return {kind for arg in get_args(annotation) for kind in _kinds(arg)}
    return {get_origin(annotation) or annotation}


@cache
def _number_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` that take an int or a float but not a bool."""
    return frozenset(name for name, field in model.model_fields.items()
                     if (kinds := _kinds(field.annotation) - {NoneType}) and kinds <= {int, float})


@cache
def _collection_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` that take a list or a mapping of values (not a section)."""
    return frozenset(name for name, field in model.model_fields.items() if _kinds(field.annotation) & {list, dict})


def _control_character(value: Any, collection: bool) -> str | None:
    """The first control character (a tab excepted) in a string or, for a list or
    mapping field (headers, properties), in its string keys and items."""
    texts = [value] if isinstance(value, str) else [] if not collection else \
        [*value] if isinstance(value, list) else [*value, *value.values()] if isinstance(value, dict) else []
    for text in texts:
        match = _CONTROL.search(text) if isinstance(text, str) else None
        if match:
            return match.group()
    return None


class Section(BaseModel):
    """A YAML mapping: unknown keys refused, immutable, every float finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_value(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's `true` is no number (pydantic would take it as 1: `timeout_ms: true` = 1 ms),
        and a control character in a string (a NUL in a path, a line break in a header) is no
        text an operator meant."""
        if isinstance(value, bool) and info.field_name in _number_fields(cls):
            raise ValueError("must be a number, not true or false")
        character = _control_character(value, info.field_name in _collection_fields(cls))
        if character is not None:
            raise ValueError(f"must not contain control characters (found {character!r})")
        return value


def _kafka_value(value: Any) -> Any:
    """One message for a value of the wrong kind (not one per member of the union)."""
    if not isinstance(value, str | int | float) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError("must be a string, a finite number, or true or false")
    return value


KafkaValue = Annotated[str | int | float | bool, BeforeValidator(_kafka_value)]


def _otlp_endpoint(value: str) -> str:
    """`http://host:port` (plaintext) or `https://host:port` (TLS); empty turns tracing off."""
    if not value:
        return value
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise ValueError("must be http://host:port or https://host:port (empty: no traces)")
    _address(rest.rstrip("/"))
    return value


OtlpEndpoint = Annotated[str, AfterValidator(_otlp_endpoint)]
