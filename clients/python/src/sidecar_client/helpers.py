"""A thin asyncio client for the sidecar, and a reader for its rich error details."""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import grpc
from google.rpc import error_details_pb2, status_pb2

from sidecar_client.inference.v1 import inference_pb2, inference_pb2_grpc

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class SidecarClient:
    """Calls `inference.v1.Inference` on a sidecar, adding the API key to every call.

    Use as an async context manager::

        async with SidecarClient("127.0.0.1:50051", api_key="...") as client:
            response = await client.infer("chat", "hello")
            async for chunk in client.infer_stream("chat", "hello"):
                print(chunk.delta, end="")
    """

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _call_metadata(self, request_id: str | None) -> tuple[tuple[str, str], ...]:
        if request_id:
            return (*self._metadata, ("x-request-id", request_id))
        return self._metadata

    async def infer(self, model: str, input: str = "", *, timeout: float | None = None,
                    request_id: str | None = None, **fields: Any) -> inference_pb2.InferResponse:
        request = inference_pb2.InferRequest(model=model, input=input, **fields)
        response: inference_pb2.InferResponse = await self._stub.Infer(
            request, timeout=timeout, metadata=self._call_metadata(request_id))
        return response

    async def infer_stream(self, model: str, input: str = "", *, timeout: float | None = None,
                           request_id: str | None = None,
                           **fields: Any) -> AsyncIterator[inference_pb2.InferChunk]:
        request = inference_pb2.InferRequest(model=model, input=input, **fields)
        call = self._stub.InferStream(request, timeout=timeout, metadata=self._call_metadata(request_id))
        async for chunk in call:
            yield chunk


@dataclass(frozen=True)
class ErrorDetail:
    """What a sidecar error says beyond its code: `reason` from the error catalog and friends."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_delay_seconds: float | None = None
    details: Sequence[Any] = ()


def error_detail(error: grpc.aio.AioRpcError | grpc.RpcError) -> ErrorDetail:
    """Decodes `grpc-status-details-bin` of a failed call into an `ErrorDetail`."""
    code = error.code()
    message = error.details() or ""
    trailers = error.trailing_metadata() or ()
    raw = next((v for k, v in trailers if k == _STATUS_DETAILS_KEY), None)
    if raw is None:
        return ErrorDetail(code=code, message=message)
    status = status_pb2.Status.FromString(raw)
    reason = domain = ""
    metadata: dict[str, str] = {}
    retry: float | None = None
    decoded: list[Any] = []
    for any_detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo,
                     error_details_pb2.QuotaFailure, error_details_pb2.BadRequest):
            if any_detail.Is(kind.DESCRIPTOR):
                msg = kind()
                any_detail.Unpack(msg)
                decoded.append(msg)
                if isinstance(msg, error_details_pb2.ErrorInfo):
                    reason, domain, metadata = msg.reason, msg.domain, dict(msg.metadata)
                elif isinstance(msg, error_details_pb2.RetryInfo):
                    retry = msg.retry_delay.seconds + msg.retry_delay.nanos / 1e9
    return ErrorDetail(code=code, message=message, reason=reason, domain=domain,
                       metadata=metadata, retry_delay_seconds=retry, details=tuple(decoded))
