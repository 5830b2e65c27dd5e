"""Proxy: send the caller's request bytes to the chosen backend and relay what it answers.

The last step of a call. Unary responses come back as bytes; streams are relayed chunk by
chunk, pulling the next chunk only after the caller took the previous one (gRPC flow control
does the rest), so a long stream never sits in memory. Backend failures are translated here,
at the boundary, into catalog errors.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from sidecar.call import Call
from sidecar.errors import BACKEND_ERROR, SidecarError
from sidecar.routing.channels import Backend


def start_unary(call: Call) -> grpc.aio.UnaryUnaryCall[bytes, bytes]:
    """Starts the backend call at once, so it runs while the server sends response headers."""
    assert call.backend is not None
    return call.backend.infer(call.raw_request, timeout=call.backend_timeout(),
                              metadata=call.forward_metadata)


async def finish_unary(call: Call, rpc: grpc.aio.UnaryUnaryCall[bytes, bytes]) -> bytes:
    assert call.backend is not None
    try:
        response: bytes = await rpc
    except grpc.aio.AioRpcError as exc:
        raise backend_failure(exc, call.backend) from None
    return response


async def relay_stream(call: Call) -> AsyncIterator[bytes]:
    assert call.backend is not None
    rpc = call.backend.infer_stream(call.raw_request, timeout=call.backend_timeout(),
                                    metadata=call.forward_metadata)
    try:
        async for chunk in rpc:
            yield chunk
    except grpc.aio.AioRpcError as exc:
        raise backend_failure(exc, call.backend) from None
    finally:
        rpc.cancel()  # a no-op once finished; stops the backend when the caller went away


def backend_failure(exc: grpc.aio.AioRpcError, backend: Backend) -> SidecarError:
    """Maps a failed backend call to the catalog.

    1. DEADLINE_EXCEEDED: the backend did not answer in time -> BACKEND_TIMEOUT.
    2. UNAVAILABLE: could not connect, or the backend says it cannot serve -> BACKEND_UNAVAILABLE;
       grpc's message names addresses, so the caller gets ours instead.
    3. Anything else is the backend's own answer: its code and message are kept (BACKEND_ERROR).
    """
    code = exc.code()
    where = {"model": backend.model, "backend": backend.name}
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return SidecarError("BACKEND_TIMEOUT", f"backend {backend.name!r} did not answer in time",
                            metadata=where)
    if code == grpc.StatusCode.UNAVAILABLE:
        return SidecarError("BACKEND_UNAVAILABLE", f"backend {backend.name!r} is unavailable",
                            metadata=where)
    return SidecarError(BACKEND_ERROR, exc.details() or code.name, metadata={**where, "backend_code": code.name},
                        code=code)
