"""Traces and access lines, end to end: a real OTLP/gRPC receiver, the sidecar and demo backends
as processes. The span tree of a call, the backend's parent, the caller's trace kept, sampling,
a dead or stuck collector, and the access line of every call — with no secret anywhere."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import grpc
import pytest
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from tests.conftest import Launcher
from tests.grpc.test_limits import metric
from tests.grpc.test_proxy import INFER, INFER_STREAM
from tests.harness.otlp import OtlpReceiver, ReceivedSpan
from tests.harness.procs import free_port, wait_until
from tests.harness.sidecar import BackendProc, SidecarProc, sidecar_config

API_KEY = "sk-trace-test-" + os.urandom(8).hex()
COLLECTOR_KEY = "collector-secret-" + os.urandom(8).hex()
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SERVER, CLIENT, INTERNAL = 2, 3, 1
STATUS_ERROR = 2


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


def traced_config(backends: list[tuple[str, BackendProc, int]], endpoint: str, ratio: float = 1.0,
                  extra: str = "") -> str:
    lines = "".join(f'\n    - {{name: {n}, address: "{b.address}", priority: {p}}}' for n, b, p in backends)
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    return (sidecar_config(f"chat:\n  timeout_ms: 5000\n  backends:{lines}")
            + "health_checks: {enabled: false}\n"
            + f"auth:\n  api_keys:\n    - {{id: app-1, sha256: \"{digest}\", org: acme, models: [\"*\"]}}\n"
            + f"telemetry:\n  otlp_endpoint: {endpoint}\n  sample_ratio: {ratio}\n"
            + f"  otlp_headers: {{x-collector-key: {COLLECTOR_KEY}}}\n"
            + "  resource_attributes: {k8s.pod.name: pod-1}\n" + extra)


def call(sidecar: SidecarProc, *, stream: bool = False, traceparent: str | None = None,
         request_id: str | None = None, key: str = API_KEY) -> str | None:
    """One call; None when it succeeded, else the error reason."""
    metadata = [("x-api-key", key)]
    if traceparent:
        metadata.append(("traceparent", traceparent))
    if request_id:
        metadata.append(("x-request-id", request_id))
    raw = InferRequest(model="chat", input="four words of input", max_output_tokens=5).SerializeToString()
    with grpc.insecure_channel(sidecar.listen) as channel:
        try:
            if stream:
                list(channel.unary_stream(INFER_STREAM)(raw, timeout=10, metadata=metadata))
            else:
                channel.unary_unary(INFER)(raw, timeout=10, metadata=metadata)
        except grpc.RpcError as error:
            return error_detail(error).reason or error.code().name
    return None


def span_tree(receiver: OtlpReceiver, trace_id: str, children: int) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    """The server span of the trace and its children, once all of them arrived."""
    def complete() -> tuple[ReceivedSpan, list[ReceivedSpan]] | None:
        spans = receiver.trace(trace_id)
        server = [s for s in spans if s.kind == SERVER]
        if len(server) != 1:
            return None
        kids = [s for s in spans if s.parent_span_id == server[0].span_id]
        return (server[0], kids) if len(kids) >= children else None
    found = wait_until(complete, 10, what=f"the spans of trace {trace_id}")
    assert found is not None
    return found


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_call_exports_its_span_tree_and_the_backend_is_a_child_of_the_attempt(
        launch: Launcher, receiver: OtlpReceiver, stream: bool) -> None:
    backend = launch.backend()
    sidecar = launch.sidecar(traced_config([("a", backend, 0)], receiver.endpoint))
    assert call(sidecar, stream=stream, traceparent=f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", request_id="req-t1") is None

    server, children = span_tree(receiver, CALLER_TRACE, 5)
    method = "InferStream" if stream else "Infer"
    # the server span continues the caller's trace, under the caller's span
    assert (server.name, server.parent_span_id) == (f"inference.v1.Inference/{method}", CALLER_SPAN)
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["rpc.service"] == "inference.v1.Inference"
    assert server.attributes["rpc.method"] == method
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["sidecar.request_id"] == "req-t1"
    assert (server.attributes["sidecar.org"], server.attributes["sidecar.api_key_id"]) == ("acme", "app-1")
    assert server.attributes["gen_ai.request.model"] == "chat"
    assert server.attributes["gen_ai.usage.output_tokens"] == 5
    assert server.attributes["gen_ai.usage.input_tokens"] > 0
    assert server.attributes["sidecar.backend"] == "a" and server.attributes["sidecar.attempts"] == 1
    assert server.status_code != STATUS_ERROR
    assert server.resource["service.name"] == "inference-sidecar" and server.resource["k8s.pod.name"] == "pod-1"
    # one child per step, in the order they ran, inside the server span
    names = [s.name for s in sorted(children, key=lambda s: s.start_ns)]
    assert names == ["sidecar.auth", "sidecar.limits", "sidecar.route", f"inference.v1.Inference/{method}",
                     "sidecar.usage"]
    assert all(server.start_ns <= s.start_ns <= s.end_ns <= server.end_ns for s in children)
    attempt = next(s for s in children if s.kind == CLIENT)
    host, port = backend.address.rsplit(":", 1)
    assert (attempt.attributes["server.address"], attempt.attributes["server.port"]) == (host, int(port))
    assert attempt.attributes["sidecar.backend"] == "a" and attempt.attributes["rpc.grpc.status_code"] == 0
    # the backend's parent is the attempt span
    seen = wait_until(lambda: backend.call_for("req-t1"), 5, what="the backend's call log")
    assert seen is not None and seen["traceparent"] == f"00-{CALLER_TRACE}-{attempt.span_id}-01"
    # the collector got the configured headers
    assert receiver.metadata[0]["x-collector-key"] == COLLECTOR_KEY


def test_a_retried_call_has_one_client_span_per_attempt(launch: Launcher, receiver: OtlpReceiver) -> None:
    failing = launch.backend("--fail-rate", "1", "--fail-code", "UNAVAILABLE")
    spare = launch.backend()
    sidecar = launch.sidecar(traced_config([("bad", failing, 0), ("spare", spare, 1)], receiver.endpoint))
    trace = os.urandom(16).hex()
    assert call(sidecar, traceparent=f"00-{trace}-{CALLER_SPAN}-01", request_id="req-retry") is None

    server, children = span_tree(receiver, trace, 6)
    attempts = sorted((s for s in children if s.kind == CLIENT), key=lambda s: s.start_ns)
    assert [a.attributes["sidecar.backend"] for a in attempts] == ["bad", "spare"]
    assert attempts[0].status_code == STATUS_ERROR and attempts[0].attributes["rpc.grpc.status_code"] == 14
    assert attempts[1].status_code != STATUS_ERROR
    assert server.attributes["sidecar.attempts"] == 2 and server.attributes["sidecar.routing_decision"] == "failover"
    seen = wait_until(lambda: spare.call_for("req-retry"), 5, what="the spare's call log")
    assert seen is not None and seen["traceparent"] == f"00-{trace}-{attempts[1].span_id}-01"


def test_a_refused_call_has_an_error_span_where_it_stopped(launch: Launcher, receiver: OtlpReceiver) -> None:
    backend = launch.backend()
    sidecar = launch.sidecar(traced_config([("a", backend, 0)], receiver.endpoint))
    trace = os.urandom(16).hex()
    assert call(sidecar, traceparent=f"00-{trace}-{CALLER_SPAN}-01", key="sk-wrong") == "INVALID_API_KEY"
    server, children = span_tree(receiver, trace, 1)
    assert server.attributes["rpc.grpc.status_code"] == 16 and server.attributes["sidecar.reason"] == "INVALID_API_KEY"
    assert [(s.name, s.status_code) for s in children] == [("sidecar.auth", STATUS_ERROR)]
    assert "INVALID_API_KEY" in children[0].status_message


def test_new_traces_are_sampled_and_the_backend_shares_the_trace_id(launch: Launcher, receiver: OtlpReceiver) -> None:
    backend = launch.backend()
    sidecar = launch.sidecar(traced_config([("a", backend, 0)], receiver.endpoint))
    assert call(sidecar, request_id="req-new") is None
    seen = wait_until(lambda: backend.call_for("req-new"), 5, what="the backend's call log")
    assert seen is not None
    _, trace, parent, flags = seen["traceparent"].split("-")
    server, children = span_tree(receiver, trace, 5)
    assert server.parent_span_id == "" and flags == "01"
    assert parent in {s.span_id for s in children if s.kind == CLIENT}


def test_sample_ratio_zero_exports_nothing(launch: Launcher, receiver: OtlpReceiver) -> None:
    backend = launch.backend()
    silent = launch.sidecar(traced_config([("a", backend, 0)], receiver.endpoint, ratio=0.0))
    traced = launch.sidecar(traced_config([("a", backend, 0)], receiver.endpoint, ratio=1.0))
    asked = os.urandom(16).hex()
    for i in range(20):
        assert call(silent, request_id=f"req-silent-{i}") is None
    assert call(silent, traceparent=f"00-{asked}-{CALLER_SPAN}-01", request_id="req-silent-asked") is None
    # the backend still gets a trace context: the caller's as it came, or the call's own, unsampled
    seen = wait_until(lambda: backend.call_for("req-silent-0"), 5, what="the backend's call log")
    assert seen is not None and seen["traceparent"].endswith("-00")
    seen = wait_until(lambda: backend.call_for("req-silent-asked"), 5, what="the backend's call log")
    assert seen is not None and seen["traceparent"] == f"00-{asked}-{CALLER_SPAN}-01"
    # the other sidecar's spans arriving shows that the receiver works and an export interval passed
    control = os.urandom(16).hex()
    assert call(traced, traceparent=f"00-{control}-{CALLER_SPAN}-01") is None
    span_tree(receiver, control, 5)
    exported = metric(traced, "api_router_trace_spans_exported_total", {})
    assert exported >= 6
    assert {s.trace_id for s in receiver.all_spans()} == {control}
    assert metric(silent, "api_router_trace_spans_exported_total", {}) == 0


def test_a_dead_collector_costs_spans_not_calls(launch: Launcher) -> None:
    backend = launch.backend()
    sidecar = launch.sidecar(traced_config([("a", backend, 0)], f"http://127.0.0.1:{free_port()}"))
    assert [call(sidecar, stream=i % 2 == 1) for i in range(40)] == [None] * 40
    wait_until(lambda: metric(sidecar, "api_router_trace_spans_dropped_total", {"reason": "export_failed"}) >= 40 * 6,
               10, what="failed exports counted")
    assert any(line.get("msg", "").startswith("trace export failing") for line in sidecar.log_json())


def test_a_collector_that_comes_back_gets_the_spans_of_new_calls(launch: Launcher) -> None:
    receiver = OtlpReceiver()  # its port is chosen, nothing listens yet
    backend = launch.backend()
    sidecar = launch.sidecar(traced_config([("a", backend, 0)], receiver.endpoint))
    try:
        assert [call(sidecar) for _ in range(10)] == [None] * 10
        wait_until(lambda: metric(sidecar, "api_router_trace_spans_dropped_total", {"reason": "export_failed"}) > 0,
                   10, what="spans dropped while the collector is down")
        receiver.start()
        trace = os.urandom(16).hex()

        def arrived() -> bool:  # calls go on; the spans of one made after the collector returned arrive
            assert call(sidecar, traceparent=f"00-{trace}-{CALLER_SPAN}-01") is None
            return bool(receiver.trace(trace))
        wait_until(arrived, 20, what="spans exported again", interval=0.5)
        assert any(line.get("msg") == "trace export recovered" for line in sidecar.log_json())
    finally:
        receiver.stop()


def test_a_stuck_collector_costs_spans_not_calls(launch: Launcher, receiver: OtlpReceiver) -> None:
    backend = launch.backend()
    sidecar = launch.sidecar(traced_config([("a", backend, 0)], receiver.endpoint,
                                           extra="  max_queued_spans: 64\n  export_timeout_ms: 30000\n"))
    receiver.hang()
    assert call(sidecar) is None
    wait_until(lambda: receiver.hung_exports >= 1, 10, what="an export stuck in the collector")
    # the exporter waits on the stuck export; calls go on, and spans beyond the queue are dropped
    assert [call(sidecar, stream=i % 2 == 1) for i in range(60)] == [None] * 60
    assert metric(sidecar, "api_router_trace_spans_dropped_total", {"reason": "queue_full"}) > 0


def test_every_call_has_an_access_line_and_no_secret_is_logged_or_exported(
        launch: Launcher, receiver: OtlpReceiver) -> None:
    backend = launch.backend()
    admin_token = "adm-secret-" + os.urandom(8).hex()
    digest = hashlib.sha256(admin_token.encode()).hexdigest()
    config = traced_config([("a", backend, 0)], receiver.endpoint, extra="  log_format: json\n  access_log: true\n")
    sidecar = launch.sidecar(config.replace(
        "auth:\n", f"auth:\n  admin_tokens:\n    - {{id: ops, sha256: \"{digest}\"}}\n"))
    trace = os.urandom(16).hex()
    assert call(sidecar, traceparent=f"00-{trace}-{CALLER_SPAN}-01", request_id="req-ok") is None
    assert call(sidecar, stream=True, request_id="req-stream") is None
    assert call(sidecar, request_id="req-denied", key=API_KEY + "-wrong") == "INVALID_API_KEY"
    assert call(sidecar, request_id="req-nokey", key="") == "UNAUTHORIZED"

    def access_lines() -> dict[str, dict[str, object]] | None:
        lines = {line["request_id"]: line for line in sidecar.log_json() if line.get("logger") == "sidecar.access"}
        return lines if len(lines) >= 4 else None
    lines = wait_until(access_lines, 5, what="four access lines")
    assert lines is not None
    ok = lines["req-ok"]
    server, _ = span_tree(receiver, trace, 5)
    assert (ok["trace_id"], ok["span_id"]) == (trace, server.span_id)
    assert {k: ok[k] for k in ("org", "api_key_id", "model", "backend", "attempts", "status", "reason",
                               "method", "routing_decision")} == {
        "org": "acme", "api_key_id": "app-1", "model": "chat", "backend": "a", "attempts": 1, "status": "OK",
        "reason": "", "method": "Infer", "routing_decision": "primary"}
    assert 0 < float(ok["overhead_ms"]) <= float(ok["duration_ms"])  # type: ignore[arg-type]
    assert lines["req-stream"]["method"] == "InferStream" and lines["req-stream"]["status"] == "OK"
    assert (lines["req-denied"]["status"], lines["req-denied"]["reason"]) == ("UNAUTHENTICATED", "INVALID_API_KEY")
    assert lines["req-denied"]["org"] == "" and lines["req-denied"]["attempts"] == 0
    assert lines["req-nokey"]["reason"] == "UNAUTHORIZED"
    # an admin call, authorized, so its token went through the sidecar too
    from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc
    with grpc.insecure_channel(sidecar.admin_listen) as channel:
        admin_pb2_grpc.RoutingAdminStub(channel).ListRoutes(
            admin_pb2.ListRoutesRequest(), timeout=5, metadata=(("authorization", f"Bearer {admin_token}"),))
    sidecar.proc.stop()  # everything flushed: the last lines and spans
    text = sidecar.proc.log_text()
    exported = repr(receiver.all_spans())
    for secret in (API_KEY, admin_token, COLLECTOR_KEY):
        assert secret not in text and secret not in exported
    assert API_KEY[:20] not in text  # not even a prefix of the key


def test_openmetrics_scrapes_get_trace_id_exemplars(launch: Launcher, receiver: OtlpReceiver) -> None:
    import urllib.request

    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
    from prometheus_client.parser import text_string_to_metric_families as parse_text

    backend = launch.backend()
    sidecar = launch.sidecar(traced_config([("a", backend, 0)], receiver.endpoint))
    trace = os.urandom(16).hex()
    assert call(sidecar, traceparent=f"00-{trace}-{CALLER_SPAN}-01") is None
    request = urllib.request.Request(f"{sidecar.ops_url}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = response.read().decode()
    exemplars = {family.name: sample.exemplar.labels["trace_id"] for family in parse_openmetrics(text)
                 for sample in family.samples if sample.exemplar is not None}
    assert exemplars["grpc_server_handling_seconds"] == trace
    assert exemplars["api_router_backend_request_duration_seconds"] == trace
    with urllib.request.urlopen(f"{sidecar.ops_url}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        plain = response.read().decode()
    assert trace not in plain and list(parse_text(plain))  # the classic format carries no exemplars
