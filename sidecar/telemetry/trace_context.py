"""W3C trace context: ids, `traceparent` parsing and writing, ratio sampling; and the shape of a
recorded span. Pure functions that `call.py` needs when a call arrives, kept apart from the
exporter (`tracing.py`) so that neither imports the other's users.
"""
from __future__ import annotations

import os
from typing import Any

_RATIO_SCALE = 1 << 64

# one recorded span: (span_id, parent_span_id, name, kind, start_ns, end_ns, attributes, error)
Span = tuple[str, str, str, int, int, int, tuple[tuple[str, Any], ...], str]


def new_trace_id() -> str:
    return os.urandom(16).hex()


def new_span_id() -> str:
    return os.urandom(8).hex()


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """`00-<trace id>-<parent id>-<flags>` -> (trace id, parent span id, sampled), or None when
    it is not a valid W3C traceparent (then the call starts a new trace)."""
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version, trace_id, parent_id, flags = value[:2], value[3:35].lower(), value[36:52].lower(), value[53:55]
    if version == "ff" or (version == "00" and len(value) != 55):
        return None
    try:
        if int(trace_id, 16) == 0 or int(parent_id, 16) == 0:
            return None
        sampled = bool(int(flags, 16) & 1)
        int(version, 16)
    except ValueError:
        return None
    return trace_id, parent_id, sampled


def traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def sampled_by_ratio(trace_id: str, ratio: float) -> bool:
    """OpenTelemetry's TraceIdRatioBased: the id's low 64 bits below ratio x 2^64."""
    return int(trace_id[16:], 16) < ratio * _RATIO_SCALE
