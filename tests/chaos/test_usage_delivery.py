"""Usage records are never lost, on real Tansu brokers: Kafka down at start, frozen under load,
killed and restarted empty; the sidecar itself killed with -9 under strict durability; a torn
spool tail. Records are counted with a real consumer and deduped on event_id: every call that
got an answer must have exactly one distinct record (a record may arrive twice, with the same
event_id: delivery is at-least-once)."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sidecar_client.inference.v1.inference_pb2 import InferRequest
from sidecar_client.sidecar.usage.v1.usage_pb2 import UsageRecord

from tests.conftest import Launcher
from tests.harness.invariants import assert_invariants
from tests.harness.load import INFER, Load
from tests.harness.procs import free_port, wait_until
from tests.harness.servers import TansuBroker, kafka_consume_all, start_tansu
from tests.harness.sidecar import SIDECAR, BackendProc, SidecarProc, one_model

pytestmark = pytest.mark.slow

KEY = "sk-usage-chaos"
METADATA = (("x-api-key", KEY),)


def usage_config(backend: str, bootstrap: str, spool: Path, topic: str, *,
                 kafka: dict[str, Any] | None = None, **usage: Any) -> str:
    kafka_keys = {"bootstrap_servers": f'"{bootstrap}"', "topic": topic, "replay_backoff_ms": 200, **(kafka or {})}
    lines = [f"  {key}: {value}" for key, value in usage.items()]
    return one_model(backend) + f"""auth:
  api_keys:
    - {{id: app, sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", org: acme}}
usage:
  sink: kafka
  spool_dir: {spool}
  kafka: {{{", ".join(f"{k}: {v}" for k, v in kafka_keys.items())}}}
""" + "".join(line + "\n" for line in lines)


def call(sidecar: SidecarProc, request_id: str) -> None:
    request = InferRequest(model="chat", input="hello").SerializeToString()
    with grpc.insecure_channel(sidecar.listen) as channel:
        channel.unary_unary(INFER)(request, metadata=(*METADATA, ("x-request-id", request_id)), timeout=10)


def records_by_request(bootstrap: str, topic: str, request_ids: list[str], timeout: float = 60.0) -> dict[str, set[str]]:
    """request id -> the distinct event ids of its records in `topic`; polls until every
    request id has one or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, set[str]] = {}
        for message in kafka_consume_all(bootstrap, topic, timeout=15, idle=1.0):
            assert message.value is not None
            record = UsageRecord.FromString(message.value)
            assert message.key == record.org.encode()
            found.setdefault(record.request_id, set()).add(record.event_id)
        if set(request_ids) <= found.keys() or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


def assert_exactly_once(found: dict[str, set[str]], request_ids: list[str]) -> None:
    missing = [r for r in request_ids if r not in found]
    assert not missing, f"{len(missing)} of {len(request_ids)} answered calls have no usage record: {missing[:5]}"
    doubled = {r: ids for r, ids in found.items() if len(ids) != 1}
    assert not doubled, f"calls with more than one distinct event_id: {list(doubled.items())[:3]}"


def usage_component(sidecar: SidecarProc) -> dict[str, Any]:
    component: dict[str, Any] = sidecar.readyz()[1]["components"]["usage"]
    return component


def metric(sidecar: SidecarProc, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{sidecar.ops_url}/metrics", timeout=2) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def test_records_made_while_kafka_is_down_at_start_arrive_when_it_starts(
        launch: Launcher, backend: BackendProc, tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    topic = "usage-down-at-start"
    # a short delivery timeout: the records go back to the spool and are replayed from disk
    sidecar = launch.sidecar(usage_config(backend.address, bootstrap, tmp_path / "spool", topic,
                                          kafka={"delivery_timeout_ms": 1500}))
    request_ids = [f"down-at-start-{i}" for i in range(40)]
    for request_id in request_ids:
        call(sidecar, request_id)
    wait_until(lambda: usage_component(sidecar)["queued"] == 0, 5, what="every record spooled")
    component = usage_component(sidecar)
    assert component["kafka"] == "down" and component["status"] == "degraded"
    assert component["spool"]["records"] == len(request_ids)
    wait_until(lambda: metric(sidecar, "api_router_usage_producer_rebuilds_total", cause="timeout") >= 1, 15,
               what="records timed out back into the spool")

    broker, _ = start_tansu(tmp_path, port=port)
    try:
        found = records_by_request(bootstrap, topic, request_ids)
        assert_exactly_once(found, request_ids)
        assert set(found) == set(request_ids)
        wait_until(lambda: usage_component(sidecar)["spool"]["records"] == 0, 20, what="spool settled")
        assert metric(sidecar, "api_router_buffer_store_retries_total") >= len(request_ids)
        assert usage_component(sidecar)["kafka"] == "up"
        assert_invariants(sidecar, spool_dir=tmp_path / "spool")
    finally:
        broker.stop()


def test_kafka_frozen_under_steady_load_loses_nothing_and_fails_no_caller(
        launch: Launcher, backend: BackendProc, fresh_tansu: TansuBroker, tmp_path: Path) -> None:
    topic = "usage-frozen"
    sidecar = launch.sidecar(usage_config(backend.address, fresh_tansu.bootstrap, tmp_path / "spool", topic))
    load = Load(sidecar.listen, METADATA, pause=0.005).start()
    try:
        time.sleep(2)
        load.phase = "frozen"
        fresh_tansu.proc.signal(signal.SIGSTOP)
        time.sleep(10)
        assert usage_component(sidecar)["spool"]["records"] > 0  # waiting for the broker
        fresh_tansu.proc.signal(signal.SIGCONT)
        load.phase = "after"
        time.sleep(2)
    finally:
        fresh_tansu.proc.signal(signal.SIGCONT)
        load.finish()
    assert set(load.total()) == {"OK"}, load.outcomes
    assert load.outcomes["frozen"]["OK"] > 100
    answered = load.all_answered()
    assert_exactly_once(records_by_request(fresh_tansu.bootstrap, topic, answered), answered)
    wait_until(lambda: usage_component(sidecar)["spool"]["records"] == 0, 30, what="spool settled")
    assert_invariants(sidecar, spool_dir=tmp_path / "spool")


def test_readiness_says_kafka_is_down_while_the_broker_is_frozen(
        launch: Launcher, backend: BackendProc, fresh_tansu: TansuBroker, tmp_path: Path) -> None:
    """A frozen broker keeps its TCP connections open, so librdkafka still calls it UP: records in
    flight that get no delivery report for a few seconds must turn Kafka `down` (and the usage
    component `degraded`) all the same, and acknowledgements flowing again turn it `up`."""
    topic = "usage-frozen-readiness"
    sidecar = launch.sidecar(usage_config(backend.address, fresh_tansu.bootstrap, tmp_path / "spool", topic))
    load = Load(sidecar.listen, METADATA, pause=0.01).start()
    try:
        wait_until(lambda: usage_component(sidecar)["kafka"] == "up", 30, what="kafka up")
        fresh_tansu.proc.signal(signal.SIGSTOP)
        load.phase = "frozen"
        frozen = wait_until(lambda: (c := usage_component(sidecar))["kafka"] == "down" and c, 30,
                            what="readiness to report the frozen broker")
        assert isinstance(frozen, dict) and frozen["status"] == "degraded", frozen
        assert metric(sidecar, "api_router_usage_kafka_up") == 0
        assert fresh_tansu.proc.frozen()  # still frozen: not a timeout that ended the freeze
        fresh_tansu.proc.signal(signal.SIGCONT)
        load.phase = "after"
        wait_until(lambda: usage_component(sidecar)["kafka"] == "up", 60, what="kafka up again")
        assert metric(sidecar, "api_router_usage_kafka_up") == 1
    finally:
        fresh_tansu.proc.signal(signal.SIGCONT)
        load.finish()
    assert set(load.total()) == {"OK"}, load.outcomes
    answered = load.all_answered()
    assert_exactly_once(records_by_request(fresh_tansu.bootstrap, topic, answered), answered)
    wait_until(lambda: usage_component(sidecar)["status"] == "ok", 30, what="usage ok again")
    assert_invariants(sidecar, spool_dir=tmp_path / "spool")


def test_kafka_killed_and_restarted_empty_gets_every_unacknowledged_record(
        launch: Launcher, backend: BackendProc, fresh_tansu: TansuBroker, tmp_path: Path) -> None:
    topic = "usage-restarted"
    # the default 30 s delivery timeout: recovery must come from detecting the stuck producer
    sidecar = launch.sidecar(usage_config(backend.address, fresh_tansu.bootstrap, tmp_path / "spool", topic))
    load = Load(sidecar.listen, METADATA, pause=0.005).start()
    try:
        time.sleep(2)
        load.phase = "unacknowledged"  # frozen: nothing of this phase can be acknowledged
        fresh_tansu.proc.signal(signal.SIGSTOP)
        time.sleep(3)
        fresh_tansu.restart()  # killed while frozen; back on the same port, empty
        load.phase = "after"
        time.sleep(4)
    finally:
        load.finish()
    assert set(load.total()) == {"OK"}, load.outcomes
    lost_with_the_broker = set(load.answered["before"])  # acknowledged by the broker that was killed
    expected = load.answered["unacknowledged"] + load.answered["after"]
    found = records_by_request(fresh_tansu.bootstrap, topic, expected)
    assert_exactly_once(found, expected)
    assert set(found) - set(expected) <= lost_with_the_broker
    rebuilds = sum(metric(sidecar, "api_router_usage_producer_rebuilds_total", cause=c) for c in ("stuck", "fatal"))
    assert rebuilds >= 1
    assert any(line.get("msg") == "kafka producer replaced" for line in sidecar.log_json())
    wait_until(lambda: usage_component(sidecar)["spool"]["records"] == 0, 30, what="spool settled")
    assert_invariants(sidecar, spool_dir=tmp_path / "spool")


def test_strict_durability_keeps_every_answered_record_through_kill_9(
        launch: Launcher, backend: BackendProc, fresh_tansu: TansuBroker, tmp_path: Path) -> None:
    topic = "usage-strict"
    config = usage_config(backend.address, fresh_tansu.bootstrap, tmp_path / "spool", topic, durability="strict")
    sidecar = launch.sidecar(config)
    load = Load(sidecar.listen, METADATA).start()
    try:
        time.sleep(1)
        load.phase = "frozen"  # Kafka acknowledges nothing now: the spool alone has these records
        fresh_tansu.proc.signal(signal.SIGSTOP)
        time.sleep(2)
        sidecar.proc.kill()
        load.phase = "dead"
        time.sleep(0.5)
    finally:
        load.finish()
        fresh_tansu.proc.signal(signal.SIGCONT)
    assert load.outcomes["frozen"]["OK"] > 50
    answered = load.all_answered()

    restarted = launch.sidecar(config)
    found = records_by_request(fresh_tansu.bootstrap, topic, answered)
    assert_exactly_once(found, answered)
    assert metric(restarted, "api_router_buffer_store_retries_total") > 0  # they came from the spool
    wait_until(lambda: usage_component(restarted)["spool"]["records"] == 0, 30, what="spool settled")
    assert_invariants(restarted, spool_dir=tmp_path / "spool")


def test_a_torn_spool_tail_is_truncated_at_start_and_reported(
        launch: Launcher, backend: BackendProc, tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    topic = "usage-torn"
    spool = tmp_path / "spool"
    config = usage_config(backend.address, bootstrap, spool, topic, kafka={"delivery_timeout_ms": 1000})
    first = launch.sidecar(config)
    request_ids = [f"torn-{i}" for i in range(10)]
    for request_id in request_ids:
        call(first, request_id)
    first.proc.stop()  # Kafka never came: the ten records stay in the spool
    segment = max(spool.glob("*.seg"))
    with open(segment, "r+b") as out:  # a crash in the middle of the last record's write
        out.truncate(segment.stat().st_size - 5)

    config_path = tmp_path / "status.yaml"
    config_path.write_text(config)
    status = subprocess.run([*SIDECAR, "spool", "status", "--config", str(config_path), "--json"],
                            capture_output=True, text=True, timeout=30, check=True)
    report = json.loads(status.stdout)
    assert report["unsettled"] == 9 and report["segments"][-1]["problem"] == "a frame is cut short"

    broker, _ = start_tansu(tmp_path, port=port)
    try:
        second = launch.sidecar(config)
        assert usage_component(second)["spool"]["torn_tails_at_start"] == 1
        assert metric(second, "api_router_buffer_store_torn_tails_total") == 1
        assert any(line.get("msg") == "usage spool: torn tail truncated" for line in second.log_json())
        found = records_by_request(bootstrap, topic, request_ids[:-1])
        assert_exactly_once(found, request_ids[:-1])
        assert request_ids[-1] not in found  # the torn record: cut before it was whole on disk
        wait_until(lambda: usage_component(second)["spool"]["records"] == 0, 30, what="spool settled")
        assert_invariants(second, spool_dir=spool)
    finally:
        broker.stop()


def test_spool_status_runs_beside_a_running_sidecar(launch: Launcher, backend: BackendProc, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    config = usage_config(backend.address, f"127.0.0.1:{free_port()}", spool, "usage-status")
    sidecar = launch.sidecar(config)
    call(sidecar, "status-1")
    config_path = tmp_path / "status.yaml"
    config_path.write_text(config)
    status = subprocess.run([*SIDECAR, "spool", "status", "--config", str(config_path)],
                            capture_output=True, text=True, timeout=30, check=True)
    assert f"in use by pid {sidecar.proc.pid}" in status.stdout
    replay = subprocess.run([*SIDECAR, "spool", "replay", "--config", str(config_path)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert replay.returncode == 1 and "replays it by itself" in replay.stdout


def test_spool_replay_sends_what_a_stopped_sidecar_left_and_waits_until_it_is_settled(
        launch: Launcher, backend: BackendProc, tmp_path: Path) -> None:
    """`sidecar spool replay`: a sidecar stopped while Kafka was down left its records in the
    spool; the command sends them and returns once every one is acknowledged (exit 0)."""
    port = free_port()
    topic = "usage-replayed"
    spool = tmp_path / "spool"
    config = usage_config(backend.address, f"127.0.0.1:{port}", spool, topic)
    sidecar = launch.sidecar(config)
    request_ids = [f"replayed-{i}" for i in range(10)]
    for request_id in request_ids:
        call(sidecar, request_id)
    wait_until(lambda: usage_component(sidecar)["queued"] == 0, 5, what="every record spooled")
    assert sidecar.proc.stop(timeout=30) == 0  # Kafka never came: the records stay in the spool
    config_path = tmp_path / "replay.yaml"
    config_path.write_text(config)
    broker, _ = start_tansu(tmp_path, port=port)
    try:
        replay = subprocess.run([*SIDECAR, "spool", "replay", "--config", str(config_path)],
                                capture_output=True, text=True, timeout=120, check=False)
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert "replaying 10 records" in replay.stdout
        found = records_by_request(f"127.0.0.1:{port}", topic, request_ids)
        assert_exactly_once(found, request_ids)
        status = subprocess.run([*SIDECAR, "spool", "status", "--config", str(config_path)],
                                capture_output=True, text=True, timeout=30, check=True)
        assert "not yet acknowledged: 0" in status.stdout, status.stdout
    finally:
        broker.stop()


def test_kafka_killed_without_warning_under_load_gets_every_later_record(
        launch: Launcher, backend: BackendProc, fresh_tansu: TansuBroker, tmp_path: Path) -> None:
    """A plain kill -9 of the broker: what it acknowledged is gone with it; what it had not
    acknowledged, and everything after, reaches the new broker through a fresh producer."""
    topic = "usage-killed"
    sidecar = launch.sidecar(usage_config(backend.address, fresh_tansu.bootstrap, tmp_path / "spool", topic))
    load = Load(sidecar.listen, METADATA, pause=0.005).start()
    try:
        time.sleep(2)
        fresh_tansu.restart()
        load.phase = "after"
        time.sleep(4)
    finally:
        load.finish()
    assert set(load.total()) == {"OK"}, load.outcomes
    expected = load.answered["after"]
    assert_exactly_once(records_by_request(fresh_tansu.bootstrap, topic, expected), expected)
    causes = {c: metric(sidecar, "api_router_usage_producer_rebuilds_total", cause=c) for c in ("stuck", "fatal")}
    assert sum(causes.values()) >= 1, causes
    wait_until(lambda: usage_component(sidecar)["spool"]["records"] == 0, 30, what="spool settled")
    assert_invariants(sidecar, spool_dir=tmp_path / "spool")
