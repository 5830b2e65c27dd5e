"""`grpc_server_handled_total` and `grpc_server_handling_seconds` for every RPC the sidecar
serves (CONTRACT §8), with the go-grpc-prometheus labels: type, service, method, code.

Three ways in, so that the inference hot path pays no interceptor:
- `Inference` calls are observed by a pipeline finisher (`ObserveInference`), from the call's
  own start time and final status;
- the admin server (RoutingAdmin, Audit, health, reflection) by the `ObservedServer`
  interceptor;
- health on the main listener by `ObservedHealthServicer`.
The labelled children are cached: observing a call costs two dictionary lookups, one `inc` and
one `observe`.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from sidecar.call import Call
from sidecar.telemetry.metrics import (
    GRPC_SERVER_HANDLED,
    GRPC_SERVER_HANDLING_SECONDS,
    SIDECAR_OVERHEAD_SECONDS,
)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]

INFERENCE = "inference.v1.Inference"
HEALTH = "grpc.health.v1.Health"
_handled: dict[tuple[str, str, str, str], Any] = {}
_seconds: dict[tuple[str, str, str], Any] = {}


def observe(grpc_type: str, service: str, method: str, code: str, seconds: float,
            exemplar: dict[str, str] | None = None) -> None:
    handled = _handled.get((grpc_type, service, method, code))
    if handled is None:
        handled = _handled[(grpc_type, service, method, code)] = GRPC_SERVER_HANDLED.labels(
            grpc_type, service, method, code)
    histogram = _seconds.get((grpc_type, service, method))
    if histogram is None:
        histogram = _seconds[(grpc_type, service, method)] = GRPC_SERVER_HANDLING_SECONDS.labels(
            grpc_type, service, method)
    handled.inc()
    histogram.observe(seconds, exemplar)


class ObserveInference:
    """Pipeline finisher: one observation per `Infer` / `InferStream` call (and OIP `ModelInfer`,
    `ModelReady`, `ModelMetadata`, under their own service), however it ended,
    and the sidecar's own share of it (`api_router_sidecar_overhead_seconds`); a sampled call
    leaves its trace id as the bucket's exemplar (shown to OpenMetrics scrapers)."""

    def __init__(self) -> None:
        self._overhead = {m: SIDECAR_OVERHEAD_SECONDS.labels(m) for m in (
            "Infer", "InferStream", "ModelInfer", "ModelReady", "ModelMetadata")}

    def __call__(self, call: Call) -> None:
        seconds = time.perf_counter() - call.started
        exemplar = {"trace_id": call.trace_id} if call.spans is not None else None
        observe("server_stream" if call.method == "InferStream" else "unary", call.service, call.method,
                call.status or "UNKNOWN", seconds, exemplar)
        backend = sum(a.duration_ms for a in call.attempts) / 1000.0 if call.attempts else 0.0
        self._overhead[call.method].observe(max(0.0, seconds - backend), exemplar)


class ObservedServer(grpc.aio.ServerInterceptor):
    """Observes every unary and server-streaming RPC of the server it is installed on."""

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
            details: grpc.HandlerCallDetails) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                observed_unary(handler.unary_unary, service, method),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming("server_stream", handler.unary_stream, service, method),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _streaming("bidi_stream", handler.stream_stream, service, method),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        return handler  # client streaming: the sidecar serves none


def _code(context: grpc.aio.ServicerContext[Any, Any], failure: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if failure is None:
        return "OK"
    return "CANCELLED" if isinstance(failure, asyncio.CancelledError) else "UNKNOWN"


def observed_unary(behavior: Any, service: str, method: str) -> Any:
    async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            observe("unary", service, method, _code(context, failure), time.perf_counter() - started)
    return observed


def _streaming(grpc_type: str, behavior: Any, service: str, method: str) -> Any:
    """For handlers that yield their responses and for those that `context.write` them."""
    async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                async for response in result:
                    yield response
            else:
                await result
        except BaseException as exc:
            failure = exc
            raise
        finally:
            observe(grpc_type, service, method, _code(context, failure), time.perf_counter() - started)
    return observed


class ObservedHealthServicer(HealthServicer):
    """The standard health servicer, observed (the main listener has no interceptor)."""

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> health_pb2.HealthCheckResponse:
        return await observed_unary(super().Check, HEALTH, "Check")(request, context)  # type: ignore[no-any-return]

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> None:
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            await super().Watch(request, context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            observe("server_stream", HEALTH, "Watch", _code(context, failure), time.perf_counter() - started)
