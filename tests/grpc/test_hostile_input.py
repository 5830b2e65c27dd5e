"""What a hostile caller or admin sends, through a real `sidecar run`: over-long strings are refused
INVALID_ARGUMENT / INVALID_REQUEST naming the field, never stored, logged or echoed whole; echoes
(error messages, ErrorInfo metadata) stay small enough for the caller's metadata limit; admin
overrides are bounded like config; large rejected requests leave no memory behind."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from sidecar_client import ErrorDetail, error_detail
from sidecar_client.inference.v1.inference_pb2 import InferRequest, InferResponse
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from sidecar.config_sections import MAX_WEIGHT
from tests.conftest import Launcher
from tests.grpc.test_proxy import INFER, INFER_STREAM
from tests.grpc.test_stream_memory import rss_bytes
from tests.harness.procs import free_port
from tests.harness.sidecar import BackendProc, SidecarProc, one_model, sidecar_config, start_sidecar

KEY = "sk-hostile-4f1e9a"
ADMIN = "adm-hostile-c07b"
ADMIN_AUTH = (("authorization", f"Bearer {ADMIN}"),)
# the documented bounds (docs/configuration.md, "What a caller may send")
MAX_MODEL_BYTES = MAX_SESSION_ID_BYTES = 256
MAX_TRACEPARENT_CHARS = 256
MAX_TRACESTATE_CHARS = 512
BIG = 64 * 1024 * 1024  # the test's own send and receive limits: never what refuses a call
OPTIONS = [("grpc.max_send_message_length", BIG), ("grpc.max_receive_message_length", BIG)]


@pytest.fixture(scope="module")
def hostile(backend: BackendProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SidecarProc, Path]]:
    """A sidecar with keys, an admin token and a usage file; model `chat` has backends a and b."""
    workdir = tmp_path_factory.mktemp("hostile")
    records = workdir / "usage.jsonl"
    config = sidecar_config(f"""
        chat:
          affinity: session
          backends:
            - {{name: a, address: "{backend.address}"}}
            - {{name: b, address: "{backend.address}"}}
        """) + f"""auth:
  api_keys: [{{id: app, sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", org: acme}}]
  admin_tokens: [{{id: ops, sha256: "{hashlib.sha256(ADMIN.encode()).hexdigest()}"}}]
state_dir: {workdir / "state"}
usage:
  sink: file
  file: {{path: {records}}}
"""
    proc = start_sidecar(workdir, config)
    try:
        yield proc, records
    finally:
        proc.proc.stop()


def call(target: str, request: InferRequest | bytes, *, stream: bool = False,
         metadata: tuple[tuple[str, str], ...] = (), key: str | None = KEY) -> ErrorDetail | None:
    """One call; None when it succeeded, else its decoded error."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    metadata = ((("x-api-key", key),) if key else ()) + metadata
    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        try:
            if stream:
                list(channel.unary_stream(INFER_STREAM)(raw, metadata=metadata, timeout=30))
            else:
                channel.unary_unary(INFER)(raw, metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            return error_detail(error)
    return None


def violation(detail: ErrorDetail | None) -> str:
    """The field an INVALID_ARGUMENT / INVALID_REQUEST names (its BadRequest and ErrorInfo agree)."""
    assert detail is not None, "the call succeeded"
    assert (detail.code, detail.reason, detail.domain) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST",
                                                           "sidecar"), detail
    bad = next(d for d in detail.details if isinstance(d, error_details_pb2.BadRequest))
    assert detail.metadata["field"] == bad.field_violations[0].field
    assert len(detail.message) < 200  # the message says what is wrong, it does not echo the value
    return bad.field_violations[0].field


# --- finding 3: over-long caller strings ----------------------------------------------------------

both = pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])


@both
@pytest.mark.parametrize("size", [4 * 1024, 4 * 1024 * 1024], ids=["4KiB", "4MiB"])
def test_an_over_long_model_is_refused_naming_the_field(hostile: tuple[SidecarProc, Path], size: int,
                                                       stream: bool) -> None:
    sidecar, _ = hostile
    assert violation(call(sidecar.listen, InferRequest(model="m" * size), stream=stream)) == "model"
    # the bound counts UTF-8 bytes: 200 characters of two bytes each are too many
    assert violation(call(sidecar.listen, InferRequest(model="é" * 200), stream=stream)) == "model"


@both
def test_a_model_at_the_bound_is_echoed_whole(hostile: tuple[SidecarProc, Path], stream: bool) -> None:
    sidecar, _ = hostile
    name = "m" * MAX_MODEL_BYTES
    detail = call(sidecar.listen, InferRequest(model=name), stream=stream)
    assert detail is not None and (detail.code, detail.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    assert detail.metadata == {"model": name}


@both
def test_an_over_long_session_id_is_refused(hostile: tuple[SidecarProc, Path], stream: bool) -> None:
    sidecar, _ = hostile
    assert call(sidecar.listen, InferRequest(model="chat", session_id="s" * MAX_SESSION_ID_BYTES),
                stream=stream) is None
    detail = call(sidecar.listen, InferRequest(model="chat", session_id="s" * (64 * 1024)), stream=stream)
    assert violation(detail) == "session_id"


@both
@pytest.mark.parametrize(("key", "allowed", "value"), [
    ("traceparent", MAX_TRACEPARENT_CHARS, "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-{}"),
    ("tracestate", MAX_TRACESTATE_CHARS, "vendor={}"),
])
def test_over_long_trace_context_is_refused(hostile: tuple[SidecarProc, Path], backend: BackendProc,
                                            stream: bool, key: str, allowed: int, value: str) -> None:
    sidecar, _ = hostile
    fits = value.format("x" * (allowed - len(value) + 2))
    assert len(fits) == allowed
    assert call(sidecar.listen, InferRequest(model="chat"), stream=stream, metadata=((key, fits),)) is None
    too_long = value.format("x" * 4000)
    detail = call(sidecar.listen, InferRequest(model="chat"), stream=stream,
                  metadata=((key, too_long), ("x-request-id", f"long-{key}-{stream}")))
    assert violation(detail) == key
    assert backend.call_for(f"long-{key}-{stream}") is None  # refused before any backend saw it


def test_tracestate_headers_count_together(hostile: tuple[SidecarProc, Path]) -> None:
    sidecar, _ = hostile
    half = "v=" + "x" * (MAX_TRACESTATE_CHARS // 2)
    assert violation(call(sidecar.listen, InferRequest(model="chat"),
                          metadata=(("tracestate", half), ("tracestate", half)))) == "tracestate"


def test_huge_model_names_are_neither_recorded_nor_logged(hostile: tuple[SidecarProc, Path]) -> None:
    """Before: each call's usage record, audit record and access line kept the whole name."""
    sidecar, records = hostile
    log_before = sidecar.proc.log_path.stat().st_size
    ids = [f"huge-model-{i}" for i in range(5)]
    for request_id in ids:
        detail = call(sidecar.listen, InferRequest(model="q" * (1024 * 1024)),
                      metadata=(("x-request-id", request_id),))
        assert violation(detail) == "model"
    assert call(sidecar.listen, InferRequest(model="chat"), metadata=(("x-request-id", "after-huge"),)) is None
    audit = admin_pb2_grpc.AuditStub(grpc.insecure_channel(sidecar.admin_listen))
    # the calls were refused before authentication: no usage or audit record (CONTRACT §6) ...
    assert audit.GetRequest(admin_pb2.GetRequestRequest(request_id="after-huge"), metadata=ADMIN_AUTH,
                            timeout=5).request_id == "after-huge"
    for request_id in ids:
        with pytest.raises(grpc.RpcError) as failure:
            audit.GetRequest(admin_pb2.GetRequestRequest(request_id=request_id), metadata=ADMIN_AUTH, timeout=5)
        assert error_detail(failure.value).reason == "REQUEST_NOT_FOUND"
    # ... and the access lines carry no name: 5 MiB of names became a few hundred bytes each
    assert sidecar.proc.log_path.stat().st_size - log_before < 16 * 1024
    if records.exists():
        assert max(len(line) for line in records.read_text().splitlines()) < 4096


# --- finding 3: echoes of what a backend says ------------------------------------------------------

LOUD_MESSAGE = "backend says: " + "z" * 7500  # fits the sidecar's metadata limit; echoed whole, not the caller's


class LoudBackend:
    """A real gRPC backend failing every call with a 7.5 KB message (no health service)."""

    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))

        def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, LOUD_MESSAGE)
            raise AssertionError("unreachable")

        def fail_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, LOUD_MESSAGE)
            yield b""

        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.v1.Inference", {
            "Infer": grpc.unary_unary_rpc_method_handler(fail),
            "InferStream": grpc.unary_stream_rpc_method_handler(fail_stream)}),))
        self.address = f"127.0.0.1:{free_port()}"
        self.server.add_insecure_port(self.address)
        self.server.start()


@pytest.fixture
def loud() -> Iterator[LoudBackend]:
    backend = LoudBackend()
    try:
        yield backend
    finally:
        backend.server.stop(None)


@both
def test_a_long_backend_message_is_echoed_truncated(launch: Launcher, loud: LoudBackend, stream: bool) -> None:
    """Before: the echo (message + the same message in the status details) overflowed the
    caller's 16 KiB metadata limit, and the caller got RESOURCE_EXHAUSTED from its own gRPC."""
    sidecar = launch.sidecar(one_model(loud.address) + "health_checks: {enabled: false}\n")
    detail = call(sidecar.listen, InferRequest(model="chat"), stream=stream, key=None)
    assert detail is not None
    assert (detail.code, detail.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BACKEND_ERROR")
    assert detail.message.startswith("backend says: zzz") and detail.message.endswith("…")
    assert len(detail.message.encode()) <= 1024


# --- finding 5: admin input is validated like config ------------------------------------------------


def routing(sidecar: SidecarProc) -> admin_pb2_grpc.RoutingAdminStub:
    return admin_pb2_grpc.RoutingAdminStub(grpc.insecure_channel(sidecar.admin_listen, options=OPTIONS))


def refused(sidecar: SidecarProc, method: str, request: Any) -> str:
    with pytest.raises(grpc.RpcError) as failure:
        getattr(routing(sidecar), method)(request, metadata=ADMIN_AUTH, timeout=10)
    return violation(error_detail(failure.value))


@pytest.mark.parametrize("weight", [float("inf"), 1e308, float("nan"), -1.0, MAX_WEIGHT * 1.5],
                         ids=["inf", "1e308", "nan", "negative", "past-max"])
def test_set_override_refuses_a_weight_config_would_refuse(hostile: tuple[SidecarProc, Path],
                                                           weight: float) -> None:
    sidecar, _ = hostile
    for backend in ("a", "b"):
        assert refused(sidecar, "SetOverride", admin_pb2.SetOverrideRequest(
            model="chat", backend=backend, weight=weight)) == "weight"
    routes = routing(sidecar).ListRoutes(admin_pb2.ListRoutesRequest(model="chat"), metadata=ADMIN_AUTH, timeout=5)
    assert not routes.routes[0].overrides
    assert {b.name: b.effective_weight for b in routes.routes[0].backends} == {"a": 1.0, "b": 1.0}


def test_set_override_accepts_the_bound(hostile: tuple[SidecarProc, Path]) -> None:
    sidecar, _ = hostile
    made = routing(sidecar).SetOverride(admin_pb2.SetOverrideRequest(model="chat", backend="a", weight=MAX_WEIGHT,
                                                                      reason="r" * 512), metadata=ADMIN_AUTH,
                                        timeout=5)
    assert made.weight == MAX_WEIGHT
    assert routing(sidecar).ClearOverride(admin_pb2.ClearOverrideRequest(model="chat", backend="a"),
                                          metadata=ADMIN_AUTH, timeout=5).cleared


@pytest.mark.parametrize(("field", "request_fields"), [
    ("ttl_seconds", {"drain": True, "ttl_seconds": 2**32 - 1}),
    ("reason", {"drain": True, "reason": "r" * 4096}),
    ("reason", {"drain": True, "reason": "line one\nrouting override cleared"}),
    ("model", {"model": "m" * (1024 * 1024), "drain": True}),
    ("backend", {"backend": "b" * 4096, "drain": True}),
])
def test_set_override_bounds_ttl_and_strings(hostile: tuple[SidecarProc, Path], field: str,
                                             request_fields: dict[str, Any]) -> None:
    sidecar, _ = hostile
    request = admin_pb2.SetOverrideRequest(**{"model": "chat", "backend": "a", **request_fields})
    assert refused(sidecar, "SetOverride", request) == field
    assert not routing(sidecar).ListRoutes(admin_pb2.ListRoutesRequest(model="chat"), metadata=ADMIN_AUTH,
                                           timeout=5).routes[0].overrides


def test_other_admin_calls_refuse_over_long_names(hostile: tuple[SidecarProc, Path]) -> None:
    """Before: ListRoutes echoed a 1 MiB model into its NOT_FOUND (RESOURCE_EXHAUSTED for the admin),
    ClearOverride logged it, GetRequest looked it up."""
    sidecar, _ = hostile
    huge = "x" * (1024 * 1024)
    assert refused(sidecar, "ListRoutes", admin_pb2.ListRoutesRequest(model=huge)) == "model"
    assert refused(sidecar, "ClearOverride", admin_pb2.ClearOverrideRequest(model=huge, backend="a")) == "model"
    assert refused(sidecar, "ClearOverride", admin_pb2.ClearOverrideRequest(model="chat", backend=huge)) == "backend"
    with pytest.raises(grpc.RpcError) as failure:
        admin_pb2_grpc.AuditStub(grpc.insecure_channel(sidecar.admin_listen, options=OPTIONS)).GetRequest(
            admin_pb2.GetRequestRequest(request_id=huge), metadata=ADMIN_AUTH, timeout=10)
    assert violation(error_detail(failure.value)) == "request_id"
    assert huge[:1000] not in sidecar.proc.log_path.read_text()


# --- finding 7: memory after large rejected requests -----------------------------------------------

LARGE = 15 * 1024 * 1024  # under the sidecar's 16 MiB max_message_bytes, over the backend's 4 MiB
LARGE_CALLS = 24


def test_large_rejected_requests_leave_no_memory_behind(launch: Launcher) -> None:
    """15 MiB requests the backend refuses (its limit is 4 MiB). Before: each failed call stayed in a
    reference cycle (grpc keeps the AbortError of `context.abort`, whose traceback holds the frames
    that hold the request; the proxy kept the backend's error, whose traceback held the attempt) until
    a full garbage collection, and glibc kept the freed heap: RSS rose by ~25 MiB a call and stayed."""
    backend = launch.backend()
    sidecar = launch.sidecar(one_model(backend.address))
    large = InferRequest(model="chat", input_bytes=b"\x07" * LARGE).SerializeToString()
    with grpc.insecure_channel(sidecar.listen, options=OPTIONS) as channel:
        infer = channel.unary_unary(INFER)
        assert InferResponse.FromString(infer(InferRequest(model="chat").SerializeToString(), timeout=30)).output
        baseline = rss_bytes(sidecar.proc.pid)
        for i in range(LARGE_CALLS):
            stream = i % 2 == 1
            detail = call(sidecar.listen, large, stream=stream, key=None)
            assert detail is not None and detail.reason == "BACKEND_ERROR", detail
            assert detail.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the calls are over: a normal call after them has been served
        assert InferResponse.FromString(infer(InferRequest(model="chat").SerializeToString(), timeout=30)).output
    time.sleep(0.2)  # the access lines of the last calls are written
    after = rss_bytes(sidecar.proc.pid)
    growth = after - baseline
    print(f"\n{LARGE_CALLS} rejected {LARGE >> 20} MiB requests: sidecar RSS {baseline >> 20} -> {after >> 20} MiB")
    # ~4 of the requests at once would be 60 MiB; before the fix the growth was 300-600 MiB
    assert growth < 80 * 1024 * 1024, f"RSS grew {growth >> 20} MiB and stayed"
