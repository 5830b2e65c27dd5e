"""Proxy: send the caller's request bytes to the chosen backend and relay what it answers.

The last step of a call. Unary responses come back as bytes; streams are relayed chunk by
chunk, pulling the next chunk only after the caller took the previous one (gRPC flow control
does the rest), so a long stream never sits in memory. Each try is an `Attempt` (attempt.py),
which alone starts and ends it whatever happens.

The usage of the final answer (the response, or a stream's last chunk) is read here, before the
answer or the stream's end reaches the caller (`billing.read_usage`): an answer that does not
parse fails the call with INTERNAL / BACKEND_ERROR instead of being relayed as garbage.

A failed attempt is retried on another backend only before the commit point -- the first
response message: a unary call until it answered, a stream until its first chunk was relayed
-- and only when the router allows it (retryable code, attempts, deadline, retry budget). A
stream never replays: after its first chunk, a failure ends the call. Backend failures are
translated here, at the boundary, into catalog errors.
"""
from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable

import grpc

from sidecar.attempt import Attempt
from sidecar.billing import Garbled, read_usage
from sidecar.call import Call
from sidecar.errors import BACKEND_ERROR, SidecarError
from sidecar.routing.channels import Backend
from sidecar.routing.router import Router
from sidecar.tls_client import DESCRIPTIONS


async def unary(call: Call, router: Router, started: Callable[[], Awaitable[None]]) -> bytes:
    """The backend's answer, retrying on another backend while the router allows it.

    `started` runs once, when the first backend call is on its way (the server sends the caller
    its response headers meanwhile)."""
    first = True
    while True:
        with Attempt(call, router) as attempt:
            rpc = attempt.unary()
            if first:
                first = False
                await started()
            try:
                response: bytes = await rpc
            except grpc.aio.AioRpcError as exc:
                failure = attempt.failed(exc)
            else:
                _read_usage(call, attempt, response)
                return response
        if not router.retry(call, failure.code()):
            raise backend_failure(failure, attempt.endpoint.backend, attempt.tls_cause)


async def relay_stream(call: Call, router: Router) -> AsyncGenerator[bytes, None]:
    """The backend's chunks; retried on another backend only while no chunk was relayed.

    The caller must close this generator (`contextlib.aclosing`) so that an attempt whose
    caller went away ends before the call's finishers run, not when it is garbage collected."""
    while True:
        with Attempt(call, router) as attempt:
            last: bytes | None = None
            try:
                async for chunk in attempt.stream():
                    last = chunk
                    yield chunk
            except grpc.aio.AioRpcError as exc:
                failure = attempt.failed(exc)
            else:
                if last is not None:
                    _read_usage(call, attempt, last)
                return
        if last is not None or not router.retry(call, failure.code()):
            raise backend_failure(failure, attempt.endpoint.backend, attempt.tls_cause)


def _read_usage(call: Call, attempt: Attempt, answer: bytes) -> None:
    try:
        read_usage(call, answer)
    except Garbled as exc:
        attempt.code = grpc.StatusCode.INTERNAL  # a backend fault: the call fails, the backend is blamed
        backend = attempt.endpoint.backend
        expected = "InferChunk" if call.streamed else "InferResponse"
        raise SidecarError(BACKEND_ERROR, f"backend {backend.name!r} answered with bytes that are not an "
                           f"inference.v1.{expected}", code=grpc.StatusCode.INTERNAL,
                           metadata={"model": backend.model, "backend": backend.name, "backend_code": "OK",
                                     "error": str(exc)}) from None


def backend_failure(exc: grpc.aio.AioRpcError, backend: Backend, tls_cause: str | None = None) -> SidecarError:
    """Maps a failed backend call to the catalog.

    1. DEADLINE_EXCEEDED: the backend did not answer in time -> BACKEND_TIMEOUT.
    2. UNAVAILABLE on a failed TLS handshake (`tls_cause`, from `Attempt.failed`) ->
       BACKEND_TLS_ERROR naming the cause; grpc's message (addresses, OpenSSL's words) is not echoed.
    3. UNAVAILABLE: could not connect, or the backend says it cannot serve -> BACKEND_UNAVAILABLE;
       grpc's message names addresses, so the caller gets ours instead.
    4. Anything else is the backend's own answer: its code and message are kept (BACKEND_ERROR).
    """
    code = exc.code()
    where = {"model": backend.model, "backend": backend.name}
    if tls_cause is not None:
        return SidecarError("BACKEND_TLS_ERROR", f"backend {backend.name!r} failed the TLS handshake: "
                            f"{DESCRIPTIONS[tls_cause]}", metadata={**where, "cause": tls_cause})
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return SidecarError("BACKEND_TIMEOUT", f"backend {backend.name!r} did not answer in time",
                            metadata=where)
    if code == grpc.StatusCode.UNAVAILABLE:
        return SidecarError("BACKEND_UNAVAILABLE", f"backend {backend.name!r} is unavailable",
                            metadata=where)
    return SidecarError(BACKEND_ERROR, exc.details() or code.name, metadata={**where, "backend_code": code.name},
                        code=code)
