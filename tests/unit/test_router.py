"""The router: picking, attempt bookkeeping, passive ejection, retries, active checks, readiness.

Pure given a clock moved by hand and a seeded `random.Random`; backends have no channels.
"""
from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client import REGISTRY
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from sidecar.call import Call, begin_call
from sidecar.config import Config, parse_config
from sidecar.errors import SidecarError
from sidecar.routing.channels import Backend, ChannelKey
from sidecar.routing.overrides import Override, OverrideTable
from sidecar.routing.router import Router

Code = grpc.StatusCode
T0 = 1000.0

# chat: a and b in tier 0, c in tier 1; embed: e shares a's address
CONFIG = """
models:
  chat:
    timeout_ms: 5000
    backends:
      - {name: a, address: "127.0.0.1:7001"}
      - {name: b, address: "127.0.0.1:7002"}
      - {name: c, address: "127.0.0.1:7003", priority: 1}
  embed:
    backends:
      - {name: e, address: "127.0.0.1:7001"}
health_checks: {unhealthy_threshold: 2, healthy_threshold: 2}
outlier_detection: {consecutive_failures: 2, base_ejection_ms: 10000, max_ejection_ms: 60000,
                    max_ejection_percent: 50}
retries: {max_attempts: 3, retry_on: [UNAVAILABLE, INTERNAL], budget_percent: 20, min_retries_per_second: 1}
"""


class NoChannel:
    """The router never touches channels; Backend only asks for its two method callables."""

    def unary_unary(self, method: str) -> None:
        return None

    def unary_stream(self, method: str) -> None:
        return None


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    config: Config
    router: Router
    clock: Clock
    changes: list[int]

    def call(self, time_remaining: float | None = None, model: str = "chat") -> Call:
        call = begin_call("Infer", InferRequest(model=model).SerializeToString(), (), time_remaining)
        call.parse()
        call.model = self.config.models[model]
        return call

    def attempt(self, call: Call, code: Code | None, backend_timed_out: bool = False) -> None:
        """One attempt of `call` on its current endpoint, ended with `code`."""
        endpoint = call.endpoint
        assert endpoint is not None
        started = self.router.attempt_started(endpoint)
        self.router.attempt_ended(call, endpoint, code, started, backend_timed_out)

    def on(self, name: str, code: Code | None, times: int = 1, backend_timed_out: bool = False,
           model: str = "chat") -> None:
        """`times` calls of `model` forced onto backend `name`, each ended with `code`."""
        endpoint = next(e for e in self.router.endpoints[model] if e.name == name)
        for _ in range(times):
            call = self.call(model=model)
            call.endpoint = endpoint
            self.attempt(call, code, backend_timed_out)

    def state(self, model: str = "chat") -> dict[str, str]:
        models: dict[str, dict[str, str]] = self.router.component()["models"]
        return models[model]


def backends_of(config: Config) -> dict[str, list[Backend]]:
    return {model: [Backend(model, b, NoChannel()) for b in m.backends]  # type: ignore[arg-type]
            for model, m in config.models.items()}


def make(text: str = CONFIG, seed: int = 1) -> Rig:
    config = parse_config(text, environ={})
    backends = backends_of(config)
    clock = Clock()
    router = Router(config, backends, clock, random.Random(seed))
    changes: list[int] = []
    router.on_change = lambda: changes.append(1)
    return Rig(config, router, clock, changes)


def healthy_gauge(model: str, backend: str) -> float | None:
    return REGISTRY.get_sample_value("api_router_backend_healthy", {"model": model, "backend": backend})


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- pick ----------------------------------------------------------------------------------------


def test_pick_sets_the_endpoint_from_the_primary_tier() -> None:
    rig = make()
    seen = set()
    for _ in range(200):
        call = rig.call()
        assert call.endpoint is None
        rig.router.pick(call)
        assert call.endpoint is not None and call.endpoint.backend.model == "chat"
        seen.add(call.endpoint.name)
    assert seen == {"a", "b"}


def test_pick_counts_primary_and_failover_decisions() -> None:
    rig = make()
    before = sample("api_router_routing_decisions_total", model="chat", backend="c", decision="failover")
    rig.on("a", Code.UNAVAILABLE, 2)                 # a ejected (the first always may be)
    for _ in range(2):
        rig.router.record_check(ChannelKey("127.0.0.1:7002"), False)  # b unhealthy
    call = rig.call()
    rig.router.pick(call)
    assert call.endpoint is not None and call.endpoint.name == "c"
    assert sample("api_router_routing_decisions_total", model="chat", backend="c",
                  decision="failover") == before + 1


def test_pick_raises_no_backend_available_when_nothing_is_routable() -> None:
    rig = make()
    for address in ("127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"):
        rig.router.record_check(ChannelKey(address), False)
        rig.router.record_check(ChannelKey(address), False)
    call = rig.call()
    with pytest.raises(SidecarError) as caught:
        rig.router.pick(call)
    assert caught.value.reason == "NO_BACKEND_AVAILABLE"
    assert caught.value.code == Code.UNAVAILABLE
    assert caught.value.metadata == {"model": "chat"}
    assert call.endpoint is None


def test_pick_refuses_when_every_backend_is_full() -> None:
    rig = make(CONFIG.replace('7003", priority: 1}', '7003", priority: 1, max_in_flight: 1}')
               .replace('7001"}\n      - {name: b', '7001", max_in_flight: 1}\n      - {name: b')
               .replace('7002"}', '7002", max_in_flight: 2}'))
    started = []
    for _ in range(4):                               # a 1 + b 2 + c 1
        call = rig.call()
        rig.router.pick(call)
        assert call.endpoint is not None
        started.append((call, call.endpoint, rig.router.attempt_started(call.endpoint)))
    assert sorted(e.name for _, e, _ in started) == ["a", "b", "b", "c"]
    with pytest.raises(SidecarError, match="no backend of model 'chat'"):
        rig.router.pick(rig.call())
    call, endpoint, t = started[0]
    rig.router.attempt_ended(call, endpoint, Code.OK, t)  # a slot frees
    again = rig.call()
    rig.router.pick(again)
    assert again.endpoint is endpoint


def test_pick_of_an_unknown_model_is_refused() -> None:
    rig = make()
    call = begin_call("Infer", InferRequest(model="nope").SerializeToString(), (), None)
    call.parse()
    with pytest.raises(SidecarError) as caught:
        rig.router.pick(call)
    assert caught.value.reason == "NO_BACKEND_AVAILABLE" and caught.value.metadata == {"model": "nope"}


# --- attempt bookkeeping -----------------------------------------------------------------------


def test_attempts_are_counted_in_flight_and_recorded() -> None:
    rig = make()
    call = rig.call()
    rig.router.pick(call)
    endpoint = call.endpoint
    assert endpoint is not None
    started = rig.router.attempt_started(endpoint)
    assert endpoint.in_flight == 1
    second = rig.router.attempt_started(endpoint)
    assert endpoint.in_flight == 2
    rig.router.attempt_ended(call, endpoint, Code.UNAVAILABLE, started)
    assert endpoint.in_flight == 1
    rig.router.attempt_ended(call, endpoint, None, second)
    assert endpoint.in_flight == 0
    assert [(a.backend, a.status) for a in call.attempts] == [(endpoint.name, "UNAVAILABLE"),
                                                             (endpoint.name, "CANCELLED")]
    assert all(a.duration_ms >= 0 for a in call.attempts)


def test_attempt_outcomes_are_counted_by_code() -> None:
    rig = make()
    before = sample("api_router_backend_requests_total", model="chat", backend="b", code="RESOURCE_EXHAUSTED")
    rig.on("b", Code.RESOURCE_EXHAUSTED, 3)
    assert sample("api_router_backend_requests_total", model="chat", backend="b",
                  code="RESOURCE_EXHAUSTED") == before + 3


# --- passive ejection ----------------------------------------------------------------------------


def test_consecutive_unavailable_eject_the_backend() -> None:
    rig = make()
    ejections = sample("api_router_backend_ejections_total", model="chat", backend="a")
    rig.on("a", Code.UNAVAILABLE)
    assert rig.state()["a"] == "healthy" and rig.changes == []
    rig.on("a", Code.UNAVAILABLE)
    assert rig.state() == {"a": "ejected", "b": "healthy", "c": "healthy"}
    assert rig.changes == [1]
    assert healthy_gauge("chat", "a") == 0
    assert sample("api_router_backend_ejections_total", model="chat", backend="a") == ejections + 1
    for _ in range(100):                             # new calls go elsewhere
        call = rig.call()
        rig.router.pick(call)
        assert call.endpoint is not None and call.endpoint.name == "b"
    rig.clock.now = T0 + 10.0                        # base_ejection_ms: back on its own
    assert rig.state()["a"] == "healthy"


@pytest.mark.parametrize("code", [Code.INTERNAL, Code.UNKNOWN])
def test_other_backend_faults_eject_too(code: Code) -> None:
    rig = make()
    rig.on("a", code, 2)
    assert rig.state()["a"] == "ejected"


@pytest.mark.parametrize("code", [Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.NOT_FOUND,
                                  Code.PERMISSION_DENIED, Code.FAILED_PRECONDITION])
def test_the_backends_own_answers_do_not_eject(code: Code) -> None:
    rig = make()
    rig.on("a", code, 10)
    assert rig.state()["a"] == "healthy" and rig.changes == []


def test_deadline_exceeded_counts_only_when_the_backend_timed_out() -> None:
    rig = make()
    rig.on("a", Code.DEADLINE_EXCEEDED, 10)          # the caller's deadline ran out
    assert rig.state()["a"] == "healthy"
    rig.on("a", Code.DEADLINE_EXCEEDED, 2, backend_timed_out=True)
    assert rig.state()["a"] == "ejected"


def test_a_cancelled_attempt_counts_nothing() -> None:
    rig = make()
    rig.on("a", None, 10)
    assert rig.state()["a"] == "healthy"
    rig.on("a", Code.UNAVAILABLE)
    rig.on("a", None, 3)                             # neither a failure nor a success
    rig.on("a", Code.UNAVAILABLE)
    assert rig.state()["a"] == "ejected"


def test_a_success_resets_the_streak() -> None:
    rig = make()
    for _ in range(5):
        rig.on("a", Code.UNAVAILABLE)
        rig.on("a", Code.OK)
    assert rig.state()["a"] == "healthy" and rig.changes == []


def test_ejection_respects_max_ejection_percent() -> None:
    rig = make()                                     # chat has 3 backends: 50 % allows only one
    rig.on("a", Code.UNAVAILABLE, 2)
    rig.on("b", Code.UNAVAILABLE, 5)
    assert rig.state() == {"a": "ejected", "b": "healthy", "c": "healthy"}
    assert rig.changes == [1]
    rig.clock.now = T0 + 10.0                        # a is back: now b may go
    rig.on("b", Code.UNAVAILABLE)
    assert rig.state() == {"a": "healthy", "b": "ejected", "c": "healthy"}


def test_ejection_is_per_model() -> None:
    rig = make()
    rig.on("a", Code.UNAVAILABLE, 2)
    assert rig.state("embed") == {"e": "healthy"}    # same address, other model: its own record
    rig.on("e", Code.UNAVAILABLE, 2, model="embed")  # the only one of its model: the first always may go
    assert rig.state("embed") == {"e": "ejected"}


def test_readiness_follows_an_ejection_that_ends() -> None:
    """An ejection ends by time alone. The backend is then routable again, so the router must
    report the change (`on_change`, which republishes gRPC readiness) and set its
    `api_router_backend_healthy` gauge back to 1 -- at the latest when it next hears about the
    backend (a passing health check, a call picked and answered)."""
    rig = make("""
models:
  solo:
    backends: [{name: only, address: "127.0.0.1:7101"}]
outlier_detection: {consecutive_failures: 1, base_ejection_ms: 10000}
""")
    rig.on("only", Code.UNAVAILABLE, model="solo")
    assert rig.state("solo") == {"only": "ejected"}
    assert rig.changes == [1] and not rig.router.any_routable()
    assert healthy_gauge("solo", "only") == 0
    rig.clock.now = T0 + 11.0
    assert rig.router.any_routable()                 # polled: fine
    rig.router.record_check(ChannelKey("127.0.0.1:7101"), True)  # the health checker's next (passing) check
    call = rig.call(model="solo")
    rig.router.pick(call)
    rig.attempt(call, Code.OK)
    assert len(rig.changes) >= 2                     # on_change never called: gRPC readiness stays NOT_SERVING
    assert healthy_gauge("solo", "only") == 1        # still 0: nothing ever sets it back


# --- retries -------------------------------------------------------------------------------------


def failed_first_attempt(rig: Rig, code: Code = Code.UNAVAILABLE, time_remaining: float | None = None) -> Call:
    call = rig.call(time_remaining)
    rig.router.pick(call)
    rig.attempt(call, code)
    return call


def test_retry_picks_another_backend_for_a_retryable_code() -> None:
    rig = make(CONFIG.replace("consecutive_failures: 2", "consecutive_failures: 1000"))  # no ejections
    for _ in range(20):
        call = failed_first_attempt(rig)
        first = call.endpoint
        assert first is not None
        assert rig.router.retry(call, Code.UNAVAILABLE) is True
        assert call.endpoint is not None and call.endpoint is not first
        assert call.endpoint.name in {"a", "b"}      # still the primary tier while one is left
        rig.clock.now += 1.0                         # keep within the budget's floor (1/s)


@pytest.mark.parametrize("code", [Code.RESOURCE_EXHAUSTED, Code.INVALID_ARGUMENT, Code.DEADLINE_EXCEEDED,
                                  Code.ABORTED, Code.OK])
def test_no_retry_for_codes_not_in_retry_on(code: Code) -> None:
    rig = make()
    call = failed_first_attempt(rig, code)
    first = call.endpoint
    assert rig.router.retry(call, code) is False
    assert call.endpoint is first


def test_retry_on_is_configurable() -> None:
    rig = make(CONFIG.replace("retry_on: [UNAVAILABLE, INTERNAL]", "retry_on: [RESOURCE_EXHAUSTED]"))
    call = failed_first_attempt(rig, Code.RESOURCE_EXHAUSTED)
    assert rig.router.retry(call, Code.RESOURCE_EXHAUSTED) is True
    call = failed_first_attempt(rig)
    assert rig.router.retry(call, Code.UNAVAILABLE) is False


def test_never_beyond_max_attempts_nor_to_a_tried_backend() -> None:
    rig = make()                                     # max_attempts 3; a, b then c
    call = failed_first_attempt(rig)
    tried = [call.endpoint]
    for _ in range(2):
        assert rig.router.retry(call, Code.UNAVAILABLE) is True
        assert call.endpoint not in tried
        tried.append(call.endpoint)
        rig.attempt(call, Code.UNAVAILABLE)
    assert sorted(e.name for e in tried if e is not None) == ["a", "b", "c"]
    assert [a.backend for a in call.attempts] == [e.name for e in tried if e is not None]
    assert rig.router.retry(call, Code.UNAVAILABLE) is False  # 3 attempts made


def test_max_attempts_one_never_retries() -> None:
    rig = make(CONFIG.replace("max_attempts: 3", "max_attempts: 1"))
    call = failed_first_attempt(rig)
    assert rig.router.retry(call, Code.UNAVAILABLE) is False


def test_no_retry_when_every_backend_was_tried() -> None:
    rig = make(CONFIG.replace("max_attempts: 3", "max_attempts: 10"))
    call = failed_first_attempt(rig)
    while rig.router.retry(call, Code.UNAVAILABLE):
        rig.attempt(call, Code.UNAVAILABLE)
    assert sorted(a.backend for a in call.attempts) == ["a", "b", "c"]  # each once, then no more


def test_retry_skips_unroutable_backends() -> None:
    rig = make()
    call = rig.call()
    call.endpoint = rig.router.endpoints["chat"][0]  # a
    rig.attempt(call, Code.UNAVAILABLE)
    rig.router.record_check(ChannelKey("127.0.0.1:7002"), False)
    rig.router.record_check(ChannelKey("127.0.0.1:7002"), False)  # b unhealthy
    assert rig.router.retry(call, Code.UNAVAILABLE) is True
    assert call.endpoint is not None and call.endpoint.name == "c"


def test_no_retry_when_the_deadline_is_nearly_gone() -> None:
    rig = make()
    for remaining in (0.0, 0.005):
        call = failed_first_attempt(rig, time_remaining=remaining)
        first = call.endpoint
        assert rig.router.retry(call, Code.UNAVAILABLE) is False
        assert call.endpoint is first
    call = failed_first_attempt(rig, time_remaining=5.0)
    assert rig.router.retry(call, Code.UNAVAILABLE) is True


def test_no_retry_once_the_budget_is_spent() -> None:
    rig = make(CONFIG.replace("budget_percent: 20, min_retries_per_second: 1",
                              "budget_percent: 0, min_retries_per_second: 1"))
    allowed = [rig.router.retry(failed_first_attempt(rig), Code.UNAVAILABLE) for _ in range(15)]
    assert allowed == [True] * 10 + [False] * 5      # 1/s over the 10 s window
    rig.clock.now = T0 + 10.0                        # the window has slid past them
    assert rig.router.retry(failed_first_attempt(rig), Code.UNAVAILABLE) is True


def test_the_budget_grows_with_picked_calls_and_counts_only_allowed_retries() -> None:
    rig = make(CONFIG.replace("budget_percent: 20, min_retries_per_second: 1",
                              "budget_percent: 50, min_retries_per_second: 0"))
    calls = [failed_first_attempt(rig) for _ in range(4)]  # 4 picks -> 2 retries
    assert rig.router.retry(calls[0], Code.RESOURCE_EXHAUSTED) is False  # not retryable: uses nothing
    assert [rig.router.retry(c, Code.UNAVAILABLE) for c in calls] == [True, True, False, False]


def test_a_retry_with_no_backend_left_uses_no_budget() -> None:
    rig = make("""
models:
  chat:
    backends:
      - {name: a, address: "127.0.0.1:7201"}
      - {name: b, address: "127.0.0.1:7202"}
health_checks: {unhealthy_threshold: 1, healthy_threshold: 1}
retries: {max_attempts: 3, budget_percent: 0, min_retries_per_second: 0.1}
""")                                                 # the budget: one retry in the window
    a = rig.router.endpoints["chat"][0]
    rig.router.record_check(ChannelKey("127.0.0.1:7202"), False)  # b unhealthy: nowhere to retry
    for _ in range(3):
        call = rig.call()
        call.endpoint = a
        rig.attempt(call, Code.UNAVAILABLE)
        assert rig.router.retry(call, Code.UNAVAILABLE) is False
    rig.router.record_check(ChannelKey("127.0.0.1:7202"), True)
    call = rig.call()
    call.endpoint = a
    rig.attempt(call, Code.UNAVAILABLE)
    assert rig.router.retry(call, Code.UNAVAILABLE) is True  # the budget's one retry was still there
    call = rig.call()
    call.endpoint = a
    rig.attempt(call, Code.UNAVAILABLE)
    assert rig.router.retry(call, Code.UNAVAILABLE) is False  # and now it is spent


def test_a_retry_counts_as_failover() -> None:
    rig = make()
    call = rig.call()
    call.endpoint = rig.router.endpoints["chat"][0]
    rig.attempt(call, Code.UNAVAILABLE)
    before = sample("api_router_routing_decisions_total", model="chat", backend="b", decision="failover")
    assert rig.router.retry(call, Code.UNAVAILABLE) is True
    assert call.endpoint is not None and call.endpoint.name == "b"
    assert sample("api_router_routing_decisions_total", model="chat", backend="b",
                  decision="failover") == before + 1


# --- active health checks --------------------------------------------------------------------------


def test_record_check_affects_every_model_at_the_address() -> None:
    rig = make()
    rig.router.record_check(ChannelKey("127.0.0.1:7001"), False)
    assert rig.changes == [] and rig.state()["a"] == "healthy"
    rig.router.record_check(ChannelKey("127.0.0.1:7001"), False)
    assert rig.state() == {"a": "unhealthy", "b": "healthy", "c": "healthy"}
    assert rig.state("embed") == {"e": "unhealthy"}
    assert len(rig.changes) == 2                     # one per endpoint that changed
    assert healthy_gauge("chat", "a") == 0 and healthy_gauge("embed", "e") == 0
    assert healthy_gauge("chat", "b") == 1
    with pytest.raises(SidecarError):
        rig.router.pick(rig.call(model="embed"))

    rig.router.record_check(ChannelKey("127.0.0.1:7001"), True)
    assert len(rig.changes) == 2
    rig.router.record_check(ChannelKey("127.0.0.1:7001"), True)
    assert rig.state()["a"] == "healthy" and rig.state("embed") == {"e": "healthy"}
    assert len(rig.changes) == 4
    assert healthy_gauge("chat", "a") == 1 and healthy_gauge("embed", "e") == 1


def test_passing_checks_of_a_healthy_backend_change_nothing() -> None:
    rig = make()
    for _ in range(5):
        rig.router.record_check(ChannelKey("127.0.0.1:7002"), True)
    rig.router.record_check(ChannelKey("127.0.0.1:9999"), False)  # not ours
    assert rig.changes == []


def test_an_ejected_backend_stays_out_when_its_checks_pass() -> None:
    rig = make()
    rig.on("a", Code.UNAVAILABLE, 2)
    rig.router.record_check(ChannelKey("127.0.0.1:7001"), True)
    assert rig.state()["a"] == "ejected"
    for _ in range(50):
        call = rig.call()
        rig.router.pick(call)
        assert call.endpoint is not None and call.endpoint.name == "b"


# --- state ---------------------------------------------------------------------------------------


def test_any_routable_and_component() -> None:
    rig = make()
    assert rig.router.any_routable()
    assert rig.router.component() == {"status": "ok", "models": {
        "chat": {"a": "healthy", "b": "healthy", "c": "healthy"}, "embed": {"e": "healthy"}},
        "in_flight": {"chat": {"a": 0, "b": 0, "c": 0}, "embed": {"e": 0}}}
    for address in ("127.0.0.1:7001", "127.0.0.1:7002"):
        rig.router.record_check(ChannelKey(address), False)
        rig.router.record_check(ChannelKey(address), False)
    assert rig.router.any_routable()                 # c is left
    rig.on("c", Code.UNAVAILABLE, 2)                 # ejected
    assert not rig.router.any_routable()
    assert {k: v for k, v in rig.router.component().items() if k != "in_flight"} == {
        "status": "no_healthy_backend", "models": {
            "chat": {"a": "unhealthy", "b": "unhealthy", "c": "ejected"}, "embed": {"e": "unhealthy"}}}
    rig.clock.now = T0 + 10.0
    assert rig.router.any_routable()
    assert rig.router.component()["status"] == "ok"


def test_ejected_shows_over_unhealthy() -> None:
    rig = make()
    rig.on("a", Code.UNAVAILABLE, 2)
    rig.router.record_check(ChannelKey("127.0.0.1:7001"), False)
    rig.router.record_check(ChannelKey("127.0.0.1:7001"), False)
    assert rig.state()["a"] == "ejected"
    rig.clock.now = T0 + 10.0
    assert rig.state()["a"] == "unhealthy"


def test_channel_keys_and_repr() -> None:
    rig = make()
    assert [key.address for key in rig.router.channel_keys] == ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
    assert repr(rig.router) == "<Router models=['chat', 'embed'] <RetryBudget 0 retries / 0 calls in 10s>>"


# --- reconfigure (a config reload) -----------------------------------------------------------------

# chat: a stays (weight 1 -> 4), b stays, c leaves, d comes; embed leaves; outlier settings change
RELOADED = """
models:
  chat:
    timeout_ms: 5000
    backends:
      - {name: a, address: "127.0.0.1:7001", weight: 4}
      - {name: b, address: "127.0.0.1:7002"}
      - {name: d, address: "127.0.0.1:7004"}
health_checks: {unhealthy_threshold: 2, healthy_threshold: 2}
outlier_detection: {consecutive_failures: 1, base_ejection_ms: 10000, max_ejection_ms: 60000,
                    max_ejection_percent: 100}
retries: {max_attempts: 3, retry_on: [UNAVAILABLE, INTERNAL], budget_percent: 20, min_retries_per_second: 1}
"""


def reload(rig: Rig, text: str = RELOADED) -> None:
    rig.config = parse_config(text, environ={})
    rig.router.reconfigure(rig.config, backends_of(rig.config))


def test_reconfigure_keeps_what_is_known_of_backends_that_stay_with_their_new_settings() -> None:
    rig = make()
    a, b = rig.router.endpoint("chat", "a"), rig.router.endpoint("chat", "b")
    assert a is not None and b is not None
    running = rig.call()
    running.endpoint = b
    rig.router.attempt_started(b)                    # a call in flight on b
    rig.router.record_check(ChannelKey("127.0.0.1:7001"), False)  # one failed check of a (threshold 2)
    b.latency.observe(0.2, T0)
    reload(rig)
    assert rig.router.endpoint("chat", "a") is a and rig.router.endpoint("chat", "b") is b
    assert (a.check_streak, b.in_flight, b.latency.value(T0) > 0) == (1, 1, True)
    assert a.weight == 4 and a.backend.config.weight == 4
    assert rig.state() == {"a": "healthy", "b": "healthy", "d": "healthy"}
    assert healthy_gauge("chat", "d") == 1
    picked = Counter()
    for _ in range(600):
        call = rig.call()
        rig.router.pick(call)
        assert call.endpoint is not None
        picked[call.endpoint.name] += 1
    assert set(picked) == {"a", "b", "d"} and abs(picked["a"] - 400) < 60  # 4:1:1; sigma 11.5


def test_reconfigure_applies_new_outlier_settings() -> None:
    rig = make()                                     # consecutive_failures 2
    reload(rig)                                      # 1
    rig.on("a", Code.UNAVAILABLE)
    assert rig.state()["a"] == "ejected"


def test_a_removed_backend_takes_no_new_call_and_its_running_call_ends_quietly() -> None:
    rig = make()
    c = rig.router.endpoint("chat", "c")
    e = rig.router.endpoint("embed", "e")
    assert c is not None and e is not None
    on_c, on_e = rig.call(), rig.call(model="embed")
    on_c.endpoint, on_e.endpoint = c, e
    started = rig.router.attempt_started(c), rig.router.attempt_started(e)
    reload(rig)
    assert rig.router.endpoint("chat", "c") is None and "embed" not in rig.router.endpoints
    assert healthy_gauge("chat", "c") is None and healthy_gauge("embed", "e") is None  # series gone
    changes = len(rig.changes)
    # failed attempts of removed backends (one failure ejects under the new config): no crash,
    # no ejection, no gauge series back, no readiness change -- only the attempt is recorded
    rig.router.attempt_ended(on_c, c, Code.UNAVAILABLE, started[0])
    rig.router.attempt_ended(on_e, e, Code.UNAVAILABLE, started[1])
    assert (c.in_flight, e.in_flight) == (0, 0) and not c.ejected(T0) and not e.ejected(T0)
    assert len(rig.changes) == changes and healthy_gauge("chat", "c") is None
    assert [(a.backend, a.status) for a in on_c.attempts] == [("c", "UNAVAILABLE")]
    assert rig.router.retry(on_e, Code.UNAVAILABLE) is False  # its model is gone
    assert rig.router.retry(on_c, Code.UNAVAILABLE) is True   # another backend of chat
    assert on_c.endpoint is not None and on_c.endpoint.name in {"a", "b", "d"}
    rig.router.record_check(ChannelKey("127.0.0.1:7003"), False)  # a check that was under way: ignored
    assert c.healthy


def test_a_backend_that_moves_to_another_address_starts_afresh() -> None:
    rig = make()
    old = rig.router.endpoint("chat", "b")
    assert old is not None
    rig.on("b", Code.UNAVAILABLE, 2)
    assert rig.state()["b"] == "ejected"
    reload(rig, RELOADED.replace("127.0.0.1:7002", "127.0.0.1:7012"))
    new = rig.router.endpoint("chat", "b")
    assert new is not None and new is not old and old.retired
    assert rig.state()["b"] == "healthy" and healthy_gauge("chat", "b") == 1
    assert [key.address for key in rig.router.channel_keys] == ["127.0.0.1:7001", "127.0.0.1:7012", "127.0.0.1:7004"]


def test_turning_health_checks_off_by_reload_brings_unhealthy_backends_back() -> None:
    rig = make()
    for _ in range(2):
        rig.router.record_check(ChannelKey("127.0.0.1:7001"), False)
    assert rig.state()["a"] == "unhealthy" and healthy_gauge("chat", "a") == 0
    changes = len(rig.changes)
    reload(rig, RELOADED.replace("health_checks: {", "health_checks: {enabled: false, "))
    assert rig.state()["a"] == "healthy" and healthy_gauge("chat", "a") == 1
    assert len(rig.changes) > changes                # readiness is told


def test_overrides_follow_a_reload() -> None:
    rig = make()
    rig.router.overrides = OverrideTable()           # memory only
    asyncio.run(rig.router.set_override(Override("chat", "c", "drain")))
    asyncio.run(rig.router.set_override(Override("chat", "a", "weight", weight=0.0)))
    reload(rig)                                      # c leaves: its drain waits; a's weight 0 stays
    a = rig.router.endpoint("chat", "a")
    assert a is not None and a.weight == 0
    reload(rig, CONFIG)                              # c is back: drained again
    c = rig.router.endpoint("chat", "c")
    assert c is not None and c.drained


class CountingRouter(Router):
    """Counts `apply_overrides`, the expiry timers' callback included."""

    applied = 0

    def apply_overrides(self) -> None:
        self.applied += 1
        super().apply_overrides()


async def test_applying_overrides_again_never_stacks_expiry_timers() -> None:
    """Suspected 15, confirmed: each apply scheduled one more timer per expiring override and
    none was cancelled, so after N applies (admin changes, Redis syncs) every expiry re-applied
    the table N times, and the timers piled up on the loop."""
    config = parse_config(CONFIG, environ={})
    wall = [1000.0]
    router = CountingRouter(config, backends_of(config), Clock(), random.Random(1), wall=lambda: wall[0])
    router.overrides = OverrideTable()
    await router.set_override(Override("chat", "a", "drain", expires_at=1000.05))
    for _ in range(49):
        router.apply_overrides()  # as every sync with a shared store does
    a = router.endpoint("chat", "a")
    assert a is not None and a.drained
    router.applied = 0
    wall[0] = 1001.0  # the override has expired
    await asyncio.sleep(0.3)  # the loop runs every timer due within 0.05 s before this one
    assert router.applied == 1
    assert not a.drained


# --- affinity: prefix -----------------------------------------------------------------------------

# three backends in one tier; the prefix is the first 16 bytes of the input
PREFIX_CONFIG = """
models:
  chat:
    affinity: prefix
    prefix_bytes: 16
    backends:
      - {name: a, address: "127.0.0.1:7001"}
      - {name: b, address: "127.0.0.1:7002"}
      - {name: c, address: "127.0.0.1:7003"}
health_checks: {unhealthy_threshold: 2, healthy_threshold: 2}
"""
PREFIXES = [f"system prompt {i:02d}" for i in range(60)]  # 16 bytes each


def prefix_call(rig: Rig, text: str, session_id: str = "", method: str = "Infer", **fields: bytes) -> Call:
    raw = InferRequest(model="chat", input=text, session_id=session_id, **fields).SerializeToString()  # type: ignore[arg-type]
    call = begin_call(method, raw, (), None)
    call.parse()
    call.model = rig.config.models["chat"]
    return call


def placed(rig: Rig, text: str, **kwargs: str) -> str:
    """The backend a call with input `text` goes to (nothing stays in flight)."""
    call = prefix_call(rig, text, **kwargs)
    rig.router.pick(call)
    assert call.endpoint is not None
    return call.endpoint.name


def test_calls_sharing_a_prefix_go_to_one_backend_whatever_follows() -> None:
    rig = make(PREFIX_CONFIG)
    for prefix in PREFIXES[:10]:
        homes = {placed(rig, prefix + suffix) for suffix in ("", " hi", " what is 2 + 2?", "!" * 500)}
        assert len(homes) == 1, prefix
    # unary and streaming calls alike, and in a fresh router (another process, another seed)
    other = make(PREFIX_CONFIG, seed=7)
    for prefix in PREFIXES:
        assert placed(rig, prefix + " x", method="InferStream") == placed(other, prefix + " y")


def test_different_prefixes_spread_over_the_backends() -> None:
    rig = make(PREFIX_CONFIG)
    spread = Counter(placed(rig, prefix + " question") for prefix in PREFIXES)
    assert set(spread) == {"a", "b", "c"} and min(spread.values()) >= 10, spread


def test_only_the_first_prefix_bytes_count() -> None:
    rig = make(PREFIX_CONFIG)
    # differing at byte 17 onwards: the same key; at byte 16 (the last one hashed): 60 keys, spread
    assert len({placed(rig, "0123456789abcdef" + c) for c in "ABCDEFGHIJ"}) == 1
    assert len({placed(rig, "0123456789abcde" + c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}) == 3


def test_a_prefix_call_is_an_affinity_decision_and_one_without_input_is_balanced() -> None:
    rig = make(PREFIX_CONFIG)
    call = prefix_call(rig, "system prompt 00, then the question")
    rig.router.pick(call)
    assert call.routing_decision == "affinity" and call.decisions[-1][:2] == ("route", "affinity")
    empty = prefix_call(rig, "")
    rig.router.pick(empty)
    assert empty.routing_decision == "primary"
    assert Counter(placed(rig, "") for _ in range(300)).keys() == {"a", "b", "c"}  # the balancer's draws


def test_a_binary_input_is_keyed_by_its_first_bytes() -> None:
    rig = make(PREFIX_CONFIG)
    image = bytes(range(16))
    homes = {placed(rig, "", input_bytes=image + tail) for tail in (b"", b"\x00" * 10, b"\xff")}  # type: ignore[arg-type]
    assert len(homes) == 1


def test_the_prefix_wins_over_the_session_id() -> None:
    rig = make(PREFIX_CONFIG)
    # one prefix, many sessions: one backend; one session, many prefixes: the prefixes decide
    assert len({placed(rig, PREFIXES[0] + " hi", session_id=f"session-{i}") for i in range(20)}) == 1
    assert len({placed(rig, prefix, session_id="session-0") for prefix in PREFIXES}) == 3


def test_a_hot_prefix_never_pushes_a_backend_past_the_bound() -> None:
    """80 % of the calls share one prefix and all stay in flight: the hot prefix's backend fills
    up to ceil(1.25 x mean) and the overflow goes on clockwise; no backend ever holds more."""
    rig = make(PREFIX_CONFIG)
    rng = random.Random(3)
    endpoints = rig.router.endpoints["chat"]
    hot = PREFIXES[0]
    home = placed(rig, hot)
    for n in range(1, 301):
        text = hot if rng.random() < 0.8 else rng.choice(PREFIXES[1:])
        call = prefix_call(rig, text + f" question {n}")
        rig.router.pick(call)
        assert call.endpoint is not None and call.routing_decision == "affinity"
        rig.router.attempt_started(call.endpoint)    # in flight, and stays so
        cap = math.ceil(1.25 * n / len(endpoints))   # n calls in flight over 3 backends
        assert max(e.in_flight for e in endpoints) <= cap, [(e.name, e.in_flight) for e in endpoints]
    loads = {e.name: e.in_flight for e in endpoints}
    assert loads[home] == math.ceil(1.25 * 300 / 3)  # the hot prefix's backend is full, not over
    assert sum(loads.values()) == 300                 # without the bound it would hold ~240


def test_a_backend_that_leaves_moves_only_its_prefixes_and_gets_them_back() -> None:
    rig = make(PREFIX_CONFIG)
    before = {prefix: placed(rig, prefix) for prefix in PREFIXES}
    for _ in range(2):
        rig.router.record_check(ChannelKey("127.0.0.1:7002"), False)  # b unhealthy
    during = {prefix: placed(rig, prefix) for prefix in PREFIXES}
    moved = {prefix for prefix in PREFIXES if during[prefix] != before[prefix]}
    assert moved == {prefix for prefix, name in before.items() if name == "b"} and moved
    for _ in range(2):
        rig.router.record_check(ChannelKey("127.0.0.1:7002"), True)
    assert {prefix: placed(rig, prefix) for prefix in PREFIXES} == before


def test_a_reload_can_turn_prefix_affinity_on_and_change_its_length() -> None:
    rig = make(PREFIX_CONFIG.replace("    affinity: prefix\n    prefix_bytes: 16\n", ""))
    assert Counter(placed(rig, PREFIXES[0]) for _ in range(100)).keys() == {"a", "b", "c"}  # balanced
    reload(rig, PREFIX_CONFIG)
    assert len({placed(rig, PREFIXES[0]) for _ in range(100)}) == 1
    reload(rig, PREFIX_CONFIG.replace("prefix_bytes: 16", "prefix_bytes: 6"))  # "system": one key for all
    assert len({placed(rig, prefix) for prefix in PREFIXES}) == 1
