"""Usage records through `usage.sink: kafka`, seen from the outside: the records of denied calls
in a real (Tansu) topic; the dead-letter store and its `sidecar dlq` commands; `sidecar spool
status|replay` on a stopped sidecar's spool; a full spool refusing calls (`on_spool_full:
reject`) or dropping its oldest records (`drop_oldest`). Kafka is "down" while nothing listens
on the sidecar's bootstrap port; a Tansu started on that port later brings it up."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferRequest
from sidecar_client.sidecar.usage.v1.usage_pb2 import UsageRecord

from tests.chaos.test_usage_delivery import (
    METADATA,
    assert_exactly_once,
    call,
    metric,
    records_by_request,
    usage_component,
    usage_config,
)
from tests.conftest import Launcher
from tests.harness.invariants import assert_invariants
from tests.harness.load import INFER
from tests.harness.procs import ManagedProcess, free_port, wait_until
from tests.harness.servers import TANSU_STOP_TIMEOUT, kafka_consume_all, start_tansu
from tests.harness.sidecar import SIDECAR, BackendProc, health_status

MAX_SPOOL = 65536
# A new segment's 16-byte header (magic + first sequence) is counted when the segment is opened,
# after `drop_oldest` made room for the record itself: the spool may pass its limit by that much.
SEGMENT_HEADER_BYTES = 16
DENIAL_KEYS = {"slow": "sk-kafka-slow", "poor": "sk-kafka-poor", "narrow": "sk-kafka-narrow"}


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


def sidecar_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIDECAR, *args], capture_output=True, text=True, timeout=timeout, check=False)




def try_call(infer: grpc.UnaryUnaryMultiCallable[bytes, bytes], request_id: str,
             metadata: tuple[tuple[str, str], ...] = METADATA) -> grpc.RpcError | None:
    """One `Infer` on an open channel; the error, or None when it was served."""
    request = InferRequest(model="chat", input="hello").SerializeToString()
    try:
        infer(request, metadata=(*metadata, ("x-request-id", request_id)), timeout=10)
    except grpc.RpcError as error:
        return error
    return None


def write_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def stop_broker(broker: ManagedProcess) -> None:
    broker.stop(timeout=TANSU_STOP_TIMEOUT)


# --- 1. denied calls have records too ------------------------------------------------------


def test_denied_calls_have_records_in_kafka_with_their_reason(
        launch: Launcher, backend: BackendProc, kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = unique("usage-denials")
    keys = "".join(f'    - {{id: {name}, sha256: "{hashlib.sha256(key.encode()).hexdigest()}", org: {name}-org'
                   f'{", models: [embed]" if name == "narrow" else ""}}}\n' for name, key in DENIAL_KEYS.items())
    denials = keys + """limits:
  api_keys:
    slow: {requests_per_minute: 1, burst: 1}
budgets:
  orgs:
    poor-org: {tokens_per_day: 5}
"""
    head, usage, tail = usage_config(backend.address, kafka_bootstrap, tmp_path / "spool", topic).partition("usage:\n")
    sidecar = launch.sidecar(head + denials + usage + tail)

    unauthenticated = unique("unauthenticated")
    served, limited, poor, forbidden = (unique(n) for n in ("served", "limited", "budget", "forbidden"))
    with grpc.insecure_channel(sidecar.listen) as channel:
        infer: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(INFER)
        error = try_call(infer, unauthenticated, (("x-api-key", "sk-nobody"),))
        assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert try_call(infer, served) is None
        first_of_the_minute = unique("slow-first")
        assert try_call(infer, first_of_the_minute, (("x-api-key", DENIAL_KEYS["slow"]),)) is None
        outcomes = {request_id: try_call(infer, request_id, (("x-api-key", DENIAL_KEYS[key]),))
                    for request_id, key in ((limited, "slow"), (poor, "poor"), (forbidden, "narrow"))}
    reasons = {r: (e.code().name, error_detail(e).reason) if e is not None else None for r, e in outcomes.items()}
    assert reasons == {limited: ("RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED"),
                       poor: ("RESOURCE_EXHAUSTED", "BUDGET_EXCEEDED"),
                       forbidden: ("PERMISSION_DENIED", "FORBIDDEN")}

    expected = [served, first_of_the_minute, limited, poor, forbidden]
    found = records_by_request(kafka_bootstrap, topic, expected, timeout=30)
    assert_exactly_once(found, expected)
    assert set(found) == set(expected), "the unauthenticated call must have no record"
    records: dict[str, UsageRecord] = {}
    for message in kafka_consume_all(kafka_bootstrap, topic, timeout=15, idle=1.0):
        assert message.value is not None
        record = UsageRecord.FromString(message.value)
        records[record.request_id] = record
    assert unauthenticated not in records
    seen = {r: (records[r].status, records[r].reason, records[r].org, records[r].api_key_id)
            for r in (served, limited, poor, forbidden)}
    assert seen == {
        served: ("OK", "", "acme", "app"),
        limited: ("RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED", "slow-org", "slow"),
        poor: ("RESOURCE_EXHAUSTED", "BUDGET_EXCEEDED", "poor-org", "poor"),
        forbidden: ("PERMISSION_DENIED", "FORBIDDEN", "narrow-org", "narrow"),
    }
    assert records[served].backend == "a" and records[served].output_tokens > 0
    assert all(not records[r].attempts and not records[r].backend for r in (limited, poor, forbidden))
    wait_until(lambda: usage_component(sidecar)["spool"]["records"] == 0, 30, what="spool settled")
    assert_invariants(sidecar, spool_dir=tmp_path / "spool")


# --- 2. the dead-letter store and `sidecar dlq` ----------------------------------------------


def test_records_too_large_for_the_topic_go_to_the_dlq_and_are_replayed_or_resolved(
        launch: Launcher, backend: BackendProc, kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = unique("usage-dlq")
    spool = tmp_path / "spool"
    small = usage_config(backend.address, kafka_bootstrap, spool, topic, kafka={"max_message_bytes": 100})
    small_yaml = write_config(tmp_path / "small.yaml", small)
    sidecar = launch.sidecar(small)
    request_ids = [unique(f"dlq-{i}") for i in range(4)]
    for request_id in request_ids:
        call(sidecar, request_id)  # raises if the call fails: a dead letter never fails its call

    wait_until(lambda: metric(sidecar, "api_router_usage_dlq_records") == 4, 15, what="four dead letters")
    assert metric(sidecar, "api_router_usage_records_dead_lettered_total", reason="MSG_SIZE_TOO_LARGE") == 4
    wait_until(lambda: usage_component(sidecar)["spool"]["records"] == 0, 15, what="spool settled")
    assert usage_component(sidecar)["dlq_open"] == 4

    listing = sidecar_cli("dlq", "list", "--config", small_yaml)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[0] == "4 open dead letters; MSG_SIZE_TOO_LARGE: 4"
    entries = json.loads(sidecar_cli("dlq", "list", "--config", small_yaml, "--json").stdout)
    assert len(entries) == 4
    assert {(e["org"], e["reason"], e["state"]) for e in entries} == {("acme", "MSG_SIZE_TOO_LARGE", "open")}
    assert all("record" not in e and "max_message_bytes is 100" in e["detail"] for e in entries)
    assert all(e["event_id"] in listing.stdout for e in entries)

    event_of: dict[str, str] = {}
    for entry in entries:
        inspected = sidecar_cli("dlq", "inspect", entry["event_id"], "--config", small_yaml)
        assert inspected.returncode == 0, inspected.stderr
        shown = json.loads(inspected.stdout)
        assert shown["record"]["event_id"] == entry["event_id"] and shown["record"]["org"] == "acme"
        assert shown["record"]["status"] == "OK" and shown["record_bytes"] > 100
        event_of[shown["record"]["request_id"]] = entry["event_id"]
    assert set(event_of) == set(request_ids)
    assert kafka_consume_all(kafka_bootstrap, topic, timeout=5, idle=1.0) == []

    # replayed with the same limit: still too large, nothing sent, every entry stays open
    still_too_large = sidecar_cli("dlq", "replay", "--all", "--config", small_yaml)
    assert still_too_large.returncode == 1, still_too_large.stdout + still_too_large.stderr
    assert still_too_large.stdout.count("not replayed: MSG_SIZE_TOO_LARGE") == 4
    after = json.loads(sidecar_cli("dlq", "list", "--config", small_yaml, "--json").stdout)
    assert {e["state"] for e in after} == {"open"} and len(after) == 4
    assert all(len(e["replay_errors"]) == 1 and "MSG_SIZE_TOO_LARGE" in e["replay_errors"][0] for e in after)

    # the limit raised (the default): one replayed, one resolved by hand
    raised_yaml = write_config(tmp_path / "raised.yaml",
                               usage_config(backend.address, kafka_bootstrap, spool, topic))
    replayed, resolved = event_of[request_ids[0]], event_of[request_ids[1]]
    replay = sidecar_cli("dlq", "replay", replayed, "--config", raised_yaml)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert f"{replayed}: replayed to {topic}" in replay.stdout
    found = records_by_request(kafka_bootstrap, topic, [request_ids[0]], timeout=20)
    assert_exactly_once(found, [request_ids[0]])
    assert found == {request_ids[0]: {replayed}}
    assert len(kafka_consume_all(kafka_bootstrap, topic, timeout=10, idle=1.0)) == 1

    note = "billed by hand, ticket OPS-1234"
    resolve = sidecar_cli("dlq", "resolve", resolved, "--note", note, "--config", raised_yaml)
    assert resolve.returncode == 0 and f"{resolved}: resolved" in resolve.stdout, resolve.stdout + resolve.stderr

    listing = sidecar_cli("dlq", "list", "--config", raised_yaml)
    assert listing.stdout.splitlines()[0] == "2 open dead letters; MSG_SIZE_TOO_LARGE: 2"
    assert replayed not in listing.stdout and resolved not in listing.stdout
    states = {e["event_id"]: e for e in json.loads(
        sidecar_cli("dlq", "list", "--all", "--json", "--config", raised_yaml).stdout)}
    assert len(states) == 4
    assert states[replayed]["state"] == "replayed" and states[replayed]["closed_at"]
    assert (states[resolved]["state"], states[resolved]["note"]) == ("resolved", note)
    assert [states[event_of[r]]["state"] for r in request_ids[2:]] == ["open", "open"]
    assert metric(sidecar, "api_router_usage_dlq_records") == 2  # the running sidecar sees the store

    unknown = sidecar_cli("dlq", "replay", "no-such-event", "--config", raised_yaml)
    assert unknown.returncode == 1 and "no open dead letter with event id no-such-event" in unknown.stdout
    again = sidecar_cli("dlq", "replay", replayed, "--config", raised_yaml)
    assert again.returncode == 1  # already replayed: not open any more
    resolved_again = sidecar_cli("dlq", "resolve", resolved, "--note", "twice", "--config", raised_yaml)
    assert resolved_again.returncode == 1 and "no open dead letter" in resolved_again.stdout
    neither = sidecar_cli("dlq", "replay", "--config", raised_yaml)
    assert neither.returncode == 2 and "--all" in neither.stderr
    assert len(kafka_consume_all(kafka_bootstrap, topic, timeout=10, idle=1.0)) == 1
    assert_invariants(sidecar, spool_dir=spool)


# --- 3. `sidecar spool status|replay` ----------------------------------------------------------


def test_spool_replay_sends_a_stopped_sidecars_records_once_kafka_is_up(
        launch: Launcher, backend: BackendProc, tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    topic = unique("usage-spool-replay")
    spool = tmp_path / "spool"
    config = usage_config(backend.address, bootstrap, spool, topic, kafka={"delivery_timeout_ms": 1000})
    config_yaml = write_config(tmp_path / "replay.yaml", config)
    sidecar = launch.sidecar(config)
    request_ids = [unique(f"spooled-{i}") for i in range(25)]
    for request_id in request_ids:
        call(sidecar, request_id)
    assert sidecar.proc.stop() == 0

    def status() -> dict[str, Any]:
        result = sidecar_cli("spool", "status", "--config", config_yaml, "--json")
        assert result.returncode == 0, result.stderr
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    before = status()
    assert (before["unsettled"], before["owner_pid"], before["dlq_open"]) == (25, None, 0)
    assert before["segments"] and all(not s["problem"] for s in before["segments"])

    down = sidecar_cli("spool", "replay", "--config", config_yaml, "--timeout", "3")
    assert down.returncode == 1, down.stdout + down.stderr
    assert "0 of 25 acknowledged; 25 still in the spool (Kafka: unreachable)" in down.stdout
    assert status()["unsettled"] == 25

    broker, _ = start_tansu(tmp_path / "tansu", port=port)
    try:
        replay = sidecar_cli("spool", "replay", "--config", config_yaml, "--timeout", "30")
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert "all 25 acknowledged by Kafka" in replay.stdout
        found = records_by_request(bootstrap, topic, request_ids, timeout=20)
        assert_exactly_once(found, request_ids)
        assert set(found) == set(request_ids)
    finally:
        stop_broker(broker)
    after = status()
    assert (after["unsettled"], after["records"], after["segments"]) == (0, 0, [])
    assert not list(spool.glob("*.seg"))


# --- 4 and 5. a full spool ---------------------------------------------------------------------


def test_a_full_spool_refuses_calls_until_kafka_drains_it(
        launch: Launcher, backend: BackendProc, tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    topic = unique("usage-full-reject")
    sidecar = launch.sidecar(usage_config(backend.address, bootstrap, tmp_path / "spool", topic,
                                          kafka={"delivery_timeout_ms": 1000},
                                          max_spool_bytes=MAX_SPOOL, on_spool_full="reject"))
    served: list[str] = []
    refused: list[str] = []
    with grpc.insecure_channel(sidecar.listen) as channel:
        infer: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(INFER)
        for i in range(3000):
            request_id = unique(f"fill-{i}")
            error = try_call(infer, request_id)
            if error is not None:
                detail = error_detail(error)
                assert (detail.code, detail.reason) == (grpc.StatusCode.UNAVAILABLE, "SERVICE_UNAVAILABLE")
                refused.append(request_id)
                break
            served.append(request_id)
        assert refused, "the spool never filled up"
        assert 100 < len(served) < 1000, len(served)

        status, body = sidecar.readyz()
        assert status == 503 and body["status"] == "not_ready"
        assert body["components"]["usage"]["spool"]["status"] == "failing"
        assert body["components"]["usage"]["spool"]["bytes"] >= MAX_SPOOL
        wait_until(lambda: health_status(sidecar.listen) == "NOT_SERVING", 5, what="readiness NOT_SERVING")
        for i in range(3):  # still full: still refused
            request_id = unique(f"refused-{i}")
            error = try_call(infer, request_id)
            assert error is not None and error_detail(error).reason == "SERVICE_UNAVAILABLE"
            refused.append(request_id)
        assert metric(sidecar, "api_router_usage_records_dropped_total", reason="refused_call") == len(refused)

        broker, _ = start_tansu(tmp_path / "tansu", port=port)
        try:
            wait_until(lambda: health_status(sidecar.listen) == "SERVING", 60, what="readiness SERVING again")
            assert sidecar.readyz()[0] == 200
            after = [unique(f"after-{i}") for i in range(5)]
            for request_id in after:
                assert try_call(infer, request_id) is None
            served += after
            found = records_by_request(bootstrap, topic, served)
            assert_exactly_once(found, served)
            assert not set(found) & set(refused), "a refused call is not billable: it has no record"
            assert set(found) == set(served)
            wait_until(lambda: usage_component(sidecar)["spool"]["records"] == 0, 30, what="spool drained")
            assert_invariants(sidecar, spool_dir=tmp_path / "spool")
        finally:
            stop_broker(broker)


def test_drop_oldest_keeps_serving_and_loses_only_the_oldest_records(
        launch: Launcher, backend: BackendProc, tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    topic = unique("usage-full-drop")
    delivery_timeout = 1.0
    sidecar = launch.sidecar(usage_config(backend.address, bootstrap, tmp_path / "spool", topic,
                                          kafka={"delivery_timeout_ms": int(delivery_timeout * 1000)},
                                          max_spool_bytes=MAX_SPOOL, on_spool_full="drop_oldest"))
    request_ids = [unique(f"drop-{i}") for i in range(800)]
    largest = 0
    with grpc.insecure_channel(sidecar.listen) as channel:
        infer: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(INFER)
        for i, request_id in enumerate(request_ids):
            assert try_call(infer, request_id) is None, f"call {i} failed"
            if i % 25 == 0:
                largest = max(largest, usage_component(sidecar)["spool"]["bytes"])
    # the last calls' records are spooled with the writer's next batch
    wait_until(lambda: usage_component(sidecar)["queued"] == 0, 5, what="every record spooled")
    spool = usage_component(sidecar)["spool"]
    largest = max(largest, spool["bytes"])
    assert largest <= MAX_SPOOL + SEGMENT_HEADER_BYTES, largest
    assert spool["status"] == "ok" and sidecar.readyz()[0] == 200
    dropped = int(metric(sidecar, "api_router_usage_records_dropped_total", reason="spool_full"))
    assert 0 < dropped < len(request_ids)
    assert spool["records"] == len(request_ids) - dropped
    assert metric(sidecar, "api_router_usage_records_dropped_total", reason="refused_call") == 0

    # what the producer still held has timed out back into the spool before Kafka comes
    wait_until(lambda: usage_component(sidecar)["in_flight"] == 0, 10, what="no record in the producer")
    broker, _ = start_tansu(tmp_path / "tansu", port=port)
    try:
        kept = request_ids[dropped:]  # whole oldest segments were dropped: the newest records remain
        found = records_by_request(bootstrap, topic, kept)
        assert_exactly_once(found, kept)
        assert set(found) == set(kept), f"{len(set(found) - set(kept))} dropped records reached Kafka"
        assert len(found) == len(request_ids) - int(
            metric(sidecar, "api_router_usage_records_dropped_total", reason="spool_full"))
        wait_until(lambda: usage_component(sidecar)["spool"]["records"] == 0, 30, what="spool drained")
        assert_invariants(sidecar, spool_dir=tmp_path / "spool")
    finally:
        stop_broker(broker)



# --- 6. the order: in the segment file first, then Kafka ----------------------------------------

ORDER = """
import asyncio, resource, signal, sys, time
from pathlib import Path
from sidecar.usage.record import Usage
from sidecar.config import UsageConfig
from sidecar.usage.dlq import DeadLetters
from sidecar.usage.kafka_sink import KafkaSink
from sidecar.usage.spool import open_spool

async def until(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)

async def main() -> None:
    directory, bootstrap, topic = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    config = UsageConfig.model_validate({"sink": "kafka", "spool_dir": str(directory), "durability": sys.argv[4],
                                         "kafka": {"bootstrap_servers": bootstrap, "topic": topic}})
    spool = open_spool(directory, durability=config.durability)
    sink = KafkaSink(config, spool, DeadLetters(directory / "dlq"))
    await sink.start()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, hard))  # a segment's header fits, no record does
    for i in range(5):
        sink.submit(Usage(event_id=f"{topic}-{i}", request_id=f"{topic}-{i}", org="acme"))
    await until(lambda: spool.write_error, 30)
    component = sink.component()
    print("unwritable", component["in_flight"], spool.unsettled(), spool.waiting(), flush=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
    await until(lambda: spool.unsettled() == 0, 60)
    print("delivered", flush=True)
    await sink.aclose()

asyncio.run(main())
"""


@pytest.mark.parametrize("durability", ["interval", "strict"])
def test_a_record_reaches_kafka_only_after_it_is_in_the_segment_file(
        kafka_bootstrap: str, tmp_path: Path, durability: str) -> None:
    """The spool's promise, on disk before Kafka is trusted: while the segment file cannot take
    a record (the file size limit stands in for a full disk), the producer is not given it, so
    Kafka cannot have a record the spool would lose in a crash; once it is written, it goes."""
    topic = unique(f"usage-order-{durability}")
    result = subprocess.run([sys.executable, "-c", ORDER, str(tmp_path / "spool"), kafka_bootstrap, topic,
                             durability], capture_output=True, text=True, timeout=120, check=False,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "unwritable 0 5 0", lines  # none in the producer, all in the spool, none acknowledged
    assert lines[1] == "delivered"
    request_ids = [f"{topic}-{i}" for i in range(5)]
    assert_exactly_once(records_by_request(kafka_bootstrap, topic, request_ids, timeout=30), request_ids)
