"""Soak: steady mixed load with every feature on, and the sidecar's memory must level off.

One `sidecar run` with Redis limits, budgets and audit (real Valkey), usage records to Kafka
through the spool (real Tansu), traces to an OTLP receiver, two weighted backends with retries,
access log on; beside it unary and streamed callers, a caller that is rate limited, and one that
asks for an unknown model. The sidecar's RSS is sampled every few seconds. After a warm-up
(allocators, caches, connection pools and metric children reach their working size) it may
grow by `GROWTH_BOUND_MB` at most over the measured window: a per-call leak of even a few
hundred bytes at these rates crosses it. The curve is printed (run with `-s` to see it) and is
part of the failure message.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from tests.conftest import Launcher
from tests.harness.invariants import assert_idle
from tests.harness.load import Load
from tests.harness.otlp import OtlpReceiver
from tests.harness.sidecar import BackendProc, sidecar_config

pytestmark = pytest.mark.slow

WARM_UP_SECONDS = 30.0
MEASURED_SECONDS = 90.0
SAMPLE_SECONDS = 5.0
GROWTH_BOUND_MB = 12.0
KEY, LIMITED = "sk-soak", "sk-soak-limited"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def soak_config(a: str, b: str, redis_url: str, kafka: str, otlp: str, spool: Path) -> str:
    digest = {key: hashlib.sha256(key.encode()).hexdigest() for key in (KEY, LIMITED)}
    return sidecar_config(f"""
        chat:
          backends:
            - {{name: a, address: "{a}", weight: 3}}
            - {{name: b, address: "{b}", weight: 1}}
        """) + f"""auth:
  api_keys:
    - {{id: app, sha256: "{digest[KEY]}", org: soak}}
    - {{id: limited, sha256: "{digest[LIMITED]}", org: soak-limited}}
limits:
  store: redis
  redis_url: {redis_url}
  redis_timeout_ms: 2000
  orgs:
    soak: {{requests_per_minute: 1000000, tokens_per_minute: 100000000}}
    soak-limited: {{requests_per_minute: 60}}
budgets:
  orgs:
    soak: {{tokens_per_day: 1000000000}}
audit: {{store: redis}}
retries: {{retry_on: [UNAVAILABLE]}}
usage:
  sink: kafka
  kafka: {{bootstrap_servers: "{kafka}", topic: soak-usage}}
  spool_dir: {spool}
telemetry:
  otlp_endpoint: {otlp}
  sample_ratio: 0.25
  log_format: json
  access_log: true
"""


def test_memory_levels_off_under_steady_mixed_load(launch: Launcher, backend: BackendProc, redis_url: str,
                                                   kafka_bootstrap: str, tmp_path: Path) -> None:
    other = launch.backend()
    receiver = OtlpReceiver().start()
    sidecar = launch.sidecar(soak_config(backend.address, other.address, redis_url, kafka_bootstrap,
                                         receiver.endpoint, tmp_path / "spool"))
    app, limited = (("x-api-key", KEY),), (("x-api-key", LIMITED),)
    loads = [
        Load(sidecar.listen, app),
        Load(sidecar.listen, app, stream=True),
        Load(sidecar.listen, limited, pause=0.01),
        Load(sidecar.listen, app, pause=0.05, request=InferRequest(model="nope", input="hi").SerializeToString()),
    ]
    pid = sidecar.proc.pid
    curve: list[tuple[float, float]] = []
    started = time.monotonic()
    try:
        for load in loads:
            load.start()
        while (elapsed := time.monotonic() - started) < WARM_UP_SECONDS + MEASURED_SECONDS:
            curve.append((round(elapsed), round(rss_mb(pid), 1)))
            time.sleep(SAMPLE_SECONDS)
    finally:
        for load in loads:
            load.finish()
        receiver.stop()
    shown = ", ".join(f"{t:.0f}s {mb} MB" for t, mb in curve)
    print(f"\nsoak RSS curve: {shown}")
    calls = {name: load.total() for name, load in zip(("unary", "stream", "limited", "unknown"), loads, strict=True)}
    print(f"soak calls: {calls}")
    assert calls["unary"]["OK"] > 1000 and calls["stream"]["OK"] > 500, calls
    assert set(calls["unary"]) == {"OK"} and set(calls["stream"]) == {"OK"}, calls
    assert calls["limited"]["RATE_LIMIT_EXCEEDED"] > 100 and calls["unknown"]["NOT_FOUND"] > 100, calls
    measured = [mb for t, mb in curve if t >= WARM_UP_SECONDS]
    assert max(measured) - measured[0] <= GROWTH_BOUND_MB, f"RSS grew after warm-up: {shown}"
    assert_idle(sidecar)
