"""`inference.GRPCInferenceService` on the `listen` port: the Open Inference Protocol (KServe v2).

Registered beside `inference.v1.Inference`, on the same server, with the same raw-bytes handlers:

1. `ModelInfer` runs the same `CallScope` and pipeline as `Infer` (authentication, allow-list,
   limits, budgets, routing with failover before the response, usage and audit records, metrics,
   access log, trace); the caller's bytes go to the backend unchanged and its answer comes back
   unchanged (`raw_input_contents` / `raw_output_contents` included). Only the model name and
   version are read (oip/wire.py); the version is forwarded as it came, and routing uses the name.
2. `ModelReady` and `ModelMetadata` go to a healthy backend of the model through the probe
   pipeline (pipeline.build_probe_pipeline): authenticated, neither limited nor billed.
3. `ServerLive`, `ServerReady` and `ServerMetadata` are the sidecar's own answers: live while
   its event loop answers, ready as its readiness (the same as grpc health's), its name and version.
   Like grpc health on this port, they need no API key: they say nothing about any model.
4. `ModelStreamInfer` (Triton's bidirectional stream) and every other method of the service
   (repository, statistics, shared memory, ...) are UNIMPLEMENTED, with a message naming what is served.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc

from sidecar.call import OIP
from sidecar.oip.wire import bool_field, string_field
from sidecar.pipeline import Pipeline
from sidecar.routing.router import Router
from sidecar.server import Context, InFlight, relay_unary
from sidecar.telemetry.grpc_server import observed_unary

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "inference-sidecar"
SERVED = ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer")
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[bytes, bytes]


class OipHandlers:
    def __init__(self, pipeline: Pipeline, probes: Pipeline, in_flight: InFlight, router: Router,
                 ready: Callable[[], bool], version: str, sampling: Callable[[], float | None] = lambda: None) -> None:
        self.pipeline = pipeline
        self.probes = probes
        self.in_flight = in_flight
        self.sampling = sampling
        self._router = router
        self._ready = ready
        self._metadata = string_field(1, SERVER_NAME) + string_field(2, version)

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
        return {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer),
            "ModelReady": grpc.unary_unary_rpc_method_handler(self.model_ready),
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(self.model_metadata),
            "ServerLive": grpc.unary_unary_rpc_method_handler(observed_unary(self.server_live, SERVICE, "ServerLive")),
            "ServerReady": grpc.unary_unary_rpc_method_handler(observed_unary(self.server_ready, SERVICE, "ServerReady")),
            "ServerMetadata": grpc.unary_unary_rpc_method_handler(
                observed_unary(self.server_metadata, SERVICE, "ServerMetadata")),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                observed_unary(self.model_stream_infer, SERVICE, "ModelStreamInfer")),
        }

    def fallback(self) -> grpc.GenericRpcHandler:
        """Answers the service's other methods UNIMPLEMENTED with a clear message."""
        return _Unimplemented()

    async def model_infer(self, raw: bytes, context: Context) -> bytes:
        return await self._forward("ModelInfer", raw, context, self.pipeline)

    async def model_ready(self, raw: bytes, context: Context) -> bytes:
        return await self._forward("ModelReady", raw, context, self.probes)

    async def model_metadata(self, raw: bytes, context: Context) -> bytes:
        return await self._forward("ModelMetadata", raw, context, self.probes)

    async def _forward(self, method: str, raw: bytes, context: Context, pipeline: Pipeline) -> bytes:
        return await relay_unary(self, self._router, method, raw, context, OIP, pipeline)

    async def server_live(self, raw: bytes, context: Context) -> bytes:
        return bool_field(1, True)  # answered by the event loop: live

    async def server_ready(self, raw: bytes, context: Context) -> bytes:
        return bool_field(1, self._ready())

    async def server_metadata(self, raw: bytes, context: Context) -> bytes:
        return self._metadata

    async def model_stream_infer(self, requests: AsyncIterator[bytes], context: Context) -> None:
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("the sidecar does not relay ModelStreamInfer (a bidirectional stream); "
                            "call ModelInfer once per request")


class _Unimplemented(grpc.GenericRpcHandler):
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method: str = handler_call_details.method
        service, _, name = method.lstrip("/").rpartition("/")
        if service != SERVICE:
            return None
        message = (f"the sidecar does not serve {SERVICE}/{name}; it serves {', '.join(SERVED)} "
                   "(docs/configuration.md, \"Open Inference Protocol\")")
        return grpc.unary_unary_rpc_method_handler(_refuse(name, message))


def _refuse(name: str, message: str) -> Any:
    async def refuse(raw: bytes, context: Context) -> bytes:
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details(message)
        return b""
    return observed_unary(refuse, SERVICE, name)
