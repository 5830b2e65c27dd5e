"""Valkey killed under load: `on_store_error: allow` decides locally within the replica's share,
`deny` refuses with SERVICE_UNAVAILABLE, and both recover on their own when Valkey is back."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.grpc.test_limits import metric
from tests.harness.invariants import assert_idle
from tests.harness.load import Load
from tests.harness.procs import ManagedProcess, wait_until
from tests.harness.servers import start_valkey
from tests.harness.sidecar import BackendProc, SidecarProc, sidecar_config, start_sidecar

KEY = "sk-outage-test"
RATE, BURST, REPLICAS = 6000, 20, 2  # 100 calls/s shared; 50/s locally, starting from 10 (burst/2)


def outage_config(backend: str, redis_url: str, on_error: str) -> str:
    return sidecar_config(f"""
        chat:
          backends: [{{name: a, address: "{backend}"}}]
        """) + f"""auth:
  api_keys:
    - {{id: app, sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", org: acme}}
limits:
  store: redis
  redis_url: {redis_url}
  redis_timeout_ms: 100
  on_store_error: {on_error}
  expected_replicas: {REPLICAS}
  breaker_failures: 2
  breaker_cooldown_ms: 200
  orgs:
    acme: {{requests_per_minute: {RATE}, burst: {BURST}}}
"""


def limits_component(sidecar: SidecarProc) -> dict[str, str]:
    component: dict[str, str] = sidecar.readyz()[1]["components"]["limits"]
    return component


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[list[ManagedProcess | str]]:
    proc, url = start_valkey(tmp_path / "valkey")
    holder: list[ManagedProcess | str] = [proc, url]
    try:
        yield holder
    finally:
        current = holder[0]
        assert isinstance(current, ManagedProcess)
        current.stop()


@pytest.mark.slow
def test_killing_valkey_under_load(backend: BackendProc, valkey: list[ManagedProcess | str], tmp_path: Path) -> None:
    proc, url = valkey
    assert isinstance(proc, ManagedProcess) and isinstance(url, str)
    allow = start_sidecar(tmp_path, outage_config(backend.address, url, "allow"), name="allow")
    deny = start_sidecar(tmp_path, outage_config(backend.address, url, "deny"), name="deny")
    metadata = (("x-api-key", KEY),)
    loads = {name: Load(sidecar.listen, metadata, pause=0.002).start()
             for name, sidecar in (("allow", allow), ("deny", deny))}
    try:
        time.sleep(1.0)
        degraded_before = metric(allow, "api_router_limit_degraded_decisions_total", {})

        for load in loads.values():
            load.phase = "outage"
        outage_started = time.monotonic()
        proc.kill()
        wait_until(lambda: limits_component(allow)["status"] == "degraded", 5, what="allow: store degraded")
        wait_until(lambda: limits_component(deny)["status"] == "degraded", 5, what="deny: store degraded")
        time.sleep(1.5)
        ok_in_outage = loads["allow"].outcomes["outage"]["OK"]
        outage = time.monotonic() - outage_started

        for load in loads.values():
            load.phase = "restarting"
        valkey[0], _ = start_valkey(tmp_path / "valkey", port=int(url.rsplit(":", 1)[1].split("/")[0]))
        restarted = time.monotonic()
        # on its own (a probe every cooldown), without a restart: a bound a loaded machine cannot miss
        wait_until(lambda: limits_component(allow)["status"] == "ok", 15, what="allow: store recovered")
        wait_until(lambda: limits_component(deny)["status"] == "ok", 15, what="deny: store recovered")
        recovery = time.monotonic() - restarted
        for load in loads.values():
            load.phase = "after"
        degraded_at_recovery = metric(allow, "api_router_limit_degraded_decisions_total", {})
        time.sleep(1.0)
    finally:
        for load in loads.values():
            load.finish()

    allowed, denied = loads["allow"].outcomes, loads["deny"].outcomes
    # before: shared limits, nothing degraded
    assert degraded_before == 0
    assert set(allowed["before"]) <= {"OK", "RATE_LIMIT_EXCEEDED"} and allowed["before"]["OK"] > 0
    # outage, allow: calls keep succeeding, within the local share (50/s, at most 10 at once), all counted
    assert set(allowed["outage"]) <= {"OK", "RATE_LIMIT_EXCEEDED"}
    assert 0 < ok_in_outage <= min(BURST, RATE / 60) / REPLICAS + RATE / 60 / REPLICAS * outage + 2
    degraded_allowed = metric(allow, "api_router_limit_degraded_decisions_total", {"outcome": "allowed"})
    assert degraded_allowed >= ok_in_outage - 2  # -2: calls already past the store when it died
    # outage, deny: the contract's reason
    assert denied["outage"]["SERVICE_UNAVAILABLE"] > 0
    assert set(denied["outage"]) <= {"OK", "RATE_LIMIT_EXCEEDED", "SERVICE_UNAVAILABLE"}
    assert denied["outage"]["OK"] <= 2
    # recovery within seconds, and decisions are shared again
    assert recovery < 15.0
    assert allowed["after"]["OK"] > 0 and denied["after"]["OK"] > 0
    assert "SERVICE_UNAVAILABLE" not in denied["after"]
    assert metric(allow, "api_router_limit_degraded_decisions_total", {}) == degraded_at_recovery
    assert metric(allow, "api_router_limit_store_degraded", {}) == 0
    for sidecar in (allow, deny):
        assert_idle(sidecar)
