import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Attempt(_message.Message):
    __slots__ = ("backend", "status", "duration_ms")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    status: str
    duration_ms: float
    def __init__(self, backend: _Optional[str] = ..., status: _Optional[str] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class UsageRecord(_message.Message):
    __slots__ = ("event_id", "request_id", "trace_id", "org", "api_key_id", "model", "backend", "status", "reason", "input_tokens", "output_tokens", "usage_estimated", "started_at", "duration_ms", "overhead_ms", "attempts", "streamed", "schema", "protocol")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    USAGE_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    STREAMED_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    request_id: str
    trace_id: str
    org: str
    api_key_id: str
    model: str
    backend: str
    status: str
    reason: str
    input_tokens: int
    output_tokens: int
    usage_estimated: bool
    started_at: _timestamp_pb2.Timestamp
    duration_ms: float
    overhead_ms: float
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    streamed: bool
    schema: str
    protocol: str
    def __init__(self, event_id: _Optional[str] = ..., request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., org: _Optional[str] = ..., api_key_id: _Optional[str] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., usage_estimated: _Optional[bool] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration_ms: _Optional[float] = ..., overhead_ms: _Optional[float] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., streamed: _Optional[bool] = ..., schema: _Optional[str] = ..., protocol: _Optional[str] = ...) -> None: ...
