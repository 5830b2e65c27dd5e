"""Each error reason of the catalog, produced through the public gRPC interface."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from sidecar_client import ErrorDetail, error_detail
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from tests.grpc.test_proxy import INFER, INFER_STREAM, params
from tests.harness.procs import free_port
from tests.harness.sidecar import BackendProc, SidecarProc, sidecar_config, start_sidecar


@pytest.fixture(scope="module")
def sidecar(backend: BackendProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProc]:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens here
    config = sidecar_config(f"""
        chat:
          backends: [{{name: a, address: "{backend.address}"}}]
        down:
          backends: [{{name: gone, address: "{dead}"}}]
        slow:
          timeout_ms: 200
          backends: [{{name: a, address: "{backend.address}"}}]
        idle:
          backends: [{{name: a, address: "{backend.address}", weight: 0}}]
        """)
    proc = start_sidecar(tmp_path_factory.mktemp("sidecar"), config)
    try:
        yield proc
    finally:
        proc.proc.stop()


def fail(target: str, request: InferRequest | bytes, *, stream: bool = False, timeout: float = 10,
         metadata: tuple[tuple[str, str], ...] = ()) -> ErrorDetail:
    """Makes a call that must fail; returns its decoded error after the checks every error passes."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as failure:
        if stream:
            list(channel.unary_stream(INFER_STREAM)(raw, timeout=timeout, metadata=metadata))
        else:
            channel.unary_unary(INFER)(raw, timeout=timeout, metadata=metadata)
    detail = error_detail(failure.value)
    assert detail.domain == "sidecar", detail
    assert "127.0.0.1" not in detail.message and "Traceback" not in detail.message
    return detail


both = pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])


@both
def test_missing_model(sidecar: SidecarProc, stream: bool) -> None:
    detail = fail(sidecar.listen, InferRequest(input="x"), stream=stream)
    assert (detail.code, detail.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD")
    bad_request = next(d for d in detail.details if isinstance(d, error_details_pb2.BadRequest))
    assert bad_request.field_violations[0].field == "model"


@both
def test_undecodable_request(sidecar: SidecarProc, stream: bool) -> None:
    detail = fail(sidecar.listen, b"\xff\xff\xff\xff", stream=stream)
    assert (detail.code, detail.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")


@both
def test_unknown_model(sidecar: SidecarProc, stream: bool) -> None:
    detail = fail(sidecar.listen, InferRequest(model="gpt-nope"), stream=stream)
    assert (detail.code, detail.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    assert detail.metadata == {"model": "gpt-nope"}


@both
def test_backend_that_cannot_be_reached(sidecar: SidecarProc, stream: bool) -> None:
    detail = fail(sidecar.listen, InferRequest(model="down"), stream=stream)
    assert (detail.code, detail.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
    assert detail.metadata["backend"] == "gone"


@both
def test_backend_slower_than_the_model_timeout(sidecar: SidecarProc, stream: bool) -> None:
    detail = fail(sidecar.listen, InferRequest(model="slow", parameters=params(delay_ms=2000)), stream=stream)
    assert (detail.code, detail.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "BACKEND_TIMEOUT")


@both
@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "INTERNAL", "RESOURCE_EXHAUSTED"])
def test_backend_error_keeps_code_and_message(sidecar: SidecarProc, stream: bool, code: str) -> None:
    detail = fail(sidecar.listen, InferRequest(model="chat", parameters=params(fail_code=code)), stream=stream)
    assert detail.code == grpc.StatusCode[code]
    assert detail.reason == "BACKEND_ERROR"
    assert detail.message == f"demo backend failure ({code})"
    assert detail.metadata["backend_code"] == code


def test_no_backend_with_weight(sidecar: SidecarProc) -> None:
    detail = fail(sidecar.listen, InferRequest(model="idle"))
    assert (detail.code, detail.reason) == (grpc.StatusCode.UNAVAILABLE, "NO_BACKEND_AVAILABLE")


def test_errors_carry_the_request_id(sidecar: SidecarProc) -> None:
    with grpc.insecure_channel(sidecar.listen) as channel, pytest.raises(grpc.RpcError) as failure:
        channel.unary_unary(INFER)(InferRequest(model="nope").SerializeToString(),
                                   metadata=(("x-request-id", "err-1"),))
    assert ("x-request-id", "err-1") in tuple(failure.value.trailing_metadata())


# --- INTERNAL_ERROR: a stage that breaks, inside a real server on port 0 -------------------


class Broken:
    """A pipeline stage failing the way a bug would, with an address in its message."""

    async def __call__(self, call: object) -> None:
        raise RuntimeError("boom while talking to 10.1.2.3:6379")


async def test_unexpected_exception_becomes_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    from sidecar.config import parse_config
    from sidecar.pipeline import Pipeline
    from sidecar.routing.router import Router
    from sidecar.server import SERVICE, InferenceHandlers, InFlight

    router = Router(parse_config("models: {chat: {backends: [{name: a, address: '127.0.0.1:1'}]}}"), {})
    server = grpc.aio.server()
    server.add_registered_method_handlers(SERVICE, InferenceHandlers(Pipeline([Broken()]), InFlight(),
                                                                     router).method_handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with caplog.at_level(logging.ERROR, logger="sidecar.errors"), \
                    pytest.raises(grpc.aio.AioRpcError) as failure:
                await channel.unary_unary(INFER)(InferRequest(model="chat").SerializeToString(),
                                                 metadata=(("x-request-id", "bug-1"),))
    finally:
        await server.stop(None)
    detail = error_detail(failure.value)
    assert (detail.code, detail.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL_ERROR")
    assert "boom" not in detail.message and "10.1.2.3" not in detail.message
    record = next(r for r in caplog.records if getattr(r, "request_id", None) == "bug-1")
    assert record.exc_info and "boom" in str(record.exc_info[1])
    from sidecar.telemetry.logging import JsonFormatter

    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "bug-1" and "RuntimeError" in line["exc"]
