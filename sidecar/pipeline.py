"""The order of the stages a call passes before it is proxied, written in one place.

Each stage is an `async def __call__(call)` that fills in the `Call` or raises a `SidecarError`.
The proxy itself (unary or stream) runs after the last stage, in `server.py`. Finishers run
once when the call has ended, however it ended (refused, failed, cancelled or served:
`server.CallScope` runs them); they must not block: what needs I/O is queued (the limit store
batches settlements). Each finisher runs even if one before it raised: that one is logged and
counted (`api_router_call_finisher_errors_total`), so a broken settlement cannot cost a call
its usage record, metrics or log line. A finisher may return an awaitable the response must
wait for (strict usage durability); `finish` returns it.

A stage with a `span_name` gets a child span of the call's server span when the call is
sampled (see telemetry/tracing.py); unsampled calls run the plain loop.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sidecar.call import Call
from sidecar.config import Config
from sidecar.limits.store import LimitStore
from sidecar.routing.router import Router
from sidecar.stages.auth import Authenticate
from sidecar.stages.limits import Limits
from sidecar.stages.route import PickBackend, ResolveModel
from sidecar.stages.usage import RecordUsage, UsageCapacity
from sidecar.telemetry.grpc_server import ObserveInference
from sidecar.telemetry.logging import AccessLog
from sidecar.telemetry.metrics import CALL_FINISHER_ERRORS
from sidecar.telemetry.tracing import INTERNAL, Tracer, record
from sidecar.usage.audit import AuditStore
from sidecar.usage.sinks import UsageSink

Stage = Callable[[Call], Awaitable[None]]
Finisher = Callable[[Call], Awaitable[None] | None]
log = logging.getLogger("sidecar.pipeline")
FAILURE_LOG_SECONDS = 60.0  # a finisher that keeps failing logs its traceback once a minute


class Pipeline:
    def __init__(self, stages: Sequence[Stage], finishers: Sequence[Finisher] = ()) -> None:
        self.stages = tuple(stages)
        self.finishers = tuple(finishers)
        self._guarded = tuple(_Guarded(f) for f in finishers)
        self._traced_stages = tuple((s, getattr(s, "span_name", "")) for s in self.stages)

    async def admit(self, call: Call) -> None:
        if call.spans is None:
            for stage in self.stages:
                await stage(call)
            return
        for stage, span_name in self._traced_stages:
            if not span_name:
                await stage(call)
                continue
            started = time.time_ns()
            try:
                await stage(call)
            except BaseException as exc:
                record(call, span_name, INTERNAL, started, error=_failure(exc))
                raise
            record(call, span_name, INTERNAL, started)

    def finish(self, call: Call) -> Awaitable[None] | None:
        """Runs every finisher once, in order; returns what the response must wait for."""
        wait = None
        for guarded in self._guarded:
            try:
                wait = guarded.finisher(call) or wait
            except Exception as exc:  # noqa: BLE001 - one finisher's failure must not stop the others
                guarded.failed(call, exc)
        return wait

    def __repr__(self) -> str:
        return f"<Pipeline {' -> '.join(type(s).__name__ for s in self.stages)}>"


class _Guarded:
    """A finisher with its failure counter and log throttle."""

    __slots__ = ("_errors", "_logged_at", "_unlogged", "finisher", "name")

    def __init__(self, finisher: Finisher) -> None:
        self.finisher = finisher
        self.name: str = getattr(finisher, "__qualname__", None) or type(finisher).__name__
        self._errors: Any = CALL_FINISHER_ERRORS.labels(self.name)  # exists at 0 from the start
        self._logged_at = -FAILURE_LOG_SECONDS
        self._unlogged = 0

    def failed(self, call: Call, exc: Exception) -> None:
        self._errors.inc()
        now = time.monotonic()
        if now - self._logged_at < FAILURE_LOG_SECONDS:
            self._unlogged += 1
            return
        log.error("call finisher failed; the others ran", exc_info=exc, extra={
            "finisher": self.name, "request_id": call.request_id, "failures_not_logged": self._unlogged})
        self._logged_at, self._unlogged = now, 0


def _failure(exc: BaseException) -> str:
    reason = getattr(exc, "reason", "")
    return f"{reason}: {exc}" if reason else type(exc).__name__


def build_pipeline(config: Callable[[], Config], router: Router, limit_store: LimitStore,
                   usage: UsageSink, audit: AuditStore, tracer: Tracer, access_log: AccessLog) -> Pipeline:
    limits = Limits(config, limit_store)
    return Pipeline([
        # 1. authenticate first: nothing else runs, and nothing is spent, for an unknown caller.
        Authenticate(config),
        # 2. refuse while usage records cannot be kept (spool full): an unbilled call must not
        # run, and a refused one should cost nothing further. Only a sink that can refuse
        # (kafka, through its spool) puts this stage on the path.
        *([UsageCapacity(usage)] if usage.can_refuse else []),
        # 3. resolve the model: an unknown model costs no limit, and limits need its settings.
        ResolveModel(config),
        # 4. rate limits and budgets, in one store round trip: they need the org, key id and
        # model, and a refused call must not reach a backend.
        limits,
        # 5. pick a backend last: taking one is only worth it for a call every stage admitted.
        PickBackend(router),
    ], finishers=[
        # 1. settle what limits reserved, from the backend's reported usage
        limits.finish,
        # 2. the usage and audit records, for every call that passed authentication
        RecordUsage(usage, audit),
        # 3. grpc_server_handled_total / grpc_server_handling_seconds, for every call
        ObserveInference(),
        # 4. the access log line, with the call's trace and span ids
        access_log,
        # 5. last: the server span ends when everything above is done, and goes to the exporter
        tracer,
    ])


def build_probe_pipeline(config: Callable[[], Config], router: Router, tracer: Tracer,
                         access_log: AccessLog) -> Pipeline:
    """The stages of OIP's `ModelReady` and `ModelMetadata`: questions about a model, asked by
    clients (tritonclient, KServe tooling) before they infer, routed to one of its backends.
    Authenticated and allow-listed like a call, but neither rate limited nor billed, and without
    usage or audit records: they do no inference, and charging them would bill a client's probes."""
    return Pipeline([
        # 1. an unknown caller learns nothing about the models
        Authenticate(config),
        # 2. the model exists and is served over OIP
        ResolveModel(config),
        # 3. a healthy backend of it answers (with failover, like a call)
        PickBackend(router),
    ], finishers=[
        # grpc_server_handled_total, the access log line and the span, as for a call
        ObserveInference(),
        access_log,
        tracer,
    ])
