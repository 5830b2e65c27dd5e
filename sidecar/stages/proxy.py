"""Proxy: send the caller's request bytes to the chosen backend and relay what it answers.

The last step of a call. Unary responses come back as bytes; streams are relayed chunk by
chunk, pulling the next chunk only after the caller took the previous one (gRPC flow control
does the rest), so a long stream never sits in memory. Every attempt is reported to the router.

A failed attempt is retried on another backend only before the commit point — the first
response message: a unary call until it answered, a stream until its first chunk was relayed
— and only when the router allows it (retryable code, attempts, deadline, retry budget). A
stream never replays: after its first chunk, a failure ends the call. Backend failures are
translated here, at the boundary, into catalog errors.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from sidecar.call import Call
from sidecar.errors import BACKEND_ERROR, SidecarError
from sidecar.routing.channels import Backend
from sidecar.routing.router import Router
from sidecar.telemetry.tracing import CLIENT, attempt_attributes, new_span_id, record


class UnaryAttempt:
    """One unary attempt in flight on `call.endpoint`."""

    def __init__(self, call: Call, router: Router) -> None:
        self.endpoint = call.endpoint
        assert self.endpoint is not None
        timeout = call.backend_timeout()
        self.capped = call.model_timeout_binds(timeout)
        self.span = _AttemptSpan(call) if call.spans is not None else None
        self.started = router.attempt_started(self.endpoint)
        self.ended = False
        self.rpc: grpc.aio.UnaryUnaryCall[bytes, bytes] = self.endpoint.backend.infer(
            call.raw_request, timeout=timeout,
            metadata=call.forward_metadata if self.span is None else self.span.metadata)

    def end(self, call: Call, router: Router, code: grpc.StatusCode | None) -> None:
        """Reports the attempt once; `code` None = the caller went away (the backend call is cancelled)."""
        if self.ended:
            return
        self.ended = True
        assert self.endpoint is not None
        if code is None:
            self.rpc.cancel()
        router.attempt_ended(call, self.endpoint, code, self.started, self.capped)
        if self.span is not None:
            self.span.end(call, self.endpoint.backend, code)


class _AttemptSpan:
    """The client span of one attempt of a sampled call; the backend gets it as parent."""

    __slots__ = ("metadata", "span_id", "started")

    def __init__(self, call: Call) -> None:
        self.span_id = new_span_id()
        self.started = time.time_ns()
        self.metadata = call.attempt_metadata(self.span_id)

    def end(self, call: Call, backend: Backend, code: grpc.StatusCode | None) -> None:
        name = code.name if code is not None else "CANCELLED"
        record(call, f"inference.v1.Inference/{call.method}", CLIENT, self.started,
               attempt_attributes(call, backend.config.address, backend.name, name),
               error="" if code == grpc.StatusCode.OK else name, span_id=self.span_id)


def start_unary(call: Call, router: Router) -> UnaryAttempt:
    """Starts the backend call at once, so it runs while the server sends response headers."""
    return UnaryAttempt(call, router)


async def finish_unary(call: Call, attempt: UnaryAttempt, router: Router) -> bytes:
    """The backend's answer, retrying on another backend while the router allows it.

    The caller must `end(call, router, None)` the attempt it started if it never gets here."""
    while True:
        assert attempt.endpoint is not None
        try:
            response: bytes = await attempt.rpc
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            attempt.end(call, router, code)
            failed = attempt.endpoint.backend
            if router.retry(call, code):
                attempt = UnaryAttempt(call, router)
                continue
            raise backend_failure(exc, failed) from None
        except asyncio.CancelledError:
            attempt.end(call, router, None)
            raise
        attempt.end(call, router, grpc.StatusCode.OK)
        return response


async def relay_stream(call: Call, router: Router) -> AsyncIterator[bytes]:
    """The backend's chunks; retried on another backend only while no chunk was relayed."""
    while True:
        endpoint = call.endpoint
        assert endpoint is not None
        timeout = call.backend_timeout()
        capped = call.model_timeout_binds(timeout)
        span = _AttemptSpan(call) if call.spans is not None else None
        started = router.attempt_started(endpoint)
        rpc = endpoint.backend.infer_stream(call.raw_request, timeout=timeout,
                                            metadata=call.forward_metadata if span is None else span.metadata)
        code: grpc.StatusCode | None = None  # None until known: the caller went away
        failure: SidecarError | None = None
        relayed = False
        try:
            async for chunk in rpc:
                relayed = True
                yield chunk
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            failure = backend_failure(exc, endpoint.backend)
        finally:
            rpc.cancel()  # a no-op once finished; stops the backend when the caller went away
            router.attempt_ended(call, endpoint, code, started, capped)
            if span is not None:
                span.end(call, endpoint.backend, code)
        if failure is None:
            return
        assert code is not None
        if relayed or not router.retry(call, code):
            raise failure


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
