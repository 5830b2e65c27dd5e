"""Usage records (`usage.sink: file`): one per authenticated call, denials included, with the
fields of CONTRACT §6; none for a caller that never authenticated; never a key."""
from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferRequest
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from tests.grpc.test_proxy import INFER, INFER_STREAM, params
from tests.harness.procs import wait_until
from tests.harness.sidecar import BackendProc, SidecarProc, sidecar_config, start_sidecar

KEYS = {"app": "sk-usage-app", "slow": "sk-usage-slow", "poor": "sk-usage-poor", "narrow": "sk-usage-narrow"}
ADMIN = "adm-audit-77"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def recorded(backend: BackendProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SidecarProc, Path]]:
    workdir = tmp_path_factory.mktemp("usage")
    records = workdir / "usage.jsonl"
    keys = "\n".join(f'    - {{id: {name}, sha256: "{hashlib.sha256(key.encode()).hexdigest()}", org: {name}-org'
                     f'{", models: [embed]" if name == "narrow" else ""}}}' for name, key in KEYS.items())
    config = sidecar_config(f"""
        chat:
          backends: [{{name: a, address: "{backend.address}"}}]
        """) + f"""auth:
  api_keys:
{keys}
  admin_tokens: [{{id: auditor, sha256: "{hashlib.sha256(ADMIN.encode()).hexdigest()}"}}]
limits:
  api_keys:
    slow: {{requests_per_minute: 1, burst: 1}}
budgets:
  orgs:
    poor-org: {{tokens_per_day: 5}}  # a call reserves 3 + 4
usage:
  sink: file
  file: {{path: {records}}}
"""
    proc = start_sidecar(workdir, config)
    try:
        yield proc, records
    finally:
        proc.proc.stop()


def call(target: str, key: str, request_id: str, *, stream: bool = False, **fields: Any) -> str | None:
    request = InferRequest(model="chat", input="hello world", max_output_tokens=4, **fields).SerializeToString()
    metadata = (("x-api-key", key), ("x-request-id", request_id),
                ("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01"))
    with grpc.insecure_channel(target) as channel:
        try:
            if stream:
                list(channel.unary_stream(INFER_STREAM)(request, metadata=metadata, timeout=10))
            else:
                channel.unary_unary(INFER)(request, metadata=metadata, timeout=10)
        except grpc.RpcError as error:
            return error.code().name
    return None


def record_of(path: Path, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        if not path.exists():
            return None
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return next((r for r in lines if r["request_id"] == request_id), None)
    found: dict[str, Any] = wait_until(find, 5, what=f"the record of {request_id}")
    return found


def rid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_a_served_call(recorded: tuple[SidecarProc, Path]) -> None:
    sidecar, path = recorded
    request_id = rid("ok")
    assert call(sidecar.listen, KEYS["app"], request_id) is None
    record = record_of(path, request_id)
    assert record["schema"] == "sidecar.usage.v1.UsageRecord"
    assert (record["org"], record["api_key_id"], record["model"], record["backend"]) == ("app-org", "app", "chat", "a")
    assert (record["status"], record.get("reason", "")) == ("OK", "")
    assert (record["input_tokens"], record["output_tokens"], record.get("usage_estimated", False)) == (2, 4, False)
    assert record["trace_id"] == TRACE and uuid.UUID(record["event_id"]).version == 7
    assert [a["backend"] for a in record["attempts"]] == ["a"] and record["attempts"][0]["status"] == "OK"
    assert 0 < record["overhead_ms"] < record["duration_ms"]
    assert record["started_at"].endswith("Z") and not record.get("streamed", False)


def test_a_streamed_call(recorded: tuple[SidecarProc, Path]) -> None:
    sidecar, path = recorded
    request_id = rid("stream")
    assert call(sidecar.listen, KEYS["app"], request_id, stream=True) is None
    record = record_of(path, request_id)
    assert record["streamed"] and (record["input_tokens"], record["output_tokens"]) == (2, 4)


@pytest.mark.parametrize(("key", "status", "reason"), [
    ("slow", "RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED"),
    ("poor", "RESOURCE_EXHAUSTED", "BUDGET_EXCEEDED"),
    ("narrow", "PERMISSION_DENIED", "FORBIDDEN"),
])
def test_denials_are_recorded_with_their_reason(recorded: tuple[SidecarProc, Path], key: str, status: str,
                                                reason: str) -> None:
    sidecar, path = recorded
    if key == "slow":
        call(sidecar.listen, KEYS[key], rid("first"))  # takes the one request of the minute
    request_id = rid(key)
    assert call(sidecar.listen, KEYS[key], request_id) == status
    record = record_of(path, request_id)
    assert (record["status"], record["reason"], record["org"]) == (status, reason, f"{key}-org")
    assert "attempts" not in record and record.get("input_tokens", 0) == 0 and not record.get("backend")


def test_a_failed_backend_call_records_the_estimate(recorded: tuple[SidecarProc, Path]) -> None:
    sidecar, path = recorded
    request_id = rid("failed")
    assert call(sidecar.listen, KEYS["app"], request_id, parameters=params(fail_code="INTERNAL")) == "INTERNAL"
    record = record_of(path, request_id)
    assert (record["status"], record["reason"]) == ("INTERNAL", "BACKEND_ERROR")
    assert record["usage_estimated"] and (record["input_tokens"], record["output_tokens"]) == (3, 4)
    assert [a["status"] for a in record["attempts"]] == ["INTERNAL"]


def test_no_record_without_authentication_and_never_a_key(recorded: tuple[SidecarProc, Path]) -> None:
    sidecar, path = recorded
    unknown = rid("unknown")
    assert call(sidecar.listen, "sk-nobody", unknown) == "UNAUTHENTICATED"
    marker = rid("marker")
    assert call(sidecar.listen, KEYS["app"], marker) is None
    record_of(path, marker)  # written after the unknown caller's call
    text = path.read_text()
    assert unknown not in text
    assert not any(key in text for key in [*KEYS.values(), "sk-nobody"])
    ids = [json.loads(line)["event_id"] for line in text.splitlines()]
    assert len(ids) == len(set(ids))


def audit(sidecar: SidecarProc, request_id: str, token: str | None = ADMIN) -> admin_pb2.AuditRecord:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(sidecar.admin_listen) as channel:
        record: admin_pb2.AuditRecord = admin_pb2_grpc.AuditStub(channel).GetRequest(
            admin_pb2.GetRequestRequest(request_id=request_id), metadata=metadata, timeout=5)
        return record


def test_audit_returns_the_decisions_and_attempts_of_a_call(recorded: tuple[SidecarProc, Path],
                                                           backend: BackendProc) -> None:
    sidecar, _ = recorded
    served, refused = rid("audited"), rid("audited-denied")
    assert call(sidecar.listen, KEYS["app"], served) is None
    record = audit(sidecar, served)
    assert record.usage.request_id == served and record.usage.status == "OK" and record.routing_decision == "primary"
    assert [(d.stage, d.result, d.detail) for d in record.decisions] == [
        ("auth", "allow", "app"), ("route", "primary", "a")]
    assert [(a.backend, a.address, a.status) for a in record.attempts] == [("a", backend.address, "OK")]
    call(sidecar.listen, KEYS["slow"], rid("take"))
    assert call(sidecar.listen, KEYS["slow"], refused) == "RESOURCE_EXHAUSTED"
    denied = audit(sidecar, refused)
    assert ("rate_limit", "deny", "key:slow:requests_per_minute") in [(d.stage, d.result, d.detail)
                                                                      for d in denied.decisions]
    assert denied.usage.reason == "RATE_LIMIT_EXCEEDED" and not denied.attempts


def test_audit_of_an_unknown_request_and_without_a_token(recorded: tuple[SidecarProc, Path]) -> None:
    sidecar, _ = recorded
    with pytest.raises(grpc.RpcError) as failure:
        audit(sidecar, "no-such-request")
    detail = error_detail(failure.value)
    assert (detail.code, detail.reason) == (grpc.StatusCode.NOT_FOUND, "REQUEST_NOT_FOUND")
    with pytest.raises(grpc.RpcError) as failure:
        audit(sidecar, "no-such-request", token=None)
    assert error_detail(failure.value).reason == "UNAUTHORIZED"
