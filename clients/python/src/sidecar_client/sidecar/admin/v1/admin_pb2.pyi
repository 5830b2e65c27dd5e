import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from sidecar_client.sidecar.usage.v1 import usage_pb2 as _usage_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BackendHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_HEALTH_UNKNOWN: _ClassVar[BackendHealth]
    BACKEND_HEALTH_HEALTHY: _ClassVar[BackendHealth]
    BACKEND_HEALTH_UNHEALTHY: _ClassVar[BackendHealth]
    BACKEND_HEALTH_EJECTED: _ClassVar[BackendHealth]
    BACKEND_HEALTH_DRAINING: _ClassVar[BackendHealth]
BACKEND_HEALTH_UNKNOWN: BackendHealth
BACKEND_HEALTH_HEALTHY: BackendHealth
BACKEND_HEALTH_UNHEALTHY: BackendHealth
BACKEND_HEALTH_EJECTED: BackendHealth
BACKEND_HEALTH_DRAINING: BackendHealth

class ListRoutesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListRoutesResponse(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("model", "backends", "overrides")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    model: str
    backends: _containers.RepeatedCompositeFieldContainer[BackendRoute]
    overrides: _containers.RepeatedCompositeFieldContainer[Override]
    def __init__(self, model: _Optional[str] = ..., backends: _Optional[_Iterable[_Union[BackendRoute, _Mapping]]] = ..., overrides: _Optional[_Iterable[_Union[Override, _Mapping]]] = ...) -> None: ...

class BackendRoute(_message.Message):
    __slots__ = ("name", "address", "priority", "configured_weight", "effective_weight", "health", "ejected_until", "in_flight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    EJECTED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    priority: int
    configured_weight: float
    effective_weight: float
    health: BackendHealth
    ejected_until: _timestamp_pb2.Timestamp
    in_flight: int
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., priority: _Optional[int] = ..., configured_weight: _Optional[float] = ..., effective_weight: _Optional[float] = ..., health: _Optional[_Union[BackendHealth, str]] = ..., ejected_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., in_flight: _Optional[int] = ...) -> None: ...

class Override(_message.Message):
    __slots__ = ("model", "backend", "weight", "drain", "pin", "ttl_seconds", "reason", "created_by", "created_at", "expires_at")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    model: str
    backend: str
    weight: float
    drain: bool
    pin: bool
    ttl_seconds: int
    reason: str
    created_by: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, model: _Optional[str] = ..., backend: _Optional[str] = ..., weight: _Optional[float] = ..., drain: _Optional[bool] = ..., pin: _Optional[bool] = ..., ttl_seconds: _Optional[int] = ..., reason: _Optional[str] = ..., created_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SetOverrideRequest(_message.Message):
    __slots__ = ("model", "backend", "weight", "drain", "pin", "ttl_seconds", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    backend: str
    weight: float
    drain: bool
    pin: bool
    ttl_seconds: int
    reason: str
    def __init__(self, model: _Optional[str] = ..., backend: _Optional[str] = ..., weight: _Optional[float] = ..., drain: _Optional[bool] = ..., pin: _Optional[bool] = ..., ttl_seconds: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ClearOverrideRequest(_message.Message):
    __slots__ = ("model", "backend")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    model: str
    backend: str
    def __init__(self, model: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class ClearOverrideResponse(_message.Message):
    __slots__ = ("cleared",)
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    cleared: bool
    def __init__(self, cleared: _Optional[bool] = ...) -> None: ...

class GetRequestRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ("backend", "address", "status", "duration_ms")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    address: str
    status: str
    duration_ms: float
    def __init__(self, backend: _Optional[str] = ..., address: _Optional[str] = ..., status: _Optional[str] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("stage", "result", "detail")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    result: str
    detail: str
    def __init__(self, stage: _Optional[str] = ..., result: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("request_id", "usage", "decisions", "attempts", "routing_decision")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_DECISION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    usage: _usage_pb2.UsageRecord
    decisions: _containers.RepeatedCompositeFieldContainer[Decision]
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    routing_decision: str
    def __init__(self, request_id: _Optional[str] = ..., usage: _Optional[_Union[_usage_pb2.UsageRecord, _Mapping]] = ..., decisions: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., routing_decision: _Optional[str] = ...) -> None: ...
