"""rescue(): every catalog reason becomes its code with google.rpc details."""
from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from sidecar.errors import CATALOG, STATUS_DETAILS_KEY, SidecarError, missing_field, rescue


def status_of(trailers: tuple[tuple[str, str | bytes], ...]) -> status_pb2.Status:
    raw = dict(trailers)[STATUS_DETAILS_KEY]
    assert isinstance(raw, bytes)
    return status_pb2.Status.FromString(raw)


@pytest.mark.parametrize(("reason", "code"), sorted(CATALOG.items()))
def test_each_reason_has_its_contract_code(reason: str, code: grpc.StatusCode) -> None:
    rescued = rescue(SidecarError(reason, "why"), "rid-1")
    assert (rescued.code, rescued.reason) == (code, reason)
    status = status_of(rescued.trailing_metadata)
    assert status.code == code.value[0] and status.message == "why"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == (reason, "sidecar")
    assert ("x-request-id", "rid-1") in rescued.trailing_metadata


def test_backend_error_keeps_the_backend_code() -> None:
    rescued = rescue(SidecarError("BACKEND_ERROR", "bad input", code=grpc.StatusCode.INVALID_ARGUMENT), "r")
    assert rescued.code == grpc.StatusCode.INVALID_ARGUMENT and rescued.message == "bad input"


def test_extra_details_follow_error_info() -> None:
    status = status_of(rescue(missing_field("model"), "r").trailing_metadata)
    bad = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad) and bad.field_violations[0].field == "model"


def test_unexpected_exceptions_leak_nothing() -> None:
    rescued = rescue(KeyError("sk-secret at 10.0.0.1"), "r")
    assert (rescued.code, rescued.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL_ERROR")
    assert "sk-secret" not in rescued.message and "10.0.0.1" not in rescued.message
