"""Every ending of a call is accounted for: a garbled answer, a caller who leaves mid-stream or
mid-call, a deadline, absurd reported usage, a retried attempt that may have done work.

Each test drives a real `sidecar run` (usage records to a file, a token budget) in front of
demo backends, then checks what the call left behind -- its usage record, access line, audit
record, `grpc_server_handled_total` -- and the invariants of `tests/harness/invariants.py`
(nothing in flight, the budget's consumption equal to the usage records, one record per call).
The last tests focus on windows too narrow to hit from outside, with the real server handlers,
router and channels in process.
"""
from __future__ import annotations

import asyncio
import hashlib
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferRequest, InferResponse
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from sidecar.call import Call, begin_call
from sidecar.config import parse_config
from sidecar.pipeline import Pipeline
from sidecar.routing.channels import Channels
from sidecar.routing.router import Router
from sidecar.server import InferenceHandlers, InFlight
from sidecar.stages import proxy
from sidecar.stages.route import PickBackend, ResolveModel
from tests.conftest import Launcher
from tests.grpc.test_limits import metric
from tests.grpc.test_proxy import INFER, INFER_STREAM, params
from tests.harness.invariants import assert_invariants, file_records
from tests.harness.procs import wait_until
from tests.harness.sidecar import BackendProc, SidecarProc, sidecar_config, start_backend, start_sidecar

KEY, ORG, ADMIN = "sk-endings", "endings-org", "adm-endings"
INPUT = "hello world"          # 11 bytes: an estimate of 3 input tokens
BUDGET = 100_000_000


@dataclass
class Endings:
    sidecar: SidecarProc
    records_path: Path
    chunky: BackendProc        # streams 256 KB chunks: a caller who stops reading blocks the sidecar's send
    sent: list[str]            # request ids of authenticated calls this module made

    def records(self) -> list[dict[str, Any]]:
        return file_records(self.records_path)

    def record(self, request_id: str) -> dict[str, Any]:
        found: dict[str, Any] = wait_until(
            lambda: next((r for r in self.records() if r["request_id"] == request_id), None), 10,
            what=f"the usage record of {request_id}")
        return found

    def access_line(self, request_id: str) -> dict[str, Any]:
        found: dict[str, Any] = wait_until(
            lambda: next((line for line in self.sidecar.log_json()
                          if line.get("logger") == "sidecar.access" and line.get("request_id") == request_id), None),
            10, what=f"the access line of {request_id}")
        return found

    def audit(self, request_id: str) -> admin_pb2.AuditRecord:
        with grpc.insecure_channel(self.sidecar.admin_listen) as channel:
            record: admin_pb2.AuditRecord = admin_pb2_grpc.AuditStub(channel).GetRequest(
                admin_pb2.GetRequestRequest(request_id=request_id),
                metadata=(("authorization", f"Bearer {ADMIN}"),), timeout=5)
        return record

    def handled(self, method: str, code: str) -> float:
        return metric(self.sidecar, "grpc_server_handled_total", {"grpc_method": method, "grpc_code": code})

    def check_invariants(self) -> None:
        assert_invariants(self.sidecar, records=self.records, request_ids=self.sent, budget=(KEY, ORG))


@pytest.fixture(scope="module")
def endings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endings]:
    workdir = tmp_path_factory.mktemp("endings")
    chunky = start_backend(workdir, "--chunk-bytes", "262144", name="chunky")
    failing = start_backend(workdir, "--fail-rate", "1", "--fail-code", "INTERNAL", name="failing")
    healthy = start_backend(workdir, name="healthy")
    records = workdir / "usage.jsonl"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    config = sidecar_config(f"""
        chat:
          backends: [{{name: a, address: "{chunky.address}"}}]
        retried:
          backends:
            - {{name: failing, address: "{failing.address}"}}
            - {{name: healthy, address: "{healthy.address}", priority: 1}}
        """) + f"""auth:
  api_keys: [{{id: app, sha256: "{digest}", org: {ORG}}}]
  admin_tokens: [{{id: ops, sha256: "{hashlib.sha256(ADMIN.encode()).hexdigest()}"}}]
budgets:
  orgs:
    {ORG}: {{tokens_per_day: {BUDGET}}}
retries: {{retry_on: [UNAVAILABLE, INTERNAL]}}
usage:
  sink: file
  file: {{path: {records}}}
telemetry: {{log_format: json, access_log: true}}
"""
    sidecar = start_sidecar(workdir, config)
    try:
        yield Endings(sidecar, records, chunky, [])
    finally:
        sidecar.proc.stop()
        for proc in (chunky, failing, healthy):
            proc.proc.stop()


def request(model: str = "chat", max_output_tokens: int = 8, **parameters: Any) -> bytes:
    return InferRequest(model=model, input=INPUT, max_output_tokens=max_output_tokens,
                        parameters=params(**parameters)).SerializeToString()


def metadata(endings: Endings, name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    request_id = f"{name}-{uuid.uuid4().hex[:8]}"
    endings.sent.append(request_id)
    return request_id, (("x-api-key", KEY), ("x-request-id", request_id))


def started(backend: BackendProc, request_id: str) -> bool:
    return any(line.get("event") == "call_started" and line.get("request_id") == request_id
               for line in backend.proc.log_lines_json())


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_garbled_answer_fails_the_call_and_every_finisher_still_runs(endings: Endings, stream: bool) -> None:
    """Finding 1: bytes that are not an InferResponse/InferChunk used to reach the caller as
    UNKNOWN with the DecodeError text and leave no record, access line, audit record or
    handled count, and a reservation never released."""
    method = "InferStream" if stream else "Infer"
    internal_before = endings.handled(method, "INTERNAL")
    request_id, md = metadata(endings, "garbled")
    with grpc.insecure_channel(endings.sidecar.listen) as channel, pytest.raises(grpc.RpcError) as raised:
        if stream:
            list(channel.unary_stream(INFER_STREAM)(request(garble=True), metadata=md, timeout=10))
        else:
            channel.unary_unary(INFER)(request(garble=True), metadata=md, timeout=10)
    detail = error_detail(raised.value)
    assert (detail.code, detail.reason) == (grpc.StatusCode.INTERNAL, "BACKEND_ERROR")
    assert "DecodeError" not in detail.message and "not an inference.v1." in detail.message
    record = endings.record(request_id)
    assert (record["status"], record["reason"]) == ("INTERNAL", "BACKEND_ERROR")
    assert record["usage_estimated"] and (record["input_tokens"], record["output_tokens"]) == (3, 8)
    assert [(a["backend"], a["status"]) for a in record["attempts"]] == [("a", "INTERNAL")]
    assert endings.access_line(request_id)["status"] == "INTERNAL"
    assert [(a.backend, a.status) for a in endings.audit(request_id).attempts] == [("a", "INTERNAL")]
    wait_until(lambda: endings.handled(method, "INTERNAL") == internal_before + 1, 5, what="the handled count")
    endings.check_invariants()


def test_a_caller_leaving_a_flow_controlled_stream_is_billed_and_its_attempt_recorded(endings: Endings) -> None:
    """Finding 3: when the caller left while the sidecar's send was blocked by flow control,
    the finishers ran before the relay's attempt ended: billed (0, 0), not estimated, no
    attempt in the audit record, the endpoint's in-flight count stuck at 1."""
    request_id, md = metadata(endings, "left-stream")
    with grpc.insecure_channel(endings.sidecar.listen) as channel:
        chunks = channel.unary_stream(INFER_STREAM)(request(max_output_tokens=400, tokens=400), metadata=md,
                                                    timeout=30)
        next(chunks)  # the stream runs; from now on the caller reads nothing
        time.sleep(1.0)  # ~100 MB waiting: every window between here and the backend fills
        chunks.cancel()
    record = endings.record(request_id)
    assert record["status"] == "CANCELLED" and record["streamed"]
    assert [(a["backend"], a["status"]) for a in record["attempts"]] == [("a", "CANCELLED")]
    assert record["usage_estimated"] and (record["input_tokens"], record["output_tokens"]) == (3, 400)
    assert [(a.backend, a.status) for a in endings.audit(request_id).attempts] == [("a", "CANCELLED")]
    endings.check_invariants()


def test_a_caller_leaving_while_the_sidecar_waits_for_the_next_chunk(endings: Endings) -> None:
    """The other await of a stream: the sidecar waits for the backend's next chunk when the
    caller leaves. The attempt ends CANCELLED, the backend call is cancelled, the call billed."""
    request_id, md = metadata(endings, "left-waiting")
    with grpc.insecure_channel(endings.sidecar.listen) as channel:
        chunks = channel.unary_stream(INFER_STREAM)(request(max_output_tokens=8, chunk_delay_ms=3000), metadata=md,
                                                    timeout=30)
        next(chunks)
        chunks.cancel()
    record = endings.record(request_id)
    assert record["status"] == "CANCELLED"
    assert [(a["backend"], a["status"]) for a in record["attempts"]] == [("a", "CANCELLED")]
    assert record["usage_estimated"] and (record["input_tokens"], record["output_tokens"]) == (3, 8)
    backend_call = wait_until(lambda: endings.chunky.call_for(request_id), 10, what="the backend's end of the call")
    assert backend_call["outcome"] == "cancelled"
    endings.check_invariants()


def test_callers_who_leave_or_run_out_of_time_are_not_counted_as_server_errors(endings: Endings) -> None:
    """Finding 5: cancelled calls used to raise grpc_server_handled_total{grpc_code="UNKNOWN"}."""
    before = {code: endings.handled("Infer", code) for code in ("UNKNOWN", "CANCELLED", "DEADLINE_EXCEEDED")}
    ids = []
    with grpc.insecure_channel(endings.sidecar.listen) as channel:
        for _ in range(5):
            request_id, md = metadata(endings, "left")
            ids.append(request_id)
            future = channel.unary_unary(INFER).future(request(delay_ms=5000), metadata=md, timeout=30)
            wait_until(lambda rid=request_id: started(endings.chunky, rid), 10, what="the backend got the call")
            future.cancel()
        late, md = metadata(endings, "late")
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(INFER)(request(delay_ms=10_000), metadata=md, timeout=2)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for request_id in ids:
        assert endings.record(request_id)["status"] == "CANCELLED"
    # the caller's client gives up at its deadline and cancels, usually a little before the
    # sidecar's copy of that deadline passes (it was sent relative, and arrived later): either
    # name is right, UNKNOWN never is
    late_status = endings.record(late)["status"]
    assert late_status in {"DEADLINE_EXCEEDED", "CANCELLED"}
    wait_until(lambda: endings.handled("Infer", "CANCELLED") + endings.handled("Infer", "DEADLINE_EXCEEDED")
               == before["CANCELLED"] + before["DEADLINE_EXCEEDED"] + 6, 10,
               what="six callers who left counted as CANCELLED or DEADLINE_EXCEEDED")
    assert endings.handled("Infer", late_status) >= before[late_status] + 1
    assert endings.handled("Infer", "UNKNOWN") == before["UNKNOWN"]
    endings.check_invariants()


def test_absurd_reported_usage_is_clamped_counted_and_flagged(endings: Endings) -> None:
    """Finding 9: a backend reporting 2^32-1 output tokens was billed them (an org locked out)."""
    clamped_before = metric(endings.sidecar, "api_router_backend_usage_clamped_total", {"backend": "a"})
    request_id, md = metadata(endings, "absurd")
    with grpc.insecure_channel(endings.sidecar.listen) as channel:
        answer = InferResponse.FromString(channel.unary_unary(INFER)(
            request(max_output_tokens=8, report_output_tokens=2**32 - 1), metadata=md, timeout=10))
    assert answer.usage.output_tokens == 2**32 - 1  # relayed as the backend sent it
    record = endings.record(request_id)
    assert (record["input_tokens"], record["output_tokens"], record["usage_estimated"]) == (2, 8, True)
    assert metric(endings.sidecar, "api_router_backend_usage_clamped_total", {"backend": "a"}) == clamped_before + 1
    decisions = [(d.stage, d.result) for d in endings.audit(request_id).decisions]
    assert ("usage", "clamped") in decisions
    endings.check_invariants()


def test_a_retried_attempt_that_may_have_done_work_is_billed(endings: Endings) -> None:
    """Finding 13: an INTERNAL failure usually comes after the backend started generating; with
    INTERNAL retried, only the last attempt used to be billed."""
    request_id, md = metadata(endings, "retried")
    with grpc.insecure_channel(endings.sidecar.listen) as channel:
        channel.unary_unary(INFER)(request(model="retried", max_output_tokens=8), metadata=md, timeout=10)
    record = endings.record(request_id)
    assert [(a["backend"], a["status"]) for a in record["attempts"]] == [("failing", "INTERNAL"), ("healthy", "OK")]
    # the failed try's estimate (3 + 8) plus what the healthy backend reported (2 + 8)
    assert (record["input_tokens"], record["output_tokens"], record["usage_estimated"]) == (5, 16, True)
    endings.check_invariants()


def test_a_call_refused_before_any_backend_costs_nothing(endings: Endings) -> None:
    """The other side of billing: an unknown model is refused before limits; nothing is billed."""
    request_id, md = metadata(endings, "unknown-model")
    with grpc.insecure_channel(endings.sidecar.listen) as channel, pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(INFER)(request(model="nope"), metadata=md, timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    record = endings.record(request_id)
    assert (record.get("input_tokens", 0), record.get("output_tokens", 0), record.get("usage_estimated", False)) == (
        0, 0, False)
    endings.check_invariants()


# --- windows too narrow to hit from outside: the real handlers, router and channels, in process ---

CONFIG = """
models:
  chat:
    backends: [{{name: a, address: "{address}"}}]
health_checks: {{enabled: false}}
"""


def in_process(address: str, finishers: list[Any]) -> tuple[InferenceHandlers, Router, Channels]:
    config = parse_config(CONFIG.format(address=address))
    channels = Channels(config)
    router = Router(config, channels.backends)
    pipeline = Pipeline([ResolveModel(lambda: config), PickBackend(router)], finishers)
    return InferenceHandlers(pipeline, InFlight(), router), router, channels


async def test_shutdown_waits_for_a_served_call_s_strict_usage_record(backend: BackendProc) -> None:
    """Suspected 11, confirmed: the call left the in-flight count before its finishers ran, so
    a draining shutdown saw no call and stopped the server while a served, billed call waited
    for its usage record's fsync (strict durability): the caller got CANCELLED."""
    on_disk: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting = asyncio.Event()

    def strict_record(call: Call) -> asyncio.Future[None]:
        waiting.set()
        return on_disk
    handlers, _, channels = in_process(backend.address, [strict_record])
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "inference.v1.Inference", handlers.method_handlers()),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = asyncio.ensure_future(channel.unary_unary(INFER)(request(), timeout=10))
            await asyncio.wait_for(waiting.wait(), 10)
            assert not await handlers.in_flight.wait_idle(0.2), "a call waiting for its record must count"
            on_disk.set_result(None)
            assert InferResponse.FromString(await answer).usage.output_tokens == 8
            assert await handlers.in_flight.wait_idle(5)
    finally:
        await server.stop(None)
        await channels.aclose()


async def test_an_attempt_whose_backend_call_cannot_start_leaves_no_call_in_flight(backend: BackendProc) -> None:
    """Suspected 12, confirmed: the endpoint's in-flight count went up before the backend call
    existed, and creating it on a closed channel (a reload drained it) raised past the code
    that counts it down: the backend looked busy for ever (max_in_flight, p2c)."""
    handlers, router, channels = in_process(backend.address, [])
    await channels.aclose()  # the channel is closed, as a drained one is
    call = begin_call("Infer", request(), (), None)
    call.parse()
    await handlers.pipeline.admit(call)
    with pytest.raises(grpc.aio.UsageError):
        await proxy.unary(call, router, lambda: asyncio.sleep(0))
    endpoint = router.endpoints["chat"][0]
    assert endpoint.in_flight == 0
    assert [(a.backend, a.status) for a in call.attempts] == [("a", "CANCELLED")]


def test_a_call_cut_by_shutdown_after_the_grace_period_is_recorded_and_billed(launch: Launcher) -> None:
    """The shutdown ending: past `shutdown.grace_ms` the server cancels what still runs. That
    call still gets its usage record (CANCELLED, its attempt CANCELLED, the estimate billed),
    written before the process exits."""
    slow = launch.backend()
    records = launch.workdir / "usage.jsonl"
    sidecar = launch.sidecar(sidecar_config(f"""
        chat:
          backends: [{{name: a, address: "{slow.address}"}}]
        """) + f"""auth:
  api_keys: [{{id: app, sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", org: {ORG}}}]
budgets:
  orgs:
    {ORG}: {{tokens_per_day: {BUDGET}}}
shutdown: {{grace_ms: 300}}
usage:
  sink: file
  file: {{path: {records}}}
""")
    request_id = f"cut-{uuid.uuid4().hex[:8]}"
    with grpc.insecure_channel(sidecar.listen) as channel:
        future = channel.unary_unary(INFER).future(request(delay_ms=60_000), timeout=60,
                                                   metadata=(("x-api-key", KEY), ("x-request-id", request_id)))
        wait_until(lambda: started(slow, request_id), 10, what="the backend got the call")
        sidecar.proc.signal(signal.SIGTERM)
        assert sidecar.proc.wait(timeout=30) == 0
        with pytest.raises(grpc.RpcError):
            future.result(timeout=10)
    record = next(r for r in file_records(records) if r["request_id"] == request_id)
    assert record["status"] == "CANCELLED"
    assert [(a["backend"], a["status"]) for a in record["attempts"]] == [("a", "CANCELLED")]
    assert record["usage_estimated"] and (record["input_tokens"], record["output_tokens"]) == (3, 8)
