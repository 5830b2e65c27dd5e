"""Rate limits through the public interface (memory store): denial, RetryInfo, key limits, shadow."""
from __future__ import annotations

import hashlib
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from prometheus_client.parser import text_string_to_metric_families
from sidecar_client import ErrorDetail, error_detail
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from tests.grpc.test_proxy import INFER
from tests.harness.sidecar import BackendProc, SidecarProc, sidecar_config, start_sidecar

KEYS = {"fast": "sk-fast-1", "slow": "sk-slow-2", "watched": "sk-watched-3"}


@pytest.fixture(scope="module")
def sidecar(backend: BackendProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProc]:
    keys = "\n".join(f'    - {{id: {name}, sha256: "{hashlib.sha256(key.encode()).hexdigest()}", org: {name}-org}}'
                     for name, key in KEYS.items())
    config = sidecar_config(f"""
        chat:
          backends: [{{name: a, address: "{backend.address}"}}]
        """) + f"""auth:
  api_keys:
{keys}
limits:
  orgs:
    fast-org: {{requests_per_minute: 60, burst: 3}}
    watched-org: {{requests_per_minute: 60, burst: 1, shadow: true}}
  api_keys:
    slow: {{requests_per_minute: 6, burst: 1}}
"""
    proc = start_sidecar(tmp_path_factory.mktemp("sidecar"), config)
    try:
        yield proc
    finally:
        proc.proc.stop()


def infer(target: str, key: str) -> ErrorDetail | None:
    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary(INFER)(InferRequest(model="chat", input="x").SerializeToString(),
                                       metadata=(("x-api-key", key),), timeout=10)
        except grpc.RpcError as error:
            return error_detail(error)
    return None


def retry_delay(detail: ErrorDetail) -> float:
    info = next(d for d in detail.details if isinstance(d, error_details_pb2.RetryInfo))
    return info.retry_delay.ToNanoseconds() / 1e9


def test_org_burst_then_denial_with_the_true_wait(sidecar: SidecarProc) -> None:
    assert [infer(sidecar.listen, KEYS["fast"]) for _ in range(3)] == [None, None, None]
    denied_at = time.monotonic()
    detail = infer(sidecar.listen, KEYS["fast"])
    assert detail is not None
    assert (detail.code, detail.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert detail.metadata["limit"] == "org:fast-org:requests_per_minute"
    wait = retry_delay(detail)
    assert 0.5 < wait <= 1.0  # one request per second after a burst of 3, minus the time spent
    time.sleep(max(0.0, wait - 0.1 - (time.monotonic() - denied_at)))
    early = infer(sidecar.listen, KEYS["fast"])
    assert early is not None and early.reason == "RATE_LIMIT_EXCEEDED"  # 100 ms too early
    time.sleep(max(0.0, denied_at + wait + 0.05 - time.monotonic()))
    assert infer(sidecar.listen, KEYS["fast"]) is None  # 50 ms after the promised time


def test_key_limit(sidecar: SidecarProc) -> None:
    assert infer(sidecar.listen, KEYS["slow"]) is None
    detail = infer(sidecar.listen, KEYS["slow"])
    assert detail is not None and detail.metadata["limit"] == "key:slow:requests_per_minute"
    assert 9.0 < retry_delay(detail) <= 10.0


def test_shadow_limit_never_denies_but_is_logged(sidecar: SidecarProc) -> None:
    assert [infer(sidecar.listen, KEYS["watched"]) for _ in range(4)] == [None] * 4
    shadowed = [line for line in sidecar.log_json() if line.get("msg") == "shadow limit would deny"]
    assert len(shadowed) >= 3 and shadowed[0]["limit"] == "org:watched-org:requests_per_minute"
    limit = "org:watched-org:requests_per_minute"
    assert denials(sidecar, "watched-org", limit, "api_router_rate_limit_shadow_denials_total") >= 3
    assert denials(sidecar, "watched-org", limit) == 0


def denials(sidecar: SidecarProc, org: str, limit: str,
            metric: str = "api_router_rate_limit_denials_total") -> float:
    with urllib.request.urlopen(f"{sidecar.ops_url}/metrics", timeout=2) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and sample.labels == {"org": org, "limit": limit}:
                return float(sample.value)
    return 0.0


def test_denials_are_counted(sidecar: SidecarProc) -> None:
    before = denials(sidecar, "slow-org", "key:slow:requests_per_minute")
    infer(sidecar.listen, KEYS["slow"])
    infer(sidecar.listen, KEYS["slow"])
    assert denials(sidecar, "slow-org", "key:slow:requests_per_minute") >= before + 1
