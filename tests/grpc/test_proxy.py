"""The proxy through its public interface: a real `sidecar run` in front of a real demo backend."""
from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import struct_pb2
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferChunk, InferRequest, InferResponse

from tests.harness.procs import wait_until
from tests.harness.sidecar import BackendProc, SidecarProc, one_model, start_sidecar

INFER = "/inference.v1.Inference/Infer"
INFER_STREAM = "/inference.v1.Inference/InferStream"


@pytest.fixture(scope="module")
def sidecar(backend: BackendProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProc]:
    proc = start_sidecar(tmp_path_factory.mktemp("sidecar"), one_model(backend.address))
    try:
        yield proc
    finally:
        proc.proc.stop()


def raw_unary(target: str, request: bytes, **kwargs: object) -> tuple[bytes, dict[str, str]]:
    with grpc.insecure_channel(target) as channel:
        response, call = channel.unary_unary(INFER).with_call(request, **kwargs)
        return response, dict(call.initial_metadata())


def raw_stream(target: str, request: bytes, **kwargs: object) -> tuple[list[bytes], dict[str, str]]:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_stream(INFER_STREAM)(request, **kwargs)
        chunks = list(call)
        return chunks, dict(call.initial_metadata())


def params(**values: object) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


REQUEST = InferRequest(model="chat", input="the quick brown fox", input_bytes=b"\x00\x01\xff",
                       max_output_tokens=6, parameters=params(temperature=0.5), session_id="s-1")


def test_unary_response_is_byte_identical_to_the_backend(sidecar: SidecarProc, backend: BackendProc) -> None:
    raw = REQUEST.SerializeToString()
    direct, _ = raw_unary(backend.address, raw)
    proxied, _ = raw_unary(sidecar.listen, raw)
    assert proxied == direct
    response = InferResponse.FromString(proxied)
    assert response.output == "the quick brown fox the quick"
    assert response.usage.input_tokens == 4 and response.usage.output_tokens == 6
    assert response.finish_reason == "length" and response.output_bytes == b"\x00\x01\xff"


def test_stream_is_relayed_chunk_for_chunk(sidecar: SidecarProc, backend: BackendProc) -> None:
    raw = REQUEST.SerializeToString()
    direct, _ = raw_stream(backend.address, raw)
    proxied, _ = raw_stream(sidecar.listen, raw)
    assert proxied == direct
    chunks = [InferChunk.FromString(c) for c in proxied]
    assert len(chunks) == 6
    assert "".join(c.delta for c in chunks) == "the quick brown fox the quick"
    assert chunks[-1].usage.output_tokens == 6 and chunks[-1].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_backend_gets_request_id_and_trace_context_but_no_credentials(
        sidecar: SidecarProc, backend: BackendProc, stream: bool) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    metadata = (("authorization", "Bearer sk-secret-1"), ("x-api-key", "sk-secret-2"),
                ("traceparent", traceparent), ("tracestate", "vendor=1"), ("x-custom", "v"))
    raw = REQUEST.SerializeToString()
    if stream:
        _, initial = raw_stream(sidecar.listen, raw, metadata=metadata)
    else:
        _, initial = raw_unary(sidecar.listen, raw, metadata=metadata)
    request_id = initial["x-request-id"]
    assert len(request_id) == 32
    seen = wait_until(lambda: backend.call_for(request_id), 5, what="backend call log")
    assert isinstance(seen, dict)
    assert seen["outcome"] == "ok"
    assert seen["traceparent"] == traceparent
    assert {"x-request-id", "traceparent", "tracestate"} <= set(seen["metadata_keys"])
    assert not {"authorization", "x-api-key", "x-custom"} & set(seen["metadata_keys"])
    assert "sk-secret" not in backend.proc.log_text()


def test_caller_request_id_is_kept_and_echoed(sidecar: SidecarProc, backend: BackendProc) -> None:
    _, initial = raw_unary(sidecar.listen, REQUEST.SerializeToString(), metadata=(("x-request-id", "req-abc-123"),))
    assert initial["x-request-id"] == "req-abc-123"
    assert wait_until(lambda: backend.call_for("req-abc-123"), 5, what="backend call log")


def test_request_ids_are_unique_when_generated(sidecar: SidecarProc) -> None:
    ids = {raw_unary(sidecar.listen, REQUEST.SerializeToString())[1]["x-request-id"] for _ in range(20)}
    assert len(ids) == 20


def test_caller_deadline_reaches_the_backend_and_cancels_it(sidecar: SidecarProc, backend: BackendProc) -> None:
    """Guards that a caller's deadline ends the backend's call too: the backend is cancelled at
    about the deadline (2 s) instead of working out its 20 s delay for a caller that is gone.

    The channel is connected before the call, so that its deadline is spent on the call alone.
    """
    request_id = f"deadline-{time.monotonic_ns()}"
    request = InferRequest(model="chat", input="slow", parameters=params(delay_ms=20_000))
    with grpc.insecure_channel(sidecar.listen) as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        with pytest.raises(grpc.RpcError) as failure:
            channel.unary_unary(INFER)(request.SerializeToString(), timeout=2.0,
                                       metadata=(("x-request-id", request_id),))
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # waits longer than the delay: without the cancellation the backend logs `ok` after 20 s
    seen = wait_until(lambda: backend.call_for(request_id), 30, what="backend saw the call end")
    assert isinstance(seen, dict) and seen["outcome"] == "cancelled", seen
    assert seen["duration_ms"] < 10_000  # cancelled near the 2 s deadline, long before the 20 s delay
    started = next(line for line in backend.proc.log_lines_json()
                   if line.get("event") == "call_started" and line.get("request_id") == request_id)
    # the deadline went along (the wire format rounds it up a little), not the model's 30 s timeout
    assert started["time_remaining"] is not None and 0 < started["time_remaining"] <= 2.5


def test_caller_cancelling_a_stream_cancels_the_backend_stream(sidecar: SidecarProc, backend: BackendProc) -> None:
    request = InferRequest(model="chat", input="long", parameters=params(tokens=200, chunk_delay_ms=50))
    with grpc.insecure_channel(sidecar.listen) as channel:
        call = channel.unary_stream(INFER_STREAM)(request.SerializeToString(),
                                                  metadata=(("x-request-id", "cancel-me"),))
        first = next(call)
        assert InferChunk.FromString(first).delta == "long"
        call.cancel()
    seen = wait_until(lambda: backend.call_for("cancel-me"), 5, what="backend saw the stream end")
    assert isinstance(seen, dict) and seen["outcome"] == "cancelled"
    assert seen["duration_ms"] < 5000  # 200 chunks x 50 ms would take 10 s


def test_sdk_client_helper_calls_through_the_sidecar(sidecar: SidecarProc) -> None:
    import asyncio

    from sidecar_client import SidecarClient

    async def use() -> tuple[str, str]:
        async with SidecarClient(sidecar.listen, api_key="k") as client:
            response = await client.infer("chat", "hi there", max_output_tokens=3)
            text = "".join([c.delta async for c in client.infer_stream("chat", "hi there", max_output_tokens=3)])
            return response.output, text

    unary, streamed = asyncio.run(use())
    assert unary == streamed == "hi there hi"


def test_error_detail_helper_reads_the_reason(sidecar: SidecarProc) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        raw_unary(sidecar.listen, InferRequest(model="nope").SerializeToString())
    detail = error_detail(failure.value)
    assert (detail.code, detail.reason, detail.domain) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "sidecar")
