"""The usage record of one call: built once, when the call has ended, from what the `Call` knows.

One `sidecar.usage.v1.UsageRecord` per call that passed authentication, denials included
(CONTRACT §6). Tokens are what the call is billed (billing.py): the backend's reported `Usage`
(clamped to what the call could use); the sidecar's estimate, flagged `usage_estimated`, for
every attempt the backend may have worked on without a readable report (a failure, a cut
stream, a cancellation, a backend that does not count); zero for a call no backend worked on. `overhead_ms` is the call's
time minus the time its backend attempts took: what the sidecar itself cost.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, NamedTuple

from sidecar_client.sidecar.usage.v1 import usage_pb2

from sidecar.billing import bill
from sidecar.call import AttemptRecord, Call
from sidecar.usage.json_lines import double_json, timestamp_json

SCHEMA = "sidecar.usage.v1.UsageRecord"


def new_event_id(now: float | None = None) -> str:
    """A UUIDv7: 48 bits of Unix milliseconds, then random bits; sortable by time, unique."""
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)        # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)        # variant 10
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


class Usage(NamedTuple):
    """The usage record of one ended call, as plain values: what the sinks and the audit store
    are handed. Cheap to make on the call's path (a tuple); each consumer then makes the form
    it needs, off that path when it can: `record()` (the protobuf message: Kafka's payload, the
    audit record's) or `json()` (the usage file's line). Field for field `UsageRecord`."""

    event_id: str = ""
    request_id: str = ""
    trace_id: str = ""
    org: str = ""
    api_key_id: str = ""
    model: str = ""
    backend: str = ""
    status: str = ""
    reason: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    usage_estimated: bool = False
    started_ns: int | None = None          # started_at, in Unix nanoseconds; None: not set
    duration_ms: float = 0.0
    overhead_ms: float = 0.0
    attempts: tuple[AttemptRecord, ...] = ()
    streamed: bool = False
    schema: str = ""
    protocol: str = ""

    def record(self) -> usage_pb2.UsageRecord:
        """The protobuf message (nested messages given as dicts: upb builds them in place)."""
        started = None
        if self.started_ns is not None:
            seconds, nanos = divmod(self.started_ns, 1_000_000_000)
            started = {"seconds": seconds, "nanos": nanos}
        return usage_pb2.UsageRecord(
            event_id=self.event_id, request_id=self.request_id, trace_id=self.trace_id, org=self.org,
            api_key_id=self.api_key_id, model=self.model, backend=self.backend, status=self.status,
            reason=self.reason, input_tokens=self.input_tokens, output_tokens=self.output_tokens,
            usage_estimated=self.usage_estimated, started_at=started, duration_ms=self.duration_ms,
            overhead_ms=self.overhead_ms,
            attempts=[{"backend": a.backend, "status": a.status, "duration_ms": a.duration_ms} for a in self.attempts],
            streamed=self.streamed, schema=self.schema, protocol=self.protocol)

    def json(self) -> dict[str, Any]:
        """What `json_format.MessageToDict(self.record(), preserving_proto_field_name=True)` gives
        (a test compares them): proto3 leaves out default values, fields go in number order,
        started_at is RFC 3339. Without building the message: a line of the usage file costs
        a few µs instead of ~20."""
        out: dict[str, Any] = {}
        for name in _STRINGS_1_TO_9:
            value = getattr(self, name)
            if value:
                out[name] = value
        if self.input_tokens:
            out["input_tokens"] = self.input_tokens
        if self.output_tokens:
            out["output_tokens"] = self.output_tokens
        if self.usage_estimated:
            out["usage_estimated"] = True
        if self.started_ns is not None:
            seconds, nanos = divmod(self.started_ns, 1_000_000_000)
            out["started_at"] = timestamp_json(seconds, nanos)
        if _present(self.duration_ms):
            out["duration_ms"] = double_json(self.duration_ms)
        if _present(self.overhead_ms):
            out["overhead_ms"] = double_json(self.overhead_ms)
        if self.attempts:
            out["attempts"] = [_attempt_json(a) for a in self.attempts]
        if self.streamed:
            out["streamed"] = True
        if self.schema:
            out["schema"] = self.schema
        if self.protocol:
            out["protocol"] = self.protocol
        return out


_STRINGS_1_TO_9 = ("event_id", "request_id", "trace_id", "org", "api_key_id", "model", "backend", "status", "reason")


def _present(value: float) -> bool:
    """A proto3 double is written unless it is +0.0 (protobuf compares the bits: -0.0 is written)."""
    return bool(value) or math.copysign(1.0, value) < 0


def _attempt_json(attempt: AttemptRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if attempt.backend:
        out["backend"] = attempt.backend
    if attempt.status:
        out["status"] = attempt.status
    if _present(attempt.duration_ms):
        out["duration_ms"] = double_json(attempt.duration_ms)
    return out


def usage_of(call: Call, ended: float) -> Usage:
    """`ended` is `time.perf_counter()` when the call ended. Tokens are what the call is billed
    (`billing.bill`: the limit store settles the same numbers)."""
    duration_ms = (ended - call.started) * 1000
    backend_ms = sum(a.duration_ms for a in call.attempts)
    billed = bill(call)
    return Usage(
        new_event_id(), call.request_id, call.trace_id, call.org, call.api_key_id, call.request.model,
        call.attempts[-1].backend if call.attempts else "",
        call.status if call.status != "UNKNOWN" else "CANCELLED", call.reason,
        billed.input_tokens, billed.output_tokens, billed.estimated, int(call.started_wall * 1e9),
        round(duration_ms, 3), round(max(0.0, duration_ms - backend_ms), 3), tuple(call.attempts),
        call.streamed, SCHEMA, call.protocol)


def build_record(call: Call, ended: float) -> usage_pb2.UsageRecord:
    """The protobuf usage record of an ended call."""
    return usage_of(call, ended).record()


def started_seconds(payload: bytes) -> float:
    """The `started_at` of a serialized record, in Unix seconds (0.0 when it cannot be read)."""
    try:
        record = usage_pb2.UsageRecord.FromString(payload)
    except Exception:  # noqa: BLE001 - a payload that does not parse is still spooled and sent
        return 0.0
    return record.started_at.seconds + record.started_at.nanos / 1e9
