"""`Call`: everything the pipeline knows about one inference request.

Built once per RPC by the server from the raw request bytes and the caller's metadata; stages
read and fill it in order (limits set `reservation`, route sets `endpoint`, each backend
attempt appends its `AttemptRecord`, the proxy sets `reported` and the server `last_message`,
`relayed` and `status`). The original request bytes travel to the backend untouched.
Plain data: the lifecycles that fill it (the call, its attempts, its reservation) are owned
by `server.CallScope`, `attempt.Attempt` and `stages.limits.Limits`.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from sidecar.errors import SidecarError, invalid_request, longer_than, missing_field, too_long
from sidecar.oip.wire import WireError, model_and_version
from sidecar.telemetry.trace_context import (
    Span,
    new_span_id,
    new_trace_id,
    parse_traceparent,
    sampled_by_ratio,
    traceparent,
)

if TYPE_CHECKING:
    from sidecar.config import ModelConfig
    from sidecar.limits.reservation import Reservation
    from sidecar.routing.channels import Backend
    from sidecar.routing.endpoints import Endpoint

# Metadata the backend receives from the caller. Credentials (`authorization`, `x-api-key`)
# and everything else stay behind: a backend sees the request, its id and its trace context
# (`traceparent` is the sidecar's: see `begin_call`).
FORWARDED_METADATA = frozenset({"tracestate"})
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(rf"^[\x21-\x7e]{{1,{MAX_REQUEST_ID_CHARS}}}$")  # printable ASCII, no spaces

# Bounds on what a caller sends that the sidecar keeps, logs, forwards or echoes (docs/configuration.md,
# "What a caller may send"). Past them a call is refused INVALID_ARGUMENT / INVALID_REQUEST naming
# the field: a 4 MB model name once went into every error, log line, usage and audit record.
MAX_MODEL_BYTES = 256
MAX_SESSION_ID_BYTES = 256
MAX_TRACEPARENT_CHARS = 256   # W3C version 00 is 55; later versions may only append
MAX_TRACESTATE_CHARS = 512    # all `tracestate` headers together, as W3C asks vendors to carry

# The protocols a call comes in by (`models.<m>.protocol` names the one a model is served over),
# and the gRPC service of each, for metrics, spans and log lines.
INFERENCE_V1 = "inference_v1"
OIP = "oip"
SERVICES = {INFERENCE_V1: "inference.v1.Inference", OIP: "inference.GRPCInferenceService"}
# the OIP methods routed to a backend, and the field names of their model for error messages
OIP_MODEL_FIELDS = {"ModelInfer": ("model_name", "model_version"), "ModelReady": ("name", "version"),
                    "ModelMetadata": ("name", "version")}


def new_request_id() -> str:
    return os.urandom(16).hex()


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One ended try of a call on one backend, for billing and the usage and audit records."""

    backend: str
    status: str        # gRPC code name, or CANCELLED when the caller went away
    duration_ms: float
    address: str = ""


@dataclass(frozen=True, slots=True)
class Billed:
    """What an ended call is charged (decided by `billing.bill`)."""

    input_tokens: int
    output_tokens: int
    estimated: bool  # some of it is the sidecar's estimate, not the backend's report
    requests: int = 1  # 1 when a backend worked on the call (charged `per_request`), else 0


@dataclass(slots=True)
class Call:
    method: str                      # "Infer", "InferStream"; OIP: "ModelInfer", "ModelReady", "ModelMetadata"
    raw_request: bytes               # forwarded unchanged
    request: InferRequest            # parsed once, read-only; of an OIP call, only its `model`
    request_id: str
    api_key: str | None              # the caller's credential; never logged or forwarded
    forward_metadata: tuple[tuple[str, str], ...]
    time_remaining: float | None     # seconds until the caller's deadline, at arrival
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)  # epoch seconds, for records
    org: str = ""                    # set by authentication
    api_key_id: str = ""             # the key's configured id, never the key
    model: ModelConfig | None = None
    endpoint: Endpoint | None = None  # the backend of the current attempt
    attempts: list[AttemptRecord] = field(default_factory=list)
    reservation: Reservation | None = None  # tokens and budget charged ahead, settled at the end
    last_message: bytes | None = None  # the backend's response, or its last stream chunk so far
    reported: tuple[int, int] | None = None  # (input, output) tokens the answer reported, clamped
    usage_clamped: bool = False      # the backend reported more than the call could use
    relayed: bool = False            # a response message was handed to the caller
    decisions: list[tuple[str, str, str]] = field(default_factory=list)  # (stage, result, detail), for audit
    routing_decision: str = ""       # primary | failover | override | affinity
    keep_usage_record: bool = True   # False: refused because the usage spool had no room for it
    status: str = "UNKNOWN"          # gRPC code name once the call ended
    reason: str = ""
    trace_id: str = ""               # 32 hex digits: the caller's trace, or a new one
    span_id: str = ""                # the call's server span (recorded only when sampled)
    parent_span_id: str = ""         # the caller's span, from its traceparent
    spans: list[Span] | None = None  # finished child spans; None when the call is not sampled
    billed: Billed | None = None     # what the call is charged, decided once it ended (billing.bill)
    refusal: SidecarError | None = None  # metadata past its bound, found by begin_call; parse() raises it
    protocol: str = INFERENCE_V1     # or OIP: the request is an Open Inference Protocol message
    model_version: str = ""          # OIP: the version the caller asked for, forwarded as it came

    def parse(self) -> None:
        """Parses the request once; raises INVALID_REQUEST / MISSING_FIELD.

        Runs before authentication, so a refused request is nobody's: it gets no usage or audit
        record, and `request` stays empty, so that no finisher (access log, span) sees the
        over-long string either. The bounds cost a len() or two (`errors.longer_than`)."""
        if self.refusal is not None:
            refusal, self.refusal = self.refusal, None  # raised once; the call does not keep it
            raise refusal
        if self.protocol == OIP:
            self._parse_oip()
            return
        try:
            request = InferRequest.FromString(self.raw_request)
        except DecodeError:
            raise invalid_request("the request is not a valid inference.v1.InferRequest") from None
        if not request.model:
            raise missing_field("model")
        if longer_than(request.model, MAX_MODEL_BYTES):
            raise too_long("model", MAX_MODEL_BYTES)
        if request.session_id and longer_than(request.session_id, MAX_SESSION_ID_BYTES):
            raise too_long("session_id", MAX_SESSION_ID_BYTES)
        self.request = request

    def _parse_oip(self) -> None:
        """An OIP request: only its model name and version are read (oip/wire.py), into a
        `request` that names the model, so that every stage reads the model the same way."""
        name_field, version_field = OIP_MODEL_FIELDS[self.method]
        try:
            name, version = model_and_version(self.raw_request)
        except WireError as exc:
            raise invalid_request(f"the request is not a valid inference.{self.method}Request: {exc}") from None
        if not name:
            raise missing_field(name_field)
        if longer_than(name, MAX_MODEL_BYTES):
            raise too_long(name_field, MAX_MODEL_BYTES)
        if longer_than(version, MAX_MODEL_BYTES):
            raise too_long(version_field, MAX_MODEL_BYTES)
        self.request = InferRequest(model=name)
        self.model_version = version

    @property
    def service(self) -> str:
        """The gRPC service the call came in by."""
        return SERVICES[self.protocol]

    @property
    def backend(self) -> Backend:
        assert self.endpoint is not None
        return self.endpoint.backend

    @property
    def streamed(self) -> bool:
        return self.method == "InferStream"

    def decide(self, stage: str, result: str, detail: str = "") -> None:
        """Notes one decision about the call (auth, rate_limit, budget, route) for its audit record."""
        self.decisions.append((stage, result, detail))

    @property
    def sampled(self) -> bool:
        return self.spans is not None

    def attempt_metadata(self, span_id: str) -> tuple[tuple[str, str], ...]:
        """The metadata of a sampled call's backend attempt: its span is the backend's parent."""
        return (*self.forward_metadata, ("traceparent", traceparent(self.trace_id, span_id, True)))

    def backend_timeout(self) -> float:
        """Seconds the backend may take: the caller's deadline capped by the model's timeout."""
        assert self.model is not None
        cap = self.model.timeout_ms / 1000.0
        if self.time_remaining is None:
            return cap
        return max(0.0, min(cap, self.time_remaining - (time.perf_counter() - self.started)))

    def model_timeout_binds(self, timeout: float) -> bool:
        """Whether `timeout` is the model's cap (not the caller's deadline): when it runs out,
        the backend was too slow, and that counts against it."""
        assert self.model is not None
        return timeout >= self.model.timeout_ms / 1000.0


def begin_call(method: str, raw: bytes, metadata: tuple[tuple[str, str | bytes], ...],
               time_remaining: float | None, sampling: float | None = None, protocol: str = INFERENCE_V1) -> Call:
    """Reads the caller's metadata into a new `Call`; the request itself is parsed by `parse()`.

    Kept apart so that even a request that fails to parse has its request id for the error.
    `sampling` is the tracer's ratio (None: tracing is off). A sampled call sends each backend
    attempt its own span as parent; any other call passes the caller's `traceparent` on as it
    came, or, without one, a new trace id (unsampled) so that the backend's logs share it.
    """
    request_id = api_key = parent = None
    refusal: SidecarError | None = None
    forward: list[tuple[str, str]] = []
    state_chars = 0
    for key, value in metadata:
        if key == "x-request-id":
            if isinstance(value, str) and _REQUEST_ID.match(value):
                request_id = value
        elif key == "authorization":
            if isinstance(value, str) and value[:7].lower() == "bearer ":
                api_key = value[7:].strip()
        elif key == "x-api-key":
            if isinstance(value, str):
                api_key = value.strip()
        elif key == "traceparent":
            if isinstance(value, str):
                if len(value) > MAX_TRACEPARENT_CHARS:
                    refusal = too_long("traceparent", MAX_TRACEPARENT_CHARS, "characters")
                else:
                    parent = value
        elif key in FORWARDED_METADATA and isinstance(value, str):
            state_chars += len(value) + 1
            if state_chars > MAX_TRACESTATE_CHARS + 1:  # + 1: the comma that joins two headers
                refusal = too_long("tracestate", MAX_TRACESTATE_CHARS, "characters")
            else:
                forward.append((key, value))
    if request_id is None:
        request_id = new_request_id()
    forward.append(("x-request-id", request_id))
    context = parse_traceparent(parent) if parent is not None else None
    if context is None:
        trace_id, parent_span_id = new_trace_id(), ""
        sampled = bool(sampling) and sampled_by_ratio(trace_id, sampling)  # type: ignore[arg-type]
    else:
        trace_id, parent_span_id, sampled = context
        sampled = sampled and bool(sampling)  # ratio 0 samples nothing, whatever the caller asks
    span_id = new_span_id()
    if not sampled:
        forward.append(("traceparent", parent if context is not None and parent is not None
                        else traceparent(trace_id, span_id, False)))
    call = Call(method, raw, _EMPTY_REQUEST, request_id, api_key or None, tuple(forward), time_remaining)
    call.trace_id, call.span_id, call.parent_span_id = trace_id, span_id, parent_span_id
    call.refusal = refusal
    call.protocol = protocol
    if sampled:
        call.spans = []
    return call


_EMPTY_REQUEST = InferRequest()
