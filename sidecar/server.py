"""The `inference.v1.Inference` handlers: raw bytes in, raw bytes out.

Registered without (de)serializers, so the request arrives as the caller's bytes and the
backend's response bytes go back untouched. Each handler runs inside one `CallScope`, the
owner of the call's lifecycle: it admits the call (metadata, parse, the pipeline's stages) and
ends it however it ends, and nothing else does. `InFlight` counts calls so that shutdown can
wait for them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Protocol

import grpc

from sidecar import errors
from sidecar.call import INFERENCE_V1, Call, begin_call
from sidecar.errors import SidecarError
from sidecar.pipeline import Pipeline
from sidecar.routing.router import Router
from sidecar.stages import proxy

SERVICE = "inference.v1.Inference"
Context = grpc.aio.ServicerContext[bytes, bytes]
log = logging.getLogger("sidecar.server")
DEADLINE_SLACK_SECONDS = 0.05  # a cancellation this close to the call's deadline is the deadline


class InFlight:
    """Counts running inference calls; after `close()` new calls are refused."""

    def __init__(self) -> None:
        self.count = 0
        self.closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if self.closed:
            raise SidecarError("SERVICE_UNAVAILABLE", "the sidecar is shutting down")
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    def close(self) -> None:
        self.closed = True

    async def wait_idle(self, timeout: float) -> bool:
        """True when every call finished within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def __repr__(self) -> str:
        return f"<InFlight {self.count}{' closed' if self.closed else ''}>"


class Handlers(Protocol):
    """What a `CallScope` needs of the handlers of a service (inference.v1, or OIP's)."""

    pipeline: Pipeline
    in_flight: InFlight
    sampling: Callable[[], float | None]


class InferenceHandlers:
    def __init__(self, pipeline: Pipeline, in_flight: InFlight, router: Router,
                 sampling: Callable[[], float | None] = lambda: None) -> None:
        self.pipeline = pipeline
        self.in_flight = in_flight
        self._router = router
        self.sampling = sampling  # the tracer's ratio for new calls; None: tracing is off

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
        return {
            "Infer": grpc.unary_unary_rpc_method_handler(self.infer),
            "InferStream": grpc.unary_stream_rpc_method_handler(self.infer_stream),
        }

    async def infer(self, raw: bytes, context: Context) -> bytes:
        return await relay_unary(self, self._router, "Infer", raw, context)

    async def infer_stream(self, raw: bytes, context: Context) -> AsyncIterator[bytes]:
        try:
            async with CallScope(self, "InferStream", raw, context) as call:
                await context.send_initial_metadata((("x-request-id", call.request_id),))
                # closed here, not by the garbage collector: when the caller leaves mid-stream, the
                # backend attempt ends (and is recorded) before the call's finishers run
                async with contextlib.aclosing(proxy.relay_stream(call, self._router)) as chunks:
                    async for chunk in chunks:
                        call.last_message, call.relayed = chunk, True
                        yield chunk
        except Refused:
            return  # grpc ends the stream with the error status set on the context


class Refused(Exception):  # a signal, not an error: the call's status is already set
    """Raised by `CallScope` once a failed call's status (code, message, trailers) is set on the
    context; the handler catches it and returns, and grpc sends that status.

    Not `context.abort()`: grpc keeps abort's exception on the RPC's state, and that exception's
    traceback holds the handler frames, which hold the request bytes and the state again: a
    reference cycle only a full garbage collection frees. Large requests a backend refused were
    kept alive that way by the dozen (hundreds of MB of RSS)."""


async def relay_unary(handlers: Handlers, router: Router, method: str, raw: bytes, context: Context,
                      protocol: str = INFERENCE_V1, pipeline: Pipeline | None = None) -> bytes:
    """A unary call from its start to its end (`Infer`, OIP's `ModelInfer`, ...): governed by its
    `CallScope`, proxied to a backend, the backend's answer relayed as bytes."""
    try:
        async with CallScope(handlers, method, raw, context, protocol, pipeline) as call:
            response = await proxy.unary(call, router, lambda: context.send_initial_metadata(
                (("x-request-id", call.request_id),)))
            call.last_message, call.relayed = response, True
            return response
    except Refused:
        return b""  # grpc sends the error status set on the context, not this


class CallScope:
    """Owns one inference call from its arrival to its last finisher.

    Entering reads the caller's metadata into a `Call`, counts it in flight, parses it and runs
    the pipeline's stages. Leaving -- however the call ends: served, refused, failed, cancelled
    by the caller, past its deadline, or closed mid-stream -- sets its final status, runs every
    finisher (each one even if another raised), waits under strict usage durability until the
    usage record is on disk, only then counts the call out of flight (so that a draining
    shutdown waits for that record instead of cancelling a served call), and last sends the
    error status, if any (`Refused`). Entering that fails ends the call the same way.
    """

    __slots__ = ("_context", "_counted", "_handlers", "_pipeline", "call")

    def __init__(self, handlers: Handlers, method: str, raw: bytes, context: Context, protocol: str = INFERENCE_V1,
                 pipeline: Pipeline | None = None) -> None:
        self._handlers = handlers
        self._pipeline = pipeline or handlers.pipeline  # OIP's ModelReady/ModelMetadata have their own
        self._context = context
        self.call = begin_call(method, raw, tuple(context.invocation_metadata() or ()), context.time_remaining(),
                               handlers.sampling(), protocol)
        self._counted = False

    async def __aenter__(self) -> Call:
        try:
            self._handlers.in_flight.enter()
            self._counted = True
            self.call.parse()
            await self._pipeline.admit(self.call)
        except BaseException as exc:
            await self._end(exc)
            raise
        return self.call

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._end(exc)

    async def _end(self, exc: BaseException | None) -> None:
        """Ends the call once; raises `Refused` once an error status is set on the context."""
        call = self.call
        rescued: errors.Rescued | None = None
        if exc is None:
            call.status = "OK"
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):  # the RPC ended under us
            remaining = self._context.time_remaining()
            # a caller's client cancels at its own deadline, a hair before ours (the wire rounds
            # the timeout up): that is the deadline, not a caller who changed its mind
            call.status = ("DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
                           else "CANCELLED")
        else:
            rescued = errors.rescue(exc, call.request_id)
            call.status, call.reason = rescued.code.name, rescued.reason
        try:
            durable = self._pipeline.finish(call)
            if durable is not None:
                await asyncio.shield(durable)
        except Exception as failure:  # noqa: BLE001 - strict durability: the record is not on disk
            log.error("usage record not durable; the call fails", extra={"request_id": call.request_id,
                                                                        "error": repr(failure)})
            rescued = errors.rescue(SidecarError(
                "SERVICE_UNAVAILABLE", "the usage record of this call could not be written; retry later"),
                call.request_id)
        finally:
            if self._counted:
                self._counted = False
                self._handlers.in_flight.leave()
        if rescued is not None:
            self._context.set_code(rescued.code)
            self._context.set_details(rescued.message)
            self._context.set_trailing_metadata(rescued.trailing_metadata)
            raise Refused
