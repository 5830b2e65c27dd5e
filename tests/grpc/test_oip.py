"""The Open Inference Protocol (KServe v2) through a real `sidecar run` to real OIP demo backends
(`sidecar demo-backend --protocol oip`), with the client package's generated stubs.

One sidecar serves the module: OIP models `echo` (priced per request), `failover` (a dead
backend first, health checks off so that the call itself fails over) and the inference.v1 model
`chat`; API keys for the auth, allow-list, rate-limit and budget cases; usage records to a file
and spans to a real OTLP receiver.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from sidecar_client import error_detail
from sidecar_client.inference import grpc_service_pb2 as oip
from sidecar_client.inference import grpc_service_pb2_grpc as oip_grpc
from sidecar_client.inference.v1.inference_pb2 import InferRequest
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from tests.grpc.test_limits import metric
from tests.grpc.test_proxy import INFER
from tests.harness.otlp import OtlpReceiver
from tests.harness.procs import free_port, wait_until
from tests.harness.sidecar import (
    BackendProc,
    SidecarProc,
    readyz,
    sidecar_config,
    start_backend,
    start_sidecar,
)

KEYS = {"main": "acme", "narrow": "acme", "slow": "slow", "poor": "poor"}
ADMIN = "oip-admin-token"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MIB = 1024 * 1024


def key(name: str) -> str:
    return f"sk-oip-{name}"


def auth(name: str = "main") -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key(name)),)


@dataclass
class Setup:
    sidecar: SidecarProc
    backend: BackendProc
    records: Path
    receiver: OtlpReceiver

    def record(self, request_id: str) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            if not self.records.exists():
                return None
            lines = [json.loads(line) for line in self.records.read_text().splitlines() if line.strip()]
            return next((r for r in lines if r["request_id"] == request_id), None)
        found: dict[str, Any] = wait_until(find, 10, what=f"the usage record of {request_id}")
        return found


@pytest.fixture(scope="module")
def setup(backend: BackendProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("oip")
    echo = start_backend(workdir, "--protocol", "oip", name="oip")
    receiver = OtlpReceiver().start()
    records = workdir / "usage.jsonl"
    keys = "\n".join(f'    - {{id: {name}, sha256: "{hashlib.sha256(key(name).encode()).hexdigest()}", org: {org}'
                     f'{", models: [chat]" if name == "narrow" else ""}}}' for name, org in KEYS.items())
    config = sidecar_config(f"""
        echo:
          protocol: oip
          backends: [{{name: a, address: "{echo.address}"}}]
        failover:
          protocol: oip
          timeout_ms: 5000
          backends:
            - {{name: dead, address: "127.0.0.1:{free_port()}"}}
            - {{name: spare, address: "{echo.address}", priority: 1}}
        chat:
          backends: [{{name: a, address: "{backend.address}"}}]
        """) + f"""health_checks: {{enabled: false}}
auth:
  api_keys:
{keys}
  admin_tokens: [{{id: ops, sha256: "{hashlib.sha256(ADMIN.encode()).hexdigest()}"}}]
limits:
  orgs:
    slow: {{requests_per_minute: 6, burst: 1, tokens_per_minute: 1}}
budgets:
  orgs:
    poor: {{cost_per_day: 0.0025, tokens_per_day: 1}}
  prices:
    echo: {{per_request: 0.001}}
    failover: {{per_request: 0.001}}
    chat: {{input_per_1k: 1, output_per_1k: 1}}
usage:
  sink: file
  file: {{path: {records}}}
telemetry:
  otlp_endpoint: {receiver.endpoint}
  sample_ratio: 1.0
"""
    sidecar = start_sidecar(workdir, config)
    try:
        yield Setup(sidecar, echo, records, receiver)
    finally:
        sidecar.proc.stop()
        receiver.stop()
        echo.proc.stop()


def stub(target: str) -> tuple[grpc.Channel, oip_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 * MIB),
                                                     ("grpc.max_send_message_length", 64 * MIB)])
    return channel, oip_grpc.GRPCInferenceServiceStub(channel)


def infer_request(model: str = "echo", **kwargs: Any) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, id="r-1", **kwargs)
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 3])
    tensor.contents.fp32_contents.extend([1.0, 2.5, -3.0])
    return request


def failure(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=10, **kwargs)
    return caught.value


# --- the server's own answers ---------------------------------------------------------------


def test_server_live_ready_and_metadata_are_the_sidecars_own(setup: Setup) -> None:
    channel, service = stub(setup.sidecar.listen)
    with channel:
        assert service.ServerLive(oip.ServerLiveRequest(), timeout=5).live
        assert service.ServerReady(oip.ServerReadyRequest(), timeout=5).ready
        metadata = service.ServerMetadata(oip.ServerMetadataRequest(), timeout=5)
    assert metadata.name == "inference-sidecar" and metadata.version and list(metadata.extensions) == []


def test_model_ready_and_metadata_are_routed_to_a_backend(setup: Setup) -> None:
    channel, service = stub(setup.sidecar.listen)
    with channel:
        assert service.ModelReady(oip.ModelReadyRequest(name="echo"), metadata=auth(), timeout=5).ready
        metadata = service.ModelMetadata(oip.ModelMetadataRequest(name="echo", version="1"), metadata=auth(),
                                         timeout=5)
        assert metadata.name == "echo" and metadata.platform == "sidecar-demo-echo"
        # governed: a key is needed, and the allow-list holds
        assert error_detail(failure(service.ModelReady, oip.ModelReadyRequest(name="echo"))).reason == "UNAUTHORIZED"
        denied = failure(service.ModelMetadata, oip.ModelMetadataRequest(name="echo"), metadata=auth("narrow"))
        assert error_detail(denied).reason == "FORBIDDEN"


# --- ModelInfer: pass-through ---------------------------------------------------------------


def test_model_infer_fp32_and_bytes_tensors_come_back(setup: Setup) -> None:
    request = infer_request(model_version="7")
    words = request.inputs.add(name="TEXT", datatype="BYTES", shape=[2])
    words.contents.bytes_contents.extend([b"hello", b"\x00\xffworld"])
    channel, service = stub(setup.sidecar.listen)
    with channel:
        response, call = service.ModelInfer.with_call(request, metadata=auth(), timeout=10)
    assert (response.model_name, response.model_version, response.id) == ("echo", "7", "r-1")
    assert [o.name for o in response.outputs] == ["INPUT0", "TEXT"]
    assert list(response.outputs[0].contents.fp32_contents) == [1.0, 2.5, -3.0]
    assert list(response.outputs[0].shape) == [1, 3] and response.outputs[1].datatype == "BYTES"
    assert list(response.outputs[1].contents.bytes_contents) == [b"hello", b"\x00\xffworld"]
    assert dict(call.initial_metadata()).get("x-request-id")


def test_a_1_mib_raw_input_is_relayed_byte_for_byte_both_ways(setup: Setup) -> None:
    payload = os.urandom(MIB)
    request = oip.ModelInferRequest(model_name="echo", raw_input_contents=[payload])
    request.inputs.add(name="RAW", datatype="UINT8", shape=[MIB])
    raw = request.SerializeToString()
    with grpc.insecure_channel(setup.backend.address) as channel:
        direct = channel.unary_unary(MODEL_INFER)(raw, timeout=10)
    channel, _ = stub(setup.sidecar.listen)
    with channel:
        relayed, _ = channel.unary_unary(MODEL_INFER).with_call(
            raw, metadata=(*auth(), ("x-request-id", "oip-mib")), timeout=10)
    assert relayed == direct  # the answer, unchanged
    response = oip.ModelInferResponse.FromString(relayed)
    assert response.raw_output_contents[0] == payload
    # the request, unchanged: what the backend hashed is what was sent
    assert response.parameters["received_sha256"].string_param == hashlib.sha256(raw).hexdigest()
    seen = wait_until(lambda: setup.backend.call_for("oip-mib"), 5, what="the backend's call log")
    assert seen is not None and seen["request_sha256"] == hashlib.sha256(raw).hexdigest()
    assert seen["response_sha256"] == hashlib.sha256(relayed).hexdigest()
    assert "x-api-key" not in seen["metadata_keys"]  # credentials stay behind


# --- the same errors as inference.v1 ---------------------------------------------------------


def test_auth_allow_list_and_model_errors(setup: Setup) -> None:
    channel, service = stub(setup.sidecar.listen)
    with channel:
        assert error_detail(failure(service.ModelInfer, infer_request())).reason == "UNAUTHORIZED"
        bad = failure(service.ModelInfer, infer_request(), metadata=(("x-api-key", "nope"),))
        assert (bad.code(), error_detail(bad).reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")
        forbidden = failure(service.ModelInfer, infer_request(), metadata=auth("narrow"))
        assert (forbidden.code(), error_detail(forbidden).reason) == (grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN")
        unknown = failure(service.ModelInfer, infer_request("nope"), metadata=auth())
        assert (unknown.code(), error_detail(unknown).reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
        missing = failure(service.ModelInfer, infer_request(""), metadata=auth())
        assert (error_detail(missing).reason, error_detail(missing).metadata["field"]) == ("MISSING_FIELD",
                                                                                           "model_name")
        garbage = failure(channel.unary_unary(MODEL_INFER), b"\x0a\xff\xff\xff\xff", metadata=auth())
        assert (garbage.code(), error_detail(garbage).reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")


def test_the_last_model_name_on_the_wire_is_the_one_governed(setup: Setup) -> None:
    """protobuf's last-one-wins: naming an allowed model first and another one later is the later one."""
    smuggled = oip.ModelInferRequest(model_name="chat").SerializeToString() + infer_request().SerializeToString()
    with grpc.insecure_channel(setup.sidecar.listen) as channel:
        denied = failure(channel.unary_unary(MODEL_INFER), smuggled, metadata=auth("narrow"))
    assert error_detail(denied).reason == "FORBIDDEN"


def test_a_model_is_called_through_its_own_protocol_only(setup: Setup) -> None:
    channel, service = stub(setup.sidecar.listen)
    with channel:
        oip_to_v1 = failure(service.ModelInfer, infer_request("chat"), metadata=auth())
        v1_to_oip = failure(channel.unary_unary(INFER), InferRequest(model="echo", input="x").SerializeToString(),
                            metadata=auth())
        probe = failure(service.ModelReady, oip.ModelReadyRequest(name="chat"), metadata=auth())
    for error, protocol in ((oip_to_v1, "inference_v1"), (v1_to_oip, "oip"), (probe, "inference_v1")):
        detail = error_detail(error)
        assert (error.code(), detail.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PROTOCOL_MISMATCH")
        assert detail.metadata["protocol"] == protocol


def test_rate_limit_denies_with_retry_info_and_token_rates_do_not_apply(setup: Setup) -> None:
    channel, service = stub(setup.sidecar.listen)
    with channel:
        service.ModelInfer(infer_request(), metadata=auth("slow"), timeout=10)  # tokens_per_minute: 1 spares it
        denied = failure(service.ModelInfer, infer_request(), metadata=auth("slow"))
    detail = error_detail(denied)
    assert (denied.code(), detail.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert detail.metadata["limit"] == "org:slow:requests_per_minute"
    assert any(isinstance(d, error_details_pb2.RetryInfo) for d in detail.details)


def test_a_per_request_price_counts_calls_against_a_cost_budget(setup: Setup) -> None:
    channel, service = stub(setup.sidecar.listen)
    with channel:
        for _ in range(2):  # 0.001 each of 0.0025 a day; tokens_per_day: 1 does not apply
            service.ModelInfer(infer_request(), metadata=auth("poor"), timeout=10)
        denied = wait_until(lambda: _denied(service), 5, what="the budget to run out")
    detail = error_detail(denied)
    assert (denied.code(), detail.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "BUDGET_EXCEEDED")
    assert detail.metadata["budget"] == "org:poor:cost_per_day"
    assert any(isinstance(d, error_details_pb2.QuotaFailure) for d in detail.details)


def _denied(service: oip_grpc.GRPCInferenceServiceStub) -> grpc.RpcError | None:
    try:
        service.ModelInfer(infer_request(), metadata=auth("poor"), timeout=10)
    except grpc.RpcError as error:
        return error
    return None


# --- routing ----------------------------------------------------------------------------------


def test_a_dead_backend_fails_over_before_the_response(setup: Setup) -> None:
    channel, service = stub(setup.sidecar.listen)
    with channel:
        response = service.ModelInfer(infer_request("failover"), metadata=(*auth(), ("x-request-id", "oip-fo")),
                                      timeout=10)
    assert response.model_name == "failover"
    record = setup.record("oip-fo")
    assert [a["backend"] for a in record["attempts"]] == ["dead", "spare"]
    assert [a["status"] for a in record["attempts"]] == ["UNAVAILABLE", "OK"]


def test_stream_infer_and_other_methods_are_unimplemented(setup: Setup) -> None:
    channel, service = stub(setup.sidecar.listen)
    with channel:
        stream = failure(lambda timeout, metadata: list(service.ModelStreamInfer(
            iter([infer_request()]), timeout=timeout, metadata=metadata)), metadata=auth())
        other = failure(channel.unary_unary("/inference.GRPCInferenceService/RepositoryIndex"), b"")
    assert stream.code() == grpc.StatusCode.UNIMPLEMENTED and "ModelInfer" in (stream.details() or "")
    assert other.code() == grpc.StatusCode.UNIMPLEMENTED and "RepositoryIndex" in (other.details() or "")


# --- records, metrics, traces, logs ------------------------------------------------------------


def test_usage_audit_metrics_span_and_access_line(setup: Setup) -> None:
    trace = os.urandom(16).hex()
    channel, service = stub(setup.sidecar.listen)
    with channel:
        service.ModelInfer(infer_request(), timeout=10, metadata=(
            *auth(), ("x-request-id", "oip-rec"), ("traceparent", f"00-{trace}-{os.urandom(8).hex()}-01")))
    record = setup.record("oip-rec")
    assert (record["protocol"], record["model"], record["status"], record["org"]) == ("oip", "echo", "OK", "acme")
    assert record.get("input_tokens", 0) == 0 and record.get("output_tokens", 0) == 0
    assert not record.get("usage_estimated", False)
    with grpc.insecure_channel(setup.sidecar.admin_listen) as admin:
        audit = admin_pb2_grpc.AuditStub(admin).GetRequest(admin_pb2.GetRequestRequest(request_id="oip-rec"),
                                                           metadata=(("authorization", f"Bearer {ADMIN}"),), timeout=5)
    assert audit.usage.protocol == "oip" and audit.usage.backend == "a" and audit.routing_decision == "primary"
    labels = {"grpc_service": "inference.GRPCInferenceService", "grpc_method": "ModelInfer", "grpc_code": "OK"}
    assert metric(setup.sidecar, "grpc_server_handled_total", labels) >= 1
    assert metric(setup.sidecar, "api_router_backend_requests_total", {"model": "echo", "code": "OK"}) >= 1
    spans = wait_until(lambda: [s for s in setup.receiver.trace(trace) if s.name.endswith("/ModelInfer")]
                       if len(setup.receiver.trace(trace)) >= 5 else None, 10, what="the call's spans")
    assert spans is not None
    assert {s.name for s in spans} == {"inference.GRPCInferenceService/ModelInfer"}
    assert any(s.attributes.get("gen_ai.request.model") == "echo" for s in spans)
    line = wait_until(lambda: next((entry for entry in setup.sidecar.log_json() if entry.get("logger") ==
                                    "sidecar.access" and entry.get("request_id") == "oip-rec"), None), 10,
                      what="the access line")
    assert line is not None and line["method"] == "ModelInfer" and line["model"] == "echo"


# --- health checks ----------------------------------------------------------------------------


def test_oip_model_ready_health_checks_mark_a_backend_without_the_model_unhealthy(tmp_path: Path) -> None:
    serving = start_backend(tmp_path, "--protocol", "oip", "--models", "echo", name="oip-ready")
    try:
        sidecar = start_sidecar(tmp_path, sidecar_config(f"""
            echo:
              protocol: oip
              health_checks: {{method: oip_model_ready}}
              backends: [{{name: a, address: "{serving.address}"}}]
            other:
              protocol: oip
              health_checks: {{method: oip_model_ready}}
              backends: [{{name: a, address: "{serving.address}"}}]
            """) + "health_checks: {interval_ms: 100, timeout_ms: 100, unhealthy_threshold: 1, healthy_threshold: 1}\n")
        try:
            def models() -> dict[str, Any] | None:
                found: dict[str, Any] = readyz(sidecar.ops_url)[1]["components"]["backends"]["models"]
                return found if found["other"]["a"] == "unhealthy" else None
            states = wait_until(models, 10, what="the backend without the model to turn unhealthy")
            assert states is not None and states["echo"]["a"] == "healthy"
            checks = [c for c in serving.calls() if c["method"] == "ModelReady"]
            assert {c["model"] for c in checks} == {"echo", "other"}
        finally:
            sidecar.proc.stop()
    finally:
        serving.proc.stop()
