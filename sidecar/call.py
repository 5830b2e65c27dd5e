"""`Call`: everything the pipeline knows about one inference request.

Built once per RPC by the server from the raw request bytes and the caller's metadata; stages
read and fill it in order (limits set `reservation`, route sets `backend`, the server sets
`last_message`, `relayed` and `status`). The original
request bytes travel to the backend untouched.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError
from sidecar_client.inference.v1.inference_pb2 import InferChunk, InferRequest, InferResponse

from sidecar.errors import invalid_request, missing_field

if TYPE_CHECKING:
    from sidecar.config import ModelConfig
    from sidecar.routing.channels import Backend
    from sidecar.routing.endpoints import Endpoint
    from sidecar.routing.router import Attempt
    from sidecar.stages.limits import Reservation

# Metadata the backend receives from the caller. Credentials (`authorization`, `x-api-key`)
# and everything else stay behind: a backend sees the request, its id and its trace context.
FORWARDED_METADATA = frozenset({"traceparent", "tracestate"})
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces, bounded


def new_request_id() -> str:
    return os.urandom(16).hex()


@dataclass(slots=True)
class Call:
    method: str                      # "Infer" or "InferStream"
    raw_request: bytes               # forwarded unchanged
    request: InferRequest            # parsed once, read-only
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
    attempts: list[Attempt] = field(default_factory=list)
    reservation: Reservation | None = None  # tokens and budget charged ahead, settled at the end
    last_message: bytes | None = None  # the backend's response, or its last stream chunk so far
    relayed: bool = False            # a response message was handed to the caller
    decisions: list[tuple[str, str, str]] = field(default_factory=list)  # (stage, result, detail), for audit
    routing_decision: str = ""       # primary | failover | override | affinity
    keep_usage_record: bool = True   # False: refused because the usage spool had no room for it
    status: str = "UNKNOWN"          # gRPC code name once the call ended
    reason: str = ""

    def parse(self) -> None:
        """Parses the request once; raises INVALID_REQUEST / MISSING_FIELD."""
        try:
            self.request = InferRequest.FromString(self.raw_request)
        except DecodeError:
            raise invalid_request("the request is not a valid inference.v1.InferRequest") from None
        if not self.request.model:
            raise missing_field("model")

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

    def reported_usage(self) -> tuple[int, int] | None:
        """(input, output) tokens the backend reported in its last message, if it did."""
        if self.last_message is None:
            return None
        message = (InferChunk if self.streamed else InferResponse).FromString(self.last_message)
        if not message.HasField("usage"):
            return None
        return message.usage.input_tokens, message.usage.output_tokens

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
               time_remaining: float | None) -> Call:
    """Reads the caller's metadata into a new `Call`; the request itself is parsed by `parse()`.

    Kept apart so that even a request that fails to parse has its request id for the error.
    """
    request_id = api_key = None
    forward: list[tuple[str, str]] = []
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
        elif key in FORWARDED_METADATA and isinstance(value, str):
            forward.append((key, value))
    if request_id is None:
        request_id = new_request_id()
    forward.append(("x-request-id", request_id))
    return Call(method, raw, _EMPTY_REQUEST, request_id, api_key or None, tuple(forward), time_remaining)


_EMPTY_REQUEST = InferRequest()
