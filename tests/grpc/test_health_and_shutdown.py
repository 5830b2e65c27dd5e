"""Health (CONTRACT §4), reflection, the ops HTTP endpoints and graceful stop on SIGTERM."""
from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferRequest, InferResponse

from tests.conftest import Launcher
from tests.grpc.test_proxy import INFER, params
from tests.harness.procs import free_port, wait_until
from tests.harness.sidecar import BackendProc, SidecarProc, health_status, one_model

LIST_ROUTES = "/sidecar.admin.v1.RoutingAdmin/ListRoutes"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def http_get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Watcher(threading.Thread):
    """Follows `Health.Watch` for one service, recording every status it is sent."""

    def __init__(self, target: str, service: str = "") -> None:
        super().__init__(daemon=True)
        self.target, self.service = target, service
        self.statuses: list[str] = []

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=self.service))
            try:
                for response in stream:
                    self.statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
            except grpc.RpcError:
                pass  # the server went away


class SlowCall(threading.Thread):
    """One unary call that the backend answers after `delay_ms`; `result` is its response or error."""

    def __init__(self, target: str, delay_ms: int, timeout: float = 30) -> None:
        super().__init__(daemon=True)
        self.target, self.delay_ms, self.timeout = target, delay_ms, timeout
        self.request_id = f"slow-{id(self)}-{time.monotonic_ns()}"
        self.result: InferResponse | grpc.RpcError | None = None

    def run(self) -> None:
        request = InferRequest(model="chat", input="in flight", parameters=params(delay_ms=self.delay_ms))
        with grpc.insecure_channel(self.target) as channel:
            try:
                self.result = InferResponse.FromString(
                    channel.unary_unary(INFER)(request.SerializeToString(), timeout=self.timeout,
                                              metadata=(("x-request-id", self.request_id),)))
            except grpc.RpcError as error:
                self.result = error


def test_serving_after_start_on_every_health_name(launch: Launcher, backend: BackendProc) -> None:
    sidecar = launch.sidecar(one_model(backend.address))
    for service in ("", "inference.v1.Inference", "liveness"):
        assert health_status(sidecar.listen, service) == "SERVING"
        assert health_status(sidecar.admin_listen, service) == "SERVING"
    with pytest.raises(grpc.RpcError) as unknown:
        health_status(sidecar.listen, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    ready = next(line for line in sidecar.log_json() if line.get("msg") == "sidecar ready")
    assert ready["health_listen"] is None  # not configured: no health-only listener

    status, body = http_get(f"{sidecar.ops_url}/readyz")
    assert status == 200 and body["status"] == "ready"
    assert body["components"]["config"]["version"]
    status, body = http_get(f"{sidecar.ops_url}/healthz")
    assert status == 200 and body["status"] == "ok"
    with urllib.request.urlopen(f"{sidecar.ops_url}/metrics", timeout=2) as response:
        assert b"process_cpu_seconds_total" in response.read()


def test_health_listen_serves_health_and_nothing_else(launch: Launcher, backend: BackendProc) -> None:
    """Guards `health_listen`, the plaintext listener for the kubelet's grpc: probes: it reports
    the same health as the other listeners, and serves nothing else (no inference, no admin, no
    reflection), so putting it on the pod IP exposes nothing more."""
    sidecar = launch.sidecar(one_model(backend.address, health_listen=f"127.0.0.1:{free_port()}"))
    for service in ("", "inference.v1.Inference", "liveness"):
        assert health_status(sidecar.health_listen, service) == "SERVING"
    with pytest.raises(grpc.RpcError) as unknown:
        health_status(sidecar.health_listen, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    infer = InferRequest(model="chat", input="not here").SerializeToString()
    with grpc.insecure_channel(sidecar.health_listen) as channel:
        for method, request in ((INFER, infer), (LIST_ROUTES, b""), (REFLECTION, b"")):
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary(method)(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
    ready = next(line for line in sidecar.log_json() if line.get("msg") == "sidecar ready")
    assert ready["health_listen"] == sidecar.health_listen


def test_reflection_lists_the_services(launch: Launcher, backend: BackendProc) -> None:
    sidecar = launch.sidecar(one_model(backend.address))
    with grpc.insecure_channel(sidecar.listen) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"inference.v1.Inference", "grpc.health.v1.Health"} <= services


def test_sigterm_drains_in_flight_calls_and_exits_zero(launch: Launcher) -> None:
    """Guards the drain: on SIGTERM, readiness turns NOT_SERVING (Watch streams see it) and new calls
    are refused while a call is still in flight, liveness stays SERVING, and the in-flight call is
    answered before a clean exit. `health_listen` reports the same as `listen` throughout, so a
    kubelet grpc: readiness probe takes the pod out of its Services while a liveness probe on it
    lets the drain finish.

    The call's backend is frozen (SIGSTOP) before the call is made and thawed only after every
    check, so the call is in flight throughout however slowly a loaded machine runs them. Health
    checks are off, so that the frozen backend cannot turn readiness NOT_SERVING by itself.
    """
    backend = launch.backend()
    sidecar = launch.sidecar(one_model(backend.address, timeout_ms=120_000, shutdown="{grace_ms: 120000}",
                                       health_checks="{enabled: false}", health_listen=f"127.0.0.1:{free_port()}"))
    watchers = [Watcher(sidecar.listen, ""), Watcher(sidecar.listen, "inference.v1.Inference"),
                Watcher(sidecar.health_listen, "")]
    for watcher in watchers:
        watcher.start()
    wait_until(lambda: all(w.statuses == ["SERVING"] for w in watchers), 20, what="watchers see SERVING")
    warm_up = SlowCall(sidecar.listen, delay_ms=0)  # connects the sidecar's channel to the backend
    warm_up.run()
    assert isinstance(warm_up.result, InferResponse), warm_up.result
    backend.proc.signal(signal.SIGSTOP)  # returns once frozen: nothing is answered until SIGCONT
    in_flight = SlowCall(sidecar.listen, delay_ms=0, timeout=120)
    in_flight.start()
    wait_until(lambda: _routed_calls(sidecar) == 2, 20, what="the sidecar routing the in-flight call")

    sidecar.proc.signal(signal.SIGTERM)
    wait_until(lambda: all(w.statuses[-1:] == ["NOT_SERVING"] for w in watchers), 30,
               what="Watch streams observe NOT_SERVING", proc=sidecar.proc)
    status, body = http_get(f"{sidecar.ops_url}/readyz")
    assert status == 503 and body["components"]["server"]["status"] == "draining"
    for target in (sidecar.listen, sidecar.health_listen):
        assert health_status(target, "", timeout=10) == "NOT_SERVING"
        assert health_status(target, "liveness", timeout=10) == "SERVING"  # alive while draining

    with grpc.insecure_channel(sidecar.listen) as channel, pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(INFER)(InferRequest(model="chat").SerializeToString(), timeout=10)
    detail = error_detail(refused.value)
    assert (detail.code, detail.reason) == (grpc.StatusCode.UNAVAILABLE, "SERVICE_UNAVAILABLE")
    assert in_flight.result is None and sidecar.proc.alive()  # all of the above happened during the drain

    backend.proc.signal(signal.SIGCONT)
    in_flight.join(60)
    assert isinstance(in_flight.result, InferResponse), in_flight.result
    assert in_flight.result.output.startswith("in flight")
    assert sidecar.proc.wait(60) == 0
    assert any(line.get("msg") == "stopped" and line.get("clean") is True for line in sidecar.log_json())


def test_grace_period_bounds_the_drain(launch: Launcher, backend: BackendProc) -> None:
    """Guards `shutdown.grace_ms`: a call still running when the grace period is over is cancelled
    and the sidecar exits at once, instead of waiting for the call (60 s here) or for the default
    grace period (15 s)."""
    sidecar = launch.sidecar(one_model(backend.address, timeout_ms=120_000, shutdown="{grace_ms: 300}"))
    in_flight = SlowCall(sidecar.listen, delay_ms=60_000, timeout=120)
    in_flight.start()
    wait_until(lambda: _started_at_backend(backend, in_flight.request_id), 20, what="the slow call reaching the backend")
    started = time.monotonic()
    sidecar.proc.signal(signal.SIGTERM)
    exit_code = sidecar.proc.wait(12)
    took = time.monotonic() - started
    assert exit_code == 0, f"no clean exit {took:.1f} s after SIGTERM with a 0.3 s grace period"
    in_flight.join(30)
    assert isinstance(in_flight.result, grpc.RpcError), in_flight.result
    assert any(line.get("msg") == "stopped" and line.get("clean") is False for line in sidecar.log_json())


def _started_at_backend(backend: BackendProc, request_id: str) -> bool:
    return any(line.get("event") == "call_started" and line.get("request_id") == request_id
               for line in backend.proc.log_lines_json())


def _routed_calls(sidecar: SidecarProc) -> float:
    """Calls the sidecar admitted and sent on to a backend so far (`api_router_routing_decisions_total`)."""
    with urllib.request.urlopen(f"{sidecar.ops_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "api_router_routing_decisions_total")
