"""Rate limits and budgets through the public gRPC interface, against both stores.

Every test here runs three times: with `limits.store: memory`, and with `limits.store: redis` on a
real Valkey and on a real 3-master Redis Cluster. Orgs carry a per-run suffix, so the two runs (and reruns against a shared $REDIS_URL)
never see each other's counters. Settlement of a call's reservation runs just after the call
ends, so tests that depend on it leave it a moment (`SETTLE`).
"""
from __future__ import annotations

import hashlib
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from prometheus_client.parser import text_string_to_metric_families
from sidecar_client import ErrorDetail, error_detail
from sidecar_client.inference.v1.inference_pb2 import InferChunk, InferRequest, InferResponse

from tests.grpc.test_proxy import INFER, INFER_STREAM, params
from tests.harness.sidecar import BackendProc, SidecarProc, sidecar_config, start_sidecar

SETTLE = 0.1  # seconds for a finished call's settlement to land
NAMES = ("fast", "slow", "watched", "tok", "tokstream", "budget", "cost", "permodel", "narrow")


@dataclass
class Limited:
    sidecar: SidecarProc
    store: str
    suffix: str

    def org(self, name: str) -> str:
        return f"{name}-{self.suffix}"

    def key(self, name: str) -> str:
        return f"sk-{name}-{self.suffix}"


@pytest.fixture(scope="module", params=["memory", "redis", "cluster"])
def limited(request: pytest.FixtureRequest, backend: BackendProc,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    store = "memory" if request.param == "memory" else "redis"
    suffix = uuid.uuid4().hex[:8]
    keys = "\n".join(f'    - {{id: {n}, sha256: "{hashlib.sha256(f"sk-{n}-{suffix}".encode()).hexdigest()}", '
                     f'org: {n}-{suffix}{", models: [embed*]" if n == "narrow" else ""}}}' for n in NAMES)
    # a generous timeout: a loaded CI machine must not push these tests into degraded mode
    url = {"redis": "redis_url", "cluster": "redis_cluster_url"}.get(request.param)
    redis = f"\n  redis_url: {request.getfixturevalue(url)}\n  redis_timeout_ms: 2000" if url else ""
    config = sidecar_config(f"""
        chat:
          backends: [{{name: a, address: "{backend.address}"}}]
        """) + f"""auth:
  api_keys:
{keys}
limits:
  store: {store}{redis}
  orgs:
    fast-{suffix}: {{requests_per_minute: 60, burst: 3}}
    watched-{suffix}: {{requests_per_minute: 60, burst: 1, shadow: true}}
    tok-{suffix}: {{tokens_per_minute: 600, token_burst: 100}}
    tokstream-{suffix}: {{tokens_per_minute: 600, token_burst: 100}}
    permodel-{suffix}: {{models: {{chat: {{requests_per_minute: 6, burst: 1}}}}}}
  api_keys:
    slow: {{requests_per_minute: 6, burst: 1}}
budgets:
  orgs:
    budget-{suffix}: {{tokens_per_day: 100}}
    cost-{suffix}: {{cost_per_day: 0.05}}
  prices:
    chat: {{input_per_1k: 1.0, output_per_1k: 2.0}}
"""
    proc = start_sidecar(tmp_path_factory.mktemp(f"limits-{store}"), config)
    try:
        yield Limited(proc, store, suffix)
    finally:
        proc.proc.stop()


def infer(target: str, key: str, *, stream: bool = False, **fields: object) -> tuple[ErrorDetail | None, int]:
    """One call; (error or None, total tokens the backend reported)."""
    request = InferRequest(model="chat", input=str(fields.pop("input", "hello world")), **fields)  # type: ignore[arg-type]
    with grpc.insecure_channel(target) as channel:
        try:
            if stream:
                chunks = [InferChunk.FromString(c) for c in channel.unary_stream(INFER_STREAM)(
                    request.SerializeToString(), metadata=(("x-api-key", key),), timeout=10)]
                usage = chunks[-1].usage
            else:
                usage = InferResponse.FromString(channel.unary_unary(INFER)(
                    request.SerializeToString(), metadata=(("x-api-key", key),), timeout=10)).usage
        except grpc.RpcError as error:
            return error_detail(error), 0
    return None, usage.input_tokens + usage.output_tokens


def denied(target: str, key: str, **fields: object) -> ErrorDetail:
    detail, _ = infer(target, key, **fields)
    assert detail is not None, "the call was admitted"
    assert key not in detail.message and key not in str(detail.metadata) and key not in str(detail.details)
    return detail


def retry_delay(detail: ErrorDetail) -> float:
    info = next(d for d in detail.details if isinstance(d, error_details_pb2.RetryInfo))
    return info.retry_delay.ToNanoseconds() / 1e9


def quota_violation(detail: ErrorDetail) -> error_details_pb2.QuotaFailure.Violation:
    failure = next(d for d in detail.details if isinstance(d, error_details_pb2.QuotaFailure))
    assert len(failure.violations) == 1
    return failure.violations[0]


def metric(sidecar: SidecarProc, name: str, labels: dict[str, str]) -> float:
    with urllib.request.urlopen(f"{sidecar.ops_url}/metrics", timeout=2) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


# --- authentication comes first, whatever the store -----------------------------------------


def test_authentication_errors(limited: Limited) -> None:
    target = limited.sidecar.listen
    request = InferRequest(model="chat", input="x").SerializeToString()
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as failure:
        channel.unary_unary(INFER)(request, timeout=10)
    assert error_detail(failure.value).reason == "UNAUTHORIZED"
    assert denied(target, "sk-not-configured").reason == "INVALID_API_KEY"
    detail = denied(target, limited.key("narrow"))
    assert (detail.code, detail.reason) == (grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN")


# --- request rates -------------------------------------------------------------------------


def test_org_burst_then_denial_with_the_true_wait(limited: Limited) -> None:
    """RetryInfo is the real wait: a call decided before it is denied, one 50 ms after it passes.

    The server decides somewhere between sending and answering, so the promised time P lies in
    [sent + wait, answered + wait] of the denied call; each probe is judged by what is certain.
    """
    target, key = limited.sidecar.listen, limited.key("fast")
    assert [infer(target, key)[0] for _ in range(3)] == [None, None, None]
    sent = time.monotonic()
    detail = denied(target, key)
    answered = time.monotonic()
    assert (detail.code, detail.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert detail.metadata["limit"] == f"org:{limited.org('fast')}:requests_per_minute"
    wait = retry_delay(detail)
    assert 0.5 < wait <= 1.0  # one request per second after a burst of 3, minus the time spent
    time.sleep(max(0.0, answered + wait - 0.1 - time.monotonic()))
    early, _ = infer(target, key)
    if early is None:  # admitted: only right if the machine stalled and it was decided after P
        assert time.monotonic() >= sent + wait, "admitted before the promised time"
    else:
        assert early.reason == "RATE_LIMIT_EXCEEDED"
    interval = 0.0 if early is not None else 1.0  # an admitted probe took the slot at P
    time.sleep(max(0.0, answered + wait + interval + 0.05 - time.monotonic()))
    assert infer(target, key)[0] is None  # sent 50 ms after the latest possible P


def test_key_limit(limited: Limited) -> None:
    target, key = limited.sidecar.listen, limited.key("slow")
    assert infer(target, key)[0] is None
    detail = denied(target, key)
    assert detail.metadata["limit"] == "key:slow:requests_per_minute"
    assert 9.0 < retry_delay(detail) <= 10.0


def test_org_limit_on_one_model(limited: Limited) -> None:
    target, key = limited.sidecar.listen, limited.key("permodel")
    assert infer(target, key)[0] is None
    detail = denied(target, key)
    assert detail.metadata["limit"] == f"org:{limited.org('permodel')}:model:chat:requests_per_minute"


def test_shadow_limit_never_denies_but_is_logged_and_counted(limited: Limited) -> None:
    target, key, org = limited.sidecar.listen, limited.key("watched"), limited.org("watched")
    assert [infer(target, key)[0] for _ in range(4)] == [None] * 4
    limit = f"org:{org}:requests_per_minute"
    shadowed = [line for line in limited.sidecar.log_json()
                if line.get("msg") == "shadow limit would deny" and line.get("limit") == limit]
    assert len(shadowed) >= 3
    assert metric(limited.sidecar, "api_router_rate_limit_shadow_denials_total", {"org": org, "limit": limit}) >= 3
    assert metric(limited.sidecar, "api_router_rate_limit_denials_total", {"org": org, "limit": limit}) == 0


def test_denials_are_counted(limited: Limited) -> None:
    labels = {"org": limited.org("slow"), "limit": "key:slow:requests_per_minute"}
    before = metric(limited.sidecar, "api_router_rate_limit_denials_total", labels)
    for _ in range(2):
        infer(limited.sidecar.listen, limited.key("slow"))
    assert metric(limited.sidecar, "api_router_rate_limit_denials_total", labels) >= before + 1


# --- token rates: reserve the estimate, settle to the usage ---------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_token_rate_reserves_the_estimate_and_settles_to_usage(limited: Limited, stream: bool) -> None:
    """600 tokens/min (10/s), burst 100. Each call reserves 3 + 40 = 43 tokens and uses 2 + 8 = 10.

    Unsettled, the third call would be refused (3 x 43 > 100); settled, six pass. Then one
    reserving 98 must wait for about (60 + 98 - 100) / 10 s.
    """
    name = "tokstream" if stream else "tok"
    target, key = limited.sidecar.listen, limited.key(name)
    for _ in range(6):
        detail, used = infer(target, key, stream=stream, max_output_tokens=40)
        assert detail is None and used == 10
        time.sleep(SETTLE)
    detail = denied(target, key, stream=stream, max_output_tokens=95)
    assert detail.metadata["limit"] == f"org:{limited.org(name)}:tokens_per_minute"
    assert 4.0 < retry_delay(detail) <= 5.8
    time.sleep(retry_delay(detail) + 0.05)
    assert infer(target, key, stream=stream, max_output_tokens=95)[0] is None  # nothing was charged by the denial


# --- budgets ---------------------------------------------------------------------------------


def test_token_budget_reserves_releases_and_denies_with_quota_failure(limited: Limited) -> None:
    """tokens_per_day: 100; a call reserves 3 (input) + max_output_tokens and uses 2 + 8."""
    target, key, org = limited.sidecar.listen, limited.key("budget"), limited.org("budget")
    failed = denied(target, key, max_output_tokens=95, parameters=params(fail_code="UNAVAILABLE"))
    assert failed.reason == "BACKEND_UNAVAILABLE"
    time.sleep(SETTLE)
    assert infer(target, key, max_output_tokens=95) == (None, 10)  # the failed call's 98 were released
    time.sleep(SETTLE)
    detail = denied(target, key, max_output_tokens=95)  # 10 used + 98 > 100
    assert (detail.code, detail.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "BUDGET_EXCEEDED")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert detail.metadata["budget"] == f"org:{org}:tokens_per_day"
    assert detail.metadata["window"] == today
    assert detail.metadata["resets_at"].startswith(time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(time.time() + 86400)))
    violation = quota_violation(detail)
    assert violation.subject == f"org:{org}"
    assert (violation.quota_id, violation.quota_metric, violation.quota_value) == (
        f"org:{org}:tokens_per_day", "tokens_per_day", 100)
    assert dict(violation.quota_dimensions) == {"org": org, "window": today}
    assert "10 used, this call needs 98" in violation.description
    assert infer(target, key, max_output_tokens=80) == (None, 10)  # 10 + 83 fits
    assert metric(limited.sidecar, "api_router_budget_denials_total", {"org": org}) == 1


def test_cost_budget_from_model_prices(limited: Limited) -> None:
    """cost_per_day 0.05 at 1/1k input and 2/1k output: a call reserves (3 + 16) / 1000 = 0.019
    and costs (2 + 16) / 1000 = 0.018, so two pass and the third (0.036 + 0.019) is refused."""
    target, key, org = limited.sidecar.listen, limited.key("cost"), limited.org("cost")
    for _ in range(2):
        assert infer(target, key, max_output_tokens=8) == (None, 10)
        time.sleep(SETTLE)
    detail = denied(target, key, max_output_tokens=8)
    assert detail.reason == "BUDGET_EXCEEDED"
    violation = quota_violation(detail)
    assert violation.quota_id == f"org:{org}:cost_per_day"
    assert "0.036 used, this call needs 0.019" in violation.description


def test_readiness_shows_the_limit_store_and_decisions_are_timed(limited: Limited) -> None:
    with urllib.request.urlopen(f"{limited.sidecar.ops_url}/readyz", timeout=2) as response:
        body = json.loads(response.read())
    limits = body["components"]["limits"]
    if limited.store == "memory":
        assert limits == {"status": "ok", "store": "memory"}
    else:  # the sidecars sharing the store, as counted, and the share each takes while it is out
        fleet = limits.pop("fleet")
        assert fleet >= 1 and limits == {"status": "ok", "store": "redis", "share": round(1 / fleet, 6)}
        assert metric(limited.sidecar, "api_router_limit_fleet_sidecars", {}) == fleet
    count = metric(limited.sidecar, "api_router_limit_decision_duration_seconds_count", {"store": limited.store})
    assert count >= 10


def test_no_key_in_logs_or_metrics(limited: Limited) -> None:
    """Runs last in the module: by now every kind of denial and settlement has happened."""
    logs = limited.sidecar.proc.log_text()
    with urllib.request.urlopen(f"{limited.sidecar.ops_url}/metrics", timeout=2) as response:
        metrics = response.read().decode()
    assert "shadow limit would deny" in logs and "api_router_budget_denials_total" in metrics
    for name in NAMES:
        assert limited.key(name) not in logs and limited.key(name) not in metrics
