"""An attempt: one try of a call on one backend, owned by one context manager.

The proxy opens one for each try (the first, and each retry on another backend). While it is
open the endpoint counts it in flight and a sampled call has its client span open. However
it ends -- the backend answered, failed, answered garbage, the caller went away (cancellation,
or the stream's generator closed), or our own code raised -- leaving it does the rest in one
synchronous step that no cancellation can interrupt: it cancels the backend call unless that
finished, counts the endpoint out, reports the outcome to the router (which appends the call's
`AttemptRecord` and learns from it), and ends the span. Nothing else starts or ends attempts.

A backend's failure is handed to `failed`, which alone looks at it further: an UNAVAILABLE on
a TLS channel may be a failed handshake (`tls_cause`), reported to the router. Only failures pay
for that; an answered call does no TLS work of its own.
"""
from __future__ import annotations

import time
from types import TracebackType
from typing import Self

import grpc

from sidecar.call import Call
from sidecar.routing.endpoints import Endpoint
from sidecar.routing.router import Router
from sidecar.telemetry.trace_context import new_span_id
from sidecar.telemetry.tracing import CLIENT, attempt_attributes, record
from sidecar.tls_client import handshake_failure

OK = grpc.StatusCode.OK


class Attempt:
    __slots__ = (
        "_call",
        "_capped",
        "_metadata",
        "_router",
        "_span_id",
        "_span_started",
        "_started",
        "code",
        "endpoint",
        "rpc",
        "timeout",
        "tls_cause",
    )

    def __init__(self, call: Call, router: Router) -> None:
        assert call.endpoint is not None
        self._call = call
        self._router = router
        self.endpoint: Endpoint = call.endpoint
        self.code: grpc.StatusCode | None = OK  # the outcome when the body leaves normally
        self.rpc: grpc.aio.Call | None = None
        self.tls_cause: str | None = None  # the attempt failed on the TLS handshake, for this reason
        self.timeout = call.backend_timeout()
        self._capped = call.model_timeout_binds(self.timeout)  # the model's timeout, not the caller's
        self._span_id = ""
        self._metadata = call.forward_metadata
        if call.spans is not None:  # sampled: the backend's parent is this attempt's span
            self._span_id = new_span_id()
            self._metadata = call.attempt_metadata(self._span_id)
        self._span_started = self._started = 0.0

    def __enter__(self) -> Self:
        if self._span_id:
            self._span_started = time.time_ns()
        self._started = self._router.attempt_started(self.endpoint)
        return self

    def unary(self) -> grpc.aio.UnaryUnaryCall[bytes, bytes]:
        """Starts the backend call (the caller's request bytes, unchanged)."""
        rpc = self.endpoint.backend.unary[self._call.method](self._call.raw_request, timeout=self.timeout,
                                                             metadata=self._metadata)
        self.rpc = rpc
        return rpc

    def stream(self) -> grpc.aio.UnaryStreamCall[bytes, bytes]:
        rpc = self.endpoint.backend.infer_stream(self._call.raw_request, timeout=self.timeout,
                                                 metadata=self._metadata)
        self.rpc = rpc
        return rpc

    def failed(self, exc: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
        """The backend call failed with `exc`: the attempt's outcome, and `tls_cause` when it was
        the TLS handshake. Returns `exc` without its traceback (no frame cycle) to raise later."""
        self.code = exc.code()
        if self.code == grpc.StatusCode.UNAVAILABLE and self.endpoint.backend.tls is not None:
            self.tls_cause = handshake_failure(exc.details())
            if self.tls_cause is not None:
                self._router.tls_failed(self.endpoint, self.tls_cause)
        return exc.with_traceback(None)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        code = self.code
        if exc is not None and code is OK:  # the body did not name the outcome: what ended it does
            code = outcome(exc)
        if self.rpc is not None and code != OK:
            self.rpc.cancel()  # a no-op once it finished; stops the backend when the caller went away
        self._router.attempt_ended(self._call, self.endpoint, code, self._started, self._capped)
        if self._span_id:
            name = code.name if code is not None else "CANCELLED"
            call, backend = self._call, self.endpoint.backend
            record(call, f"{call.service}/{call.method}", CLIENT, int(self._span_started),
                   attempt_attributes(call, backend.config.address, backend.name, name),
                   error="" if code == OK else name, span_id=self._span_id)


def outcome(exc: BaseException) -> grpc.StatusCode | None:
    """The attempt's code from what ended it: the backend's status, or None (no verdict on the
    backend) when the caller went away (cancellation, a closed stream) or our own code failed."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    return None
