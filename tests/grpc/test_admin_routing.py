"""RoutingAdmin through the admin listener: ListRoutes, weight/drain/pin overrides that act at
once, expire by TTL, survive a restart, are audited, and need an admin token."""
from __future__ import annotations

import hashlib
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from sidecar_client import error_detail
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from tests.conftest import Launcher
from tests.grpc.test_proxy import params
from tests.grpc.test_routing import NO_CHECKS, calls_on, infer, routed
from tests.harness.procs import wait_until
from tests.harness.sidecar import BackendProc, SidecarProc, start_sidecar

TOKEN = "adm-routing-5d1c"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def admin_config(a: BackendProc, b: BackendProc, state_dir: Path) -> str:
    return routed([("a", a, 1, 0), ("b", b, 1, 0)], checks=NO_CHECKS, extra=f"""state_dir: {state_dir}
auth:
  api_keys: [{{id: app, sha256: "{hashlib.sha256(b"sk-app").hexdigest()}", org: acme}}]
  admin_tokens: [{{id: ops-alice, sha256: "{hashlib.sha256(TOKEN.encode()).hexdigest()}"}}]
""")


def admin(sidecar: SidecarProc) -> admin_pb2_grpc.RoutingAdminStub:
    return admin_pb2_grpc.RoutingAdminStub(grpc.insecure_channel(sidecar.admin_listen))


def call(sidecar: SidecarProc, n: int) -> list[str | None]:
    return [infer(sidecar.listen, metadata_key="sk-app") for _ in range(n)]


def backends(sidecar: SidecarProc) -> dict[str, admin_pb2.BackendRoute]:
    routes = admin(sidecar).ListRoutes(admin_pb2.ListRoutesRequest(model="chat"), metadata=AUTH, timeout=5)
    return {b.name: b for b in routes.routes[0].backends}


@pytest.fixture
def pair(launch: Launcher, tmp_path: Path) -> tuple[SidecarProc, BackendProc, BackendProc]:
    a, b = launch.backend(), launch.backend()
    return launch.sidecar(admin_config(a, b, tmp_path / "state")), a, b


def test_list_routes_needs_an_admin_token(pair: tuple[SidecarProc, BackendProc, BackendProc]) -> None:
    sidecar, _, _ = pair
    with pytest.raises(grpc.RpcError) as failure:
        admin(sidecar).ListRoutes(admin_pb2.ListRoutesRequest(), timeout=5)
    assert error_detail(failure.value).reason == "UNAUTHORIZED"
    with pytest.raises(grpc.RpcError) as failure:
        admin(sidecar).SetOverride(admin_pb2.SetOverrideRequest(model="chat", backend="a", drain=True),
                                   metadata=(("authorization", "Bearer sk-app"),), timeout=5)
    assert error_detail(failure.value).reason == "INVALID_API_KEY"
    routes = backends(sidecar)
    assert set(routes) == {"a", "b"}
    assert routes["a"].configured_weight == routes["a"].effective_weight == 1
    assert routes["a"].health == admin_pb2.BACKEND_HEALTH_HEALTHY


def test_weight_override_acts_at_once_expires_and_is_audited(pair: tuple[SidecarProc, BackendProc, BackendProc]) -> None:
    sidecar, a, b = pair
    made = admin(sidecar).SetOverride(admin_pb2.SetOverrideRequest(
        model="chat", backend="a", weight=0, ttl_seconds=2, reason="canary off"), metadata=AUTH, timeout=5)
    assert (made.created_by, made.reason, made.WhichOneof("action")) == ("ops-alice", "canary off", "weight")
    assert made.expires_at.seconds - made.created_at.seconds == 2
    before = calls_on(a), calls_on(b)
    assert call(sidecar, 20) == [None] * 20
    assert calls_on(a) == before[0] and calls_on(b) == before[1] + 20
    assert backends(sidecar)["a"].effective_weight == 0
    audit = [line for line in sidecar.log_json() if line.get("msg") == "routing override set"]
    assert audit and audit[-1]["admin_token_id"] == "ops-alice" and audit[-1]["reason"] == "canary off"
    time.sleep(2.2)
    routes = admin(sidecar).ListRoutes(admin_pb2.ListRoutesRequest(), metadata=AUTH, timeout=5)
    assert not routes.routes[0].overrides and backends(sidecar)["a"].effective_weight == 1
    before_a = calls_on(a)
    call(sidecar, 40)
    assert calls_on(a) > before_a  # back in rotation


def test_drain_lets_running_calls_finish_and_takes_no_new_ones(
        pair: tuple[SidecarProc, BackendProc, BackendProc]) -> None:
    sidecar, _, b = pair
    admin(sidecar).SetOverride(admin_pb2.SetOverrideRequest(model="chat", backend="b", pin=True),
                               metadata=AUTH, timeout=5)  # every call to b ...
    slow: list[str | None] = []
    worker = threading.Thread(target=lambda: slow.append(infer(sidecar.listen, metadata_key="sk-app",
                                                               parameters=params(delay_ms=800))))
    worker.start()
    time.sleep(0.3)  # ... the slow one is running on b
    admin(sidecar).SetOverride(admin_pb2.SetOverrideRequest(model="chat", backend="b", drain=True),
                               metadata=AUTH, timeout=5)  # replaces the pin
    assert backends(sidecar)["b"].health == admin_pb2.BACKEND_HEALTH_DRAINING
    assert backends(sidecar)["b"].in_flight == 1
    before_b = calls_on(b)
    assert call(sidecar, 10) == [None] * 10
    worker.join(5)
    assert slow == [None] and calls_on(b) == before_b + 1  # the running call finished; no new ones
    assert admin(sidecar).ClearOverride(admin_pb2.ClearOverrideRequest(model="chat", backend="b"),
                                        metadata=AUTH, timeout=5).cleared
    assert not admin(sidecar).ClearOverride(admin_pb2.ClearOverrideRequest(model="chat", backend="b"),
                                            metadata=AUTH, timeout=5).cleared


def test_pin_survives_a_restart(launch: Launcher, tmp_path: Path) -> None:
    a, b = launch.backend(), launch.backend()
    config = admin_config(a, b, tmp_path / "state")
    sidecar = launch.sidecar(config)
    admin(sidecar).SetOverride(admin_pb2.SetOverrideRequest(model="chat", backend="a", pin=True, reason="debug"),
                               metadata=AUTH, timeout=5)
    sidecar.proc.stop()
    restarted = start_sidecar(tmp_path, config, name="again")
    try:
        overrides = admin(restarted).ListRoutes(admin_pb2.ListRoutesRequest(), metadata=AUTH, timeout=5).routes[0].overrides
        assert [(o.backend, o.pin, o.reason) for o in overrides] == [("a", True, "debug")]
        before = calls_on(a), calls_on(b)
        assert call(restarted, 10) == [None] * 10
        assert calls_on(a) == before[0] + 10 and calls_on(b) == before[1]
    finally:
        restarted.proc.stop()


def test_bad_overrides_are_refused(pair: tuple[SidecarProc, BackendProc, BackendProc]) -> None:
    sidecar, _, _ = pair
    for request, reason in ((admin_pb2.SetOverrideRequest(model="chat", backend="zz", drain=True), "NOT_FOUND"),
                            (admin_pb2.SetOverrideRequest(model="chat", backend="a"), "MISSING_FIELD"),
                            (admin_pb2.SetOverrideRequest(model="chat", backend="a", weight=-1), "INVALID_REQUEST")):
        with pytest.raises(grpc.RpcError) as failure:
            admin(sidecar).SetOverride(request, metadata=AUTH, timeout=5)
        assert error_detail(failure.value).reason == reason


@pytest.mark.parametrize("url_fixture", ["redis_url", "redis_cluster_url"])
def test_overrides_in_redis_are_shared_by_every_sidecar(launch: Launcher, tmp_path: Path, url_fixture: str,
                                                        request: pytest.FixtureRequest) -> None:
    redis_url = request.getfixturevalue(url_fixture)  # one Valkey, or a 3-master cluster
    a, b = launch.backend(), launch.backend()
    model = f"chat-{uuid.uuid4().hex[:6]}"  # the hash is shared by the session's Valkey: own model name

    def shared(state: str) -> str:  # same models and store, own ports and state_dir
        return admin_config(a, b, tmp_path / state).replace("chat:", f"{model}:", 1) + f"""limits:
  redis_url: {redis_url}
overrides: {{store: redis, sync_interval_ms: 200}}
"""

    one, two = launch.sidecar(shared("one")), launch.sidecar(shared("two"))
    try:
        admin(one).SetOverride(admin_pb2.SetOverrideRequest(model=model, backend="a", drain=True, ttl_seconds=60,
                                                            reason="shared"), metadata=AUTH, timeout=5)

        def drained_on_two() -> bool:
            routes = admin(two).ListRoutes(admin_pb2.ListRoutesRequest(model=model), metadata=AUTH, timeout=5)
            return any(r.health == admin_pb2.BACKEND_HEALTH_DRAINING and r.name == "a" for r in routes.routes[0].backends)

        wait_until(drained_on_two, 3, what="the drain set on one sidecar to reach the other")
        assert admin(two).ClearOverride(admin_pb2.ClearOverrideRequest(model=model, backend="a"),
                                        metadata=AUTH, timeout=5).cleared
        wait_until(lambda: not admin(one).ListRoutes(admin_pb2.ListRoutesRequest(model=model), metadata=AUTH,
                                                     timeout=5).routes[0].overrides,
                   3, what="the clear made on the other sidecar to reach the first")
    finally:
        for sidecar in (one, two):
            sidecar.proc.stop()
