"""The `inference.v1.Inference` handlers: raw bytes in, raw bytes out.

Registered without (de)serializers, so the request arrives as the caller's bytes and the
backend's response bytes go back untouched. Each handler: read the metadata, parse the request
once, run the pipeline, proxy, and on any failure hand the exception to `errors.rescue()`;
whatever happened, run the pipeline's finishers exactly once.
`InFlight` counts calls so that shutdown can wait for them.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from sidecar import errors
from sidecar.call import Call, begin_call
from sidecar.errors import SidecarError
from sidecar.pipeline import Pipeline
from sidecar.routing.router import Router
from sidecar.stages import proxy

SERVICE = "inference.v1.Inference"
Context = grpc.aio.ServicerContext[bytes, bytes]
log = logging.getLogger("sidecar.server")


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


class InferenceHandlers:
    def __init__(self, pipeline: Pipeline, in_flight: InFlight, router: Router,
                 sampling: Callable[[], float | None] = lambda: None) -> None:
        self._pipeline = pipeline
        self._in_flight = in_flight
        self._router = router
        self._sampling = sampling  # the tracer's ratio for new calls; None: tracing is off

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
        return {
            "Infer": grpc.unary_unary_rpc_method_handler(self.infer),
            "InferStream": grpc.unary_stream_rpc_method_handler(self.infer_stream),
        }

    async def _admit(self, method: str, raw: bytes, context: Context) -> Call:
        call = begin_call(method, raw, tuple(context.invocation_metadata() or ()), context.time_remaining(),
                          self._sampling())
        try:
            self._in_flight.enter()
        except SidecarError as exc:
            await _abort(context, call, exc)
        try:
            call.parse()
            await self._pipeline.admit(call)
        except BaseException as exc:  # noqa: BLE001 - every failure goes to rescue(); cancellation passes
            self._in_flight.leave()
            try:
                await _abort(context, call, exc)
            finally:
                await _finished(self._pipeline, call)  # after the status is known
        return call

    async def infer(self, raw: bytes, context: Context) -> bytes:
        call = await self._admit("Infer", raw, context)
        attempt: proxy.UnaryAttempt | None = None
        try:
            attempt = proxy.start_unary(call, self._router)
            await context.send_initial_metadata((("x-request-id", call.request_id),))
            response = await proxy.finish_unary(call, attempt, self._router)
            call.last_message, call.relayed, call.status = response, True, "OK"
            return response
        except Exception as exc:
            await _abort(context, call, exc)
            raise  # unreachable: abort raises
        finally:
            if attempt is not None:
                attempt.end(call, self._router, None)  # a no-op unless the caller left before the answer
            self._in_flight.leave()
            await _finished(self._pipeline, call)

    async def infer_stream(self, raw: bytes, context: Context) -> AsyncIterator[bytes]:
        call = await self._admit("InferStream", raw, context)
        try:
            await context.send_initial_metadata((("x-request-id", call.request_id),))
            async for chunk in proxy.relay_stream(call, self._router):
                call.last_message, call.relayed = chunk, True
                yield chunk
            call.status = "OK"
        except Exception as exc:  # noqa: BLE001 - every failure goes to rescue()
            await _abort(context, call, exc)
        finally:
            self._in_flight.leave()
            await _finished(self._pipeline, call)


async def _finished(pipeline: Pipeline, call: Call) -> None:
    """Runs the finishers; under strict usage durability, waits until the record is on disk
    (the response, or the error status, goes out only after this)."""
    wait = pipeline.finish(call)
    if wait is not None:
        await asyncio.shield(wait)


async def _abort(context: Context, call: Call, exc: BaseException) -> None:
    """Ends the RPC with the rescued status; always raises (grpc's abort exception)."""
    if isinstance(exc, asyncio.CancelledError):
        call.status = "CANCELLED"
        raise exc
    rescued = errors.rescue(exc, call.request_id)
    call.status, call.reason = rescued.code.name, rescued.reason
    await context.abort(rescued.code, rescued.message, rescued.trailing_metadata)
