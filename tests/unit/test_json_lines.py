"""Usage records as JSON: `record_dict` and `Usage.json` must write exactly what protobuf's json_format
writes of the record."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sidecar_client.inference.v1 import inference_pb2
from sidecar_client.sidecar.admin.v1 import admin_pb2
from sidecar_client.sidecar.usage.v1 import usage_pb2

from sidecar.call import AttemptRecord, begin_call
from sidecar.usage.json_lines import record_dict
from sidecar.usage.record import SCHEMA, Usage, usage_of


def reference(message: object) -> dict[str, object]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)  # type: ignore[arg-type]


def random_record(rng: random.Random) -> usage_pb2.UsageRecord:
    def text() -> str:
        return rng.choice(["", "a", "acme", "é中文 \"quoted\" \\ \n", "x" * rng.randint(0, 40)])

    started = Timestamp(seconds=rng.choice([0, 1, 1_765_000_000, 253_402_300_799, rng.randint(0, 2**33)]),
                        nanos=rng.choice([0, 1_000_000, 123_000, 7, 999_999_999, rng.randint(0, 999_999_999)]))
    record = usage_pb2.UsageRecord(
        event_id=text(), request_id=text(), trace_id=text(), org=text(), api_key_id=text(), model=text(),
        backend=text(), status=rng.choice(["OK", "UNAVAILABLE", ""]), reason=text(),
        input_tokens=rng.choice([0, 1, 2**32 - 1, rng.randint(0, 10**6)]),
        output_tokens=rng.choice([0, 5, rng.randint(0, 10**6)]), usage_estimated=rng.random() < 0.5,
        duration_ms=rng.choice([0.0, 1.5, 1e-9, 123456.789, rng.random() * 1e4]),
        overhead_ms=rng.choice([0.0, 0.25, rng.random()]), streamed=rng.random() < 0.5, schema=text(),
        protocol=rng.choice(["inference_v1", "oip", ""]),
        attempts=[usage_pb2.Attempt(backend=text(), status=text(), duration_ms=rng.random() * 100)
                  for _ in range(rng.randint(0, 3))])
    if rng.random() < 0.9:
        record.started_at.CopyFrom(started)
    return record


def test_the_same_as_json_format_on_generated_records() -> None:
    rng = random.Random(20261205)
    for _ in range(2000):
        record = random_record(rng)
        ours, theirs = record_dict(record), reference(record)
        assert ours == theirs
        assert json.dumps(ours) == json.dumps(theirs), "the same field order and values"


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_doubles(value: float) -> None:
    record = usage_pb2.UsageRecord(duration_ms=value)
    assert json.dumps(record_dict(record)) == json.dumps(reference(record))


def test_timestamps_beyond_four_digit_years_fall_back() -> None:
    record = usage_pb2.UsageRecord(started_at=Timestamp(seconds=-62135596800, nanos=5))  # year 1
    assert record_dict(record) == reference(record)


def test_nested_records_with_enums_and_bytes() -> None:
    """The audit record holds the usage record: the same conversion one level down."""
    rng = random.Random(7)
    audit = admin_pb2.AuditRecord(request_id="r", usage=random_record(rng), routing_decision="primary",
                                  decisions=[admin_pb2.Decision(stage="auth", result="allow", detail="k")],
                                  attempts=[admin_pb2.Attempt(backend="a", address="127.0.0.1:1", status="OK")])
    assert record_dict(audit) == reference(audit)


def random_usage(rng: random.Random) -> Usage:
    def text() -> str:
        return rng.choice(["", "a", "acme", "é中文 \"quoted\" \\ \n", "x" * rng.randint(0, 40)])

    def duration() -> float:
        return rng.choice([0.0, -0.0, 1.5, 1e-9, 123456.789, math.inf, rng.random() * 1e4])

    return Usage(
        event_id=text(), request_id=text(), trace_id=text(), org=text(), api_key_id=text(), model=text(),
        backend=text(), status=rng.choice(["OK", "UNAVAILABLE", ""]), reason=text(),
        input_tokens=rng.choice([0, 1, 2**32 - 1, rng.randint(0, 10**6)]),
        output_tokens=rng.choice([0, 5, rng.randint(0, 10**6)]), usage_estimated=rng.random() < 0.5,
        started_ns=rng.choice([None, 0, 1_765_000_000_123_456_789, 1_765_000_000_000_000_000,
                               1_765_000_000_120_000_000, 1_765_000_000_123_456_000, rng.randint(0, 2**62)]),
        duration_ms=duration(), overhead_ms=duration(),
        attempts=tuple(AttemptRecord(text(), rng.choice(["OK", "UNAVAILABLE", ""]), duration(), text())
                       for _ in range(rng.randint(0, 3))),
        streamed=rng.random() < 0.5, schema=text(), protocol=rng.choice(["inference_v1", "oip", ""]))


def test_usage_json_is_the_records_json_format() -> None:
    """The usage file's line is made from the values, never from the message: it must be what
    json_format makes of the message, byte for byte (field order, left-out defaults, RFC 3339)."""
    rng = random.Random(1205)
    for _ in range(3000):
        usage = random_usage(rng)
        record = usage.record()
        assert json.dumps(usage.json()) == json.dumps(reference(record))
        assert usage.json() == record_dict(record)


def test_a_calls_usage_record_and_its_line(tmp_path: Path) -> None:
    """usage_of a real ended call: the record the Kafka sink sends and the line the file gets."""
    raw = inference_pb2.InferRequest(model="chat", input="hello", max_output_tokens=4).SerializeToString()
    call = begin_call("Infer", raw, (("x-request-id", "req-1"),), 5.0)
    call.parse()
    call.org, call.api_key_id, call.status = "acme", "app-1", "OK"
    call.attempts.append(AttemptRecord("a", "OK", 1.25, "127.0.0.1:1"))
    call.reported = (2, 3)
    usage = usage_of(call, call.started + 0.002)
    record = usage.record()
    assert (record.request_id, record.org, record.model, record.backend, record.input_tokens,
            record.output_tokens, record.schema) == ("req-1", "acme", "chat", "a", 2, 3, SCHEMA)
    assert record.started_at.ToNanoseconds() == int(call.started_wall * 1e9)
    assert record.duration_ms == 2.0 and record.overhead_ms == 0.75
    assert json.dumps(usage.json()) == json.dumps(reference(record))
