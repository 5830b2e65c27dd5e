"""`/metrics`, `/healthz` and `sidecar version` seen from the outside (CONTRACT §8, §4): after
served, denied and failed calls, 1,000 of them with distinct request ids, the exposition parses
with Prometheus' own parser, holds a sample of every contract name, and no label carries
anything a caller chose; the standard gRPC server metrics cover inference, health and the admin
services; the build is described the same way in the three places."""
from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.request
import uuid
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families
from sidecar_client.inference.v1.inference_pb2 import InferRequest
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from tests.conftest import Launcher
from tests.harness.load import INFER
from tests.harness.procs import wait_until
from tests.harness.sidecar import SIDECAR, BackendProc, SidecarProc, sidecar_config

KEYS = {"app": "sk-metrics-app", "slow": "sk-metrics-slow", "poor": "sk-metrics-poor"}
ADMIN_TOKEN = "adm-metrics-7f2e"
CONTRACT_NAMES = [
    "api_router_backend_requests_total", "api_router_backend_request_duration_seconds",
    "api_router_backend_errors_total", "api_router_routing_decisions_total", "api_router_backend_healthy",
    "api_router_rate_limit_denials_total", "api_router_budget_denials_total",
    "api_router_usage_records_published_total", "api_router_usage_records_publish_duration_seconds",
    "api_router_usage_records_buffered_total", "api_router_buffer_store_size",
    "api_router_buffer_store_retries_total", "api_router_buffer_store_age_seconds",
    "grpc_server_handled_total", "grpc_server_handling_seconds", "sidecar_build_info",
]
CALLS = 1000


def config(good: BackendProc, failing: BackendProc, bootstrap: str, spool: Path, *, failover: bool = False,
           extra: str = "") -> str:
    """Two models (`flaky` on a backend that fails every call; with `failover`, `good` as its
    failover tier), three keys (one rate-limited, one with a tiny budget), usage to Kafka."""
    keys = "".join(f'    - {{id: {name}, sha256: "{hashlib.sha256(key.encode()).hexdigest()}", org: {name}-org}}\n'
                   for name, key in KEYS.items())
    spare = f'{{name: a, address: "{good.address}", weight: 1, priority: 1}}' if failover else ""
    return sidecar_config(f"""
        chat:
          backends:
            - {{name: a, address: "{good.address}", weight: 1}}
        flaky:
          backends:
            - {{name: f, address: "{failing.address}", weight: 1}}
            {"- " + spare if spare else ""}
        """) + f"""auth:
  api_keys:
{keys}  admin_tokens: [{{id: ops, sha256: "{hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}"}}]
limits:
  api_keys:
    slow: {{requests_per_minute: 1, burst: 1}}
budgets:
  orgs:
    poor-org: {{tokens_per_day: 5}}
usage:
  sink: kafka
  spool_dir: {spool}
  kafka: {{bootstrap_servers: "{bootstrap}", topic: metrics-{uuid.uuid4().hex[:8]}}}
""" + extra


def infer(infer_call: grpc.UnaryUnaryMultiCallable[bytes, bytes], key: str, request_id: str,
          model: str = "chat") -> grpc.StatusCode:
    request = InferRequest(model=model, input="hello").SerializeToString()
    try:
        infer_call(request, metadata=(("x-api-key", KEYS[key]), ("x-request-id", request_id)), timeout=10)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def scrape(sidecar: SidecarProc) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Family name -> its samples (name, labels, value), parsed by prometheus_client's parser."""
    with urllib.request.urlopen(f"{sidecar.ops_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {family.name: [(s.name, s.labels, s.value) for s in family.samples]
            for family in text_string_to_metric_families(text)}


def sample_names(families: dict[str, list[tuple[str, dict[str, str], float]]]) -> set[str]:
    return {name for samples in families.values() for name, _, _ in samples}


def value(families: dict[str, list[tuple[str, dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for samples in families.values() for n, lab, v in samples if n == name and labels.items() <= lab.items())


def test_metrics_hold_every_contract_name_with_bounded_labels(
        launch: Launcher, kafka_bootstrap: str, tmp_path: Path) -> None:
    good, failing = launch.backend(), launch.backend("--fail-rate", "1.0", "--fail-code", "INTERNAL")
    sidecar = launch.sidecar(config(good, failing, kafka_bootstrap, tmp_path / "spool"))
    request_ids = [f"metrics-{i}-{uuid.uuid4().hex}" for i in range(CALLS)]
    with grpc.insecure_channel(sidecar.listen) as channel:
        infer_call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(INFER)
        codes = [infer(infer_call, "app", request_id) for request_id in request_ids]
        assert codes == [grpc.StatusCode.OK] * CALLS
        assert infer(infer_call, "slow", "slow-1") == grpc.StatusCode.OK
        assert infer(infer_call, "slow", "slow-2") == grpc.StatusCode.RESOURCE_EXHAUSTED   # rate limit
        assert infer(infer_call, "poor", "poor-1") == grpc.StatusCode.RESOURCE_EXHAUSTED   # budget
        assert infer(infer_call, "app", "flaky-1", model="flaky") != grpc.StatusCode.OK   # backend error
    with grpc.insecure_channel(sidecar.admin_listen) as channel:
        audit = admin_pb2_grpc.AuditStub(channel)
        found = audit.GetRequest(admin_pb2.GetRequestRequest(request_id=request_ids[0]),
                                 metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),), timeout=5)
        assert found.request_id == request_ids[0]
        try:
            audit.GetRequest(admin_pb2.GetRequestRequest(request_id=request_ids[0]), timeout=5)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        else:
            raise AssertionError("an admin call without a token was served")

    wait_until(lambda: value(scrape(sidecar), "api_router_usage_records_published_total") >= CALLS + 4, 30,
               what="usage records acknowledged by Kafka")
    families = scrape(sidecar)
    names = sample_names(families)
    missing = [n for n in CONTRACT_NAMES if n not in names and f"{n}_bucket" not in names]
    assert not missing, f"no sample of {missing}"
    assert "process_cpu_seconds_total" in names and "process_resident_memory_bytes" in names

    # bounded: no label value is caller input, and a thousand request ids made no new series
    label_values = {v for samples in families.values() for _, labels, _ in samples for v in labels.values()}
    assert not label_values & {*request_ids, "slow-1", "slow-2", "poor-1", "flaky-1"}
    assert not {v for v in label_values if v.startswith("metrics-")}
    series = {family: len({tuple(sorted(labels.items())) for _, labels, _ in samples})
              for family, samples in families.items()}
    assert max(series.values()) < 100, sorted(series.items(), key=lambda kv: -kv[1])[:3]

    # the standard gRPC server metrics, for every service
    handled = "grpc_server_handled_total"
    inference = {"grpc_service": "inference.v1.Inference", "grpc_method": "Infer", "grpc_type": "unary"}
    assert value(families, handled, **inference, grpc_code="OK") == CALLS + 1
    assert value(families, handled, **inference, grpc_code="RESOURCE_EXHAUSTED") == 2
    assert value(families, "grpc_server_handling_seconds_count", **inference) == CALLS + 4
    assert value(families, handled, grpc_service="grpc.health.v1.Health", grpc_method="Check", grpc_code="OK") >= 1
    audit_labels = {"grpc_service": "sidecar.admin.v1.Audit", "grpc_method": "GetRequest"}
    assert value(families, handled, **audit_labels, grpc_code="OK") == 1
    assert value(families, handled, **audit_labels, grpc_code="UNAUTHENTICATED") == 1
    assert value(families, "api_router_backend_errors_total") >= 1
    assert value(families, "api_router_rate_limit_denials_total") == 1
    assert value(families, "api_router_budget_denials_total") == 1


def test_the_build_is_described_alike_in_healthz_the_metric_and_sidecar_version(
        launch: Launcher, backend: BackendProc) -> None:
    sidecar = launch.sidecar(sidecar_config(f"""
        chat:
          backends:
            - {{name: a, address: "{backend.address}", weight: 1}}
        """))
    with urllib.request.urlopen(f"{sidecar.ops_url}/healthz", timeout=5) as response:
        healthz = json.load(response)
    printed = json.loads(subprocess.run([*SIDECAR, "version"], capture_output=True, text=True, check=True,
                                        timeout=30).stdout)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], check=False).stdout.strip()
    assert set(printed) == {"version", "commit", "build_time"}
    assert {k: healthz[k] for k in printed} == printed
    if head:  # a checkout: the commit is found, not made up
        assert printed["commit"] == head
    (info,) = [labels for samples in scrape(sidecar).values() for name, labels, v in samples
               if name == "sidecar_build_info" and v == 1]
    assert info == printed
