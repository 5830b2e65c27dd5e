"""The usage record of one call: built once, when the call has ended, from what the `Call` knows.

One `sidecar.usage.v1.UsageRecord` per call that passed authentication, denials included
(CONTRACT §6). Tokens are what the call is billed (billing.py): the backend's reported `Usage`
(clamped to what the call could use); the sidecar's estimate, flagged `usage_estimated`, for
every attempt the backend may have worked on without a readable report (a failure, a cut
stream, a cancellation, a backend that does not count); zero for a call no backend worked on. `overhead_ms` is the call's
time minus the time its backend attempts took: what the sidecar itself cost.
"""
from __future__ import annotations

import os
import time

from google.protobuf.timestamp_pb2 import Timestamp
from sidecar_client.sidecar.usage.v1 import usage_pb2

from sidecar.billing import bill
from sidecar.call import Call

SCHEMA = "sidecar.usage.v1.UsageRecord"


def new_event_id(now: float | None = None) -> str:
    """A UUIDv7: 48 bits of Unix milliseconds, then random bits; sortable by time, unique."""
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)        # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)        # variant 10
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def build_record(call: Call, ended: float) -> usage_pb2.UsageRecord:
    """`ended` is `time.perf_counter()` when the call ended. Tokens are what the call is billed
    (`billing.bill`: the limit store settles the same numbers)."""
    duration_ms = (ended - call.started) * 1000
    backend_ms = sum(a.duration_ms for a in call.attempts)
    billed = bill(call)
    started = Timestamp()
    started.FromNanoseconds(int(call.started_wall * 1e9))
    return usage_pb2.UsageRecord(
        event_id=new_event_id(), request_id=call.request_id, trace_id=call.trace_id, org=call.org,
        api_key_id=call.api_key_id, model=call.request.model,
        backend=call.attempts[-1].backend if call.attempts else "",
        status=call.status if call.status != "UNKNOWN" else "CANCELLED", reason=call.reason,
        input_tokens=billed.input_tokens, output_tokens=billed.output_tokens, usage_estimated=billed.estimated,
        started_at=started, duration_ms=round(duration_ms, 3),
        overhead_ms=round(max(0.0, duration_ms - backend_ms), 3),
        attempts=[usage_pb2.Attempt(backend=a.backend, status=a.status, duration_ms=a.duration_ms)
                  for a in call.attempts],
        streamed=call.streamed, schema=SCHEMA, protocol=call.protocol)


def started_seconds(payload: bytes) -> float:
    """The `started_at` of a serialized record, in Unix seconds (0.0 when it cannot be read)."""
    try:
        record = usage_pb2.UsageRecord.FromString(payload)
    except Exception:  # noqa: BLE001 - a payload that does not parse is still spooled and sent
        return 0.0
    return record.started_at.seconds + record.started_at.nanos / 1e9
