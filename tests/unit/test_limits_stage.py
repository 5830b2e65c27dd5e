"""The Limits stage on a real Call and a real memory store: estimates, reservations, settlement."""
from __future__ import annotations

import asyncio

import pytest
from sidecar_client.inference.v1.inference_pb2 import InferRequest, InferResponse, Usage

from sidecar.call import Call, begin_call
from sidecar.config import parse_config
from sidecar.errors import SidecarError
from sidecar.limits.memory_store import MemoryLimitStore
from sidecar.stages.limits import Limits

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
    call.last_message = InferResponse(usage=Usage(output_tokens=output_tokens)).SerializeToString()
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
    assert call.reservation is None


def test_a_cut_stream_keeps_the_estimate() -> None:
    store = MemoryLimitStore(clock=lambda: 1000.0)
    limits = Limits(lambda: CONFIG, store)
    call = new_call(900)
    asyncio.run(limits(call))
    call.relayed, call.status = True, "CANCELLED"  # chunks went out, then the caller left
    limits.finish(call)
    with pytest.raises(SidecarError):
        asyncio.run(limits(new_call(900)))
