"""Proves the real-process harness works: Valkey, Tansu, and ManagedProcess stop/freeze semantics.

If these fail, every integration test built on the fixtures is suspect, so they
stay small and fast (the whole file runs in a few seconds).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from confluent_kafka import KafkaError, Message, Producer

from tests.harness.procs import ManagedProcess, free_port, live_processes, wait_for_port, wait_until
from tests.harness.servers import TansuBroker, kafka_config, kafka_consume_all, kafka_create_topic

SIGTERM_IGNORER = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def _unique(prefix: str) -> str:
    """A name no other test (or earlier run against an external server) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _pid_gone(pid: int) -> bool:
    """True when no process (not even a zombie) has ``pid``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- Valkey -------------------------------------------------------------------------


async def test_valkey_set_get_and_eval(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        key = _unique("harness")
        assert await client.set(key, "hello")
        assert await client.get(key) == b"hello"
        script = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
        counter = _unique("harness-counter")
        assert await client.eval(script, 1, counter, 5) == 5
        assert await client.eval(script, 1, counter, 2) == 7
    finally:
        await client.aclose()


# --- Tansu --------------------------------------------------------------------------


def test_tansu_idempotent_produce_then_consume_exactly(kafka_bootstrap: str) -> None:
    topic = _unique("harness")
    kafka_create_topic(kafka_bootstrap, topic, partitions=1)
    producer = Producer(kafka_config(kafka_bootstrap, **{"enable.idempotence": True, "acks": "all"}))
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    sent = [f"v{i}".encode() for i in range(100)]
    for i, value in enumerate(sent):
        producer.produce(topic, key=str(i).encode(), value=value, on_delivery=on_delivery)
    assert producer.flush(10) == 0
    assert errors == []

    records = kafka_consume_all(kafka_bootstrap, topic, timeout=10, expected=100, grace=0.5)
    assert [r.value for r in records] == sent  # one partition: exact order, no duplicates
    assert [r.offset for r in records] == list(range(100))


def _produce_one(bootstrap: str, topic: str, value: bytes, timeout_ms: int) -> KafkaError | None:
    """Produce one message with a fresh producer; return its delivery error (None = delivered)."""
    producer = Producer(kafka_config(bootstrap, **{"acks": "all", "message.timeout.ms": timeout_ms}))
    outcome: list[KafkaError | None] = []
    producer.produce(topic, value=value, on_delivery=lambda err, _msg: outcome.append(err))
    producer.flush(timeout_ms / 1000 + 3)
    assert len(outcome) == 1, "no delivery report"
    return outcome[0]


def test_tansu_freeze_and_thaw(fresh_tansu: TansuBroker) -> None:
    topic = _unique("frozen")
    kafka_create_topic(fresh_tansu.bootstrap, topic)

    fresh_tansu.proc.signal(signal.SIGSTOP)
    assert fresh_tansu.proc.frozen()
    err = _produce_one(fresh_tansu.bootstrap, topic, b"while-frozen", timeout_ms=1000)
    assert err is not None and err.code() == KafkaError._MSG_TIMED_OUT

    fresh_tansu.proc.signal(signal.SIGCONT)
    assert not fresh_tansu.proc.frozen()
    assert _produce_one(fresh_tansu.bootstrap, topic, b"after-thaw", timeout_ms=5000) is None

    records = kafka_consume_all(fresh_tansu.bootstrap, topic, timeout=5, expected=1, grace=0.3)
    assert [r.value for r in records] == [b"after-thaw"]


def test_fresh_tansu_restart_comes_back_empty(fresh_tansu: TansuBroker) -> None:
    topic = _unique("restart")
    kafka_create_topic(fresh_tansu.bootstrap, topic)
    assert _produce_one(fresh_tansu.bootstrap, topic, b"lost", timeout_ms=5000) is None
    old_pid = fresh_tansu.proc.pid

    fresh_tansu.restart()

    assert fresh_tansu.proc.pid != old_pid and _pid_gone(old_pid)
    assert kafka_consume_all(fresh_tansu.bootstrap, topic, timeout=3, idle=0.5) == []


# --- ManagedProcess -----------------------------------------------------------------


def test_stop_escalates_to_sigkill_when_sigterm_ignored(tmp_path: Path) -> None:
    proc = ManagedProcess([sys.executable, "-c", SIGTERM_IGNORER], tmp_path / "ignorer.log")
    wait_until(lambda: "ready" in proc.log_text(), 10, what="ignorer ready", proc=proc)
    pid = proc.pid

    started = time.monotonic()
    code = proc.stop(timeout=0.5)
    elapsed = time.monotonic() - started

    assert code == -signal.SIGKILL
    assert 0.5 <= elapsed < 2.0
    assert _pid_gone(pid)
    assert proc not in live_processes()
    assert "exited(-9)" in repr(proc)


def test_stop_thaws_a_frozen_process_so_sigterm_lands(tmp_path: Path) -> None:
    proc = ManagedProcess(["sleep", "60"], tmp_path / "sleep.log")
    proc.signal(signal.SIGSTOP)
    assert proc.frozen() and "frozen" in repr(proc)

    started = time.monotonic()
    assert proc.stop(timeout=3) == -signal.SIGTERM
    assert time.monotonic() - started < 1.0


def test_context_manager_stops_and_log_json_is_parsed(tmp_path: Path) -> None:
    script = (
        "import json, time\n"
        "print(json.dumps({'event': 'start', 'n': 1}))\n"
        "print('plain text line')\n"
        "print('[1, 2]')\n"
        "print(json.dumps({'event': 'ready'}), flush=True)\n"
        "time.sleep(60)\n"
    )
    with ManagedProcess([sys.executable, "-c", script], tmp_path / "json.log") as proc:
        wait_until(lambda: len(proc.log_lines_json()) == 2, 10, what="two JSON lines", proc=proc)
        assert proc.alive() and "running" in repr(proc)
        pid = proc.pid
    assert proc.log_lines_json() == [{"event": "start", "n": 1}, {"event": "ready"}]
    assert proc.returncode == -signal.SIGTERM
    assert _pid_gone(pid)


def test_wait_for_port_reports_log_of_dead_process(tmp_path: Path) -> None:
    script = "import sys; print('boom: cannot bind', flush=True); sys.exit(3)"
    proc = ManagedProcess([sys.executable, "-c", script], tmp_path / "dies.log")
    try:
        with pytest.raises(TimeoutError, match="boom: cannot bind"):
            wait_for_port("127.0.0.1", free_port(), timeout=10, proc=proc)
        assert proc.wait(5) == 3
    finally:
        proc.stop()
