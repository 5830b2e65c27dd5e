"""The routing engine through the public interface: weights, tiers, health checks, ejection,
retries before the commit point, and a backend killed under load."""
from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from collections import Counter

import grpc
import pytest
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferChunk, InferRequest
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from tests.conftest import Launcher
from tests.grpc.test_limits import metric
from tests.grpc.test_proxy import INFER, INFER_STREAM, params
from tests.harness.load import Load
from tests.harness.procs import wait_until
from tests.harness.sidecar import BackendProc, SidecarProc, health_status, sidecar_config

FAST_CHECKS = "health_checks: {interval_ms: 250, timeout_ms: 250, unhealthy_threshold: 2, healthy_threshold: 1}\n"
NO_CHECKS = "health_checks: {enabled: false}\n"  # for tests where a slow check on a busy machine would interfere
FAST_EJECTION = "outlier_detection: {consecutive_failures: 3, base_ejection_ms: 1000, max_ejection_ms: 5000}\n"


def routed(backends: list[tuple[str, BackendProc, float, int]], extra: str = "", model: str = "",
           checks: str = FAST_CHECKS) -> str:
    """A config routing model `chat` over `backends` (name, backend, weight, priority); `model`
    adds keys to the model (e.g. "balancer: p2c_ewma"), `extra` top-level sections."""
    lines = "".join(f'\n    - {{name: {n}, address: "{b.address}", weight: {w}, priority: {p}}}'
                    for n, b, w, p in backends)
    model_keys = f"\n  {model}" if model else ""
    return sidecar_config(f"chat:\n  timeout_ms: 5000{model_keys}\n  backends:{lines}") + checks + FAST_EJECTION + extra


def infer(target: str, metadata_key: str | None = None, request_id: str | None = None,
          **fields: object) -> str | None:
    """One unary call (with `metadata_key` as API key): None when it succeeded, else the error reason."""
    request = InferRequest(**{"model": "chat", "input": "hi", **fields})  # type: ignore[arg-type]
    metadata = ((("x-api-key", metadata_key),) if metadata_key else ()) + (
        (("x-request-id", request_id),) if request_id else ())
    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary(INFER)(request.SerializeToString(), timeout=10, metadata=metadata)
        except grpc.RpcError as error:
            return error_detail(error).reason or error.code().name
    return None


def calls_on(backend: BackendProc) -> int:
    return len(backend.calls())


def backend_state(sidecar: SidecarProc, name: str) -> str:
    try:
        with urllib.request.urlopen(f"{sidecar.ops_url}/readyz", timeout=2) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = json.loads(error.read())
    state: str = body["components"]["backends"]["models"]["chat"][name]
    return state


def test_traffic_splits_by_weight(launch: Launcher) -> None:
    a, b = launch.backend(), launch.backend()
    sidecar = launch.sidecar(routed([("a", a, 3, 0), ("b", b, 1, 0)]))
    assert [infer(sidecar.listen) for _ in range(400)] == [None] * 400
    # binomial(400, 0.75): sigma 8.7; 4 sigma either side
    assert abs(calls_on(a) - 300) < 35 and calls_on(a) + calls_on(b) == 400


def test_failover_tier_takes_over_when_the_primary_dies_and_hands_back(launch: Launcher) -> None:
    primary, spare = launch.backend(), launch.backend()
    sidecar = launch.sidecar(routed([("primary", primary, 1, 0), ("spare", spare, 1, 1)]))
    assert [infer(sidecar.listen) for _ in range(20)] == [None] * 20
    assert calls_on(spare) == 0
    port = int(primary.address.rsplit(":", 1)[1])
    primary.proc.kill()
    assert [infer(sidecar.listen) for _ in range(20)] == [None] * 20  # retried onto the spare tier
    wait_until(lambda: backend_state(sidecar, "primary") != "healthy", 5, what="primary marked down")
    decisions = metric(sidecar, "api_router_routing_decisions_total", {"backend": "spare", "decision": "failover"})
    assert decisions >= 20
    revived = launch.backend(port=port)
    wait_until(lambda: backend_state(sidecar, "primary") == "healthy", 10, what="primary back")
    before = calls_on(spare), calls_on(revived)  # the revived one appends to the same log file
    assert [infer(sidecar.listen) for _ in range(10)] == [None] * 10
    assert calls_on(spare) == before[0] and calls_on(revived) == before[1] + 10


def test_a_backend_killed_under_load_costs_no_call(launch: Launcher) -> None:
    a, b = launch.backend(), launch.backend()
    sidecar = launch.sidecar(routed([("a", a, 1, 0), ("b", b, 1, 0)]))
    loads = [Load(sidecar.listen).start() for _ in range(4)]
    try:
        time.sleep(0.5)
        port = int(a.address.rsplit(":", 1)[1])
        killed = time.monotonic()
        a.proc.kill()
        wait_until(lambda: backend_state(sidecar, "a") != "healthy", 5, what="a marked down")
        marked_down = time.monotonic() - killed
        time.sleep(0.5)
        revived = launch.backend(port=port)
        restarted = time.monotonic()
        old_calls = calls_on(revived)  # the revived one appends to the same log file
        wait_until(lambda: backend_state(sidecar, "a") == "healthy", 10, what="a back")
        wait_until(lambda: calls_on(revived) > old_calls, 5, what="a taking calls again")
        back = time.monotonic() - restarted
    finally:
        for load in loads:
            load.finish()
    outcomes = sum((load.total() for load in loads), Counter[str]())
    assert set(outcomes) == {"OK"} and outcomes["OK"] > 100, outcomes
    assert marked_down < 2.0 and back < 5.0, (marked_down, back)
    print(f"\nkilled backend: {outcomes['OK']} calls, no error; down after {marked_down * 1000:.0f} ms, "
          f"taking calls {back * 1000:.0f} ms after its restart")


def test_a_stream_failing_before_its_first_chunk_is_retried(launch: Launcher) -> None:
    flaky = launch.backend("--fail-rate", "1", "--fail-code", "UNAVAILABLE")
    good = launch.backend()
    sidecar = launch.sidecar(routed([("flaky", flaky, 9, 0), ("good", good, 1, 0)]).replace(
        FAST_EJECTION, "outlier_detection: {consecutive_failures: 1000}\n"))
    for _ in range(10):
        with grpc.insecure_channel(sidecar.listen) as channel:
            chunks = list(channel.unary_stream(INFER_STREAM)(
                InferRequest(model="chat", input="a b c").SerializeToString(), timeout=10))
        assert InferChunk.FromString(chunks[-1]).usage.output_tokens == 8
    assert calls_on(flaky) >= 5 and calls_on(good) == 10


def test_a_stream_cut_after_its_first_chunk_is_not_replayed(launch: Launcher) -> None:
    victim, spare = launch.backend(), launch.backend()
    sidecar = launch.sidecar(routed([("victim", victim, 1, 0), ("spare", spare, 1, 1)]))
    request = InferRequest(model="chat", input="a b c", parameters=params(tokens=50, chunk_delay_ms=50))
    with grpc.insecure_channel(sidecar.listen) as channel:
        stream = channel.unary_stream(INFER_STREAM)(request.SerializeToString(), timeout=10,
                                                    metadata=(("x-request-id", "cut-stream-1"),))
        first = next(stream)
        assert InferChunk.FromString(first).delta == "a"
        victim.proc.kill()
        with pytest.raises(grpc.RpcError) as failure:
            for _ in stream:
                pass
    assert error_detail(failure.value).reason == "BACKEND_UNAVAILABLE"
    assert spare.call_for("cut-stream-1") is None


def test_readiness_follows_backend_health(launch: Launcher) -> None:
    only = launch.backend()
    sidecar = launch.sidecar(routed([("only", only, 1, 0)]))
    assert health_status(sidecar.listen) == "SERVING"
    port = int(only.address.rsplit(":", 1)[1])
    only.proc.kill()
    wait_until(lambda: health_status(sidecar.listen) == "NOT_SERVING", 5, what="readiness NOT_SERVING")
    assert health_status(sidecar.listen, "liveness") == "SERVING"
    assert metric(sidecar, "api_router_backend_healthy", {"backend": "only"}) == 0
    launch.backend(port=port)
    wait_until(lambda: health_status(sidecar.listen) == "SERVING", 10, what="readiness SERVING again")
    assert metric(sidecar, "api_router_backend_healthy", {"backend": "only"}) == 1


def readyz(sidecar: SidecarProc) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"{sidecar.ops_url}/readyz", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_readyz_and_grpc_health_fail_together_when_every_model_lost_its_backends(launch: Launcher) -> None:
    x, y = launch.backend(), launch.backend()
    config = sidecar_config(f"""
        chat:
          backends: [{{name: x, address: "{x.address}"}}]
        embed:
          backends: [{{name: y, address: "{y.address}"}}]
        """) + FAST_CHECKS
    sidecar = launch.sidecar(config)
    x.proc.kill()  # one model without a backend: the other still serves, so the sidecar is ready
    wait_until(lambda: readyz(sidecar)[1]["components"]["backends"]["models"]["chat"]["x"] == "unhealthy",  # type: ignore[index]
               5, what="x unhealthy")
    assert readyz(sidecar)[0] == 200 and health_status(sidecar.listen) == "SERVING"
    port = int(y.address.rsplit(":", 1)[1])
    y.proc.kill()
    wait_until(lambda: health_status(sidecar.listen) == "NOT_SERVING", 5, what="readiness NOT_SERVING")
    status, body = readyz(sidecar)  # the same state drives both
    assert status == 503 and body["status"] == "not_ready"
    assert body["components"]["backends"]["status"] == "no_healthy_backend"  # type: ignore[index]
    assert health_status(sidecar.admin_listen) == "NOT_SERVING"
    assert health_status(sidecar.listen, "inference.v1.Inference") == "NOT_SERVING"
    assert health_status(sidecar.listen, "liveness") == "SERVING"
    assert any(line.get("msg") == "readiness NOT_SERVING" for line in sidecar.log_json())
    launch.backend(port=port)
    wait_until(lambda: readyz(sidecar)[0] == 200, 10, what="/readyz 200 again")
    assert health_status(sidecar.listen) == "SERVING"
    flips = [line["msg"] for line in sidecar.log_json() if str(line.get("msg")).startswith("readiness ")]
    assert flips[-3:] == ["readiness SERVING", "readiness NOT_SERVING", "readiness SERVING"]


def test_p2c_ewma_sends_few_calls_to_a_slow_backend(launch: Launcher) -> None:
    slow, fast = launch.backend("--delay-ms", "40"), launch.backend()
    sidecar = launch.sidecar(routed([("slow", slow, 1, 0), ("fast", fast, 1, 0)], model="balancer: p2c_ewma",
                                    checks=NO_CHECKS))
    assert [infer(sidecar.listen) for _ in range(100)] == [None] * 100
    assert calls_on(slow) < 15 < calls_on(fast)  # weighted random would give each about 50


def test_sessions_stick_and_only_a_drained_backends_sessions_move(launch: Launcher) -> None:
    pool = {f"b{i}": launch.backend() for i in range(4)}
    token = "adm-affinity-1"
    digest = hashlib.sha256(token.encode()).hexdigest()
    sidecar = launch.sidecar(routed([(n, b, 1, 0) for n, b in pool.items()], model="affinity: session",
                                    checks=NO_CHECKS, extra=f"""auth:
  api_keys: [{{id: app, sha256: "{hashlib.sha256(b"sk-aff").hexdigest()}", org: acme}}]
  admin_tokens: [{{id: ops, sha256: "{digest}"}}]
"""))

    def placement(round_: int) -> dict[str, str]:
        placed = {}
        for i in range(60):
            rid = f"s{i}-r{round_}"
            assert infer(sidecar.listen, "sk-aff", request_id=rid, session_id=f"session-{i}") is None
            placed[f"session-{i}"] = next(n for n, b in pool.items() if b.call_for(rid) is not None)
        return placed

    first, second = placement(0), placement(1)
    assert first == second and len(set(first.values())) == 4  # sticky, and spread over all four
    gone = max(pool, key=lambda n: sum(v == n for v in first.values()))
    with grpc.insecure_channel(sidecar.admin_listen) as channel:
        admin_pb2_grpc.RoutingAdminStub(channel).SetOverride(
            admin_pb2.SetOverrideRequest(model="chat", backend=gone, drain=True),
            metadata=(("authorization", f"Bearer {token}"),), timeout=5)
    third = placement(2)
    moved = {s for s in first if third[s] != first[s]}
    assert moved == {s for s, n in first.items() if n == gone}  # only the drained backend's sessions
    assert 0.1 < len(moved) / len(first) < 0.45 and gone not in third.values()


def first_chunk_ms(target: str, text: str, request_id: str) -> float:
    """An InferStream of model `chat` with input `text`: milliseconds to its first chunk (read to the end)."""
    request = InferRequest(model="chat", input=text).SerializeToString()
    with grpc.insecure_channel(target) as channel:
        started = time.perf_counter()
        stream = channel.unary_stream(INFER_STREAM)(request, timeout=10, metadata=(("x-request-id", request_id),))
        first = next(stream)
        elapsed = (time.perf_counter() - started) * 1000
        assert InferChunk.FromString(first).delta and len(list(stream)) == 7
    return elapsed


def test_calls_sharing_a_prompt_prefix_land_on_one_backend_and_find_its_cache_warm(launch: Launcher) -> None:
    prefill = 150  # ms a demo backend waits for a prefix it has not seen
    pool = {f"b{i}": launch.backend("--prefix-cache-ms", str(prefill), "--prefix-bytes", "32") for i in range(3)}
    sidecar = launch.sidecar(routed([(n, b, 1, 0) for n, b in pool.items()],
                                    model="affinity: prefix\n  prefix_bytes: 32", checks=NO_CHECKS))

    def home(request_id: str) -> tuple[str, str]:
        """The backend that served the call, and whether its prefix cache had the prefix."""
        name, call = next((n, c) for n, b in pool.items() if (c := b.call_for(request_id)) is not None)
        return name, call["prefix_cache"]

    prompts = [f"You are helper {i:02d}.".ljust(32, ".") for i in range(12)]  # 32 bytes each
    homes = {}
    for i, prompt in enumerate(prompts):
        cold = first_chunk_ms(sidecar.listen, prompt + " What is 2 + 2?", f"p{i}-cold")
        warm = first_chunk_ms(sidecar.listen, prompt + " And what is 3 + 3?", f"p{i}-warm")
        # unary, and a session id: the prefix decides
        assert infer(sidecar.listen, request_id=f"p{i}-unary", input=prompt + " Bye.", session_id=f"s{i}") is None
        placed = [home(f"p{i}-{kind}") for kind in ("cold", "warm", "unary")]
        assert [name for name, _ in placed] == [placed[0][0]] * 3, placed  # one backend for the prefix
        assert [cache for _, cache in placed] == ["miss", "hit", "hit"]
        assert cold >= prefill and warm < cold - prefill / 2, (cold, warm)  # the prefill is paid once
        homes[prompt] = placed[0][0]
    assert Counter(homes.values()) == {"b0": 6, "b1": 4, "b2": 2}  # spread, as blake2b places them anywhere
    assert sum(metric(sidecar, "api_router_routing_decisions_total", {"backend": n, "decision": "affinity"})
               for n in pool) == 36
