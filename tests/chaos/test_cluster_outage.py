"""One master of a Redis Cluster killed under load: only the orgs whose slots it held go degraded.

A sidecar on a real 3-master cluster serves two orgs, `north` (its keys on node 0) and `south`
(node 1), each under steady load. Node 0 is killed. Through the public interface:

- readiness names node 0 as the one degraded node, and the degraded-decision counter grows;
- every `north` call admitted after its breaker opened was decided locally (the audit record of
  the call says `rate_limit: degraded`), none of `south`'s was: its limits stay shared and exact;
- `south` admits exactly what its limit allows over the whole run (the rate is slow, so that is
  its burst), before and during the outage;
- node 0 back (empty, owning its slots): the breaker closes on its own and `north` is shared again.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import grpc
import pytest
from redis.crc import key_slot
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from tests.grpc.test_limits import metric
from tests.harness.invariants import assert_idle
from tests.harness.load import Load
from tests.harness.procs import wait_until
from tests.harness.redis_cluster import ValkeyCluster
from tests.harness.sidecar import BackendProc, SidecarProc, sidecar_config, start_sidecar

TOKEN = "admin-token-cluster"
BURST = 150  # south: requests_per_minute 1, so over the test it admits its burst (and perhaps one more)


def org_on(cluster: ValkeyCluster, node: int, prefix: str) -> str:
    start, end = cluster.slot_ranges()[node]
    return next(f"{prefix}{n}" for n in range(100_000) if start <= key_slot(f"{prefix}{n}".encode()) <= end)


def config(backend: str, url: str, north: str, south: str) -> str:
    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()
    return sidecar_config(f"""
        chat:
          backends: [{{name: a, address: "{backend}"}}]
        """) + f"""auth:
  api_keys:
    - {{id: north, sha256: "{sha("sk-north")}", org: {north}}}
    - {{id: south, sha256: "{sha("sk-south")}", org: {south}}}
  admin_tokens: [{{id: ops, sha256: "{sha(TOKEN)}"}}]
limits:
  store: redis
  redis_url: {url}
  redis_timeout_ms: 200
  on_store_error: allow
  breaker_failures: 2
  breaker_cooldown_ms: 200
  orgs:
    {north}: {{requests_per_minute: 6000, burst: 20}}
    {south}: {{requests_per_minute: 1, burst: {BURST}}}
"""


@pytest.fixture
def cluster(own_cluster: ValkeyCluster) -> ValkeyCluster:
    return own_cluster


def limits(sidecar: SidecarProc) -> dict[str, object]:
    component: dict[str, object] = sidecar.readyz()[1]["components"]["limits"]
    return component


def rate_decisions(sidecar: SidecarProc, request_ids: list[str]) -> list[str]:
    """The `rate_limit` decision each call's audit record holds ("allowed", "degraded", ...)."""
    results = []
    with grpc.insecure_channel(sidecar.admin_listen) as channel:
        audit = admin_pb2_grpc.AuditStub(channel)
        for request_id in request_ids:
            record = audit.GetRequest(admin_pb2.GetRequestRequest(request_id=request_id),
                                      metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5)
            results += [d.result for d in record.decisions if d.stage == "rate_limit"][:1]
    return results


@pytest.mark.slow
def test_killing_one_master_degrades_only_its_orgs(backend: BackendProc, cluster: ValkeyCluster,
                                                   tmp_path: Path) -> None:
    north, south = org_on(cluster, 0, "north-"), org_on(cluster, 1, "south-")
    sidecar = start_sidecar(tmp_path, config(backend.address, cluster.url, north, south))
    node0 = f"127.0.0.1:{cluster.ports[0]}"
    loads = {org: Load(sidecar.listen, (("x-api-key", f"sk-{org}"),), pause=0.002).start()
             for org in ("north", "south")}
    try:
        time.sleep(0.5)
        assert limits(sidecar)["status"] == "ok"
        for load in loads.values():
            load.phase = "outage"
        cluster.kill(0)
        wait_until(lambda: limits(sidecar).get("nodes") == [node0], 5, what="node 0's breaker open")
        for load in loads.values():
            load.phase = "degraded"
        time.sleep(1.5)
        degraded = limits(sidecar)
        for load in loads.values():
            load.phase = "restarting"
        cluster.restart(0)
        wait_until(lambda: limits(sidecar)["status"] == "ok", 10, what="node 0's breaker closed by the probe")
        for load in loads.values():
            load.phase = "after"
        time.sleep(0.5)
    finally:
        for load in loads.values():
            load.finish()

    assert degraded["status"] == "degraded" and degraded["nodes"] == [node0], degraded
    assert metric(sidecar, "api_router_limit_degraded_decisions_total", {"outcome": "allowed"}) > 0
    north_load, south_load = loads["north"], loads["south"]
    # north, while node 0's breaker was open: admitted, and decided locally
    north_ids = north_load.answered.get("degraded", [])
    assert north_ids and set(rate_decisions(sidecar, north_ids)) == {"degraded"}
    # south: never decided locally, and exact: its burst over the whole run, no more
    south_ids = south_load.all_answered()
    assert "degraded" not in rate_decisions(sidecar, south_ids)
    assert BURST <= len(south_ids) <= BURST + 1, south_load.outcomes
    assert set(south_load.total()) == {"OK", "RATE_LIMIT_EXCEEDED"}, south_load.outcomes
    assert south_load.outcomes["degraded"]["RATE_LIMIT_EXCEEDED"] > 0  # south kept asking past its limit
    # north after recovery: shared again
    after = north_load.answered.get("after", [])
    assert after and "degraded" not in rate_decisions(sidecar, after[-20:])
    assert_idle(sidecar)
    sidecar.proc.stop()
