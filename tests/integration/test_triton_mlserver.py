"""Real Open Inference Protocol peers: tritonclient[grpc] → sidecar → MLServer.

MLServer (serving `tests/oip_peers/echo_runtime.py`) and tritonclient run from virtualenvs of
their own that `scripts/oip_peers.sh` installs once and caches (both need protobuf < 7, and
their `inference` stubs cannot share a process with ours). First tritonclient calls MLServer
directly, which proves the harness; then every call goes through the sidecar, governed like
`inference.v1`: the answers match MLServer's, each call leaves a usage record, a metric and a
trace, and auth, rate-limit and routing failures surface in tritonclient's
InferenceServerException with the gRPC status and our ErrorInfo reason.

The reason: tritonclient's exception keeps only the code, message and debug string, but it is
raised while handling the grpc.RpcError (`raise ... from None` hides it from tracebacks, not
from `__context__`); `triton_calls.py` reads that error's `grpc-status-details-bin` trailer.
"""
from __future__ import annotations

import base64
import hashlib
import json
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.grpc.test_limits import metric
from tests.grpc.test_usage_records import record_of
from tests.harness.oip_peers import start_mlserver, status_details, triton_calls
from tests.harness.otlp import OtlpReceiver, ReceivedSpan
from tests.harness.procs import free_port, wait_until
from tests.harness.sidecar import SidecarProc, sidecar_config, start_sidecar

KEYS = {name: f"sk-oip-{name}-{uuid.uuid4().hex}" for name in ("app", "slow", "narrow", "poor")}
SERVICE = "inference.GRPCInferenceService"
FP32 = [1.5, -2.0, 3.25, 1e-30, 65504.0]  # triton_calls.py's default tensors
BYTES = [b"hello", b"\x00\xff\xfe binary\n", "\u00fcn\u00efc\u00f6de \u2713".encode()]
EVERY_CALL = ["is_server_live", "is_server_ready", "is_model_ready", "get_model_metadata", "infer_fp32",
              "infer_bytes", "aio_is_server_live", "aio_is_model_ready", "aio_get_model_metadata",
              "aio_infer_fp32", "aio_infer_bytes"]
INFER_CALLS = [c for c in EVERY_CALL if "infer" in c]
SERVER, CLIENT = 2, 3


@dataclass
class Governed:
    sidecar: SidecarProc
    records: Path
    receiver: OtlpReceiver


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MLServer with the echo runtime as model `echo`, started once for the module; its gRPC address."""
    proc, address = start_mlserver(tmp_path_factory.mktemp("mlserver"))
    try:
        yield address
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def governed(mlserver: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Governed]:
    """A sidecar serving `echo` (MLServer) and `down` (nothing listens) over OIP and `chat` over
    inference.v1, with keys, a rate limit, a cost budget, usage records in a file and traces to a
    real OTLP receiver."""
    workdir = tmp_path_factory.mktemp("oip-sidecar")
    records = workdir / "usage.jsonl"
    receiver = OtlpReceiver().start()
    keys = "\n".join(f'    - {{id: {name}, sha256: "{hashlib.sha256(key.encode()).hexdigest()}", org: {name}-org'
                     f'{", models: [other]" if name == "narrow" else ""}}}' for name, key in KEYS.items())
    config = sidecar_config(f"""
        echo:
          protocol: oip
          timeout_ms: 10000
          health_checks: {{method: oip_model_ready}}
          backends: [{{name: mls, address: "{mlserver}"}}]
        down:
          protocol: oip
          timeout_ms: 2000
          health_checks: {{method: oip_model_ready}}
          backends: [{{name: gone, address: "127.0.0.1:{free_port()}"}}]
        chat:
          backends: [{{name: v1, address: "127.0.0.1:{free_port()}"}}]
        """) + f"""auth:
  api_keys:
{keys}
limits:
  api_keys:
    slow: {{requests_per_minute: 1, burst: 1}}
budgets:
  orgs:
    poor-org: {{cost_per_day: 0.0015}}  # one call at 0.001 fits, a second does not
  prices:
    echo: {{per_request: 0.001}}
    down: {{per_request: 0.001}}
    chat: {{input_per_1k: 0, output_per_1k: 0}}
usage:
  sink: file
  file: {{path: {records}}}
telemetry:
  otlp_endpoint: {receiver.endpoint}
  sample_ratio: 1.0
"""
    try:
        sidecar = start_sidecar(workdir, config)
    except BaseException:
        receiver.stop()
        raise
    try:
        yield Governed(sidecar, records, receiver)
    finally:
        sidecar.proc.stop()
        receiver.stop()


def by_call(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["call"]: r for r in results}


def check_answers(results: dict[str, dict[str, Any]]) -> None:
    """What every call answers when the echo model is served: the same whether direct or proxied."""
    assert all(r["ok"] for r in results.values()), [r for r in results.values() if not r["ok"]]
    for prefix in ("", "aio_"):
        assert results[f"{prefix}is_server_live"]["value"] is True
        assert results[f"{prefix}is_model_ready"]["value"] is True
        metadata = results[f"{prefix}get_model_metadata"]["metadata"]
        assert metadata["name"] == "echo"
        assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [("x", "FP32"), ("s", "BYTES")]
        fp32 = results[f"{prefix}infer_fp32"]
        assert fp32["model_name"] == "echo"
        x = fp32["outputs"]["x"]
        # bit for bit: FP32 values as raw little-endian bytes
        assert (x["datatype"], x["shape"]) == ("FP32", [1, len(FP32)])
        assert bytes.fromhex(x["raw_hex"]) == struct.pack(f"<{len(FP32)}f", *FP32)
        s = results[f"{prefix}infer_bytes"]["outputs"]["s"]
        assert (s["datatype"], s["shape"]) == ("BYTES", [len(BYTES)])
        assert [base64.b64decode(v) for v in s["bytes_b64"]] == BYTES
    assert results["is_server_ready"]["value"] is True


def rid(name: str) -> str:
    return f"oip-{name}-{uuid.uuid4().hex[:8]}"


def failure(result: dict[str, Any], status: str, reason: str | set[str]) -> tuple[str, dict[str, str]]:
    """Check a failed tritonclient call: InferenceServerException with `status`, and our reason in the
    status details; returns (the reason, the ErrorInfo metadata)."""
    assert not result["ok"], result
    assert result["exception"] == "InferenceServerException", result
    assert result["status"] == f"StatusCode.{status}", result
    assert "127.0.0.1" not in result["message"] and "Traceback" not in result["message"], result
    detail = status_details(result)
    assert detail is not None, f"no grpc-status-details-bin trailer: {result}"
    assert detail.domain == "sidecar" and detail.message == result["message"], detail
    assert detail.reason in ({reason} if isinstance(reason, str) else reason), (detail, result)
    return detail.reason, detail.metadata


# --- tritonclient → MLServer: the harness itself ------------------------------------------------


def test_tritonclient_calls_mlserver_directly(mlserver: str) -> None:
    results = by_call(triton_calls(mlserver, [{"call": c} for c in EVERY_CALL]))
    check_answers(results)
    direct = by_call(triton_calls(mlserver, [{"call": "infer_fail"}, {"call": "aio_infer_fail"}]))
    for result in direct.values():  # MLServer's own error, no sidecar details
        assert (result["status"], result["message"]) == ("StatusCode.INVALID_ARGUMENT", "echo asked to fail")
        assert result["details_bin"] is None


# --- tritonclient → sidecar → MLServer --------------------------------------------------------


@pytest.fixture(scope="module")
def proxied(governed: Governed) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """Every call once through the sidecar with a key: call → (request id, trace id, result)."""
    calls = []
    for name in [*EVERY_CALL, "get_server_metadata"]:
        trace = uuid.uuid4().hex
        calls.append({"call": name, "headers": {"x-request-id": rid(name),
                                                "traceparent": f"00-{trace}-00f067aa0ba902b7-01"}})
    results = triton_calls(governed.sidecar.listen, calls, headers={"x-api-key": KEYS["app"]})
    return {c["call"]: (c["headers"]["x-request-id"], c["headers"]["traceparent"].split("-")[1], r)
            for c, r in zip(calls, results, strict=True)}


def test_every_call_through_the_sidecar_answers_like_mlserver(
        proxied: dict[str, tuple[str, str, dict[str, Any]]], mlserver: str) -> None:
    results = {name: result for name, (_, _, result) in proxied.items()}
    check_answers(results)
    direct = by_call(triton_calls(mlserver, [{"call": "get_model_metadata"}]))
    assert results["get_model_metadata"]["metadata"] == direct["get_model_metadata"]["metadata"]
    # ServerMetadata is the sidecar's own
    assert results["get_server_metadata"]["metadata"]["name"] == "inference-sidecar"


@pytest.mark.parametrize("call", INFER_CALLS)
def test_each_proxied_inference_leaves_a_usage_record(
        governed: Governed, proxied: dict[str, tuple[str, str, dict[str, Any]]], call: str) -> None:
    request_id, trace_id, _ = proxied[call]
    record = record_of(governed.records, request_id)
    assert (record["org"], record["api_key_id"], record["model"], record["backend"]) == ("app-org", "app", "echo",
                                                                                         "mls")
    assert (record["status"], record.get("reason", ""), record["protocol"]) == ("OK", "", "oip")
    # OIP carries no tokens: billed 0, and that is not an estimate
    assert (record.get("input_tokens", 0), record.get("output_tokens", 0)) == (0, 0)
    assert not record.get("usage_estimated", False)
    assert record["trace_id"] == trace_id and not record.get("streamed", False)
    assert [(a["backend"], a["status"]) for a in record["attempts"]] == [("mls", "OK")]
    assert 0 <= record["overhead_ms"] <= record["duration_ms"]
    text = governed.records.read_text()
    assert not any(key in text for key in KEYS.values())


def test_model_ready_and_metadata_leave_no_usage_record(
        governed: Governed, proxied: dict[str, tuple[str, str, dict[str, Any]]]) -> None:
    for call in INFER_CALLS:  # written after the ModelReady and ModelMetadata calls
        record_of(governed.records, proxied[call][0])
    recorded = {json.loads(line)["request_id"] for line in governed.records.read_text().splitlines()}
    for call in ("is_model_ready", "get_model_metadata", "aio_is_model_ready", "aio_get_model_metadata"):
        assert proxied[call][0] not in recorded, call


def test_proxied_calls_are_counted_in_the_metrics(
        governed: Governed, proxied: dict[str, tuple[str, str, dict[str, Any]]]) -> None:
    sidecar = governed.sidecar
    infers = len(INFER_CALLS)
    assert metric(sidecar, "grpc_server_handled_total",
                  {"grpc_service": SERVICE, "grpc_method": "ModelInfer", "grpc_code": "OK"}) >= infers
    for method in ("ServerLive", "ServerReady", "ModelReady", "ModelMetadata"):
        assert metric(sidecar, "grpc_server_handled_total",
                      {"grpc_service": SERVICE, "grpc_method": method, "grpc_code": "OK"}) >= 1, method
    assert metric(sidecar, "api_router_backend_requests_total",
                  {"model": "echo", "backend": "mls", "code": "OK"}) >= infers
    assert metric(sidecar, "api_router_routing_decisions_total",
                  {"model": "echo", "backend": "mls", "decision": "primary"}) >= infers


def span_tree(receiver: OtlpReceiver, trace_id: str) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    def complete() -> tuple[ReceivedSpan, list[ReceivedSpan]] | None:
        spans = receiver.trace(trace_id)
        server = [s for s in spans if s.kind == SERVER]
        if len(server) != 1:
            return None
        kids = [s for s in spans if s.parent_span_id == server[0].span_id]
        return (server[0], kids) if any(s.kind == CLIENT for s in kids) else None
    found = wait_until(complete, 10, what=f"the spans of trace {trace_id}")
    assert found is not None
    return found


@pytest.mark.parametrize("call", ["infer_bytes", "aio_infer_fp32"])
def test_a_proxied_inference_exports_its_span_tree(
        governed: Governed, proxied: dict[str, tuple[str, str, dict[str, Any]]], call: str) -> None:
    request_id, trace_id, _ = proxied[call]
    server, children = span_tree(governed.receiver, trace_id)
    assert (server.name, server.parent_span_id) == (f"{SERVICE}/ModelInfer", "00f067aa0ba902b7")
    assert server.attributes["rpc.service"] == SERVICE and server.attributes["rpc.method"] == "ModelInfer"
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["sidecar.request_id"] == request_id
    assert (server.attributes["sidecar.org"], server.attributes["sidecar.api_key_id"]) == ("app-org", "app")
    assert server.attributes["sidecar.backend"] == "mls"
    names = {s.name for s in children}
    assert {"sidecar.auth", "sidecar.limits", "sidecar.route"} <= names, names
    attempt = next(s for s in children if s.kind == CLIENT)
    assert attempt.name == f"{SERVICE}/ModelInfer" and attempt.attributes["sidecar.backend"] == "mls"


def test_a_proxied_model_metadata_call_is_traced(
        governed: Governed, proxied: dict[str, tuple[str, str, dict[str, Any]]]) -> None:
    request_id, trace_id, _ = proxied["get_model_metadata"]
    server, _ = span_tree(governed.receiver, trace_id)
    assert server.name == f"{SERVICE}/ModelMetadata" and server.attributes["rpc.method"] == "ModelMetadata"
    assert server.attributes["sidecar.request_id"] == request_id
    assert server.attributes["sidecar.api_key_id"] == "app" and server.attributes["rpc.grpc.status_code"] == 0


# --- failures: the same reasons as inference.v1, as tritonclient sees them ---------------------


@pytest.mark.parametrize(("key", "reason"), [(None, "UNAUTHORIZED"), ("sk-oip-nobody", "INVALID_API_KEY")],
                         ids=["no-key", "wrong-key"])
def test_auth_failures_surface_in_inference_server_exception(governed: Governed, key: str | None,
                                                             reason: str) -> None:
    sidecar = governed.sidecar
    before = metric(sidecar, "grpc_server_handled_total", {"grpc_service": SERVICE, "grpc_method": "ModelInfer",
                                                          "grpc_code": "UNAUTHENTICATED"})
    headers = {"x-api-key": key} if key else {}
    calls = ["infer_fp32", "aio_infer_bytes", "get_model_metadata", "is_model_ready"]
    results = triton_calls(sidecar.listen, [{"call": c} for c in calls], headers=headers)
    for result in results:
        failure(result, "UNAUTHENTICATED", reason)
        assert key is None or key not in json.dumps(result)
    # the server's own liveness and readiness need no key
    live = triton_calls(sidecar.listen, [{"call": "is_server_live"}, {"call": "aio_is_server_ready"}],
                        headers=headers)
    assert [r.get("value") for r in live] == [True, True], live
    assert metric(sidecar, "grpc_server_handled_total", {"grpc_service": SERVICE, "grpc_method": "ModelInfer",
                                                        "grpc_code": "UNAUTHENTICATED"}) >= before + 2


def test_a_rate_limit_denial_surfaces_with_its_reason_and_is_recorded(governed: Governed) -> None:
    sidecar = governed.sidecar
    first, second, third = rid("slow-1"), rid("slow-2"), rid("slow-3")
    results = triton_calls(sidecar.listen, [
        {"call": "infer_fp32", "headers": {"x-request-id": first}},  # the one request of the minute
        {"call": "infer_fp32", "headers": {"x-request-id": second}},
        {"call": "aio_infer_bytes", "headers": {"x-request-id": third}},
    ], headers={"x-api-key": KEYS["slow"]})
    assert results[0]["ok"], results[0]
    for result, request_id in ((results[1], second), (results[2], third)):
        failure(result, "RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED")
        record = record_of(governed.records, request_id)
        assert (record["status"], record["reason"], record["org"], record["model"]) == (
            "RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED", "slow-org", "echo")
        assert "attempts" not in record and not record.get("backend")
    assert record_of(governed.records, first)["status"] == "OK"
    assert metric(sidecar, "api_router_rate_limit_denials_total", {"org": "slow-org"}) >= 2
    # ModelReady and ModelMetadata are not rate limited
    after = triton_calls(sidecar.listen, [{"call": "is_model_ready"}, {"call": "get_model_metadata"}],
                         headers={"x-api-key": KEYS["slow"]})
    assert all(r["ok"] for r in after), after
    assert metric(sidecar, "grpc_server_handled_total", {"grpc_service": SERVICE, "grpc_method": "ModelInfer",
                                                        "grpc_code": "RESOURCE_EXHAUSTED"}) >= 2


def test_a_cost_budget_denial_surfaces_with_its_reason(governed: Governed) -> None:
    sidecar = governed.sidecar
    denied = rid("poor")
    served, refused = triton_calls(sidecar.listen, [
        {"call": "infer_bytes"},  # 0.001 of the day's 0.0015
        {"call": "aio_infer_fp32", "headers": {"x-request-id": denied}},
    ], headers={"x-api-key": KEYS["poor"]})
    assert served["ok"], served
    failure(refused, "RESOURCE_EXHAUSTED", "BUDGET_EXCEEDED")
    record = record_of(governed.records, denied)
    assert (record["status"], record["reason"], record["org"]) == ("RESOURCE_EXHAUSTED", "BUDGET_EXCEEDED", "poor-org")
    assert metric(sidecar, "api_router_budget_denials_total", {"org": "poor-org"}) >= 1


def test_routing_failures_surface_with_their_reasons(governed: Governed) -> None:
    sidecar = governed.sidecar
    forbidden = triton_calls(sidecar.listen, [{"call": "infer_fp32"}, {"call": "aio_infer_fp32"}],
                             headers={"x-api-key": KEYS["narrow"]})
    for result in forbidden:
        _, metadata = failure(result, "PERMISSION_DENIED", "FORBIDDEN")
        assert metadata.get("model") == "echo"
    failed_id = rid("fail")
    unknown, unknown_aio, down, fail, nameless, mismatch, mismatch_ready = triton_calls(sidecar.listen, [
        {"call": "infer_fp32", "model": "no-such-model"},
        {"call": "aio_infer_bytes", "model": "no-such-model"},
        {"call": "infer_fp32", "model": "down"},
        {"call": "infer_fail", "headers": {"x-request-id": failed_id}},
        {"call": "infer_fp32", "model": ""},
        {"call": "infer_fp32", "model": "chat"},
        {"call": "aio_is_model_ready", "model": "chat"},
    ], headers={"x-api-key": KEYS["app"]})
    for result in (unknown, unknown_aio):
        _, metadata = failure(result, "NOT_FOUND", "NOT_FOUND")
        assert metadata.get("model") == "no-such-model"
    # unreachable: BACKEND_UNAVAILABLE while its health is unknown, NO_BACKEND_AVAILABLE once unhealthy
    failure(down, "UNAVAILABLE", {"BACKEND_UNAVAILABLE", "NO_BACKEND_AVAILABLE"})
    # MLServer's own error comes back with its code and message, as BACKEND_ERROR
    failure(fail, "INVALID_ARGUMENT", "BACKEND_ERROR")
    assert fail["message"] == "echo asked to fail"
    record = record_of(governed.records, failed_id)
    assert (record["status"], record["reason"], record["backend"]) == ("INVALID_ARGUMENT", "BACKEND_ERROR", "mls")
    _, metadata = failure(nameless, "INVALID_ARGUMENT", "MISSING_FIELD")
    assert metadata.get("field") == "model_name"
    # an inference.v1 model called over OIP
    for result in (mismatch, mismatch_ready):
        _, metadata = failure(result, "FAILED_PRECONDITION", "PROTOCOL_MISMATCH")
        assert (metadata.get("model"), metadata.get("protocol")) == ("chat", "inference_v1")
