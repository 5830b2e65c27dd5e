"""RecordUsage: the finisher that turns every authenticated call into a usage record.

Runs once per call when it has ended (served, failed, refused by limits or budgets, cancelled);
calls that never passed authentication have no org and get no record (CONTRACT §6).
"""
from __future__ import annotations

import time

from sidecar.call import Call
from sidecar.usage.record import build_record
from sidecar.usage.sinks import UsageSink


class RecordUsage:
    def __init__(self, sink: UsageSink) -> None:
        self._sink = sink
        self._enabled = sink.name != "none"

    def __call__(self, call: Call) -> None:
        if self._enabled and call.org:
            self._sink.submit(build_record(call, time.perf_counter()))
