"""Traces: W3C trace context in and out, parent-based sampling, spans exported over OTLP/gRPC.

Every call gets a trace id (the caller's `traceparent`, or a new one) and a server span id, so
log lines, usage records and the backend share one id whether or not the call is sampled.

Sampling is parent-based: a caller's `traceparent` decides with its sampled flag; a new trace
is sampled when its id falls in `telemetry.sample_ratio` (the low 64 bits of the id against the
ratio, as OpenTelemetry's TraceIdRatioBased does, so every hop decides the same). Without
`telemetry.otlp_endpoint` nothing is sampled and the caller's context is passed on untouched.

A sampled call records its spans as plain tuples while it runs: one per traced pipeline stage
(auth, limits, route), one client span per backend attempt — whose id goes to the backend as
the parent in `traceparent` — and one for the usage hand-off. When the call has ended,
`Tracer.finish` adds the server span and queues the lot. The exporter task turns the queue into
one OTLP `ExportTraceServiceRequest` per batch (every second, or at once when 512 spans wait)
and sends it; one export is in flight at a time. The channel (otlp_channel.py) is TLS for an
`https://` endpoint, with `telemetry.otlp_tls`, and is built anew when those files change.
Nothing of that runs on the call path, and a dead or hanging collector only costs spans: the
queue is bounded (`max_queued_spans`), what does not fit or fails to export is dropped and
counted, and calls never wait for it.

Spans are built straight into OTLP protobufs rather than through the OpenTelemetry SDK: the
SDK's span objects cost ~70 µs of CPU per sampled call on the call path and ~90 µs more to
encode; here a sampled call costs ~27 µs in all on its path and ~80 µs more with its export
(`bench/trace_cost.py`, numbers in bench/README.md).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2

from sidecar import __version__
from sidecar.telemetry.metrics import TRACE_SPANS_DROPPED, TRACE_SPANS_EXPORTED
from sidecar.telemetry.otlp_channel import OtlpChannel
from sidecar.telemetry.trace_context import Span, new_span_id

if TYPE_CHECKING:
    from sidecar.call import Call
    from sidecar.config import Config, TelemetryConfig

log = logging.getLogger("sidecar.tracing")

INTERNAL, SERVER, CLIENT = (trace_pb2.Span.SPAN_KIND_INTERNAL, trace_pb2.Span.SPAN_KIND_SERVER,
                            trace_pb2.Span.SPAN_KIND_CLIENT)
BATCH_SPANS = 512            # export at once when this many spans wait
EXPORT_INTERVAL = 1.0        # otherwise every second
_CALLS_PER_SLICE = 4        # calls' spans built between two yields to the event loop (~0.1 ms)
# attributes whose values are bounded (config, codes): their protobufs are built once and reused
_BOUNDED_KEYS = frozenset({"rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code", "server.address",
                           "server.port", "sidecar.backend", "sidecar.org", "sidecar.api_key_id",
                           "sidecar.routing_decision", "sidecar.reason", "sidecar.attempts", "gen_ai.request.model",
                           "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"})
_GRPC_CODES = {code.name: code.value[0] for code in grpc.StatusCode}
# server spans: the codes that mean the server failed (OTel RPC conventions); others are the caller's
_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                            "DATA_LOSS"})

# --- recording, on the call path (sampled calls only) ---------------------------------------------

def record(call: Call, name: str, kind: int, start_ns: int, attributes: tuple[tuple[str, Any], ...] = (),
           error: str = "", span_id: str = "") -> None:
    """Adds one finished child span of the call's server span (ending now)."""
    assert call.spans is not None
    call.spans.append((span_id or new_span_id(), call.span_id, name, kind, start_ns, time.time_ns(), attributes,
                       error))


def attempt_attributes(call: Call, address: str, backend: str, code: str) -> tuple[tuple[str, Any], ...]:
    """A backend attempt's client span: the RPC conventions, plus which backend it was."""
    host, _, port = address.rpartition(":")
    return (("rpc.system", "grpc"), ("rpc.service", call.service), ("rpc.method", call.method),
            ("rpc.grpc.status_code", _GRPC_CODES.get(code, 2)), ("server.address", host.strip("[]")),
            ("server.port", int(port) if port.isdigit() else 0), ("sidecar.backend", backend),
            ("gen_ai.request.model", call.request.model))


# --- the server span and the exporter ------------------------------------------------------------

class Tracer:
    """Samples calls, finishes their traces and exports them (see the module docstring).

    `sampling()` is what the server asks for each new call: None when tracing is off, else the
    configured ratio (read from the running config, so a reload changes it)."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        telemetry = config().telemetry
        self.endpoint = telemetry.otlp_endpoint
        self._queue: list[tuple[str, tuple[Span, ...]]] = []  # (trace id, spans) per call
        self._queued_spans = 0
        self._ready = asyncio.Event()
        self._tls = telemetry.otlp_tls
        self._otlp: OtlpChannel | None = None  # from `run`: the channel and its Export
        self._headers = tuple((k.lower(), v) for k, v in telemetry.otlp_headers.items())
        self._timeout = telemetry.export_timeout_ms / 1000.0
        self._max_spans = telemetry.max_queued_spans
        self._resource = _resource(telemetry)
        self._failing = False
        self._attributes: dict[tuple[str, Any], KeyValue] = {}
        self.exported = 0

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)

    def sampling(self) -> float | None:
        return self._config().telemetry.sample_ratio if self.endpoint else None

    # -- the finisher --

    def __call__(self, call: Call) -> None:
        """Pipeline finisher (the last one): the server span, then the call's spans to the queue."""
        spans = call.spans
        if spans is None:
            return
        status = call.status if call.status != "UNKNOWN" else "CANCELLED"
        attributes: list[tuple[str, Any]] = [
            ("rpc.system", "grpc"), ("rpc.service", call.service), ("rpc.method", call.method),
            ("rpc.grpc.status_code", _GRPC_CODES.get(status, 2)), ("sidecar.request_id", call.request_id),
            ("sidecar.attempts", len(call.attempts))]
        if call.org:
            attributes += (("sidecar.org", call.org), ("sidecar.api_key_id", call.api_key_id))
        if call.request.model:
            attributes.append(("gen_ai.request.model", call.request.model))
        if call.attempts:
            attributes.append(("sidecar.backend", call.attempts[-1].backend))
        if call.routing_decision:
            attributes.append(("sidecar.routing_decision", call.routing_decision))
        if call.reason:
            attributes.append(("sidecar.reason", call.reason))
        usage = call.reported if status == "OK" else None
        if usage is not None:
            attributes += (("gen_ai.usage.input_tokens", usage[0]), ("gen_ai.usage.output_tokens", usage[1]))
        error = f"{status}: {call.reason}" if status in _SERVER_ERRORS else ""
        server: Span = (call.span_id, call.parent_span_id, f"{call.service}/{call.method}", SERVER,
                        int(call.started_wall * 1e9), time.time_ns(), tuple(attributes), error)
        self._enqueue((server, *spans), call.trace_id)

    def _enqueue(self, spans: tuple[Span, ...], trace_id: str) -> None:
        if self._queued_spans + len(spans) > self._max_spans:
            TRACE_SPANS_DROPPED.labels("queue_full").inc(len(spans))
            return
        self._queue.append((trace_id, spans))
        self._queued_spans += len(spans)
        if self._queued_spans >= BATCH_SPANS:
            self._ready.set()

    # -- the exporter --

    async def run(self) -> None:
        """The exporter task: one batch per second, or as soon as a full batch waits."""
        if not self.endpoint:
            return
        self._otlp = OtlpChannel(self.endpoint, self._tls)
        while True:
            try:
                await asyncio.wait_for(self._ready.wait(), EXPORT_INTERVAL)
            except TimeoutError:
                pass
            await self._otlp.refresh()  # rotated TLS files: the next exports use a new channel
            await self.flush()

    async def flush(self, timeout: float | None = None) -> None:
        """Exports what is queued now, in batches; drops (and counts) what the collector refuses."""
        otlp = self._otlp
        while self._queue and otlp is not None:
            take = spans = 0
            for _, queued in self._queue:
                if spans >= BATCH_SPANS:
                    break
                spans += len(queued)
                take += 1
            batch, self._queue = self._queue[:take], self._queue[take:]
            self._queued_spans -= spans
            self._ready.clear()
            if otlp.channel is None or otlp.export is None:
                TRACE_SPANS_DROPPED.labels("export_failed").inc(spans)  # no channel: its TLS files do not load
                continue
            if otlp.channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                # the collector is known to be down (the channel retries it in the background):
                # dropped without building a request nobody will take
                TRACE_SPANS_DROPPED.labels("export_failed").inc(spans)
                continue
            request = await self._request(batch)
            try:
                await otlp.export(request, timeout=timeout or self._timeout, metadata=self._headers)
            except (TimeoutError, grpc.aio.AioRpcError) as exc:
                TRACE_SPANS_DROPPED.labels("export_failed").inc(spans)
                if not self._failing:
                    self._failing = True
                    log.warning("trace export failing; spans are dropped until the collector answers",
                                extra={"endpoint": self.endpoint, "error": _describe(exc), "spans": spans})
                continue
            TRACE_SPANS_EXPORTED.inc(spans)
            self.exported += spans
            if self._failing:
                self._failing = False
                log.info("trace export recovered", extra={"endpoint": self.endpoint})

    async def _request(self, batch: Sequence[tuple[str, tuple[Span, ...]]]) -> Any:
        """One OTLP request for the batch; yields to the event loop every few calls, so that
        building a large batch never holds up the calls being served."""
        request = trace_service_pb2.ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        resource_spans.resource.CopyFrom(self._resource)
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.CopyFrom(_SCOPE)
        out = scope_spans.spans
        attribute = self._attribute
        for n, (trace_id, spans) in enumerate(batch):
            if n % _CALLS_PER_SLICE == _CALLS_PER_SLICE - 1:
                await asyncio.sleep(0)
            tid = bytes.fromhex(trace_id)
            for span_id, parent, name, kind, start, end, attributes, error in spans:
                span = out.add(trace_id=tid, span_id=bytes.fromhex(span_id), name=name, kind=kind,
                               start_time_unix_nano=start, end_time_unix_nano=end,
                               attributes=[attribute(k, v) for k, v in attributes])
                if parent:
                    span.parent_span_id = bytes.fromhex(parent)
                if error:
                    span.status.code = trace_pb2.Status.STATUS_CODE_ERROR
                    span.status.message = error
        return request

    def _attribute(self, key: str, value: Any) -> KeyValue:
        """Attributes whose values come from config or small fixed sets are built once."""
        if key not in _BOUNDED_KEYS:
            return _attribute(key, value)
        made = self._attributes.get((key, value))
        if made is None:
            if len(self._attributes) >= 4096:
                self._attributes.clear()
            made = self._attributes[(key, value)] = _attribute(key, value)
        return made

    async def aclose(self) -> None:
        """At shutdown: a last export (a short wait), then the channel closes."""
        if self._otlp is None:
            return
        try:
            await asyncio.wait_for(self.flush(timeout=min(self._timeout, 2.0)), 3.0)
        except TimeoutError:
            pass  # a collector that does not answer: what is left goes with the process
        await self._otlp.aclose()

    def __repr__(self) -> str:
        return f"<Tracer {self.endpoint or 'off'} queued={self._queued_spans} exported={self.exported}>"


_SCOPE = InstrumentationScope(name="sidecar", version=__version__)


def _resource(telemetry: TelemetryConfig) -> Resource:
    attributes = {"service.name": telemetry.service_name, "service.version": __version__,
                  "telemetry.sdk.language": "python", "telemetry.sdk.name": "sidecar",
                  **telemetry.resource_attributes}
    return Resource(attributes=[_attribute(k, v) for k, v in attributes.items()])


def _attribute(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return type(exc).__name__
