"""What a `Call` takes from the caller's metadata, and what it forwards."""
from __future__ import annotations

import time

import pytest
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from sidecar.call import begin_call
from sidecar.config import ModelConfig
from sidecar.errors import SidecarError


def test_credentials_are_read_but_never_forwarded() -> None:
    call = begin_call("Infer", b"", (("authorization", "Bearer sk-1"), ("x-api-key", "sk-2"),
                                     ("traceparent", "00-aa-bb-01"), ("tracestate", "a=1"), ("cookie", "c")), None)
    # (an invalid traceparent: the call starts its own trace and passes that on)
    assert call.api_key == "sk-2"  # the later header wins
    keys = {k for k, _ in call.forward_metadata}
    assert keys == {"traceparent", "tracestate", "x-request-id"}
    assert "sk-" not in repr(call.forward_metadata)


def test_bearer_scheme_is_case_insensitive() -> None:
    assert begin_call("Infer", b"", (("authorization", "bearer abc"),), None).api_key == "abc"
    assert begin_call("Infer", b"", (("authorization", "Basic abc"),), None).api_key is None


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, "tab\there"])
def test_unusable_request_ids_are_replaced(given: str) -> None:
    call = begin_call("Infer", b"", (("x-request-id", given),), None)
    assert call.request_id != given and len(call.request_id) == 32
    assert ("x-request-id", call.request_id) in call.forward_metadata


def test_a_good_request_id_is_kept() -> None:
    assert begin_call("Infer", b"", (("x-request-id", "abc-123_X"),), None).request_id == "abc-123_X"


def test_parse_reads_the_request_once() -> None:
    call = begin_call("InferStream", InferRequest(model="chat", input="hi").SerializeToString(), (), None)
    call.parse()
    assert call.request.model == "chat" and call.streamed


@pytest.mark.parametrize(("raw", "reason"), [(b"\xff\xff", "INVALID_REQUEST"),
                                             (InferRequest(input="x").SerializeToString(), "MISSING_FIELD")])
def test_parse_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(SidecarError) as failure:
        begin_call("Infer", raw, (), None).parse()
    assert failure.value.reason == reason


def test_backend_timeout_is_the_callers_deadline_capped_by_the_model() -> None:
    """Guards `backend_timeout`: what is left of the caller's deadline (the time since the call
    arrived taken off), capped by the model's timeout, never negative.

    Arrival is set back by whole seconds, so the bounds leave seconds of slack for a slow machine
    and still fail when the elapsed time is not taken off, or the cap or the floor is missing.
    """
    call = begin_call("Infer", b"", (), 100.0)       # the caller allows 100 s
    call.started = time.perf_counter() - 30.0       # ... and the call arrived 30 s ago
    call.model = ModelConfig(timeout_ms=1_000_000, backends=[{"name": "a", "address": "h:1"}])
    assert 60.0 < call.backend_timeout() <= 70.0
    call.model = ModelConfig(timeout_ms=100, backends=[{"name": "a", "address": "h:1"}])
    assert call.backend_timeout() == pytest.approx(0.1)
    no_deadline = begin_call("Infer", b"", (), None)
    no_deadline.model = call.model
    assert no_deadline.backend_timeout() == pytest.approx(0.1)
    late = begin_call("Infer", b"", (), 0.01)
    late.started = time.perf_counter() - 1.0        # its deadline passed 0.99 s ago
    late.model = call.model
    assert late.backend_timeout() == 0.0
