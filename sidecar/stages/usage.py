"""RecordUsage: the finisher that turns every authenticated call into a usage record and an
audit record.

Runs once per call when it has ended (served, failed, refused by limits or budgets, cancelled);
calls that never passed authentication have no org and get neither (CONTRACT §6). The usage
record goes to the sink, and inside the call's audit record (decisions, attempts) to the
audit store that `Audit.GetRequest` reads.
"""
from __future__ import annotations

import time

from sidecar.call import Call
from sidecar.usage.audit import AuditStore, audit_record
from sidecar.usage.record import build_record
from sidecar.usage.sinks import UsageSink


class RecordUsage:
    def __init__(self, sink: UsageSink, audit: AuditStore) -> None:
        self._sink = sink
        self._audit = audit

    def __call__(self, call: Call) -> None:
        if not call.org:
            return
        record = build_record(call, time.perf_counter())
        self._sink.submit(record)
        self._audit.put(audit_record(record, call))
