"""The Limits stage on a real Call and a real memory store: estimates, reservations, settlement,
the rates a rule makes, and whose clock chooses a budget's window."""
from __future__ import annotations

import asyncio

import pytest
from sidecar_client.inference.v1.inference_pb2 import InferRequest, InferResponse, Usage

from sidecar.billing import read_usage
from sidecar.call import AttemptRecord, Call, begin_call
from sidecar.config import Config, parse_config
from sidecar.config_sections import RateRule
from sidecar.errors import SidecarError
from sidecar.limits.memory_store import MemoryLimitStore
from sidecar.stages.limits import Limits, rates_of

CONFIG = parse_config("""
limits:
  orgs:
    anonymous: {tokens_per_minute: 60000, token_burst: 1000}
models:
  chat:
    backends: [{name: a, address: "127.0.0.1:1"}]
""")


def new_call(max_output_tokens: int) -> Call:
    call = begin_call("Infer", InferRequest(model="chat", max_output_tokens=max_output_tokens).SerializeToString(),
                      (), None)
    call.parse()
    call.org, call.model = "anonymous", CONFIG.models["chat"]
    return call


def served(call: Call, output_tokens: int) -> None:
    """As the proxy and the call's scope leave a call whose one attempt answered with usage."""
    call.attempts.append(AttemptRecord("a", "OK", 1.0))
    read_usage(call, InferResponse(usage=Usage(output_tokens=output_tokens)).SerializeToString())
    call.relayed, call.status = True, "OK"


def test_a_local_share_settles_against_what_it_charged() -> None:
    """Half of a 1000-token burst is 500: an 800-token call is charged 500 up front, and must be
    settled to 800 (+300), not to 800 minus the unshared burst's charge (0)."""
    store = MemoryLimitStore(clock=lambda: 1000.0, share=0.5)  # 500 tokens/s, burst 500
    limits = Limits(lambda: CONFIG, store)
    call = new_call(800)
    asyncio.run(limits(call))
    served(call, 800)
    limits.finish(call)
    with pytest.raises(SidecarError) as denial:
        asyncio.run(limits(new_call(1)))
    # 800 units at 500/s from now, minus the 1 s burst, plus the new call's 1 unit
    assert denial.value.reason == "RATE_LIMIT_EXCEEDED"
    assert "retry in 0.602s" in denial.value.message


def test_nothing_relayed_releases_the_reservation() -> None:
    store = MemoryLimitStore(clock=lambda: 1000.0)
    limits = Limits(lambda: CONFIG, store)
    for _ in range(3):  # 3 x 900 > 1000 unless each failed call's reservation is released
        call = new_call(900)
        asyncio.run(limits(call))
        call.status = "UNAVAILABLE"
        limits.finish(call)
    asyncio.run(limits(new_call(1000)))  # all released: the whole burst of 1000 is free again
    with pytest.raises(SidecarError):
        asyncio.run(limits(new_call(1)))


def test_a_cut_stream_keeps_the_estimate() -> None:
    store = MemoryLimitStore(clock=lambda: 1000.0)
    limits = Limits(lambda: CONFIG, store)
    call = new_call(900)
    asyncio.run(limits(call))
    call.attempts.append(AttemptRecord("a", "CANCELLED", 1.0))
    call.relayed, call.status = True, "CANCELLED"  # chunks went out, then the caller left
    limits.finish(call)
    with pytest.raises(SidecarError):
        asyncio.run(limits(new_call(900)))


class Clock:
    """A clock the test moves by hand (a plain callable, not a mock)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def config_for(rule: str) -> Config:
    return parse_config(f"""
limits:
  orgs:
    anonymous: {rule}
models:
  chat:
    backends: [{{name: a, address: "127.0.0.1:1"}}]
""")


async def admitted_in(limits: Limits, clock: Clock, seconds: int, step: int) -> int:
    """Calls `limits` every `step` seconds of `clock` for `seconds`; how many were admitted."""
    admitted = 0
    for _ in range(0, seconds, step):
        try:
            await limits(new_call(1))
            admitted += 1
        except SidecarError as denial:
            assert denial.reason == "RATE_LIMIT_EXCEEDED"
        clock.now += step
    return admitted


@pytest.mark.parametrize("per_minute", [0.25, 0.5, 1.0])
def test_a_request_rate_admits_its_rate_even_below_one_per_minute(per_minute: float) -> None:
    """0.25/min is 15 an hour, not one a minute: a request is one whole unit however slow the rate
    (its burst, one minute's amount by default, is at least one request)."""
    clock = Clock(1_000_000.0)
    limits = Limits(lambda: config_for(f"{{requests_per_minute: {per_minute}}}"), MemoryLimitStore(clock=clock))
    assert asyncio.run(admitted_in(limits, clock, 3600, 5)) == round(per_minute * 60)


def test_the_burst_of_a_rate_is_at_least_one_unit() -> None:
    requests, tokens = rates_of("org:a", RateRule(requests_per_minute=0.25, tokens_per_minute=0.5))
    assert (requests.burst, tokens.burst) == (1.0, 1.0)
    assert requests.per_second == pytest.approx(0.25 / 60) and tokens.per_second == pytest.approx(0.5 / 60)
    configured = rates_of("org:a", RateRule(requests_per_minute=0.25, burst=3, tokens_per_minute=30, token_burst=7))
    assert [r.burst for r in configured] == [3.0, 7.0]
    assert [r.burst for r in rates_of("org:a", RateRule(requests_per_minute=90, tokens_per_minute=600))] == [90, 600]
