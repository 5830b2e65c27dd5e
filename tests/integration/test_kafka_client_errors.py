"""A Kafka client error that repeats (issue 15, finding 8): librdkafka retries every 50-500 ms
and reports the same error each time. Against a real `sidecar run` and a real Tansu broker: a
SASL client on a broker without SASL, and a bootstrap port where nothing listens (then a broker
starts there) each log their error once, then at most one summary per minute with the count
of repeats; the recovery logs once, with the repeats never reported."""
from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from tests.chaos.test_usage_delivery import usage_config
from tests.conftest import Launcher
from tests.harness.procs import free_port, wait_until
from tests.harness.servers import TANSU_STOP_TIMEOUT, start_tansu
from tests.harness.sidecar import BackendProc, SidecarProc

CLIENT_LOGGER = "sidecar.usage.librdkafka"
SASL = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.username": "u", "sasl.password": "p"}
WINDOW_SECONDS = 5.0


def client_lines(sidecar: SidecarProc, text: str) -> list[dict[str, Any]]:
    return [line for line in sidecar.log_json() if line.get("logger") == CLIENT_LOGGER and text in str(line["msg"])]


def lines_in_a_window(sidecar: SidecarProc, text: str) -> list[dict[str, Any]]:
    """The client's lines with `text`: waits for the first, then `WINDOW_SECONDS` of repeats."""
    wait_until(lambda: client_lines(sidecar, text), 30, what=f"a {text!r} line", proc=sidecar.proc)
    time.sleep(WINDOW_SECONDS)
    return client_lines(sidecar, text)


def test_a_sasl_failure_logs_once_not_every_retry(launch: Launcher, backend: BackendProc, kafka_bootstrap: str,
                                                  tmp_path: Path) -> None:
    properties = "{" + ", ".join(f"{k}: {v}" for k, v in SASL.items()) + "}"
    sidecar = launch.sidecar(usage_config(backend.address, kafka_bootstrap, tmp_path / "spool",
                                          f"usage-sasl-{uuid.uuid4().hex[:8]}", kafka={"properties": properties}))
    lines = lines_in_a_window(sidecar, "SASL")
    # unthrottled: one line per retry, more than a dozen in 5 s
    assert len(lines) <= 2, [line["msg"] for line in lines]
    assert lines[0]["level"] == "error" and "repeats" not in lines[0]


def test_refused_connections_log_once_and_the_recovery_once_with_the_count(
        launch: Launcher, backend: BackendProc, tmp_path: Path) -> None:
    port = free_port()
    sidecar = launch.sidecar(usage_config(backend.address, f"127.0.0.1:{port}", tmp_path / "spool",
                                          f"usage-refused-{uuid.uuid4().hex[:8]}"))
    lines = lines_in_a_window(sidecar, "Connection refused")
    assert len(lines) <= 2, [line["msg"] for line in lines]
    broker, _ = start_tansu(tmp_path / "tansu", port=port)
    try:
        def reachable() -> list[dict[str, Any]]:
            return [line for line in sidecar.log_json() if line.get("msg") == "kafka reachable"]
        wait_until(reachable, 60, what="kafka reachable", proc=sidecar.proc)
        time.sleep(1.0)
        recovered = reachable()
        assert len(recovered) == 1, recovered
        assert recovered[0]["client_errors_not_logged"] >= 1, recovered[0]
    finally:
        broker.stop(timeout=TANSU_STOP_TIMEOUT)


def test_the_summary_carries_the_count_of_repeats(kafka_bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    """The sidecar's client log on a real producer that keeps failing SASL, with a 1 s interval
    instead of the minute: the first line, then one summary a second with its count."""
    from sidecar.usage.kafka_sink import ClientLog

    client_log = ClientLog(logging.getLogger("tests.librdkafka"), interval=1.0)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "logger": client_log, "log_level": 4,
                         "reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 50, **SASL})
    with caplog.at_level(logging.INFO, "tests.librdkafka"):
        producer.produce(f"usage-sasl-{uuid.uuid4().hex[:8]}", b"x")
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            producer.poll(0.05)
    producer.purge()
    producer.flush(0)
    records = [r for r in caplog.records if r.name == "tests.librdkafka" and "SASL" in r.getMessage()]
    assert 2 <= len(records) <= 5, [r.getMessage() for r in records]
    assert getattr(records[0], "repeats", None) is None
    counts = [getattr(r, "repeats", 0) for r in records[1:]]
    assert all(count >= 2 for count in counts), counts
