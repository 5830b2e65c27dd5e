"""The error catalog, and `rescue()`: the one place errors become gRPC statuses.

Stages and adapters raise `SidecarError(reason, message)`; the reason fixes the gRPC code
(CONTRACT §3). `rescue()` turns any exception into a status carrying `google.rpc.Status`
details (`ErrorInfo{reason, domain: "sidecar", metadata}` plus `RetryInfo`, `QuotaFailure` or
`BadRequest` where the error has them). Unexpected exceptions become INTERNAL/INTERNAL_ERROR with
a fixed message: the traceback is logged with the request id, never sent to the caller.

Echoes are bounded: the message to `MAX_ECHO_BYTES`, each ErrorInfo metadata value to
`MAX_ECHO_VALUE_BYTES` (UTF-8, cut with "…"). The status travels in the caller's trailers twice
(`grpc-message`, percent-encoded, up to 3 bytes a byte; and `grpc-status-details-bin`, base64),
and a gRPC client refuses trailers past 8 KiB (soft) / 16 KiB (hard): an error that echoes a
backend's long message, or a name, must still arrive as itself and not as RESOURCE_EXHAUSTED.
"""
from __future__ import annotations

import logging
import traceback
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
    # the model is served over the other protocol (inference.v1 vs the Open Inference Protocol)
    "PROTOCOL_MISMATCH": grpc.StatusCode.FAILED_PRECONDITION,
    "REQUEST_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "RATE_LIMIT_EXCEEDED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "BUDGET_EXCEEDED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "QUOTA_EXCEEDED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "NO_BACKEND_AVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "BACKEND_UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "BACKEND_TLS_ERROR": grpc.StatusCode.UNAVAILABLE,  # the TLS handshake with the backend failed
    "SERVICE_UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "BACKEND_TIMEOUT": grpc.StatusCode.DEADLINE_EXCEEDED,
    "ROUTING_ERROR": grpc.StatusCode.INTERNAL,
    "INTERNAL_ERROR": grpc.StatusCode.INTERNAL,
}
BACKEND_ERROR = "BACKEND_ERROR"
MAX_ECHO_BYTES = 1024        # an error message, as the caller receives it
MAX_ECHO_VALUE_BYTES = 256   # one ErrorInfo metadata value


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


def invalid_request(description: str, field: str = "request") -> SidecarError:
    """INVALID_ARGUMENT / INVALID_REQUEST naming `field` (ErrorInfo metadata and BadRequest);
    `description` says what is wrong and must not echo the caller's value."""
    return SidecarError("INVALID_REQUEST", description, metadata={"field": field},
                        details=[error_details_pb2.BadRequest(
                            field_violations=[error_details_pb2.BadRequest.FieldViolation(
                                field=field, description=description)])])


def too_long(field: str, limit: int, unit: str = "bytes") -> SidecarError:
    """A caller-supplied string past its bound (docs/configuration.md, "What a caller may send")."""
    return invalid_request(f"{field} is longer than {limit} {unit}", field)


def longer_than(text: str, limit: int) -> bool:
    """Whether `text` is longer than `limit` UTF-8 bytes: one len() for the usual short text, and
    never an encoding of a huge one."""
    return len(text) > limit // 4 and (len(text) > limit or len(text.encode()) > limit)


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, ending in "…" when it was cut.

    Cheap for the usual short text (one len()); a long one is encoded only up to `limit` chars."""
    if len(text) <= limit // 4:  # no character takes more than 4 bytes
        return text
    head = text[:limit].encode()
    if len(head) <= limit and len(text) <= limit:
        return text
    return head[:limit - len("…".encode())].decode("utf-8", "ignore") + "…"


@dataclass(frozen=True, slots=True)
class Rescued:
    """What the caller receives: a code, a message and trailers with the rich status."""

    code: grpc.StatusCode
    message: str
    reason: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def rescue(exc: BaseException, request_id: str) -> Rescued:
    """Maps an exception raised while serving `request_id` to the status the caller gets.

    A `SidecarError` has done its job once it is a status: the frames it left (the proxy's
    attempt, its backend call and the request bytes they hold) are cleared here, so that they are
    freed now rather than by a later garbage collection of the cycles a traceback makes (an
    exception kept in a local of a frame its own traceback holds). Frames still running are left
    alone."""
    if isinstance(exc, SidecarError):
        traceback.clear_frames(exc.__traceback__)
    else:
        log.error("unexpected error", exc_info=exc, extra={"request_id": request_id})
        exc = SidecarError("INTERNAL_ERROR", "internal error; see the sidecar log for this request id")
    message = clip(exc.message, MAX_ECHO_BYTES)
    metadata = exc.metadata
    if any(len(value) > MAX_ECHO_VALUE_BYTES // 4 for value in metadata.values()):
        metadata = {key: clip(value, MAX_ECHO_VALUE_BYTES) for key, value in metadata.items()}
    status = status_pb2.Status(code=_code_number(exc.code), message=message)
    for detail in (error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=metadata),
                   *exc.details):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    trailers = ((STATUS_DETAILS_KEY, status.SerializeToString()), ("x-request-id", request_id))
    return Rescued(exc.code, message, exc.reason, trailers)


def _code_number(code: grpc.StatusCode) -> int:
    """grpc.StatusCode and google.rpc.Code share their numbering."""
    number: int = code.value[0]
    return number
