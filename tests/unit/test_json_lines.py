"""Usage records as JSON: `record_dict` must write exactly what protobuf's json_format writes."""
from __future__ import annotations

import json
import math
import random

import pytest
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sidecar_client.sidecar.admin.v1 import admin_pb2
from sidecar_client.sidecar.usage.v1 import usage_pb2

from sidecar.usage.json_lines import record_dict


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
