"""Usage: the stage that refuses calls whose usage record could not be kept, and the finisher
that turns every authenticated call into a usage record and an audit record.

`UsageCapacity` runs right after authentication: while the spool is full (`on_spool_full:
reject`) or the disk refuses writes, a call fails UNAVAILABLE/`SERVICE_UNAVAILABLE` before it
costs a limit or reaches a backend: no unbilled traffic. Such a refused call is not billable,
and its record is not spooled either (the spool has no room): it is counted as dropped.

`RecordUsage` runs once per call when it has ended (served, failed, refused, cancelled); calls
that never passed authentication have no org and get neither record (CONTRACT §6). The usage
record goes to the sink, and inside the call's audit record (decisions, attempts) to the
audit store that `Audit.GetRequest` reads. Under strict durability it returns the sink's
"on disk" awaitable, which the server awaits before the response completes.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable

from sidecar.call import Call
from sidecar.errors import SidecarError
from sidecar.telemetry import tracing
from sidecar.telemetry.metrics import USAGE_RECORDS_DROPPED
from sidecar.usage.audit import AuditStore
from sidecar.usage.record import usage_of
from sidecar.usage.sinks import UsageSink

REFUSED_REASON = "usage spool is full"


class UsageCapacity:
    def __init__(self, sink: UsageSink) -> None:
        self._sink = sink

    async def __call__(self, call: Call) -> None:
        if self._sink.refusing():
            call.keep_usage_record = False
            call.decide("usage", "refused", REFUSED_REASON)
            raise SidecarError("SERVICE_UNAVAILABLE", "usage records cannot be kept right now (the usage spool is "
                               "full or not writable); retry later")


class RecordUsage:
    def __init__(self, sink: UsageSink, audit: AuditStore) -> None:
        self._sink = sink
        self._audit = audit

    def __call__(self, call: Call) -> Awaitable[None] | None:
        if not call.org:
            return None
        started = time.time_ns() if call.spans is not None else 0
        usage = usage_of(call, time.perf_counter())
        self._audit.put(usage, call)
        if not call.keep_usage_record:
            USAGE_RECORDS_DROPPED.labels("refused_call").inc()
            return None
        wait = self._sink.submit(usage)
        if started:  # the hand-off's span: the records built and queued
            tracing.record(call, "sidecar.usage", tracing.INTERNAL, started, (("sidecar.event_id", usage.event_id),))
        return wait
