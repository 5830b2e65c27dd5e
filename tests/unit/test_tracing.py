"""W3C trace context and sampling: what a call continues, what the backend is sent, who samples."""
from __future__ import annotations

import pytest

from sidecar.call import begin_call
from sidecar.telemetry.trace_context import parse_traceparent, sampled_by_ratio, traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def sent_traceparent(call_metadata: tuple[tuple[str, str], ...]) -> str:
    return next(v for k, v in call_metadata if k == "traceparent")


@pytest.mark.parametrize(("value", "expected"), [
    (f"00-{TRACE}-{PARENT}-01", (TRACE, PARENT, True)),
    (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, False)),
    (f"00-{TRACE.upper()}-{PARENT}-03", (TRACE, PARENT, True)),       # other flag bits are ignored
    (f"01-{TRACE}-{PARENT}-01-future", (TRACE, PARENT, True)),         # a later version may add fields
    (f"00-{TRACE}-{PARENT}-01-more", None),                            # version 00 has exactly four
    (f"ff-{TRACE}-{PARENT}-01", None),                                 # version ff is invalid
    (f"00-{'0' * 32}-{PARENT}-01", None),                              # all-zero ids are invalid
    (f"00-{TRACE}-{'0' * 16}-01", None),
    (f"00-{TRACE[:-1]}g-{PARENT}-01", None),
    ("garbage", None),
    ("", None),
])
def test_traceparent_parsing(value: str, expected: tuple[str, str, bool] | None) -> None:
    assert parse_traceparent(value) == expected


def test_ratio_sampling_follows_the_low_64_bits_of_the_trace_id() -> None:
    assert sampled_by_ratio("f" * 16 + "0" * 16, 0.001)
    assert not sampled_by_ratio("0" * 16 + "f" * 16, 0.999)
    assert sampled_by_ratio("0" * 16 + "7" + "f" * 15, 0.5)
    assert not sampled_by_ratio("0" * 16 + "8" + "0" * 15, 0.5)
    ids = [f"{i:032x}" for i in range(0, 1 << 64, (1 << 64) // 1000)]
    assert sum(sampled_by_ratio(t, 0.25) for t in ids) == pytest.approx(250, abs=2)


def test_a_sampled_caller_is_continued_and_each_attempt_becomes_the_backends_parent() -> None:
    call = begin_call("Infer", b"", (("traceparent", f"00-{TRACE}-{PARENT}-01"), ("tracestate", "v=1")), None, 0.5)
    assert (call.trace_id, call.parent_span_id, call.sampled) == (TRACE, PARENT, True)
    assert "traceparent" not in dict(call.forward_metadata)  # set per attempt
    sent = dict(call.attempt_metadata("aaaaaaaaaaaaaaaa"))
    assert sent["traceparent"] == traceparent(TRACE, "aaaaaaaaaaaaaaaa", True)
    assert sent["tracestate"] == "v=1" and sent["x-request-id"] == call.request_id


def test_an_unsampled_caller_is_passed_on_untouched() -> None:
    given = f"00-{TRACE}-{PARENT}-00"
    call = begin_call("Infer", b"", (("traceparent", given),), None, 1.0)
    assert (call.trace_id, call.sampled) == (TRACE, False)
    assert sent_traceparent(call.forward_metadata) == given


def test_without_tracing_a_sampled_caller_is_passed_on_untouched() -> None:
    given = f"00-{TRACE}-{PARENT}-01"
    call = begin_call("Infer", b"", (("traceparent", given),), None, None)
    assert not call.sampled and sent_traceparent(call.forward_metadata) == given


def test_ratio_zero_samples_nothing_even_when_the_caller_sampled() -> None:
    call = begin_call("Infer", b"", (("traceparent", f"00-{TRACE}-{PARENT}-01"),), None, 0.0)
    assert not call.sampled


@pytest.mark.parametrize("given", [(), (("traceparent", "garbage"),)])
def test_a_call_without_usable_context_starts_a_trace_the_backend_shares(given: tuple[tuple[str, str], ...]) -> None:
    unsampled = begin_call("Infer", b"", given, None, 0.0)
    assert len(unsampled.trace_id) == 32 and unsampled.parent_span_id == "" and not unsampled.sampled
    assert sent_traceparent(unsampled.forward_metadata) == traceparent(unsampled.trace_id, unsampled.span_id, False)
    sampled = begin_call("Infer", b"", given, None, 1.0)
    assert sampled.sampled and sampled.trace_id != unsampled.trace_id


def test_new_traces_are_sampled_at_the_ratio() -> None:
    assert sum(begin_call("Infer", b"", (), None, 0.1).sampled for _ in range(4000)) == pytest.approx(400, rel=0.25)
