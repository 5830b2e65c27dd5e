"""The floor: the least per-call work of the sidecar's feature sets, written inline in one handler.

    python bench/floor_hop.py --listen 127.0.0.1:7003 --backend 127.0.0.1:7000 --features min
    python bench/floor_hop.py ... --features full --otlp 127.0.0.1:4317 --dir /tmp/floor

Not a sidecar: a measuring stick for `bench/floor.py`. It is the reference+rid hop
(bench/reference_proxy.py --request-id) plus, per call, what the contract makes every call pay
in a feature set, done the cheapest way Python allows: one function, local variables, no
objects of its own, everything that can wait batched.

- min: the caller's metadata read (x-request-id, credentials, traceparent); the request parsed
  for its model; a request id, trace id and span id (one urandom); the backend called with the
  deadline, x-request-id and traceparent; the id echoed in the response headers; the answer's
  usage read; the six metric updates of a call (handled, handling seconds, overhead, backend
  requests, backend duration, routing decision); the call kept for audit lookups (10,000).
- full: min, plus the API key checked (sha256, cached per key), an org request rate, token rate
  and daily token budget reserved and settled to the reported usage, a usage record (a JSON line,
  written by a thread every 50 ms), an access log line (JSON, written every 50 ms) and traces
  sampled at 0.1 (a server and a client span, exported over OTLP every second).

What it leaves out is everything else the sidecar does per call (retries and failover, health
and outlier tracking, in-flight accounting for the drain, deadline and cancellation accounting,
error mapping, decisions for audit, per-stage spans, finisher isolation, config reloads): the
sidecar's cost above this floor is the price of those and of its structure.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from reference_proxy import serve_until_signalled
from sidecar_client.inference.v1.inference_pb2 import InferRequest, InferResponse

SERVICE = "inference.v1.Inference"
API_KEY_SHA256 = hashlib.sha256(b"bench-key-0123456789").hexdigest()  # bench/latency.py's key
AUDIT_RECORDS = 10_000
FLUSH_SECONDS = 0.05
SAMPLE_BELOW = int(0.1 * 2**64)  # traces at 0.1: the trace id's low 64 bits under this
ACCESS_KEYS = ("ts", "request_id", "trace_id", "span_id", "method", "org", "api_key_id", "model", "backend",
               "attempts", "routing_decision", "status", "duration_ms", "overhead_ms", "sampled")


class Bucket:
    """One GCRA-style rate or budget: `level` units used, refilled at `per_second`."""

    __slots__ = ("capacity", "level", "per_second", "seen")

    def __init__(self, capacity: float, per_second: float, now: float) -> None:
        self.capacity, self.per_second, self.level, self.seen = capacity, per_second, 0.0, now


async def serve(args: argparse.Namespace) -> None:
    full = args.features == "full"
    registry = CollectorRegistry()
    handled = Counter("grpc_server_handled_total", "", ["code"], registry=registry).labels("OK")
    handling = Histogram("grpc_server_handling_seconds", "", registry=registry)
    overhead = Histogram("sidecar_overhead_seconds", "", registry=registry)
    backend_requests = Counter("backend_requests_total", "", ["code"], registry=registry).labels("OK")
    backend_seconds = Histogram("backend_duration_seconds", "", registry=registry)
    decisions = Counter("routing_decisions_total", "", ["decision"], registry=registry).labels("primary")
    channel = grpc.aio.insecure_channel(args.backend)
    infer = channel.unary_unary(f"/{SERVICE}/Infer")
    audit: collections.OrderedDict[str, tuple[Any, ...]] = collections.OrderedDict()
    keys: dict[str, tuple[str, str] | None] = {}  # raw key -> (org, key id), after one sha256
    now = time.monotonic()
    rpm, tpm, per_day = Bucket(1e9, 1e9 / 60, now), Bucket(1e12, 1e12 / 60, now), Bucket(1e15, 0.0, now)
    usage_lines: list[dict[str, Any]] = []
    access_lines: list[tuple[Any, ...]] = []
    spans: list[tuple[Any, ...]] = []

    def take(bucket: Bucket, amount: float, at: float) -> bool:
        bucket.level = max(0.0, bucket.level - (at - bucket.seen) * bucket.per_second)
        bucket.seen = at
        if bucket.level + amount > bucket.capacity:
            return False
        bucket.level += amount
        return True

    async def unary(raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        started = time.perf_counter()
        request_id = api_key = parent = None
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id":
                request_id = value
            elif key == "authorization":
                api_key = value[7:]
            elif key == "traceparent":
                parent = value
        request = InferRequest.FromString(raw)
        if not request.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model")
        ids = os.urandom(40).hex()
        request_id = request_id or ids[:32]
        trace_id, span_id = ids[32:64], ids[64:80]
        org = key_id = ""
        estimate = 0
        if full:
            identity = keys.get(api_key or "")
            if identity is None:
                sha = hashlib.sha256((api_key or "").encode()).hexdigest()
                identity = keys[api_key or ""] = ("bench", "bench") if sha == API_KEY_SHA256 else None
            if identity is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
            org, key_id = identity  # type: ignore[misc]
            at = time.monotonic()
            estimate = len(request.input) // 4 + (request.max_output_tokens or 256)
            if not (take(rpm, 1, at) and take(tpm, estimate, at) and take(per_day, estimate, at)):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit")
        sampled = full and int(trace_id[16:], 16) < SAMPLE_BELOW
        if parent is None:
            parent = f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"
        remaining = context.time_remaining()
        span_start = time.time_ns()
        backend_started = time.perf_counter()
        call = infer(raw, timeout=30.0 if remaining is None else min(30.0, remaining),
                     metadata=(("x-request-id", request_id), ("traceparent", parent)))
        await context.send_initial_metadata((("x-request-id", request_id),))
        response = await call
        ended = time.perf_counter()
        usage = InferResponse.FromString(response).usage
        input_tokens, output_tokens = usage.input_tokens, usage.output_tokens
        backend = ended - backend_started
        decisions.inc()
        backend_requests.inc()
        backend_seconds.observe(backend)
        handled.inc()
        handling.observe(ended - started)
        overhead.observe(ended - started - backend)
        audit[request_id] = (request_id, trace_id, org, key_id, request.model, "a", "OK", input_tokens,
                             output_tokens, started, ended, backend)
        if len(audit) > AUDIT_RECORDS:
            audit.popitem(last=False)
        if full:
            actual = input_tokens + output_tokens
            tpm.level += actual - estimate
            per_day.level += actual - estimate
            wall = time.time()
            duration_ms = round((ended - started) * 1000, 3)
            usage_lines.append({"event_id": ids[:32], "request_id": request_id, "trace_id": trace_id, "org": org,
                                "api_key_id": key_id, "model": request.model, "backend": "a", "status": "OK",
                                "input_tokens": input_tokens, "output_tokens": output_tokens, "started_at": wall,
                                "duration_ms": duration_ms, "attempts": [{"backend": "a", "status": "OK",
                                "duration_ms": round(backend * 1000, 3)}]})
            access_lines.append((wall, request_id, trace_id, span_id, "Infer", org, key_id, request.model, "a", 1,
                                 "primary", "OK", duration_ms, round((ended - started - backend) * 1000, 3), sampled))
            if sampled:
                spans.append((trace_id, span_id, span_start, time.time_ns(), request.model, org))
        return response

    def write_usage(lines: list[dict[str, Any]], out: Any) -> None:
        out.write("".join(json.dumps(line) + "\n" for line in lines).encode())

    async def flush_records(directory: Path) -> None:
        nonlocal usage_lines, access_lines
        usage_file = (directory / "usage.jsonl").open("ab", buffering=0)
        access_file = (directory / "access.log").open("a")
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            lines, usage_lines = usage_lines, []
            if lines:
                await asyncio.to_thread(write_usage, lines, usage_file)
            entries, access_lines = access_lines, []
            if entries:
                access_file.write("".join(json.dumps(dict(zip(ACCESS_KEYS, entry, strict=True))) + "\n"
                                          for entry in entries))
                access_file.flush()

    async def export_spans(otlp: str) -> None:
        nonlocal spans
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
        from opentelemetry.proto.trace.v1 import trace_pb2

        stub = trace_service_pb2_grpc.TraceServiceStub(grpc.aio.insecure_channel(otlp))
        while True:
            await asyncio.sleep(1.0)
            batch, spans = spans, []
            if not batch:
                continue
            request = trace_service_pb2.ExportTraceServiceRequest()
            scope = request.resource_spans.add().scope_spans.add()
            for trace_id, span_id, start, end, model, org in batch:
                trace, server = bytes.fromhex(trace_id), bytes.fromhex(span_id)
                attributes = [{"key": "gen_ai.request.model", "value": {"string_value": model}},
                              {"key": "sidecar.org", "value": {"string_value": org}}]
                scope.spans.add(trace_id=trace, span_id=server, name=f"{SERVICE}/Infer", attributes=attributes,
                                kind=trace_pb2.Span.SPAN_KIND_SERVER, start_time_unix_nano=start,
                                end_time_unix_nano=end)
                scope.spans.add(trace_id=trace, span_id=os.urandom(8), parent_span_id=server, name=f"{SERVICE}/Infer",
                                kind=trace_pb2.Span.SPAN_KIND_CLIENT, start_time_unix_nano=start,
                                end_time_unix_nano=end)
            await stub.Export(request, timeout=5)

    background = []
    if full:
        background.append(asyncio.create_task(flush_records(args.dir)))
        if args.otlp:
            background.append(asyncio.create_task(export_spans(args.otlp)))
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Infer": grpc.unary_unary_rpc_method_handler(unary)})
    await serve_until_signalled(grpc.aio.server(handlers=(handler,)), args.listen)
    for task in background:
        task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on")
    parser.add_argument("--backend", required=True, help="HOST:PORT of the Inference backend")
    parser.add_argument("--features", choices=("min", "full"), default="min")
    parser.add_argument("--otlp", help="HOST:PORT of an OTLP/gRPC receiver (full)")
    parser.add_argument("--dir", type=Path, default=Path("."), help="where full writes usage.jsonl and access.log")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (as the sidecar does)")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
