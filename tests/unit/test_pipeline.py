"""The pipeline's finishers: each runs once per call, even when one before it raised."""
from __future__ import annotations

from prometheus_client import REGISTRY
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from sidecar.call import Call, begin_call
from sidecar.pipeline import Pipeline


def settle_that_breaks(call: Call) -> None:
    raise ValueError("a settlement bug")


def test_a_finisher_that_raises_does_not_stop_the_others() -> None:
    """Finding 1's root: a finisher raising (then: reading garbled usage) skipped every later
    finisher -- no usage record, metrics, access line or trace for the call."""
    ran: list[str] = []
    pipeline = Pipeline([], [settle_that_breaks, lambda call: ran.append(call.request_id)])
    call = begin_call("Infer", InferRequest(model="chat").SerializeToString(), (("x-request-id", "r-1"),), None)
    labels = {"finisher": "settle_that_breaks"}
    before = REGISTRY.get_sample_value("api_router_call_finisher_errors_total", labels)
    assert before is not None  # exists at 0 once the pipeline is built
    assert pipeline.finish(call) is None
    assert ran == ["r-1"]
    assert REGISTRY.get_sample_value("api_router_call_finisher_errors_total", labels) == before + 1
