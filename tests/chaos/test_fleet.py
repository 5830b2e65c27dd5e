"""A fleet: three `sidecar run` processes on one etcd key and one real 3-master Redis Cluster, as
replicas of a deployment would be. A pushed config is live on all three within 2 s (measured and
printed: run with `-s`); an invalid one changes nothing on any; the three share one limit and
count each other; with etcd killed all three keep serving, and one restarted meanwhile starts
from its cache and serves; an override set through one sidecar's admin API applies on all three
(overrides.store: redis)."""
from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path

import grpc
from sidecar_client.inference.v1.inference_pb2 import InferRequest
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from tests.conftest import Launcher
from tests.grpc.test_limits import metric
from tests.grpc.test_proxy import INFER
from tests.harness.etcd import (
    SHARED_LISTENERS,
    EtcdServer,
    Listeners,
    config_cli,
    put_raw,
    start_etcd,
    start_etcd_sidecar,
    write_bootstrap,
)
from tests.harness.procs import wait_until
from tests.harness.sidecar import BackendProc, SidecarProc
from tests.integration.test_config_etcd import logged, push_text, source, version

API_KEY, NARROW_KEY, ADMIN_TOKEN = "sk-fleet", "sk-fleet-narrow", "adm-fleet-3c9a"
NARROW_BURST = 6  # the narrow org's limit, shared by the fleet: 6 calls in all, however spread
AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
LIVE_WITHIN = 2.0  # seconds from `sidecar config push` to the new config serving on every sidecar


def fleet_config(model: str, redis_url: str, weights: dict[str, tuple[BackendProc, float]]) -> str:
    """The one config all three share: their listeners come from their environment."""
    lines = "".join(f'\n      - {{name: {n}, address: "{b.address}", weight: {w}}}' for n, (b, w) in weights.items())
    return f"""{SHARED_LISTENERS}health_checks: {{enabled: false}}
auth:
  api_keys:
    - {{id: app, sha256: "{hashlib.sha256(API_KEY.encode()).hexdigest()}", org: {model}}}
    - {{id: narrow, sha256: "{hashlib.sha256(NARROW_KEY.encode()).hexdigest()}", org: {model}-narrow}}
  admin_tokens: [{{id: ops, sha256: "{hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}"}}]
limits:
  store: redis
  redis_url: "{redis_url}"
  redis_timeout_ms: 2000
  orgs:
    {model}-narrow: {{requests_per_minute: 1, burst: {NARROW_BURST}}}
overrides: {{store: redis, sync_interval_ms: 200}}
models:
  {model}:
    timeout_ms: 5000
    backends:{lines}
"""


def routes(sidecar: SidecarProc, model: str, backends: dict[str, BackendProc], calls: int = 10) -> Counter[str]:
    seen = Counter[str]()
    with grpc.insecure_channel(sidecar.listen) as channel:
        for i in range(calls):
            request_id = f"fleet-{time.monotonic_ns()}-{i}"
            channel.unary_unary(INFER)(InferRequest(model=model, input="hi").SerializeToString(), timeout=10,
                                       metadata=(("x-api-key", API_KEY), ("x-request-id", request_id)))
            seen.update(n for n, b in backends.items() if b.call_for(request_id) is not None)
    return seen


def live_times(sidecars: list[SidecarProc], wanted: str, since: float, timeout: float = 10) -> list[float]:
    """Seconds from `since` until each sidecar's `/readyz` shows config version `wanted`."""
    seen: dict[int, float] = {}

    def all_live() -> bool:
        for i, sidecar in enumerate(sidecars):
            if i not in seen and version(sidecar) == wanted:
                seen[i] = time.monotonic() - since
        return len(seen) == len(sidecars)

    wait_until(all_live, timeout, what=f"config {wanted} live on every sidecar", interval=0.005)
    return [seen[i] for i in range(len(sidecars))]


def narrow_call(sidecar: SidecarProc, model: str) -> str:
    with grpc.insecure_channel(sidecar.listen) as channel:
        try:
            channel.unary_unary(INFER)(InferRequest(model=model, input="hi").SerializeToString(), timeout=10,
                                       metadata=(("x-api-key", NARROW_KEY),))
        except grpc.RpcError as error:
            return error.code().name
    return "OK"


def admin(sidecar: SidecarProc) -> admin_pb2_grpc.RoutingAdminStub:
    return admin_pb2_grpc.RoutingAdminStub(grpc.insecure_channel(sidecar.admin_listen))


def test_three_sidecars_follow_one_etcd_key(launch: Launcher, redis_cluster_url: str, tmp_path: Path) -> None:
    etcd: EtcdServer = start_etcd(tmp_path / "etcd")
    sidecars: list[SidecarProc] = []
    try:
        run_the_fleet(etcd, sidecars, launch, redis_cluster_url, tmp_path)
    finally:
        for sidecar in sidecars:
            sidecar.proc.stop()
        etcd.stop()


def run_the_fleet(etcd: EtcdServer, sidecars: list[SidecarProc], launch: Launcher, redis_url: str,
                  tmp_path: Path) -> None:
    a, b = launch.backend(), launch.backend()
    both = {"a": a, "b": b}
    model = f"fleet-{uuid.uuid4().hex[:8]}"  # the overrides hash in Redis is shared with other tests
    bootstrap = write_bootstrap(tmp_path, etcd.endpoint)
    push_text(tmp_path, bootstrap, fleet_config(model, redis_url, {"a": (a, 1), "b": (b, 0)}))
    sidecars += [start_etcd_sidecar(tmp_path / f"sidecar-{i}", bootstrap, Listeners.free()) for i in range(3)]
    assert [routes(s, model, both) for s in sidecars] == [{"a": 10}] * 3

    # 1. a pushed change is live on all three within 2 s
    started = time.monotonic()
    revision, pushed_version = push_text(tmp_path, bootstrap, fleet_config(model, redis_url, {"a": (a, 0),
                                                                                             "b": (b, 1)}))
    returned = time.monotonic() - started
    live = live_times(sidecars, pushed_version, started)
    print(f"\nfleet: `sidecar config push` took {returned:.3f} s; live on the three sidecars "
          f"{', '.join(f'{t:.3f}' for t in live)} s after it started (max {max(live) - returned:.3f} s after "
          "it returned)")
    assert max(live) < LIVE_WITHIN, live
    assert [routes(s, model, both) for s in sidecars] == [{"b": 10}] * 3
    # the same from the write itself, without the CLI's start-up: by the sidecars' own log lines
    text = fleet_config(model, redis_url, {"a": (a, 0), "b": (b, 2)})
    written = time.monotonic()
    wall = time.time()
    put_raw(etcd.endpoint, text.encode())
    from sidecar.app import config_version

    live_times(sidecars, config_version(text), written)
    applied = [datetime.fromisoformat(logged(s, "config reloaded")[-1]["ts"]).timestamp() - wall for s in sidecars]
    print(f"fleet: an etcd write -> applied by the three (their `config reloaded` lines): "
          f"{', '.join(f'{t * 1000:.0f}' for t in applied)} ms")
    assert max(applied) < LIVE_WITHIN

    # the three share one limit: the narrow org's burst, once, over calls spread on all three
    outcomes = Counter(narrow_call(sidecars[i % 3], model) for i in range(3 * NARROW_BURST))
    assert outcomes == {"OK": NARROW_BURST, "RESOURCE_EXHAUSTED": 2 * NARROW_BURST}, outcomes

    # 2. an invalid push changes nothing, on any
    running = [version(s) for s in sidecars]
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(fleet_config(model, redis_url, {"a": (a, 0), "b": (b, -2)}))
    refused = config_cli("push", str(invalid), "--config", str(bootstrap))
    assert refused.returncode == 2 and refused.stderr.strip() == f"models.{model}.backends[1].weight: must be >= 0"
    bad = put_raw(etcd.endpoint, invalid.read_bytes())  # written around the CLI: each sidecar refuses it
    wait_until(lambda: all(metric(s, "api_router_config_reloads_total", {"result": "failure"}) == 1
                           for s in sidecars), 5, what="the invalid revision refused by all three")
    assert [version(s) for s in sidecars] == running
    assert all(source(s)["refused"]["revision"] == bad for s in sidecars)
    assert [routes(s, model, both) for s in sidecars] == [{"b": 10}] * 3

    # 3. an override set through one sidecar applies on all three
    admin(sidecars[0]).SetOverride(admin_pb2.SetOverrideRequest(model=model, backend="a", pin=True, ttl_seconds=60,
                                                                reason="fleet test"), metadata=AUTH, timeout=5)
    wait_until(lambda: all(routes(s, model, both, calls=3) == {"a": 3} for s in sidecars), 5,
               what="the pin set on one sidecar acting on all three")
    assert [routes(s, model, both) for s in sidecars] == [{"a": 10}] * 3
    assert admin(sidecars[2]).ClearOverride(admin_pb2.ClearOverrideRequest(model=model, backend="a"),
                                            metadata=AUTH, timeout=5).cleared
    wait_until(lambda: all(routes(s, model, both, calls=3) == {"b": 3} for s in sidecars), 5,
               what="the pin cleared on all three")

    # ... and count each other (a heartbeat every 5 s): the share each would take in an outage
    wait_until(lambda: all(s.readyz()[1]["components"]["limits"].get("fleet") == 3 for s in sidecars), 12,
               what="every sidecar counting a fleet of three in the store")

    # 4. etcd killed: all three keep serving, and say the source is degraded
    etcd.kill()
    wait_until(lambda: all(source(s)["etcd"] == "down" for s in sidecars), 5, what="every sidecar sees etcd down")
    assert all(s.readyz()[0] == 200 and source(s)["status"] == "degraded" for s in sidecars)
    assert [routes(s, model, both) for s in sidecars] == [{"b": 10}] * 3

    # 5. ... and one restarted meanwhile starts from its cache, and serves
    sidecars[1].proc.stop()
    sidecars[1] = start_etcd_sidecar(tmp_path / "sidecar-1", bootstrap, Listeners.free())
    assert version(sidecars[1]) == running[1]
    assert source(sidecars[1])["origin"] == "cache" and logged(sidecars[1], "config from the cache")
    assert routes(sidecars[1], model, both) == {"b": 10}

    # 6. etcd back: a push reaches all three again, the restarted one included
    etcd.restart()
    wait_until(lambda: all(source(s)["etcd"] == "up" for s in sidecars), 15, what="every sidecar sees etcd up")
    started = time.monotonic()
    final, final_version = push_text(tmp_path, bootstrap, fleet_config(model, redis_url, {"a": (a, 1), "b": (b, 0)}))
    live = live_times(sidecars, final_version, started)
    print(f"fleet: after the outage, live {', '.join(f'{t:.3f}' for t in live)} s after the push started")
    assert max(live) < LIVE_WITHIN
    assert all(source(s)["revision"] == final and source(s)["status"] == "ok" for s in sidecars)
    assert [routes(s, model, both) for s in sidecars] == [{"a": 10}] * 3
    assert revision < bad < final
