"""The reference Open Inference Protocol backend: `sidecar demo-backend --protocol oip`.

An echo model server speaking `inference.GRPCInferenceService` (KServe v2), for the tests, the
demo and the benchmark, in front of which the sidecar behaves as in front of Triton or MLServer.
A separate process from the sidecar, so it may load the client package's generated OIP stubs.

- `ModelInfer` echoes: one output per input, named as the input, with its datatype, shape and
  `contents`; `raw_output_contents` = `raw_input_contents`, byte for byte. The response's
  `parameters` carry `received_bytes` and `received_sha256` of the request bytes as they arrived
  (what the relay test compares), and the request's `id` and `model_version` come back as sent.
- Request `parameters` knobs, as the inference.v1 demo backend's: `delay_ms` (int64 or double),
  `fail_code` (a gRPC code name, string).
- `ModelReady` / `ModelMetadata`: every model is ready unless `--models a,b` names the ones it
  serves; then others are not ready (ModelReady) or NOT_FOUND (ModelMetadata).
- `ServerLive`, `ServerReady`, `ServerMetadata` (name `demo-oip-backend`), and grpc health.
- `--log-calls`: one JSON line per call, with `request_sha256` and `response_sha256`.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from typing import TYPE_CHECKING, Any

import grpc
from sidecar_client.inference import grpc_service_pb2 as oip

if TYPE_CHECKING:
    from sidecar.demo.backend import DemoOptions

SERVICE = "inference.GRPCInferenceService"
Context = grpc.aio.ServicerContext[bytes, bytes]


def _param(params: Any, name: str) -> Any:
    """The value of one `InferParameter`, whichever of its kinds is set; None when absent."""
    if name not in params:
        return None
    param = params[name]
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


class OipDemoBackend:
    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.models = frozenset(options.models)

    def serves(self, name: str) -> bool:
        return not self.models or name in self.models

    async def model_infer(self, raw: bytes, context: Context) -> bytes:
        request = oip.ModelInferRequest.FromString(raw)
        delay = _param(request.parameters, "delay_ms")
        delay_ms = float(delay) if delay is not None else self.options.delay_ms
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000.0)
        fail_code = _param(request.parameters, "fail_code")
        if fail_code:
            await context.abort(grpc.StatusCode[str(fail_code)], f"injected failure {fail_code}")
        if not self.serves(request.model_name):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name!r}")
        response = oip.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                          id=request.id, raw_output_contents=request.raw_input_contents)
        for tensor in request.inputs:
            output = response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            if tensor.HasField("contents"):
                output.contents.CopyFrom(tensor.contents)
        response.parameters["received_bytes"].int64_param = len(raw)
        response.parameters["received_sha256"].string_param = hashlib.sha256(raw).hexdigest()
        answer = response.SerializeToString(deterministic=True)
        self._log(context, "ModelInfer", request.model_name, raw, answer)
        return answer

    async def model_ready(self, raw: bytes, context: Context) -> bytes:
        request = oip.ModelReadyRequest.FromString(raw)
        answer = oip.ModelReadyResponse(ready=self.serves(request.name)).SerializeToString()
        self._log(context, "ModelReady", request.name, raw, answer)
        return answer

    async def model_metadata(self, raw: bytes, context: Context) -> bytes:
        request = oip.ModelMetadataRequest.FromString(raw)
        if not self.serves(request.name):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        tensor = oip.ModelMetadataResponse.TensorMetadata(name="INPUT0", datatype="FP32", shape=[-1])
        answer = oip.ModelMetadataResponse(name=request.name, versions=["1"], platform="sidecar-demo-echo",
                                           inputs=[tensor], outputs=[tensor]).SerializeToString()
        self._log(context, "ModelMetadata", request.name, raw, answer)
        return answer

    async def server_live(self, raw: bytes, context: Context) -> bytes:
        return oip.ServerLiveResponse(live=True).SerializeToString()

    async def server_ready(self, raw: bytes, context: Context) -> bytes:
        return oip.ServerReadyResponse(ready=True).SerializeToString()

    async def server_metadata(self, raw: bytes, context: Context) -> bytes:
        return oip.ServerMetadataResponse(name="demo-oip-backend", version="1").SerializeToString()

    def _log(self, context: Context, method: str, model: str, raw: bytes, answer: bytes) -> None:
        if not self.options.log_calls:
            return
        metadata = context.invocation_metadata() or ()
        print(json.dumps({"event": "call", "method": method, "model": model, "outcome": "ok",
                          "request_id": next((v for k, v in metadata if k == "x-request-id"), None),
                          "metadata_keys": sorted({k for k, _ in metadata}),
                          "traceparent": next((v for k, v in metadata if k == "traceparent"), None),
                          "request_sha256": hashlib.sha256(raw).hexdigest(),
                          "response_sha256": hashlib.sha256(answer).hexdigest()}), flush=True)


def add_oip_backend_to_server(backend: OipDemoBackend, server: grpc.aio.Server) -> None:
    """Raw-bytes handlers, so that the backend sees (and hashes) the request bytes as they came."""
    methods = {"ModelInfer": backend.model_infer, "ModelReady": backend.model_ready,
               "ModelMetadata": backend.model_metadata, "ServerLive": backend.server_live,
               "ServerReady": backend.server_ready, "ServerMetadata": backend.server_metadata}
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        name: grpc.unary_unary_rpc_method_handler(method) for name, method in methods.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
