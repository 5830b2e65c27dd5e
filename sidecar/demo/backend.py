"""The reference backend: implements `inference.v1.Inference` and grpc health (with `--protocol
oip`, the Open Inference Protocol instead: demo/oip_backend.py).

Used by `sidecar demo`, the tests and the benchmark. Output is deterministic: the answer repeats
the input's words (or `token<i>` with no input) up to `--tokens` (capped by the request's
`max_output_tokens`); `input_tokens` counts whitespace words of the input; `output_tokens` is what
was generated. Knobs for tests and load tests:

- `--delay-ms N`: wait before answering (before the first chunk of a stream).
- `--prefix-cache-ms MS` (with `--prefix-bytes N`, default 256, and `--prefix-cache-entries E`,
  default 1024): a simulated prefix (KV) cache. The backend remembers the last E prefixes it
  served (the first N bytes of the input, taken as the sidecar's `affinity: prefix` takes them),
  and a call whose prefix it does not hold waits MS more before answering (before its first
  chunk), as a real backend pays the prefill of a prompt it has not cached. A prefix counts as
  held once that wait is over, so two calls that arrive together with a new prefix both pay it.
  A small E plays a GPU whose cache holds few long prompts. Off by default.
- `--fail-rate F` / `--fail-code CODE`: fail that share of calls with that gRPC code.
- `--chunk-bytes N`: add N bytes of `delta_bytes` to every streamed chunk (large streams).
- request `parameters` override per call: `delay_ms`, `fail_code`, `tokens`, `chunk_delay_ms`.
- request `parameters` that play a broken backend: `garble: true` answers (or ends a stream
  with) bytes that are not an `InferResponse`/`InferChunk`; `report_output_tokens: N` reports N
  output tokens whatever was generated.
- `--log-calls`: one JSON line per call on stdout when it starts (`call_started`: request id and
  the seconds left of the deadline it received) and when it ends (`call`: request id, metadata
  keys received, outcome `ok`, `failed` or `cancelled`, over mutual TLS `client_cn`, the
  common name of the certificate the caller presented, and with the prefix cache on
  `prefix_cache`: `hit` or `miss`).
- `--tls-cert FILE --tls-key FILE`: serve over TLS (PEM); `--client-ca FILE` also requires every
  caller to present a certificate signed by that CA (mutual TLS). Read once, at start.
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from sidecar_client.inference.v1 import inference_pb2
from sidecar_client.inference.v1.inference_pb2 import InferChunk, InferRequest, InferResponse, Usage

from sidecar.routing.affinity import input_prefix

Context = grpc.aio.ServicerContext[InferRequest, Any]
GARBAGE = b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"  # a field whose length varint never ends


@dataclass(frozen=True)
class DemoOptions:
    tokens: int = 8
    delay_ms: float = 0.0
    fail_rate: float = 0.0
    fail_code: str = "UNAVAILABLE"
    chunk_bytes: int = 0
    log_calls: bool = False
    seed: int | None = None
    tls_cert: str | None = None   # PEM files: with tls_key, serve over TLS
    tls_key: str | None = None
    client_ca: str | None = None  # require callers' certificates signed by this CA (mutual TLS)
    protocol: str = "inference_v1"  # or "oip": the Open Inference Protocol echo (oip_backend.py)
    models: tuple[str, ...] = ()     # oip: the models it serves (ModelReady); empty: every name
    prefix_cache_ms: float = 0.0     # > 0: the simulated prefix cache is on; a miss waits this long
    prefix_bytes: int = 256          # the prefix it caches, as models.<m>.prefix_bytes
    prefix_cache_entries: int = 1024  # the prefixes it holds, least recently used forgotten first


class PrefixCache:
    """The prefixes a backend has prefilled, the least recently used forgotten past `size`."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def hit(self, prefix: bytes) -> bool:
        """Whether `prefix` is cached (and then it becomes the most recently used)."""
        if prefix not in self._seen:
            return False
        self._seen.move_to_end(prefix)
        return True

    def add(self, prefix: bytes) -> None:
        self._seen[prefix] = None
        self._seen.move_to_end(prefix)
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


@dataclass(frozen=True)
class _Plan:
    """What one call will do, from the options and the request's parameters."""

    tokens: list[str]
    finish_reason: str
    delay: float
    chunk_delay: float
    fail_code: grpc.StatusCode | None
    garble: bool = False
    report_output_tokens: int | None = None


class DemoBackend:
    """`inference.v1.Inference`, registered by `add_backend_to_server` (it may answer raw bytes)."""

    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self._rng = random.Random(options.seed)
        self._padding = b"\x00" * options.chunk_bytes
        self.prefix_cache = PrefixCache(options.prefix_cache_entries) if options.prefix_cache_ms > 0 else None

    def _plan(self, request: InferRequest) -> _Plan:
        params: dict[str, Any] = dict(request.parameters.items()) if request.HasField("parameters") else {}
        limit = int(params.get("tokens", self.options.tokens))
        if request.max_output_tokens:
            cut = min(limit, request.max_output_tokens)
            finish = "length" if cut < limit else "stop"
            limit = cut
        else:
            finish = "stop"
        words = request.input.split() or ["token"]
        tokens = [words[i % len(words)] if request.input.split() else f"token{i}" for i in range(limit)]
        fail_code = params.get("fail_code")
        if fail_code is None and self.options.fail_rate and self._rng.random() < self.options.fail_rate:
            fail_code = self.options.fail_code
        reported = params.get("report_output_tokens")
        return _Plan(tokens, finish, float(params.get("delay_ms", self.options.delay_ms)) / 1000.0,
                     float(params.get("chunk_delay_ms", 0)) / 1000.0,
                     grpc.StatusCode[str(fail_code)] if fail_code else None, bool(params.get("garble")),
                     None if reported is None else int(reported))

    async def Infer(self, request: InferRequest, context: Context) -> InferResponse | bytes:
        plan = self._plan(request)
        async with self._observed("Infer", request, context) as observed:
            observed.prefix_cache = await self._prefill(request)
            await self._prelude(plan, context)
            if plan.garble:
                return GARBAGE
            return InferResponse(model=request.model, output=" ".join(plan.tokens), output_bytes=request.input_bytes,
                                 usage=Usage(input_tokens=len(request.input.split()),
                                             output_tokens=_reported(plan, len(plan.tokens))),
                                 finish_reason=plan.finish_reason)

    async def InferStream(self, request: InferRequest,
                          context: Context) -> AsyncIterator[InferChunk | bytes]:
        plan = self._plan(request)
        async with self._observed("InferStream", request, context) as observed:
            observed.prefix_cache = await self._prefill(request)
            await self._prelude(plan, context)
            last = len(plan.tokens) - 1
            for i, token in enumerate(plan.tokens):
                chunk = InferChunk(delta=token if i == 0 else " " + token, delta_bytes=self._padding)
                if i == last:
                    chunk.usage.CopyFrom(Usage(input_tokens=len(request.input.split()),
                                               output_tokens=_reported(plan, i + 1)))
                    chunk.finish_reason = plan.finish_reason
                yield GARBAGE if i == last and plan.garble else chunk
                if plan.chunk_delay:
                    await asyncio.sleep(plan.chunk_delay)
            if last < 0:
                yield InferChunk(usage=Usage(input_tokens=len(request.input.split())),
                                 finish_reason=plan.finish_reason)

    async def _prefill(self, request: InferRequest) -> str | None:
        """With the prefix cache on: waits `prefix_cache_ms` for a prefix not cached, then caches
        it; "hit" or "miss" (None when the cache is off, or the call has no input)."""
        if self.prefix_cache is None:
            return None
        prefix = input_prefix(request.input, request.input_bytes, self.options.prefix_bytes)
        if not prefix:
            return None
        if self.prefix_cache.hit(prefix):
            return "hit"
        await asyncio.sleep(self.options.prefix_cache_ms / 1000.0)
        self.prefix_cache.add(prefix)
        return "miss"

    async def _prelude(self, plan: _Plan, context: Context) -> None:
        if plan.delay:
            await asyncio.sleep(plan.delay)
        if plan.fail_code is not None:
            await context.abort(plan.fail_code, f"demo backend failure ({plan.fail_code.name})")

    def _observed(self, method: str, request: InferRequest, context: Context) -> _CallLog:
        return _CallLog(self.options.log_calls, method, request, context)


def _reported(plan: _Plan, generated: int) -> int:
    return generated if plan.report_output_tokens is None else plan.report_output_tokens


def _serialize(message: InferResponse | InferChunk | bytes) -> bytes:
    """Messages as usual; raw bytes (a garbled answer) as they are."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_backend_to_server(backend: DemoBackend, server: grpc.aio.Server) -> None:
    """Registers `inference.v1.Inference` with a serializer that can also send raw bytes."""
    handlers = {
        "Infer": grpc.unary_unary_rpc_method_handler(
            backend.Infer, request_deserializer=InferRequest.FromString, response_serializer=_serialize),
        "InferStream": grpc.unary_stream_rpc_method_handler(
            backend.InferStream, request_deserializer=InferRequest.FromString, response_serializer=_serialize),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.v1.Inference", handlers),))


class _CallLog:
    """Logs one call's metadata keys and outcome (when --log-calls is on)."""

    def __init__(self, enabled: bool, method: str, request: InferRequest, context: Context) -> None:
        self.enabled = enabled
        self.method, self.request, self.context = method, request, context
        self.started = time.perf_counter()
        self.common_names: list[bytes] = []
        self.prefix_cache: str | None = None  # "hit" or "miss" with the prefix cache on

    async def __aenter__(self) -> Self:
        if self.enabled:
            # read while the call is alive: asked at the end of a call the caller cancelled under
            # flow control, it left this backend answering nothing more (grpcio 1.85)
            self.common_names = list(self.context.auth_context().get("x509_common_name", ()))
            metadata = self.context.invocation_metadata() or ()
            print(json.dumps({"event": "call_started", "method": self.method,
                              "request_id": next((v for k, v in metadata if k == "x-request-id"), None),
                              "time_remaining": self.context.time_remaining()}),  # the deadline it got
                  flush=True)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if not self.enabled:
            return
        metadata = self.context.invocation_metadata() or ()
        if kind is None:
            outcome = "ok"
        elif issubclass(kind, asyncio.CancelledError):
            outcome = "cancelled"
        else:
            outcome = "failed"
        line = {"event": "call", "method": self.method, "model": self.request.model, "outcome": outcome,
                "request_id": next((v for k, v in metadata if k == "x-request-id"), None),
                "metadata_keys": sorted({k for k, _ in metadata}),
                "traceparent": next((v for k, v in metadata if k == "traceparent"), None),
                "duration_ms": round((time.perf_counter() - self.started) * 1000, 3)}
        if self.common_names:  # mutual TLS: whose certificate the caller presented (tests see rotations)
            line["client_cn"] = self.common_names[0].decode()
        if self.prefix_cache is not None:
            line["prefix_cache"] = self.prefix_cache
        print(json.dumps(line), flush=True)


async def serve_backend(listen: str, options: DemoOptions, ready: asyncio.Event | None = None,
                        stop: asyncio.Event | None = None) -> None:
    """Serves until `stop` is set (or forever); prints one JSON `listening` line when ready."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_send_message_length", 64 * 1024 * 1024)])
    if options.protocol == "oip":
        from sidecar.demo.oip_backend import SERVICE, OipDemoBackend, add_oip_backend_to_server

        add_oip_backend_to_server(OipDemoBackend(options), server)
        services: tuple[str, ...] = ("", SERVICE)
    else:
        add_backend_to_server(DemoBackend(options), server)
        services = ("", inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name)
    health = HealthServicer()
    for service in services:
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = _add_port(server, listen, options)
    await server.start()
    print(json.dumps({"event": "listening", "address": f"{listen.rpartition(':')[0]}:{port}"}), flush=True)
    if ready is not None:
        ready.set()
    try:
        if stop is None:
            await server.wait_for_termination()
        else:
            await stop.wait()
    finally:
        await server.stop(0.5)


def _add_port(server: grpc.aio.Server, listen: str, options: DemoOptions) -> int:
    """Plaintext, TLS (`tls_cert`/`tls_key`) or mutual TLS (and `client_ca`)."""
    credentials = server_credentials(options)
    return server.add_insecure_port(listen) if credentials is None else server.add_secure_port(listen, credentials)


def server_credentials(options: DemoOptions) -> grpc.ServerCredentials | None:
    """The TLS credentials the options name (None: plaintext); OSError when a file cannot be read."""
    if options.tls_cert is None or options.tls_key is None:
        return None
    key, cert = Path(options.tls_key).read_bytes(), Path(options.tls_cert).read_bytes()
    client_ca = Path(options.client_ca).read_bytes() if options.client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def run_backend(listen: str, options: DemoOptions) -> None:
    """Entry point of `sidecar demo-backend`: serves until SIGTERM/SIGINT."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_backend(listen, options, stop=stop)

    try:
        server_credentials(options)
    except OSError as exc:
        sys.exit(f"demo-backend: cannot read a TLS file: {exc}")
    try:
        asyncio.run(main())
    except (OSError, RuntimeError) as exc:  # grpc reports a port in use as RuntimeError
        sys.exit(f"demo-backend: cannot listen on {listen}: {exc}")
