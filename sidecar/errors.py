"""The error catalog, and `rescue()`: the one place errors become gRPC statuses.

Stages and adapters raise `SidecarError(reason, message)`; the reason fixes the gRPC code
(CONTRACT §3). `rescue()` turns any exception into a status carrying `google.rpc.Status`
details (`ErrorInfo{reason, domain: "sidecar", metadata}` plus `RetryInfo`, `QuotaFailure` or
`BadRequest` where the error has them). Unexpected exceptions become INTERNAL/INTERNAL_ERROR with
a fixed message: the traceback is logged with the request id, never sent to the caller.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "sidecar"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

log = logging.getLogger("sidecar.errors")

# reason -> gRPC code. BACKEND_ERROR is absent: it keeps the backend's own code.
CATALOG: Mapping[str, grpc.StatusCode] = {
    "UNAUTHORIZED": grpc.StatusCode.UNAUTHENTICATED,
    "INVALID_API_KEY": grpc.StatusCode.UNAUTHENTICATED,
    "FORBIDDEN": grpc.StatusCode.PERMISSION_DENIED,
    "INVALID_REQUEST": grpc.StatusCode.INVALID_ARGUMENT,
    "MISSING_FIELD": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "REQUEST_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "RATE_LIMIT_EXCEEDED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "BUDGET_EXCEEDED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "QUOTA_EXCEEDED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "NO_BACKEND_AVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "BACKEND_UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "SERVICE_UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "BACKEND_TIMEOUT": grpc.StatusCode.DEADLINE_EXCEEDED,
    "ROUTING_ERROR": grpc.StatusCode.INTERNAL,
    "INTERNAL_ERROR": grpc.StatusCode.INTERNAL,
}
BACKEND_ERROR = "BACKEND_ERROR"


class SidecarError(Exception):
    """A request the sidecar refuses or cannot complete, with the catalog reason saying why.

    `details` are extra `google.rpc` messages (RetryInfo, QuotaFailure, BadRequest) sent after
    the ErrorInfo. `code` is only given for BACKEND_ERROR, which keeps the backend's code.
    """

    def __init__(self, reason: str, message: str, *, metadata: Mapping[str, str] | None = None,
                 details: Sequence[message.Message] = (), code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is None:
            code = CATALOG[reason]
        self.reason = reason
        self.code = code
        self.message = message
        self.metadata = dict(metadata or {})
        self.details = tuple(details)

    def __repr__(self) -> str:
        return f"SidecarError({self.reason}, {self.code.name}, {self.message!r})"


def missing_field(field: str) -> SidecarError:
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=f"{field} is required")
    return SidecarError("MISSING_FIELD", f"{field} is required", metadata={"field": field},
                        details=[error_details_pb2.BadRequest(field_violations=[violation])])


def invalid_request(description: str) -> SidecarError:
    return SidecarError("INVALID_REQUEST", description,
                        details=[error_details_pb2.BadRequest(
                            field_violations=[error_details_pb2.BadRequest.FieldViolation(
                                field="request", description=description)])])


@dataclass(frozen=True, slots=True)
class Rescued:
    """What the caller receives: a code, a message and trailers with the rich status."""

    code: grpc.StatusCode
    message: str
    reason: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def rescue(exc: BaseException, request_id: str) -> Rescued:
    """Maps an exception raised while serving `request_id` to the status the caller gets."""
    if not isinstance(exc, SidecarError):
        log.error("unexpected error", exc_info=exc, extra={"request_id": request_id})
        exc = SidecarError("INTERNAL_ERROR", "internal error; see the sidecar log for this request id")
    status = status_pb2.Status(code=_code_number(exc.code), message=exc.message)
    for detail in (error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata),
                   *exc.details):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    trailers = ((STATUS_DETAILS_KEY, status.SerializeToString()), ("x-request-id", request_id))
    return Rescued(exc.code, exc.message, exc.reason, trailers)


def _code_number(code: grpc.StatusCode) -> int:
    """grpc.StatusCode and google.rpc.Code share their numbering."""
    number: int = code.value[0]
    return number
